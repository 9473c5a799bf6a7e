"""Guards of a training run: what stops it, what it keeps when it stops, and config checks made before step 1.

* A non-finite training loss stops ``fit`` without the optimizer applying it, with the step and the
  batch's tasks in the message; the checkpoints on disk stay as they were (the last good state) and
  the MLflow run is marked FAILED, with the message as its ``error`` tag. With a fused AdamW (the
  default on a GPU) the check costs no host sync: the flag goes to the optimizer's kernels, which skip
  the update on the device when it is set, and the host reads it a step later, or before any checkpoint
  is saved, validation starts or training ends, whichever comes first. Otherwise the host reads it before
  every optimizer step, which waits for the GPU to finish the step's backward.
* Ctrl-C finishes the training step under way, saves ``last.ckpt`` where ``fit --ckpt_path last``
  finds it, stops, and marks the MLflow run KILLED (a second Ctrl-C stops at once).
* ``last.ckpt`` for ``fit --ckpt_path last`` is written every N steps, but not more often than once a
  minute by default (:class:`ResumeCheckpoint`): a fast run does not spend its time saving.
* Every callback's ``monitor`` (checkpointing, early stopping) must name a metric the module logs:
  a task name that is not in the data fails before the first step, not at the first validation.
* Under DDP, at the end of ``fit`` every rank's adapters are compared with rank 0's: the largest
  difference is logged as ``ddp/adapter_replica_max_diff`` (0 when DDP kept the replicas equal, as it
  must), and replicas that drifted apart fail the run, naming the tensors.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy

from cgc_lightning.tracking import mlflow_logger

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The training loss was NaN or infinite."""


def loggable_metrics(pl_module: LightningModule) -> set[str]:
    """Metric keys the module logs (``train/...``, ``val/...``, ``test/...``), for checking a ``monitor``."""
    tasks = list(pl_module.layout.tasks)
    metrics = list(getattr(pl_module, "task_metrics", None) or ["accuracy"] * len(tasks))
    keys = {"train/loss", "train/aux_loss", "val/avg/score", "val/avg/loss", "test/avg/score", "test/avg/loss"}
    for task, metric in zip(tasks, metrics, strict=True):
        keys.add(f"train/{task}/loss")
        for stage in ("val", "test"):
            keys |= {f"{stage}/{task}/{metric}", f"{stage}/{task}/loss"}
    return keys


def check_monitors(trainer: Trainer, pl_module: LightningModule) -> None:
    """Raise ``ValueError`` when a callback monitors a per-task metric that this run will never log."""
    known = loggable_metrics(pl_module)
    tasks = list(pl_module.layout.tasks)
    for cb in trainer.callbacks:
        key = getattr(cb, "monitor", None)
        if not isinstance(key, str) or key in known:
            continue
        parts = key.split("/")
        if len(parts) == 3 and parts[0] in ("train", "val", "test") and parts[1] not in (*tasks, "avg"):
            raise ValueError(
                f"{type(cb).__name__} monitors {key!r}, but task {parts[1]!r} is not in the data; the tasks are "
                f"{tasks} (set the callback's monitor to val/<task>/<metric>, or val/avg/score)"
            )
        if len(parts) == 3 and parts[1] in tasks:
            options = sorted(k for k in known if k.startswith(f"{parts[0]}/{parts[1]}/"))
            raise ValueError(
                f"{type(cb).__name__} monitors {key!r}, but task {parts[1]!r} is scored with {options}; "
                "its metric comes from the task spec (data.tasks[].metric)"
            )


def deferred_blockers(trainer: Trainer) -> list[str]:
    """What keeps the non-finite check from being deferred (empty: it can be): see ``RunGuard``'s ``check_finite``."""
    blockers = []
    groups = [g for opt in trainer.optimizers for g in opt.param_groups]
    if not groups or not all(g.get("fused") for g in groups):
        blockers.append("a fused AdamW (model.adamw: fused, or auto on a GPU)")
    if getattr(trainer.precision_plugin, "scaler", None) is not None:
        blockers.append(f"a precision without a gradient scaler (bf16-mixed, not {trainer.precision})")
    if trainer.world_size > 1:
        blockers.append(f"one training process (this run has {trainer.world_size})")
    return blockers


