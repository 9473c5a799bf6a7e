"""The training progress bar with real totals: what the epoch will run under ``max_steps``, and the step count.

Lightning's bar counts the batches of the epoch's loader, so a 60-step run over a 2,000-batch epoch shows
``60/2000`` when it ends, and its Rich bar reads ``Epoch 0/-2`` (``max_epochs`` is -1 under ``max_steps``).
This one stops its total at the batches the run will really take in this epoch (steps left x
``accumulate_grad_batches``, after the batches a resumed epoch already did) and shows ``step=k/max_steps``.
The CLI adds it unless ``trainer.enable_progress_bar: false`` or another progress bar is configured.
"""

from __future__ import annotations

import math

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar


def epoch_batches(trainer: Trainer) -> float:
    """Batches this epoch will run, counting those a resumed epoch already did (``inf`` for an endless loader)."""
    batches = trainer.num_training_batches
    if trainer.max_steps is not None and trainer.max_steps > 0:
        done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        left = max(trainer.max_steps - trainer.global_step, 0) * trainer.accumulate_grad_batches
        batches = min(batches, done + left)
    return batches


class StepProgressBar(TQDMProgressBar):
    """TQDM bar whose training total and description hold under ``max_steps`` (module docstring)."""

    def on_train_epoch_start(self, trainer: Trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        total = epoch_batches(trainer)
        self.train_progress_bar.total = None if math.isinf(total) else int(total)
        epochs = trainer.max_epochs
        of = f"/{epochs - 1}" if epochs is not None and epochs > 0 and not trainer.max_steps > 0 else ""
        self.train_progress_bar.set_description(f"Epoch {trainer.current_epoch}{of}")

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict:
        items = super().get_metrics(trainer, pl_module)
        if trainer.max_steps is not None and trainer.max_steps > 0:
            items = {"step": f"{trainer.global_step}/{trainer.max_steps}", **items}
        return items
