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