class _PendingFlag:
    """One optimizer step's non-finite flag with the loss and per-task sums for the message, on their way to the
    host: copied without waiting into pinned memory on a GPU, read after the copy's event (by then long done).

    ``reuse``: the previous step's flag, already read: its pinned buffer and event serve again (one step's flag is
    pending at a time), so a step allocates no pinned memory and creates no event.
    """

    def __init__(self, nonfinite: dict, step: int, epoch: int, reuse: _PendingFlag | None = None):
        values = torch.cat([nonfinite["flag"].float().reshape(1), nonfinite["loss"].float().reshape(1),
                            nonfinite["task_sum"].float().reshape(-1)])  # fmt: skip
        self.values = values  # on the device; values[0] is the flag as fused AdamW's found_inf takes it
        self.step, self.epoch, self.task_ids = step, epoch, nonfinite["task_ids"]
        if values.is_cuda:
            fits = reuse is not None and reuse.event is not None and reuse.host.shape == values.shape
            self.host = reuse.host if fits else torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self.host.copy_(values, non_blocking=True)
            self.event = reuse.event if fits else torch.cuda.Event()
            self.event.record()
        else:
            self.host, self.event = values, None

    def nonfinite(self) -> bool:
        if self.event is not None:
            self.event.synchronize()
        return self.host[0].tolist() != 0

    def as_dict(self) -> dict:
        return {"loss": self.host[1], "task_sum": self.host[2:], "task_ids": self.task_ids}


