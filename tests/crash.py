"""Callbacks that break a run on purpose: SIGKILL (a crash no Python handler sees), a NaN loss, Ctrl-C, a tracking
server that goes away."""

from __future__ import annotations

import os
import signal
import time

import torch
from lightning.pytorch import Callback


class SigkillAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class HangAt(Callback):
    """At step ``step``, the first process to claim ``token`` writes its MLflow run id there and hangs until killed.

    A machine lost in the middle of a fit, at a moment the test chooses instead of one it races for: the test
    waits for the token, then kills. Later processes (a resumed run) find the token taken and run on.
    """

    def __init__(self, step: int, token: str, stage: str | None = None):
        self.step, self.token, self.stage = step, token, stage  # stage: only in this MoDULA stage's fit

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step or self.stage not in (None, pl_module.adapter_config.stage):
            return
        try:
            fd = os.open(self.token, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, (trainer.logger.run_id if trainer.global_rank == 0 else "").encode())
        os.close(fd)
        while True:
            time.sleep(1)


class PoisonAt(Callback):
    """Before optimizer step ``step + 1``, fill the frozen embedding with inf: that step's loss is NaN."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.model.get_input_embeddings().weight.fill_(float("inf"))


class InterruptAt(Callback):
    """Ctrl-C (SIGINT to itself) as the batch after optimizer step ``step`` starts (where most of a run's time goes)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


class KillServerAt(Callback):
    """SIGKILL the process whose id is in ``$TRACKING_SERVER_PID`` (an MLflow server) after optimizer step ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.killpg(int(os.environ["TRACKING_SERVER_PID"]), signal.SIGKILL)
            time.sleep(1)
