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
