"""Adapter files: our own format (every task, reloadable), and one task as a standard PEFT LoRA.

Our format is a directory with

    adapter_model.safetensors   every adapter and gate tensor, by its name in the model
    adapter_config.json         the method config, the task layout and the adapted layer names

PEFT export writes task t's update ``dW_t = B'_t A'_t`` (gate weights and scaling folded into
``B'``, ``lora_alpha = r'`` so PEFT's own scaling is 1) in the layout ``peft.PeftModel.from_pretrained``
reads, so any LoRA-serving stack serves the task with no cgc-lightning code.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cgc_lightning.adapters.modula import DOMAIN_TRAINED_STAGES, MoDULA
from cgc_lightning.config import MODULA_METHODS, AdapterConfig, TaskLayout
from cgc_lightning.inject import (
    _task_index,
    adapted_layers,
    adapter_parameters,
    check_mergeable,
    inject_adapters,
    injection,
)

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT = "cgc-lightning-adapter"


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter and gate tensor of ``model``, detached, on the CPU."""
    return {name: p.detach().cpu().contiguous() for name, p in adapter_parameters(model)}


def save_adapter(
    model: nn.Module,
    path: str | Path,
    *,
    base_model: str | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the adapter weights (safetensors) and the config needed to rebuild them.

    Args:
        model: a model with adapters.
        path: output directory (created).
        base_model: name or path of the base model, recorded for whoever reloads it.
        state_dict: adapter tensors to write instead of the model's current ones (e.g. a best checkpoint's).
    """
    inj = injection(model)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = adapter_state_dict(model)
    if state_dict is not None:
        tensors = {k: state_dict[k].detach().cpu().contiguous() if k in state_dict else v for k, v in tensors.items()}
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": FORMAT})
    meta = {
        "format": FORMAT,
        "version": 1,
        "base_model": base_model,
        "adapter": inj.config.to_dict(),
        "layout": inj.layout.to_dict(),
        "target_names": inj.target_names,
    }
    (path / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
    return path


def read_adapter_config(path: str | Path) -> tuple[AdapterConfig, TaskLayout, list[str], dict]:
    """Read ``adapter_config.json`` of a saved adapter; errors name the file and the problem."""
    cfg_file = Path(path) / CONFIG_NAME
    if not cfg_file.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path}: not a saved cgc-lightning adapter directory")
    meta = json.loads(cfg_file.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{cfg_file} is not a cgc-lightning adapter config (format={meta.get('format')!r}); "
            "a PEFT adapter is loaded with peft.PeftModel.from_pretrained"
        )
    layout = TaskLayout(
        tuple(meta["layout"]["tasks"]), tuple(meta["layout"]["clusters"]), tuple(meta["layout"]["task_cluster"])
    )
    return AdapterConfig(**meta["adapter"]), layout, list(meta["target_names"]), meta


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Rebuild the saved adapters on a freshly loaded base model and load their weights.

    Only safetensors are read, so nothing is unpickled.
    """
    config, layout, targets, _ = read_adapter_config(path)
    weights_file = Path(path) / WEIGHTS_NAME
    if not weights_file.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {path}")
    config.target_modules = targets  # exactly the layers that were adapted
    config.exclude_modules = []
    inject_adapters(model, config, layout)
    tensors = load_file(str(weights_file))
    own = dict(adapter_parameters(model))
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{weights_file} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            " (was it saved from a different base model?)"
        )
    with torch.no_grad():
        for name, p in own.items():
            t = tensors[name]
            if t.shape != p.shape:
                raise ValueError(
                    f"{weights_file}: tensor {name} has shape {tuple(t.shape)}, the model expects {tuple(p.shape)}"
                )
            p.copy_(t.to(p.dtype))
    return model


def read_saved_adapter(path: str | Path) -> tuple[AdapterConfig, TaskLayout, dict[str, torch.Tensor]]:
    """The config, task layout and adapter tensors of a saved adapter directory, a ``fit`` ``.ckpt``, or an
    MLflow artifact URI (``runs:/<run id>/best_adapter``, fetched from ``$MLFLOW_TRACKING_URI`` or the default store).
    """
    path = str(path)
    if path.startswith(("runs:/", "mlflow-artifacts:/", "models:/")):
        from mlflow.artifacts import download_artifacts

        from cgc_lightning.mlflow_env import default_tracking_uri

        path = download_artifacts(artifact_uri=path, tracking_uri=default_tracking_uri())
    if not Path(path).exists():
        raise ValueError(
            f"init_adapter {path} does not exist (model.adapter.init_adapter): give a saved adapter folder, "
            "a fit checkpoint (.ckpt) or "
            "runs:/<run id>/best_adapter"
        )
    if Path(path).is_file() and path.endswith(".ckpt"):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        hp = ckpt.get("hyper_parameters") or {}
        if "adapter" not in hp or "task_names" not in hp:
            raise ValueError(f"{path} is not a checkpoint of cgc-lightning's fit (no adapter hyperparameters)")
        clusters = list(hp.get("task_clusters") or ["all"] * len(hp["task_names"]))
        names = list(dict.fromkeys(clusters))
        layout = TaskLayout(tuple(hp["task_names"]), tuple(names), tuple(names.index(c) for c in clusters))
        tensors = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
        return AdapterConfig(**hp["adapter"]), layout, tensors
    config, layout, _, _ = read_adapter_config(path)
    weights_file = Path(path) / WEIGHTS_NAME
    if not weights_file.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {path}")
    return config, layout, load_file(str(weights_file))


