"""``python -m cgc_lightning export`` and ``merge`` end to end: fit, then each task as a PEFT adapter and as a
full model, loaded by PEFT and by ``AutoModelForCausalLM.from_pretrained``, against the routed model (float64)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cgc_lightning import export_cli

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["plausible", "qa", "count"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A tiny saved base model (weights on disk, so it can be reloaded), and a fit of the tiny experiment on it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tmp = tmp_path_factory.mktemp("export")
    base = tmp / "base"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ROOT / "tests/fixtures/tiny-llama")).save_pretrained(
        base
    )
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ROOT / "tests/fixtures/tiny-llama" / name, base / name)
    (tmp / "experiments").symlink_to(ROOT / "experiments")
    (tmp / "tests").symlink_to(ROOT / "tests")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"PYTHONPATH": str(ROOT)}
    args = ["--config", "experiments/tiny.yaml", "--trainer.max_steps=4", "--trainer.val_check_interval=2"]
    args += [f"--model.model.name_or_path={base}", "--model.model.random_init=false", "--model.lr=0.05"]
    fit = subprocess.run([sys.executable, "-m", "cgc_lightning", "fit", *args], cwd=tmp, env=env, capture_output=True)
    assert fit.returncode == 0, fit.stderr.decode()[-3000:]
    (ckpt,) = tmp.glob("outputs/*/*/checkpoints/best.ckpt")
    return {"tmp": tmp, "base": base, "ckpt": ckpt, "run_id": ckpt.parent.parent.name, "env": env}


def routed_logits(source: str, task: str, ids: torch.Tensor) -> torch.Tensor:
    from cgc_lightning.inject import injection
    from cgc_lightning.routing import route

    model, _ = export_cli.load_source(source, None, None, None)
    t = injection(model).layout.tasks.index(task)
    model = model.double()
    with torch.no_grad(), route(model, torch.full((ids.shape[0],), t)):
        return model(input_ids=ids).logits


def test_export_writes_a_peft_adapter_per_task_that_peft_loads_to_the_routed_model(trained, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = trained["tmp"] / "peft"
    assert export_cli.main([str(trained["ckpt"]), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(TASKS)
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(1))
    moved = []
    for task in TASKS:
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(trained["base"]), out / task).double()
        with torch.no_grad():
            got = peft(input_ids=ids).logits
        want = routed_logits(str(trained["ckpt"]), task, ids)
        # the exported factors (gate weights and scaling folded in) are stored in float32: rounding only
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m, t=task: f"{t}: {m}")
        with torch.no_grad():
            moved.append(
                float((want - AutoModelForCausalLM.from_pretrained(trained["base"]).double()(ids).logits).abs().max())
            )
    assert min(moved) > 1e-4, f"the adapters change every task's logits: {moved}"


def test_merge_writes_full_models_that_from_pretrained_loads_to_the_routed_model(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = trained["tmp"] / "merged"
    # through the command line, from the run id (its best_adapter/ artifact in the project's MLflow store)
    proc = subprocess.run(
        [sys.executable, "-m", "cgc_lightning", "merge", trained["run_id"], "--out", str(out), "--tasks", "qa,count"],
        cwd=trained["tmp"],
        env=trained["env"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "qa: merged model in" in proc.stdout and sorted(p.name for p in out.iterdir()) == ["count", "qa"]
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(2))
    for task in ("qa", "count"):
        merged = AutoModelForCausalLM.from_pretrained(out / task).double()
        AutoTokenizer.from_pretrained(out / task)  # saved beside the weights
        with torch.no_grad():
            got = merged(input_ids=ids).logits
        # the merge is done, and saved, in the base's float32: rounding, not a different function
        torch.testing.assert_close(got, routed_logits(str(trained["ckpt"]), task, ids), rtol=1e-4, atol=1e-5, msg=task)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks", "nope"], "unknown task(s) ['nope']"),
        (["--out", "{tmp}/experiments"], "exists and is not an empty folder"),
        (["--source", "{tmp}/missing.ckpt"], "not a checkpoint (.ckpt), a saved adapter directory or an MLflow run id"),
    ],
    ids=["unknown task", "non-empty output", "missing source"],
)
def test_bad_export_arguments_say_what_is_wrong_and_write_nothing(trained, capsys, args, message):
    tmp = trained["tmp"]
    args = [a.format(tmp=tmp) for a in args]
    source = args.pop(args.index("--source") + 1) if "--source" in args else str(trained["ckpt"])
    args = [a for a in args if a != "--source"]
    out = str(tmp / "never")
    if "--out" not in args:
        args += ["--out", out]
    assert export_cli.main([source, *args]) == 2
    assert message in capsys.readouterr().err
    assert not Path(out).exists()
