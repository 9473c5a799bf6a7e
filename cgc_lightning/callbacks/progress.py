"""The training progress bar with real totals under ``max_steps``: the batches this epoch will run, and the step.

Lightning's Rich bar (its default when ``rich`` is installed) reads ``Epoch 0/-2`` under ``max_steps``
(``max_epochs`` is -1 then), and both its bars total an epoch's batches without counting
``accumulate_grad_batches`` or the batches a resumed epoch already did. These bars total what the run will
really take in this epoch (steps left x ``accumulate_grad_batches``, after the batches already done), leave the
epoch count off when there is none, and show ``step=k/max_steps``. They read the logged metrics (the loss)
only at logging steps, not at every batch as Lightning's do: each read waits for the GPU. The CLI adds the
Rich one (or the TQDM one without ``rich``) unless ``trainer.enable_progress_bar: false`` or the config brings
its own bar.
"""

from __future__ import annotations

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE


def epoch_batches(trainer: Trainer) -> float:
    """Batches this epoch will run, counting those a resumed epoch already did (``inf`` for an endless loader)."""
    batches = trainer.num_training_batches
    if trainer.max_steps is not None and trainer.max_steps > 0:
        done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        left = max(trainer.max_steps - trainer.global_step, 0) * trainer.accumulate_grad_batches
        batches = min(batches, done + left)
    return batches


def metrics_due(trainer: Trainer, read_at: int | None) -> bool:
    """Whether a training bar reads the logged metrics now: at the steps Lightning logs (every
    ``log_every_n_steps``) and the last, once each. Lightning's bars read them at every batch: one host sync
    a step, which holds the host until the GPU has finished the step's queued work."""
    step, every = trainer.global_step, trainer.log_every_n_steps
    if step == read_at:
        return False
    last = trainer.max_steps is not None and 0 < trainer.max_steps <= step
    return not every or step % every == 0 or last


class _StepTotals:
    """What both bars share: the epoch's real total, the step count beside the metrics, and metrics read from
    the device only at logging steps."""

    _shown: dict | None = None
    _read_at: int | None = None

    @property
    def total_train_batches(self) -> int | float:
        return epoch_batches(self.trainer)

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict:
        if trainer.training and self._read_at is not None and not metrics_due(trainer, self._read_at):
            items = dict(self._shown)  # reading the logged loss would wait for the GPU to finish the step
        else:
            items = self._shown = super().get_metrics(trainer, pl_module)
            if trainer.training:  # the first training batch reads too, so the loss shows from step 1
                self._read_at = trainer.global_step
        if trainer.max_steps is not None and trainer.max_steps > 0:
            items = {"step": f"{trainer.global_step}/{trainer.max_steps}", **items}
        return items


class StepProgressBar(_StepTotals, TQDMProgressBar):
    """Lightning's TQDM bar with real totals (module docstring)."""


class RichStepProgressBar(_StepTotals, RichProgressBar):
    """Lightning's Rich bar with real totals, and no ``/-2`` epoch count under ``max_steps`` (module docstring)."""

    def _get_train_description(self, current_epoch: int) -> str:
        epochs = self.trainer.max_epochs
        description = f"Epoch {current_epoch}" + (f"/{epochs - 1}" if epochs is not None and epochs > 0 else "")
        if len(self.validation_description) > len(description):
            description = f"{description:{len(self.validation_description)}}"
        return description


def step_progress_bar() -> StepProgressBar | RichStepProgressBar:
    """The bar Lightning would pick (Rich where it is installed), with real totals."""
    return RichStepProgressBar() if _RICH_AVAILABLE else StepProgressBar()