def domain_rows(saved: tuple[str, ...], clusters: tuple[str, ...], where: str) -> list[int | None]:
    """For each of ``clusters``, its index among the ``saved`` domains, or ``None`` for a new one (matched by name)."""
    missing = [c for c in saved if c not in clusters]
    if missing:
        raise ValueError(
            f"{where} has domain expert(s) {missing} that are not among this run's clusters {list(clusters)}; "
            "domains are matched by cluster name and a trained domain cannot be dropped: keep its cluster in "
            "data.clusters (and at least one of its tasks), or rename the cluster back"
        )
    return [saved.index(c) if c in saved else None for c in clusters]


@torch.no_grad()
def init_from_adapter(model: nn.Module, path: str | Path) -> list[str]:
    """Start ``model``'s adapters from a saved adapter, e.g. the previous training stage's.

    The method and its shapes must match. For MoDULA, the domains are matched by cluster name: the
    universal experts and every saved domain's expert and router row are copied, a cluster the
    saved adapter does not have keeps its fresh expert, and the layers are set to this model's stage
    with the saved adapter's trained domains frozen (so a ``domain`` stage trains only new domains).

    Args:
        model: a model with adapters (:func:`~cgc_lightning.inject.inject_adapters`).
        path: see :func:`read_saved_adapter`.

    Returns:
        The clusters whose domain expert was not trained by the saved adapter (MoDULA; ``[]`` otherwise).
    """
    inj = injection(model)
    saved_config, saved_layout, tensors = read_saved_adapter(path)
    if saved_config.method != inj.config.method:
        raise ValueError(f"{path} holds a {saved_config.method} adapter; this model's method is {inj.config.method}")
    own = dict(adapter_parameters(model))
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{path} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]} "
            "(saved from a different base model or other target_modules?)"
        )
    if inj.config.method not in MODULA_METHODS:
        for name, p in own.items():
            if tensors[name].shape != p.shape:
                raise ValueError(
                    f"{path}: tensor {name} has shape {tuple(tensors[name].shape)}, the model expects {tuple(p.shape)}"
                    " (a different task layout or method settings?)"
                )
            p.copy_(tensors[name].to(p.dtype))
        return []
    for field in ("r", "num_universal"):
        if getattr(saved_config, field) != getattr(inj.config, field):
            raise ValueError(
                f"{path} was trained with {field}={getattr(saved_config, field)}, this model has "
                f"{field}={getattr(inj.config, field)}; a stage continues the previous one's experts as they are"
            )
    rows = domain_rows(saved_layout.clusters, inj.layout.clusters, str(path))
    trained = [k for k, old in enumerate(rows) if old is not None and saved_config.stage in DOMAIN_TRAINED_STAGES]
    for name, layer in adapted_layers(model):
        adapter = layer.adapter
        assert isinstance(adapter, MoDULA)
        prefix = f"{name}.adapter."
        adapter.load_saved({k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}, rows)
        adapter.set_stage(inj.config.stage, trained_domains=trained)
    untrained = [c for k, c in enumerate(inj.layout.clusters) if k not in trained]
    stage = inj.config.stage
    if stage == "domain" and not untrained:
        raise ValueError(
            f"stage 'domain' has no domain to train: {path} (stage {saved_config.stage!r}) has trained every "
            f"cluster of this run ({list(inj.layout.clusters)}); add a cluster to the data to add a domain, or "
            "start from the universal stage's adapter to train the domains again"
        )
    if stage == "router" and untrained:
        warnings.warn(
            f"stage 'router' starts from {path}, whose domain expert(s) for {untrained} were never trained; "
            "run the domain stage first",
            stacklevel=2,
        )
    return untrained


def export_peft(model: nn.Module, task: int | str, path: str | Path, *, base_model: str | None = None) -> Path:
    """Write one task's update as a PEFT LoRA adapter directory.

    The rank is ``K * r``, where ``K`` is the number of experts the task sees (``S + P`` for CGC-LoRA).
    """
    inj = injection(model)
    check_mergeable(inj.config)
    t = _task_index(model, task)
    tensors, rank, fan_in_fan_out = {}, None, False
    for name, layer in adapted_layers(model):
        A, B = layer.adapter.task_factors(t)  # (R, d_in), (d_out, R)
        rank = A.shape[0]
        fan_in_fan_out |= layer.fan_in_fan_out
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.detach().cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.detach().cpu().contiguous()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": rank,  # scaling 1: the method's own scaling is already folded into B'
        "lora_dropout": 0.0,
        "target_modules": sorted(inj.target_names),
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": False,
        "inference_mode": True,
        "modules_to_save": None,
        "init_lora_weights": True,
    }
    (path / CONFIG_NAME).write_text(json.dumps(peft_config, indent=2))
    return path