class RunGuard(Callback):
    """Stop on a non-finite loss, keep a checkpoint on Ctrl-C, check monitored metric names (module docstring).

    Args:
        check_finite: stop on a NaN or infinite training loss without applying it. ``true``: ``deferred`` where
            the optimizer can skip a step on the device, else ``step``. ``step``: read the flag before every
            optimizer step (a host sync a step: the host waits for the step's backward). ``deferred``: the
            flag goes to fused AdamW (``found_inf``), whose kernels skip the update when it is set, and the host
            reads it one step later, without waiting (fails at the start of training unless ``model.adamw`` is
            fused, the precision has no gradient scaler and one process trains). ``false``: no check.
        checkpoint_on_interrupt: on Ctrl-C, finish the step and save ``last.ckpt`` before stopping.
        check_replicas: under DDP, compare every rank's adapters with rank 0's at the end of ``fit``.
    """

    def __init__(
        self,
        check_finite: bool | Literal["step", "deferred"] = True,
        checkpoint_on_interrupt: bool = True,
        check_replicas: bool = True,
    ):
        if check_finite not in (True, False, "step", "deferred"):
            raise ValueError(f"guard.check_finite must be true, false, step or deferred, got {check_finite!r}")
        self.check_finite, self.checkpoint_on_interrupt = check_finite, checkpoint_on_interrupt
        self.check_replicas = check_replicas
        self.finite_mode: str | None = None  # step, deferred or None (off), from check_finite at the start of fit
        self._pending: _PendingFlag | None = None
        self._read: _PendingFlag | None = None  # the last flag read, whose buffer and event the next one reuses

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if hasattr(pl_module, "layout"):
            check_monitors(trainer, pl_module)

    def _resolve_finite_mode(self, trainer: Trainer) -> str | None:
        if self.check_finite is False:
            return None
        if self.check_finite == "step":
            return "step"
        blockers = deferred_blockers(trainer)
        if self.check_finite == "deferred" and blockers:
            raise ValueError(f"guard.check_finite: deferred needs {'; '.join(blockers)} (or set it to step)")
        return "step" if blockers else "deferred"

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        nonfinite = getattr(pl_module, "nonfinite", None)  # set by training_step; (micro-)batches since the last step
        if self.finite_mode is None or nonfinite is None:
            return
        pl_module.nonfinite = None
        if self.finite_mode == "step":
            if bool(nonfinite["flag"]):  # the one host sync
                raise NonFiniteLossError(self._message(trainer, pl_module, nonfinite))
            return
        self._raise_if_pending_was_nonfinite(trainer, pl_module)  # the last step's: finished on the device by now
        step, epoch = trainer.global_step + 1, trainer.current_epoch
        self._pending = _PendingFlag(nonfinite, step, epoch, reuse=self._read)
        optimizer.found_inf = self._pending.values[0]  # the flag as a float: fused AdamW skips the update where 1

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        for optimizer in trainer.optimizers:  # the flag is one step's; another use of the optimizer must not see it
            if hasattr(optimizer, "found_inf"):
                del optimizer.found_inf
        if getattr(self, "_stop", False) and not self._saved:
            self._saved = self._save_last(trainer)

    def _raise_if_pending_was_nonfinite(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pending, self._pending = self._pending, None
        if pending is not None and pending.nonfinite():
            raise NonFiniteLossError(self._message(trainer, pl_module, pending.as_dict(), step=pending.step,
                                                   epoch=pending.epoch))  # fmt: skip
        if pending is not None:  # read: its pinned buffer and event can carry the next step's flag
            self._read = pending

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        # before the file is written: a checkpoint is never taken after a non-finite step
        self._raise_if_pending_was_nonfinite(trainer, pl_module)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._raise_if_pending_was_nonfinite(trainer, pl_module)
        self._stop_if_saved()

    @staticmethod
    def _message(
        trainer: Trainer, pl_module: LightningModule, nonfinite: dict, step: int | None = None, epoch: int | None = None
    ) -> str:
        names = pl_module.layout.tasks
        in_batch = [names[t] for t in sorted(set(nonfinite["task_ids"].flatten().tolist()))]
        sums = nonfinite["task_sum"]
        bad = [names[t] for t in torch.nonzero(~torch.isfinite(sums)).flatten().tolist()]
        ckpt = next((c.last_model_path for c in trainer.checkpoint_callbacks if c.last_model_path), "") or "none yet"
        return (
            f"non-finite training loss ({float(nonfinite['loss'])}) at step "
            f"{trainer.global_step + 1 if step is None else step} "
            f"(epoch {trainer.current_epoch if epoch is None else epoch}); tasks in the batch: {', '.join(in_batch)}; "
            "non-finite loss in: "
            f"{', '.join(bad) or 'none of the per-task losses (an auxiliary loss)'}. The optimizer did not apply it. "
            f"Last good checkpoint: {ckpt}. Lower model.lr, use trainer.precision 32-true or bf16-mixed instead of "
            "16-mixed, or set trainer.gradient_clip_val"
        )

    # Ctrl-C: the first one asks to stop; the step under way finishes, last.ckpt is saved where the resume
    # checkpoints are (the same state as theirs, so the resume is exact) and the run stops before the next
    # batch or validation. A second Ctrl-C stops at once, keeping the checkpoints already on disk.

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.finite_mode, self._pending, self._read = self._resolve_finite_mode(trainer), None, None
        self._stop, self._saved, self._previous = False, False, None
        if self.checkpoint_on_interrupt and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum, frame) -> None:
        if self._stop:
            self._restore()
            raise KeyboardInterrupt
        self._stop = True
        print(
            "\nCtrl-C: stopping after this training step with a checkpoint to resume from (Ctrl-C again: stop now)",
            file=sys.stderr,
            flush=True,
        )

    def _restore(self) -> None:
        if getattr(self, "_previous", None) is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx) -> None:
        self._stop_if_saved()

    def _stop_if_saved(self) -> None:
        if getattr(self, "_saved", False):
            self._restore()
            raise KeyboardInterrupt

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore()
        self._raise_if_pending_was_nonfinite(trainer, pl_module)  # the last step's
        if self.check_replicas and trainer.world_size > 1 and isinstance(trainer.strategy, DDPStrategy):
            check_replicas(trainer, pl_module)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        logger = mlflow_logger(trainer)
        self._restore()
        self._pending = None
        for optimizer in trainer.optimizers:
            if hasattr(optimizer, "found_inf"):
                del optimizer.found_inf
        if isinstance(exception, KeyboardInterrupt):
            if logger is not None:
                logger.final_status = "KILLED"
        elif logger is not None and trainer.is_global_zero and getattr(logger, "_initialized", False):
            # only a run that exists: a failure before the run started (a data file, a monitor) leaves none behind
            try:
                logger.experiment.set_tag(logger.run_id, "error", f"{type(exception).__name__}: {exception}"[:5000])
            except Exception as e:  # the store may be what failed
                log.warning("could not tag the MLflow run with the error: %s", e)

    @staticmethod
    def _save_last(trainer: Trainer) -> bool:
        dirs = [c.dirpath for c in trainer.checkpoint_callbacks if c.save_last and c.dirpath]
        if not dirs:
            log.warning("Ctrl-C: no checkpoint callback with save_last, so no checkpoint was saved")
            return True
        path = Path(dirs[0]) / "last.ckpt"
        trainer.save_checkpoint(path)
        for c in trainer.checkpoint_callbacks:
            if c.save_last:
                c.last_model_path = str(path)
        if trainer.is_global_zero:
            print(f"saved {path} at step {trainer.global_step}; resume with: fit --ckpt_path last", file=sys.stderr)
        return True


