r"""What the seesaw diagnostics cost: the same ``fit`` with the diagnostic callbacks on and off.

Builds the CLI's trainer from an experiment config twice per round, once with ``seesaw``,
``grad_conflict`` and ``gate_usage`` at their defaults and once with all three disabled, and times
``trainer.fit`` (not the imports, model load or data preparation, which the callbacks do not touch),
split into the validation loops (the callbacks' ``on_validation_end`` work, figures included, is
counted there) and the rest, the training loop (where the gradient-conflict probes run).
Both log to a throw-away MLflow store, as a real run does, so the figures and metric writes are
counted. Rounds alternate which variant goes first; the time of a variant is its median over rounds.
Also reported: the seconds spent inside each callback's own hooks (their stopwatches), and whether
both variants ended with bit-identical adapter weights (the diagnostics must not change training).

    python -m benchmarks.diagnostics_overhead --config experiments/tiny.yaml --steps 150 --val-every 50
    python -m benchmarks.diagnostics_overhead --shape smollm2-135m -- --trainer.accelerator=gpu
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

DIAGNOSTICS = ("seesaw", "grad_conflict", "gate_usage")
#: Model shapes for ``--shape``: the fixture tokenizer (400 tokens) on a randomly initialised Llama of this size.
SHAPES = {
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
    ),
}
FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tiny-llama"


def shaped_model(shape: str, where: Path) -> Path:
    """A model folder: the tiny fixture's tokenizer and config, resized to ``shape`` (random weights)."""
    where.mkdir(parents=True, exist_ok=True)
    for f in FIXTURE.iterdir():
        if f.name != "config.json":
            shutil.copy(f, where / f.name)
    config = json.loads((FIXTURE / "config.json").read_text()) | SHAPES[shape]
    (where / "config.json").write_text(json.dumps(config, indent=1))
    return where


def build(config: str, steps: int, val_every: int, diagnostics: bool, workdir: Path, extra: list[str]):
    from cgc_lightning.cli import CGCLightningCLI
    from cgc_lightning.module import MultiTaskLoRAModule
    from datamodules.multitask import MultiTaskDataModule

    args = [
        "--config",
        config,
        f"--trainer.max_steps={steps}",
        f"--trainer.val_check_interval={val_every}",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={workdir}/out",
        f"--trainer.logger.init_args.tracking_uri=sqlite:///{workdir}/mlflow.db",
        f"--trainer.logger.init_args.artifact_location={workdir}/artifacts",
        f"--trainer.logger.init_args.checkpoint_dir={workdir}/out",
        *extra,
    ]
    if not diagnostics:
        args += [f"--{name}.enabled=false" for name in DIAGNOSTICS]
    return CGCLightningCLI(MultiTaskLoRAModule, MultiTaskDataModule, run=False, args=args)


def run_once(config, steps, val_every, diagnostics, workdir, extra) -> dict:
    """One timed ``fit``: its seconds in all, in validation, and inside each diagnostic callback; its weights."""
    from cgc_lightning.inject import adapter_parameters

    cli = build(config, steps, val_every, diagnostics, workdir, extra)
    cli.datamodule.prepare_data()
    val_loop = cli.trainer.fit_loop.epoch_loop.val_loop
    run, val = val_loop.run, {"seconds": 0.0, "count": 0}

    def timed_run(*args, **kwargs):  # the whole validation, the callbacks' on_validation_end included
        start = time.perf_counter()
        try:
            return run(*args, **kwargs)
        finally:
            val["seconds"] += time.perf_counter() - start
            val["count"] += not cli.trainer.sanity_checking

    val_loop.run = timed_run
    start = time.perf_counter()
    cli.trainer.fit(cli.model, cli.datamodule)
    fit = time.perf_counter() - start
    return {
        "fit": fit,
        "val": val["seconds"],
        "train": fit - val["seconds"],
        "validations": val["count"],
        "inside": {type(c).__name__: c.stopwatch.seconds for c in cli.trainer.callbacks if hasattr(c, "stopwatch")},
        "weights": {n: p.detach().cpu().clone() for n, p in adapter_parameters(cli.model.model)},
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="experiments/tiny.yaml")
    p.add_argument("--steps", type=int, default=150, help="trainer.max_steps")
    p.add_argument("--val-every", type=int, default=50, help="trainer.val_check_interval")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--shape", choices=sorted(SHAPES), help="replace the config's model by a random one of this shape")
    p.add_argument("extra", nargs="*", help="more CLI arguments for both variants (after --)")
    args = p.parse_args(argv)

    runs: dict[str, list[dict]] = {"off": [], "on": []}
    same = True
    with tempfile.TemporaryDirectory() as tmp:
        extra = list(args.extra)
        if args.shape:
            extra.append(f"--model.model.name_or_path={shaped_model(args.shape, Path(tmp) / 'model')}")
        for r in range(args.rounds):
            for variant in ("off", "on") if r % 2 == 0 else ("on", "off"):
                out = run_once(
                    args.config, args.steps, args.val_every, variant == "on", Path(tmp) / f"{r}{variant}", extra
                )
                runs[variant].append(out)
                print(f"round {r + 1}/{args.rounds} {variant:>3}: fit {out['fit']:7.2f} s", flush=True)
            same &= all(
                torch.equal(runs["on"][-1]["weights"][k], runs["off"][-1]["weights"][k])
                for k in runs["on"][-1]["weights"]
            )
    med = {v: {k: statistics.median(o[k] for o in runs[v]) for k in ("fit", "train", "val")} for v in runs}
    spread = {v: (max(o["fit"] for o in runs[v]) - min(o["fit"] for o in runs[v])) / med[v]["fit"] for v in runs}
    n_val = runs["on"][0]["validations"]
    inside = {k: statistics.median(o["inside"][k] for o in runs["on"]) for k in runs["on"][0]["inside"]}
    ratio = {k: med["on"][k] / med["off"][k] for k in ("fit", "train", "val")}
    lines = [
        f"config={args.config} model={args.shape or 'as configured'} steps={args.steps} val_every={args.val_every} "
        f"({n_val} validations) rounds={args.rounds} torch threads={torch.get_num_threads()} "
        f"extra={' '.join(args.extra) or '-'}",
        f"{'seconds (median)':<18}{'fit':>8}{'training':>10}{'validation':>12}{'fit spread':>12}",
        *[
            f"{'diagnostics ' + v:<18}{m['fit']:>8.2f}{m['train']:>10.2f}{m['val']:>12.2f}{spread[v]:>12.1%}"
            for v, m in med.items()
        ],
        f"{'on / off':<18}{ratio['fit']:>8.3f}{ratio['train']:>10.3f}{ratio['val']:>12.3f}",
        "inside the callbacks (s per fit, median): " + ", ".join(f"{k} {v:.2f}" for k, v in inside.items()),
        f"validation: +{(med['on']['val'] - med['off']['val']) / max(n_val, 1):.2f} s per validation; "
        f"adapter weights identical on vs off: {same}",
    ]
    print("\n".join(lines))
    return {"median": med, "ratio": ratio, "inside": inside, "same": same}


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")  # args= on purpose
    main()
