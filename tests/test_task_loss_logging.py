"""The per-task training losses in MLflow: at the steps Lightning logs, each the token-weighted mean of the task's
losses over every micro-batch since the last log."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_cli


@pytest.mark.parametrize("accumulate", [1, 2])
def test_task_losses_are_the_interval_means_logged_at_lightnings_steps(tmp_path, monkeypatch, accumulate):
    from mlflow import MlflowClient

    cli = tiny_cli(
        tmp_path,
        monkeypatch,
        "--trainer.max_steps=5",
        "--trainer.log_every_n_steps=2",
        f"--trainer.accumulate_grad_batches={accumulate}",
        "--trainer.val_check_interval=100",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false",
    )
    module = cli.model
    seen = []  # (global_step when the micro-batch ran, per-task loss sums, per-task target tokens)
    per_task_loss = module._per_task_loss

    def recording(batch):
        loss, sums, tokens = per_task_loss(batch)
        seen.append((module.global_step, sums.detach().double(), tokens.detach().double()))
        return loss, sums, tokens

    monkeypatch.setattr(module, "_per_task_loss", recording)
    cli.trainer.fit(module, cli.datamodule)
    assert len(seen) == 5 * accumulate

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = cli.trainer.logger.run_id
    tasks = module.layout.tasks
    # Lightning logs after optimizer steps 2 and 4 (of 5), at its step index 1 and 3; each log covers the
    # micro-batches of the steps since the last one, all of them when gradients are accumulated
    for task_index, task in enumerate(tasks):
        history = {m.step: m.value for m in client.get_metric_history(run_id, f"train/{task}/loss")}
        expected = {}
        for logged_at, steps in ((1, (0, 1)), (3, (2, 3))):
            sums = sum(s[task_index] for g, s, _ in seen if g in steps)
            tokens = sum(t[task_index] for g, _, t in seen if g in steps)
            if tokens:
                expected[logged_at] = float(sums / tokens)
        assert expected, f"no {task} tokens in the run: the fixture data should hold every task"
        assert history.keys() == expected.keys(), (task, history, expected)
        for step, value in expected.items():
            torch.testing.assert_close(history[step], value, rtol=1e-5, atol=1e-6)
    # the overall loss is logged at the same steps
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == [1, 3]


def logged_fit(tmp_path, monkeypatch, *args: str):
    """A 7-step fit logging every 3 steps: the global steps at which ``train/loss`` was given to ``self.log``,
    each step's loss, and the MLflow history of ``train/loss`` as ``{step: value}``."""
    from lightning.pytorch import Callback
    from mlflow import MlflowClient

    tmp_path.mkdir()
    cli = tiny_cli(
        tmp_path, monkeypatch, "--trainer.max_steps=7", "--trainer.log_every_n_steps=3",
        "--trainer.val_check_interval=100", "--trainer.num_sanity_val_steps=0", *args,
    )  # fmt: skip
    module, calls, losses = cli.model, [], {}
    log = module.log

    def recording(name, value, *a, **k):
        if name == "train/loss":
            calls.append(module.global_step)
        return log(name, value, *a, **k)

    class Losses(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses[trainer.global_step - 1] = float(outputs["loss"])

    monkeypatch.setattr(module, "log", recording)
    cli.trainer.callbacks.append(Losses())
    cli.trainer.fit(module, cli.datamodule)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    history = {m.step: m.value for m in client.get_metric_history(cli.trainer.logger.run_id, "train/loss")}
    return cli, calls, losses, history


def test_the_loss_is_logged_where_it_is_read_and_the_history_is_lightnings(tmp_path, monkeypatch):
    cli, calls, losses, history = logged_fit(tmp_path / "a", monkeypatch)
    # the first step (the bar's first read), Lightning's logging steps (3rd and 6th) and the last (7th): not
    # every step, each value a host-side cost for Lightning
    assert calls == [0, 2, 5, 6]
    assert sorted(history) == [2, 5], "what MLflow gets: Lightning's logging steps"
    for step, value in history.items():
        assert value == pytest.approx(losses[step], rel=1e-6), step
    # a callback monitoring a train/ metric sees every step's value: logged at every step, same history
    monitor = "--checkpoint.monitor=train/loss"
    cli2, calls2, losses2, history2 = logged_fit(tmp_path / "b", monkeypatch, monitor, "--checkpoint.mode=min")
    assert calls2 == list(range(7))
    assert history2 == pytest.approx(history) and losses2 == pytest.approx(losses)
    assert cli2.trainer.callback_metrics["train/loss"].item() == pytest.approx(losses2[6], rel=1e-6)
