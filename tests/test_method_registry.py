"""A method added from outside the package, with one adapter class and one registry entry: it trains, logs and
exports with no other edit (docs/adding_a_method.md walks through the same method)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from cgc_lightning.adapters.experts import Adapter, require_task_ids
from cgc_lightning.adapters.lora import lora_scaling
from cgc_lightning.config import AdapterConfig
from cgc_lightning.methods import MethodSpec, method_spec, register, unregister

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["plausible", "qa", "count"]  # experiments/tiny.yaml


class TaskScaledLoRA(Adapter):
    """One LoRA pair for every task, scaled per task by a learned scalar: ``h = W0 x + g_t s B A x``."""

    def __init__(self, *, num_tasks: int, in_features, out_features, r, alpha, dropout=0.0, rslora=False, **kw):
        super().__init__(
            in_features=in_features,
            out_features=out_features,
            r=r,
            num_experts=1,
            scaling=lora_scaling(alpha, r, rslora),
            dropout=dropout,
            **kw,
        )
        # named gate_*: trainable, saved with the adapter, in the gates' optimizer group
        self.gate_scale = nn.Parameter(torch.ones(num_tasks, dtype=self.experts.lora_A.dtype, device=kw.get("device")))

    def route(self, x, task_ids, cluster_ids):
        task_ids = require_task_ids(task_ids, "task_scaled_lora")
        index = torch.zeros_like(task_ids)[:, None]  # (B, 1): the one pair
        return index, self.gate_scale.index_select(0, task_ids).to(x.dtype)[:, None, None]  # (B, 1, 1)

    def task_route(self, task):
        return None, self.gate_scale[task : task + 1]


SPEC = MethodSpec(
    name="task_scaled_lora",
    build=lambda config, layout, gate, **common: TaskScaledLoRA(num_tasks=len(layout.tasks), **common),
    labels=lambda config, layout, n: ["lora"],
)


@pytest.fixture
def toy_method():
    register(SPEC)
    yield SPEC
    unregister(SPEC.name)


def test_an_unregistered_method_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown method 'task_scaled_lora'; choose one of \('cgc_lora', "):
        AdapterConfig(method="task_scaled_lora")
    with pytest.raises(ValueError, match="method 'cgc_lora' is registered already"):
        register(MethodSpec(name="cgc_lora", build=lambda *a, **k: None))


def test_a_registered_method_trains_logs_and_exports_with_no_other_edit(toy_method, tmp_path):
    from mlflow import MlflowClient
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    from cgc_lightning import export_cli
    from cgc_lightning.cli import main
    from tests.test_export_cli import routed_logits

    assert method_spec("task_scaled_lora") is toy_method and AdapterConfig(method="task_scaled_lora").mergeable
    base = tmp_path / "base"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ROOT / "tests/fixtures/tiny-llama")).save_pretrained(
        base
    )
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ROOT / "tests/fixtures/tiny-llama" / name, base / name)
    (tmp_path / "experiments").symlink_to(ROOT / "experiments")
    (tmp_path / "tests").symlink_to(ROOT / "tests")
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        main(
            [
                "fit",
                "--config=experiments/tiny.yaml",
                "--model.adapter.method=task_scaled_lora",
                f"--model.model.name_or_path={base}",
                "--model.model.random_init=false",
                "--model.lr=0.05",
                "--trainer.max_steps=4",
                "--trainer.val_check_interval=2",
                "--trainer.enable_progress_bar=false",
                f"--trainer.logger.init_args.tracking_uri=sqlite:///{tmp_path}/mlruns/mlflow.db",
            ]
        )
    finally:
        os.chdir(cwd)
    (ckpt,) = tmp_path.glob("outputs/*/*/checkpoints/best.ckpt")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    scales = [v for k, v in state.items() if k.endswith("gate_scale")]
    assert scales and any(not torch.allclose(s, torch.ones_like(s)) for s in scales), "the per-task scales trained"

    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["method"] == "task_scaled_lora"
    assert not [k for k in run.data.params if k.startswith("adapter.num_")], "only the common adapter fields"
    assert run.info.run_name.startswith("task_scaled_lora seed=7 ")
    assert {f"val/{t}/loss" for t in TASKS} <= set(run.data.metrics)

    out = tmp_path / "peft"
    assert export_cli.main([str(ckpt), "--out", str(out)]) == 0
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(1))
    for task in TASKS:
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out / task).double()
        with torch.no_grad():
            got = peft(input_ids=ids).logits
        torch.testing.assert_close(got, routed_logits(str(ckpt), task, ids), rtol=1e-5, atol=1e-6)
