"""The GPU tier on a machine with two GPUs or more (``pytest -m gpu``; skipped with fewer).

* The default experiment (``experiments/exp.yaml``: SmolLM2-135M on four BIG-bench tasks) trained under DDP on
  2 GPUs at 8 sequences per GPU against 1 GPU at 16: the same examples in every step, per-task validation
  metrics within noise, and every rank's adapters bitwise equal after training.
* A grid spreads its points over both GPUs.

Exact resume under DDP on 2 GPUs is ``tests/test_resume.py``'s DDP test, run with ``accelerator=gpu``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from tests.test_gpu import ROOT, client_of, local_experiment, run

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs"),
]
TASKS = ["sports_understanding", "anachronisms", "date_understanding", "object_counting"]


@pytest.fixture(scope="module")
def default_experiment(tmp_path_factory) -> Path:
    return local_experiment(ROOT / "experiments/exp.yaml", tmp_path_factory.mktemp("exp"))


def test_default_experiment_under_ddp_on_two_gpus_matches_one_gpu(default_experiment, tmp_path):
    """2 GPUs at B = 8 against 1 GPU at B = 16: the same examples in every step. Noise yardstick: 1 GPU at B = 8
    with 2 accumulated batches, whose gradient also averages two token means of 8 sequences each."""
    # no dropout: both ranks draw the same masks (same seed), which one process does not; without it, the runs
    # differ only in how the gradient weighs the halves' token means, and in the order sums are taken
    common = ["fit", "--config", str(default_experiment), "--trainer.accelerator=gpu", "--model.adapter.dropout=0"]
    common.append("--trainer.log_every_n_steps=1")
    runs = {
        "one": ["--data.batch_size=16"],
        "accumulate": ["--data.batch_size=8", "--trainer.accumulate_grad_batches=2"],
        "two": ["--trainer.devices=2", "--trainer.strategy=ddp", "--data.batch_size=8"],
    }
    for name, args in runs.items():
        run(tmp_path, *common, *args, f"--trainer.logger.init_args.experiment_name={name}")
    client = client_of(tmp_path)
    found = {n: client.search_runs([client.get_experiment_by_name(n).experiment_id]) for n in runs}
    assert all(len(f) == 1 for f in found.values())
    one, acc, two = (found[n][0] for n in runs)
    assert two.data.metrics["ddp/adapter_replica_max_diff"] == 0.0, "the ranks' adapters are bitwise equal"
    assert "ddp/adapter_replica_max_diff" not in one.data.metrics

    def steps(run_, key) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(run_.info.run_id, key)}

    print(f"{'metric':<40}{'1 GPU, B=16':>14}{'1 GPU, 8x2':>14}{'2 GPUs, B=8':>14}")
    keys = [f"{stage}/{t}/{m}" for t in TASKS for stage, m in (("train", "loss"), ("val", "loss"), ("val", "accuracy"))]
    for key in [*keys, "val/avg/loss", "val/avg/score"]:
        print(f"{key:<40}" + "".join(f"{r.data.metrics[key]:>14.4f}" for r in (one, acc, two)))
    first = []
    for task in TASKS:
        a, b = steps(one, f"train/{task}/loss"), steps(two, f"train/{task}/loss")
        assert sorted(a) == sorted(b), f"{task}: the same tasks in every step"
        if 0 in a:  # the first step: the same weights and examples, per-task sums over both ranks' tokens
            torch.testing.assert_close(b[0], a[0], rtol=1e-3, atol=0, msg=task)
            first.append(task)
    assert first
    # floors: a yes/no task flips many of its 32 answers at once when the bias tips (docs/gpu.md)
    for key, floor in (("val/avg/loss", 0.02), ("val/avg/score", 0.10)):
        noise = abs(acc.data.metrics[key] - one.data.metrics[key])
        gap = abs(two.data.metrics[key] - one.data.metrics[key])
        assert gap <= 2 * noise + floor, f"{key}: DDP is {gap:.4f} from 1 GPU, accumulation {noise:.4f}"


def test_grid_spreads_points_over_two_gpus(tmp_path):

    config = tmp_path / "grid.yaml"
    base = local_experiment(ROOT / "experiments/gpu.yaml", tmp_path)
    config.write_text(
        yaml.safe_dump(
            {
                "base": str(base),
                "experiment_name": "gpu-grid-2",
                "overrides": {"trainer.max_steps": 4, "trainer.val_check_interval": 2, "grad_conflict.enabled": False},
                "axes": {"model.adapter.method": ["cgc_lora", "joint_lora"], "seed_everything": [1, 2]},
            }
        )
    )
    out = run(tmp_path, "grid", "--config", str(config), "--jobs", "4").stdout
    client = client_of(tmp_path)
    runs = client.search_runs([client.get_experiment_by_name("gpu-grid-2").experiment_id], "tags.`grid.role` = 'point'")
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs), out
    gpus = sorted(r.data.tags["grid.gpu"] for r in runs)
    print(out, gpus)
    assert set(gpus) == {"0", "1"}, f"the points ran on {gpus}:\n{out}"
    assert "on GPU 0" in out and "on GPU 1" in out
