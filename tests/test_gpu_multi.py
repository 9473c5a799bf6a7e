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
    # no dropout: both ranks draw the same masks (same seed), which one process does not; without it, the runs
    # differ only in how the gradient weighs the two ranks' token means, and in the order sums are taken
    common = ["fit", "--config", str(default_experiment), "--trainer.accelerator=gpu", "--model.adapter.dropout=0"]
    run(tmp_path, *common, "--data.batch_size=16", "--trainer.logger.init_args.experiment_name=one")
    two = ["--trainer.devices=2", "--trainer.strategy=ddp", "--data.batch_size=8"]
    run(tmp_path, *common, *two, "--trainer.logger.init_args.experiment_name=two")

    client = client_of(tmp_path)
    (one,), (two,) = (client.search_runs([client.get_experiment_by_name(n).experiment_id]) for n in ("one", "two"))
    assert two.data.metrics["ddp/adapter_replica_max_diff"] == 0.0, "the ranks' adapters are bitwise equal"
    assert "ddp/adapter_replica_max_diff" not in one.data.metrics

    def steps(run_, key) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(run_.info.run_id, key)}

    print(f"{'metric':<40}{'1 GPU, B=16':>14}{'2 GPUs, B=8':>14}")
    for task in TASKS:
        a, b = steps(one, f"train/{task}/loss"), steps(two, f"train/{task}/loss")
        print(f"train/{task}/loss by step: {a} {b}")
        assert sorted(a) == sorted(b), f"{task}: the same tasks in every logged interval"
        for key in (f"train/{task}/loss", f"val/{task}/loss", f"val/{task}/accuracy"):
            print(f"{key:<40}{one.data.metrics[key]:>14.4f}{two.data.metrics[key]:>14.4f}")
        # the same examples; the gradients differ only in how the ranks' token means are weighted
        torch.testing.assert_close(list(b.values()), list(a.values()), rtol=0.05, atol=0, msg=task)
        val = f"val/{task}/loss"
        torch.testing.assert_close(two.data.metrics[val], one.data.metrics[val], rtol=0.1, atol=0, msg=val)
        accuracy = f"val/{task}/accuracy"  # 32 examples: 0.03 each
        assert abs(two.data.metrics[accuracy] - one.data.metrics[accuracy]) <= 0.16, accuracy
    key = "val/avg/score"
    print(f"{key:<40}{one.data.metrics[key]:>14.4f}{two.data.metrics[key]:>14.4f}")
    assert abs(two.data.metrics[key] - one.data.metrics[key]) <= 0.06


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
