r"""``python -m cgc_lightning export`` and ``merge``: a trained run's tasks as PEFT adapters or as full models.

    python -m cgc_lightning export SOURCE --out DIR [--tasks a,b]     # DIR/<task>/: a PEFT LoRA adapter per task
    python -m cgc_lightning merge  SOURCE --out DIR [--tasks a,b]     # DIR/<task>/: a full model per task

SOURCE is any of:

* a checkpoint written by ``fit`` (``outputs/<experiment>/<run>/checkpoints/best.ckpt``): its
  hyper-parameters name the base model and the adapter config, its state dict holds the adapters;
* a saved adapter directory (``save_adapter``; the ``best_adapter/`` artifact of a run, downloaded);
* an MLflow run id: the run's ``best_adapter/`` artifact, from ``--tracking-uri`` (default: the project's
  SQLite store, ``sqlite:///mlruns/mlflow.db``).

``export`` writes each task's update as a PEFT LoRA (``cgc_lightning.export.export_peft``), loadable with
``peft.PeftModel.from_pretrained(base, DIR/<task>)``. ``merge`` folds each task's update into a copy of the base
weights and saves a plain Hugging Face model with the tokenizer, loadable with
``AutoModelForCausalLM.from_pretrained(DIR/<task>)``. Both need a method whose task update is a fixed matrix
(not a token-reading gate or MoDULA's router stage); both refuse to write into a non-empty folder.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

import torch

RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class ExportError(Exception):
    """A source, task or output folder that cannot be used; the message says which and why."""


def load_source(source: str, base_model: str | None, gguf_file: str | None, tracking_uri: str | None):
    """``(model with the trained adapters, ModelSpec)`` from a checkpoint, an adapter directory or a run id."""
    from cgc_lightning.config import AdapterConfig, TaskLayout
    from cgc_lightning.export import WEIGHTS_NAME, load_adapter, read_adapter_config
    from cgc_lightning.hf import ModelSpec, load_model
    from cgc_lightning.inject import adapter_parameters, inject_adapters

    path = Path(source)
    if RUN_ID.match(source) and not path.exists():
        from mlflow import MlflowClient

        from cgc_lightning.mlflow_env import default_tracking_uri

        tmp = tempfile.mkdtemp(prefix="cgc-export-")
        try:
            got = MlflowClient(tracking_uri or default_tracking_uri()).download_artifacts(source, "best_adapter", tmp)
        except Exception as e:
            raise ExportError(f"run {source}: could not fetch its best_adapter/ artifact ({e})") from e
        path = Path(got)
    if path.is_dir():
        if not (path / WEIGHTS_NAME).is_file():
            raise ExportError(f"{path}: not a saved adapter directory (no {WEIGHTS_NAME})")
        _, _, _, meta = read_adapter_config(path)
        name = base_model or meta.get("base_model")
        if not name:
            raise ExportError(f"{path} does not name its base model: give --base-model")
        spec = ModelSpec(name_or_path=name, gguf_file=gguf_file)
        return load_adapter(load_model(spec), path), spec
    if path.suffix == ".ckpt" and path.is_file():
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        hp = ckpt.get("hyper_parameters") or {}
        if "adapter" not in hp or "model" not in hp:
            raise ExportError(f"{path}: not a checkpoint written by cgc_lightning fit (no model/adapter settings)")
        spec = ModelSpec(**(hp["model"] | ({"name_or_path": base_model} if base_model else {})))
        if gguf_file:
            spec = ModelSpec(**(vars(spec) | {"gguf_file": gguf_file}))
        if spec.random_init:
            raise ExportError(
                f"{path} was trained on a randomly initialised base ({spec.name_or_path}), whose weights no file "
                "holds: there is nothing to export onto"
            )
        clusters = list(dict.fromkeys(hp["task_clusters"]))
        layout = TaskLayout(
            tuple(hp["task_names"]), tuple(clusters), tuple(clusters.index(c) for c in hp["task_clusters"])
        )
        model = load_model(spec)
        inject_adapters(model, AdapterConfig(**hp["adapter"]), layout, hp.get("adapter_dtype", "base"))
        state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
        own = dict(adapter_parameters(model))
        if set(own) != set(state):
            raise ExportError(f"{path}: its adapter tensors do not fit the model its settings describe")
        with torch.no_grad():
            for k, p in own.items():
                p.copy_(state[k].to(p.dtype))
        return model, spec
    raise ExportError(f"{source}: not a checkpoint (.ckpt), a saved adapter directory or an MLflow run id")


def chosen_tasks(model, tasks: str | None) -> list[str]:
    from cgc_lightning.inject import injection

    known = list(injection(model).layout.tasks)
    if not tasks:
        return known
    wanted = [t.strip() for t in tasks.split(",") if t.strip()]
    unknown = [t for t in wanted if t not in known]
    if unknown:
        raise ExportError(f"unknown task(s) {unknown}; this run's tasks are {known}")
    return wanted


def empty_output(out: str) -> Path:
    path = Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ExportError(f"--out {path} exists and is not an empty folder; choose a new one (nothing was written)")
    return path


def export(model, spec, tasks: list[str], out: Path) -> list[Path]:
    from cgc_lightning.export import export_peft

    return [export_peft(model, t, out / t, base_model=spec.name_or_path) for t in tasks]


def merge(model, spec, tasks: list[str], out: Path) -> list[Path]:
    """Each task's merged weights in a plain copy of the base model, saved with the tokenizer."""
    from cgc_lightning.hf import load_model, load_tokenizer
    from cgc_lightning.inject import adapted_layers, merge_task, unmerge

    plain = load_model(spec)  # the base without adapters, written once per task with that task's weights
    tokenizer = load_tokenizer(spec)
    written = []
    for t in tasks:
        merge_task(model, t)
        with torch.no_grad():
            for name, layer in adapted_layers(model):
                plain.get_submodule(name).weight.copy_(layer.base_layer.weight)
        unmerge(model)
        plain.save_pretrained(out / t)
        tokenizer.save_pretrained(out / t)
        written.append(out / t)
    return written


def main(argv: list[str] | None = None, command: str = "export") -> int:
    p = argparse.ArgumentParser(
        prog=f"python -m cgc_lightning {command}",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", help="a fit checkpoint (.ckpt), a saved adapter directory, or an MLflow run id")
    p.add_argument("--out", required=True, help="output folder (new or empty): one subfolder per task")
    p.add_argument("--tasks", help="comma-separated task names (default: every task)")
    p.add_argument("--base-model", help="base model name or path, in place of the one the source names")
    p.add_argument("--gguf-file", help="the GGUF file in --base-model's folder, for a GGUF base")
    p.add_argument("--tracking-uri", help="MLflow store of a run id (default: sqlite:///mlruns/mlflow.db)")
    args = p.parse_args(argv)
    try:
        out = empty_output(args.out)
        model, spec = load_source(args.source, args.base_model, args.gguf_file, args.tracking_uri)
        from cgc_lightning.inject import check_mergeable, injection

        check_mergeable(injection(model).config)
        tasks = chosen_tasks(model, args.tasks)
        written = (export if command == "export" else merge)(model, spec, tasks, out)
    except (ExportError, ValueError, FileNotFoundError) as e:
        print(f"error: {command}: {e}", file=sys.stderr)
        return 2
    how = "PEFT LoRA adapter" if command == "export" else "merged model"
    for path in written:
        print(f"{path.name}: {how} in {path}")
    return 0


def merge_main(argv: list[str] | None = None) -> int:
    return main(argv, "merge")
