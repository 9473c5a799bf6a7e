"""The run guard's non-finite check, read before every step or deferred to fused AdamW's device-side skip: both
stop the run without applying the bad update and name the step; the deferred one reads the flag a step later.
And the resume checkpoint's wait between saves."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.demos.boring_classes import BoringModel

from cgc_lightning import guard as guard_module
from cgc_lightning.guard import NonFiniteLossError, ResumeCheckpoint, RunGuard
from cgc_lightning.inject import adapter_parameters
from tests.conftest import tiny_cli
from tests.crash import PoisonAt

QUIET = ["--seesaw.enabled=false", "--grad_conflict.enabled=false", "--gate_usage.enabled=false"]


class AdaptersAfterEachStep(Callback):
    """The adapter tensors after every optimizer step, by step."""

    def __init__(self):
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after[trainer.global_step] = {n: p.detach().clone() for n, p in adapter_parameters(pl_module.model)}


def poisoned_fit(tmp_path, monkeypatch, check_finite: str, poison_at: int, *args: str):
    cli = tiny_cli(
        tmp_path, monkeypatch, *QUIET, "--trainer.max_steps=4", "--trainer.val_check_interval=2",
        "--trainer.log_every_n_steps=1", "--model.adamw=fused", f"--guard.check_finite={check_finite}", *args,
    )  # fmt: skip
    seen = AdaptersAfterEachStep()
    cli.trainer.callbacks += [PoisonAt(poison_at), seen]
    with pytest.raises(NonFiniteLossError) as err:
        cli.trainer.fit(cli.model, cli.datamodule)
    guard = next(c for c in cli.trainer.callbacks if isinstance(c, RunGuard))
    return cli, guard, seen, str(err.value)


@pytest.mark.parametrize("check_finite", ["step", "deferred", "true"])
def test_a_nan_step_is_never_applied_and_the_error_names_it(tmp_path, monkeypatch, check_finite):
    # PoisonAt(1): every step from the 2nd on has a NaN loss (the frozen embedding is inf from then on)
    cli, guard, seen, message = poisoned_fit(tmp_path, monkeypatch, check_finite, 1)
    assert guard.finite_mode == ("step" if check_finite == "step" else "deferred"), "fused AdamW on a CPU: deferred"
    assert "non-finite training loss (nan) at step 2 (epoch 0)" in message and "did not apply it" in message
    good = seen.after[1]
    now = dict(adapter_parameters(cli.model.model))
    assert all(torch.equal(now[n], good[n]) for n in good), "the adapters are those after step 1"
    assert all(torch.isfinite(t).all() for t in now.values())
    (optimizer,) = cli.trainer.optimizers
    steps = {float(s["step"]) for s in optimizer.state.values()}
    assert steps == {1.0}, "AdamW's step count: the skipped step was taken back"
    assert not hasattr(optimizer, "found_inf"), "the flag does not outlive the step"
    if guard.finite_mode == "deferred":  # the host read it one step later: step 3 ran its forward and backward
        assert 2 in seen.after and 3 not in seen.after
    else:
        assert 2 not in seen.after


def test_deferred_check_stops_before_a_checkpoint_of_the_bad_step_is_written(tmp_path, monkeypatch):
    # the last step is the bad one: the resume checkpoint due after it must not be written
    cli, guard, seen, message = poisoned_fit(
        tmp_path,
        monkeypatch,
        "deferred",
        3,
        "--resume_checkpoint.every_n_train_steps=1",
        "--resume_checkpoint.min_interval_s=0",
    )
    assert guard.finite_mode == "deferred" and "at step 4 (epoch 0)" in message
    states = [torch.load(p, map_location="cpu", weights_only=True) for p in (tmp_path / "outputs").rglob("*.ckpt")]
    assert max(s["global_step"] for s in states) == 3, "the newest checkpoint is step 3's, the last good one"
    assert all(torch.isfinite(v).all() for s in states for v in s["state_dict"].values())


def test_deferred_check_without_a_fused_adamw_fails_before_the_first_step(tmp_path, monkeypatch):
    cli = tiny_cli(tmp_path, monkeypatch, *QUIET, "--trainer.max_steps=2", "--guard.check_finite=deferred")
    seen = AdaptersAfterEachStep()
    cli.trainer.callbacks.append(seen)
    with pytest.raises(ValueError, match=r"deferred needs a fused AdamW \(model.adamw: fused"):
        cli.trainer.fit(cli.model, cli.datamodule)
    assert not seen.after, "no step ran"


def test_check_finite_names_its_choices():
    with pytest.raises(ValueError, match="true, false, step or deferred"):
        RunGuard(check_finite="later")


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("poison_at", [1, 3])
def test_deferred_check_on_a_gpu_reads_the_flag_through_pinned_memory(tmp_path, monkeypatch, poison_at):
    # on CUDA the flag reaches the host by a copy that does not wait, and an event read a step later; at 3 the
    # bad step's flag travels in the buffer and event of the flags before it (validation at step 2 in between)
    cli, guard, seen, message = poisoned_fit(
        tmp_path, monkeypatch, "true", poison_at, "--trainer.accelerator=gpu", "--trainer.devices=1",
        "--trainer.precision=bf16-mixed",
    )  # fmt: skip
    bad = poison_at + 1
    assert guard.finite_mode == "deferred" and f"non-finite training loss (nan) at step {bad} (epoch 0)" in message
    good = seen.after[poison_at]
    now = dict(adapter_parameters(cli.model.model))
    assert all(good[n].is_cuda and torch.equal(now[n].cpu(), good[n].cpu()) for n in good)  # fit moved them back
    assert bad in seen.after and bad + 1 not in seen.after


def nonfinite_values(loss: float, device: str) -> dict:
    """What ``training_step`` leaves for the guard, for a batch of two tasks with per-task sums loss and 2 x loss."""
    value = torch.tensor(loss, device=device)
    return {"flag": ~torch.isfinite(value), "loss": value, "task_sum": torch.stack([value, 2 * value]),
            "task_ids": torch.tensor([0, 1], device=device)}  # fmt: skip


@pytest.mark.gpu
def test_deferred_flags_share_one_pinned_buffer_and_event_on_a_gpu():
    first = guard_module._PendingFlag(nonfinite_values(1.0, "cuda"), 1, 0)
    assert first.host.is_pinned() and not first.nonfinite()
    second = guard_module._PendingFlag(nonfinite_values(float("nan"), "cuda"), 2, 0, reuse=first)
    assert second.host.data_ptr() == first.host.data_ptr() and second.event is first.event
    assert second.nonfinite() and torch.isnan(second.as_dict()["loss"])
    assert second.values[0].item() == 1.0 and second.values[0].dim() == 0, "fused AdamW's found_inf: a float"
    third = guard_module._PendingFlag(nonfinite_values(3.0, "cuda"), 3, 0, reuse=second)
    assert not third.nonfinite() and third.as_dict()["task_sum"].tolist() == [3.0, 6.0]
    other = dict(nonfinite_values(3.0, "cuda"), task_sum=torch.ones(3, device="cuda"))
    fourth = guard_module._PendingFlag(other, 4, 0, reuse=third)
    assert fourth.host.shape == (5,) and fourth.host.data_ptr() != third.host.data_ptr(), "another size, own buffer"


def test_a_deferred_flag_on_the_cpu_is_its_values():
    flag = guard_module._PendingFlag(nonfinite_values(float("inf"), "cpu"), 1, 0, reuse=None)
    assert flag.event is None and flag.nonfinite() and flag.host is flag.values
    assert flag.as_dict()["task_sum"].tolist() == [float("inf")] * 2


class StepClock(Callback):
    """A clock at ``10 s x steps taken + 5 s`` during each step, so the seconds between saves are known."""

    def __init__(self):
        self.now = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.now = 10.0 * trainer.global_step + 5.0


@pytest.mark.parametrize(
    ("every", "min_interval_s", "saved_at"),
    [
        (1, 0, [1, 2, 3, 4, 5, 6]),  # Lightning's rule: every due step
        (1, 25, [3, 6]),  # due every step, saved once 25 s have passed since the start, then since the save
        (2, 25, [4]),  # due at 2, 4, 6: at 2 (15 s) too soon, at 4 (35 s) saved, at 6 (20 s after) too soon
    ],
)
def test_resume_checkpoint_saves_due_steps_at_most_once_per_interval(tmp_path, monkeypatch, every, min_interval_s,
                                                                     saved_at):  # fmt: skip
    clock = StepClock()
    monkeypatch.setattr(guard_module.time, "monotonic", lambda: clock.now)
    resume = ResumeCheckpoint(
        dirpath=tmp_path, every_n_train_steps=every, save_top_k=0, save_last=True, min_interval_s=min_interval_s
    )
    saved, save = [], resume._save_checkpoint

    def recording_save(trainer, path):
        saved.append(trainer.global_step)
        save(trainer, path)

    resume._save_checkpoint = recording_save
    trainer = Trainer(
        max_steps=6, limit_val_batches=0, callbacks=[clock, resume], logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=True, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(BoringModel())
    assert saved == saved_at
    state = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == saved_at[-1], "last.ckpt holds the newest save"


def test_resume_checkpoint_interval_is_checked_and_named():
    with pytest.raises(ValueError, match=r"resume_checkpoint.min_interval_s must be >= 0 seconds, got -1"):
        ResumeCheckpoint(min_interval_s=-1)


def test_the_cli_saves_every_50_steps_at_most_once_a_minute_by_default(tmp_path, monkeypatch):
    cli = tiny_cli(tmp_path, monkeypatch, *QUIET)
    (resume,) = [c for c in cli.trainer.callbacks if isinstance(c, ResumeCheckpoint)]
    assert (resume.min_interval_s, resume._every_n_train_steps, resume.save_last) == (60.0, 50, True)
