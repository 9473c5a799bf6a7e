"""A callback that kills its own process with SIGKILL at a given step: a crash no Python handler sees."""

from __future__ import annotations

import os
import signal

from lightning.pytorch import Callback


class SigkillAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