class ResumeCheckpoint(ModelCheckpoint):
    """``last.ckpt`` every ``every_n_train_steps`` steps, at most once in ``min_interval_s``.

    A save writes the adapters and AdamW's state (67 MB at SmolLM2-135M) and takes a fraction of a second: on an
    H200 a compiled run stepping every 30 ms reached 50 steps every 1.5 s and spent about 14% of its time saving
    (docs/benchmarks.md). With ``min_interval_s`` a step that is due (a multiple of ``every_n_train_steps``) is
    skipped until that long has passed since the last save or the start of training, so saving costs at most
    (save time / ``min_interval_s``) of the run, and a crash loses at most about ``min_interval_s`` plus
    ``every_n_train_steps`` steps of work. Saves still fall on multiples of ``every_n_train_steps`` only.

    Args:
        min_interval_s: seconds between two saves at least; ``0`` saves at every due step (Lightning's own rule).
            Under DDP rank 0's clock decides for every rank.
        *args, **kwargs: those of :class:`~lightning.pytorch.callbacks.ModelCheckpoint`.
    """

    def __init__(self, *args, min_interval_s: float = 0.0, **kwargs):
        if not (isinstance(min_interval_s, (int, float)) and min_interval_s >= 0):
            raise ValueError(f"resume_checkpoint.min_interval_s must be >= 0 seconds, got {min_interval_s!r}")
        super().__init__(*args, **kwargs)
        self.min_interval_s = float(min_interval_s)
        self._last_save = time.monotonic()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_save = time.monotonic()  # a resumed run counts from its own start

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        every = self._every_n_train_steps
        due = every >= 1 and trainer.global_step % every == 0 and not self._should_skip_saving_checkpoint(trainer)
        if due and self.min_interval_s > 0:
            too_soon = time.monotonic() - self._last_save < self.min_interval_s
            if trainer.strategy.broadcast(too_soon):  # every rank saves, or none
                return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        self._last_save = time.monotonic()  # any save of this callback (a due step, validation) restarts the wait


class ReplicaMismatchError(RuntimeError):
    """The DDP ranks' adapters were not equal at the end of training."""


def check_replicas(trainer: Trainer, pl_module: LightningModule) -> float:
    """Largest difference between any rank's adapter tensors and rank 0's (a collective: every rank calls it).

    Logged as ``ddp/adapter_replica_max_diff``; anything but 0 raises :class:`ReplicaMismatchError`, naming
    the tensors, since DDP applies the same averaged gradient on every rank and so keeps them bitwise equal.
    """
    import torch.distributed as dist

    from cgc_lightning.inject import adapter_parameters

    named = [(n, p.detach()) for n, p in adapter_parameters(pl_module.model) if p.requires_grad]
    mine = torch.cat([p.reshape(-1).float() for _, p in named])
    rank0 = mine.clone()
    dist.broadcast(rank0, src=0)
    per_tensor = torch.stack([d.abs().max() for d in (mine - rank0).split([p.numel() for _, p in named])])
    dist.all_reduce(per_tensor, op=dist.ReduceOp.MAX)
    worst = float(per_tensor.max())
    logger = mlflow_logger(trainer)
    if logger is not None:
        logger.log_metrics({"ddp/adapter_replica_max_diff": worst}, step=trainer.global_step)
    if worst > 0:
        off = [n for (n, _), d in zip(named, per_tensor.tolist(), strict=True) if d > 0]
        raise ReplicaMismatchError(
            f"after training, {len(off)} of {len(named)} adapter tensors differ between the {trainer.world_size} "
            f"DDP ranks (largest difference {worst:.3g}), e.g. {off[:3]}: DDP did not average some gradient. "
            "A trainable tensor outside DDP's reducer, or a custom optimizer step, can cause this; the checkpoints "
            "hold rank 0's weights"
        )
    return worst
