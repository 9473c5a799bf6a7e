"""The CLI's training progress bar counts what the run will really do under ``max_steps``."""

from __future__ import annotations

import pytest
from lightning.pytorch.callbacks import ProgressBar

from cgc_lightning.callbacks.progress import RichStepProgressBar, StepProgressBar
from tests.conftest import tiny_cli


def test_the_bar_totals_the_steps_of_a_max_steps_run_not_the_epoch(tmp_path, monkeypatch):
    # an epoch of 100 batches, a run of 3 steps: Lightning's bar would end at 3/100
    cli = tiny_cli(tmp_path, monkeypatch, "--trainer.max_steps=3", "--data.samples_per_epoch=400")
    bar = cli.trainer.progress_bar_callback
    assert isinstance(bar, (RichStepProgressBar, StepProgressBar))
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.num_training_batches == 100
    assert bar.total_train_batches == 3
    assert bar.get_metrics(cli.trainer, cli.model)["step"] == "3/3"
    if isinstance(bar, RichStepProgressBar):  # Lightning's own read "Epoch 0/-2" under max_steps
        assert bar._get_train_description(0).strip() == "Epoch 0"


def test_the_total_counts_accumulated_batches_and_the_tqdm_bar_too(tmp_path, monkeypatch):
    cli = tiny_cli(tmp_path, monkeypatch, "--trainer.max_steps=2", "--trainer.accumulate_grad_batches=3")
    bar = StepProgressBar()
    cli.trainer.callbacks = [c for c in cli.trainer.callbacks if not isinstance(c, ProgressBar)] + [bar]
    cli.trainer.fit(cli.model, cli.datamodule)
    assert bar.total_train_batches == min(cli.trainer.num_training_batches, 6)
    assert bar.train_progress_bar.n == bar.train_progress_bar.total


@pytest.mark.parametrize(
    "args",
    [["--trainer.enable_progress_bar=false"], ["--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar"]],
    ids=["bar off", "own bar"],
)
def test_no_bar_of_ours_when_the_bar_is_off_or_the_config_brings_one(tmp_path, monkeypatch, args):
    cli = tiny_cli(tmp_path, monkeypatch, *args)
    bars = [c for c in cli.trainer.callbacks if isinstance(c, ProgressBar)]
    assert not any(isinstance(c, (StepProgressBar, RichStepProgressBar)) for c in bars)
    assert len(bars) == (0 if "false" in args[0] else 1)


class ShownMetrics(StepProgressBar):
    """The TQDM bar, keeping what it showed after each training batch (by step)."""

    def __init__(self):
        super().__init__()
        self.shown: dict[int, dict] = {}

    def get_metrics(self, trainer, pl_module) -> dict:
        self.last = super().get_metrics(trainer, pl_module)  # what the bar is given to show
        return self.last

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses = {**getattr(self, "losses", {}), trainer.global_step: float(outputs["loss"])}
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.shown[trainer.global_step] = self.last


def test_the_bar_reads_the_logged_loss_at_logging_steps_and_the_last_not_every_step(tmp_path, monkeypatch):
    # every read of a logged tensor is a host sync on a GPU; Lightning's bars read at every batch
    cli = tiny_cli(tmp_path, monkeypatch, "--trainer.max_steps=5", "--trainer.log_every_n_steps=2")
    bar = ShownMetrics()
    cli.trainer.callbacks = [c for c in cli.trainer.callbacks if not isinstance(c, ProgressBar)] + [bar]
    cli.trainer.fit(cli.model, cli.datamodule)
    shown = {step: float(m["train/loss"]) for step, m in bar.shown.items()}
    true = bar.losses
    assert len(set(true.values())) == 5, "five different losses"
    for step in (1, 2, 4, 5):  # the first, the logging steps 2 and 4, and the last
        assert shown[step] == pytest.approx(true[step], rel=1e-3), step
    assert shown[3] == shown[2] != pytest.approx(true[3], rel=1e-3), "step 3 shows step 2's loss, read then"
    assert {m["step"] for m in bar.shown.values()} == {f"{s}/5" for s in range(1, 6)}, "the step count is live"
