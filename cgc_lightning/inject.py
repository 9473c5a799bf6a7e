"""Put adapters into any Hugging Face causal LM, freeze the base, and merge per task.

The injector walks ``named_modules()``, matches names against the target patterns, wraps each
matched layer (``nn.Linear``, or GPT-2's ``Conv1D``) as ``base_layer`` of an :class:`AdaptedLayer`,
and puts the wrapper in its place with ``setattr(parent, child, wrapper)``. Trainable tensors are
named ``lora_*``, ``gate_*`` or ``router_*`` inside an adapter, so freezing, optimizer groups and
adapter-only checkpoints are name filters.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from cgc_lightning.adapters.experts import Adapter
from cgc_lightning.config import MODULA_METHODS, AdapterConfig, TaskLayout
from cgc_lightning.methods import method_spec
from cgc_lightning.routing import RoutingState, attach_routing_state, routing_state

_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: Target-module presets by ``config.model_type``: attention and MLP projections, never ``lm_head``.
PRESETS: dict[str, list[str]] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "stablelm": _LLAMA_LIKE,
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
}
ADAPTER_PREFIXES = ("lora_", "gate_", "router_")
SHARED_GATE_NAME = "adapter_gate"


def _global_module_hooks() -> bool:
    """Whether any hook is registered for every module (``torch.nn.modules.module.register_module_*_hook``)."""
    m = torch.nn.modules.module
    return bool(
        m._global_forward_hooks
        or m._global_forward_pre_hooks
        or m._global_backward_hooks
        or m._global_backward_pre_hooks
    )


class AdaptedLayer(nn.Module):
    """A frozen layer plus an adapter: ``h = base_layer(x) + adapter(x, routed ids)``.

    Args:
        base_layer: the original ``nn.Linear`` or ``Conv1D``.
        adapter: the method's :class:`~cgc_lightning.adapters.experts.Adapter`.
        state: the model's routing state.
    """

    def __init__(self, base_layer: nn.Module, adapter: Adapter, state: RoutingState):
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter
        self.__dict__["routing"] = state  # shared by all layers; not a submodule
        # GPT-2's Conv1D stores its weight as (d_in, d_out)
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.merged_task: int | None = None

    # Some modeling code reads these off the projection directly.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.merged_task is not None or self.routing.disabled:
            return self.base_layer(x, *args, **kwargs)
        task_ids, cluster_ids = self.routing.ids_for(x.shape[0])
        if task_ids is None and self.adapter.needs_task_ids:
            raise RuntimeError(
                "this model's adapters need per-sample task ids and none are set: call it inside "
                "`with cgc_lightning.routing.route(model, task_ids=...):`"
            )
        # The dtype the adapter computes in. Under autocast its products run in the autocast dtype whatever its
        # weights' dtype (float32 adapters on a bf16 base), so x is not cast up to the weights' dtype for the
        # products to cast it back, and ``out`` in that dtype goes into the last product (below) rather than
        # taking the update as a separate pass: fewer operations for the host to issue, the same products.
        autocast = torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else self.adapter.dtype
        # a plain frozen nn.Linear runs inside the adapter's node (LinearMixture) where its output would have the
        # products' dtype: no module call and no autograd node of its own in an eager step
        base = None if args or kwargs or not (autocast or x.dtype == dtype) else self._fusable_base()
        out = None if base is not None else self.base_layer(x, *args, **kwargs)
        flat = x.dim() != 3  # reshape only when needed: each view is one more node for autograd to walk
        x3 = x.reshape(x.shape[0], -1, x.shape[-1]) if flat else x  # (B, T, d_in)
        x3 = x3 if autocast else x3.to(dtype)
        if task_ids is not None and task_ids.dim() == 2:  # packed rows: a task per token, each token a sample
            if task_ids.shape != x3.shape[:2]:
                raise RuntimeError(
                    f"per-token task ids of shape {tuple(task_ids.shape)} for an input of {tuple(x3.shape[:2])} tokens"
                )
            x3, flat = x3.reshape(-1, 1, x3.shape[-1]), True  # (B*T, 1, d_in)
            task_ids, cluster_ids = self.routing.flat_ids
        # the batch's routing constants, shared by every layer; a compiled graph builds its own (and is not
        # guarded on a table that is new with every batch)
        cache = None if torch.compiler.is_compiling() else self.routing.batch_cache
        bank = self._bank_weights(task_ids, dtype, cache)
        kw = {"cache": cache} if bank is None else {"cache": cache, "weights": bank}
        if base is not None:
            h = self.adapter(x3, task_ids, cluster_ids, base=base, **kw)
            return h.reshape(*x.shape[:-1], h.shape[-1]) if flat else h
        if out.dtype != dtype:
            delta = self.adapter(x3, task_ids, cluster_ids, **kw)  # (B, T, d_out)
            return out + delta.reshape(out.shape).to(out.dtype)
        # the usual case: the adapter adds its update inside its last product, no separate pass over `out`
        out3 = out.reshape(x3.shape[0], x3.shape[1], -1) if flat else out  # (B, T, d_out)
        h = self.adapter(x3, task_ids, cluster_ids, out=out3, **kw)
        return h.reshape(out.shape) if flat else h

    def _fusable_base(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """``(W, bias)`` when the frozen layer can run inside the adapter's node, else ``None``.

        It can when it is a plain ``nn.Linear`` (not a subclass: quantised layers, ``Conv1D``) with no gradient and
        no hooks, the adapter is one whose forward takes ``base`` (not MoDULA's own), and no graph is being
        compiled (the compiled step keeps the layer's own call: what Inductor fuses there is already one graph).
        """
        layer = self.base_layer
        if (
            torch.compiler.is_compiling()
            or type(layer) is not nn.Linear
            or type(self.adapter).forward is not Adapter.forward
            or layer.weight.requires_grad
            or (layer.bias is not None and layer.bias.requires_grad)
            or layer._forward_hooks
            or layer._forward_pre_hooks
            or layer._backward_hooks
            or layer._backward_pre_hooks
            or _global_module_hooks()
        ):
            return None
        return layer.weight, layer.bias

    def _bank_weights(self, task_ids: torch.Tensor | None, dtype: torch.dtype, cache) -> torch.Tensor | None:
        """This layer's gate weights from the model's gate bank, or ``None`` where the layer computes its own.

        The bank serves eager forwards of a routed batch (one id per sample), with or without grad; not compiled
        graphs (no cache), inference mode (inference tensors cannot be kept for a later forward), packed rows or
        ``generate()``'s expanded ids (not the routed ids tensor).
        """
        state = self.routing
        bank = state.gate_bank
        if (
            bank is None
            or cache is None
            or task_ids is None
            or task_ids is not state.task_ids
            or task_ids.dim() != 1
            or getattr(self.adapter, "_bank_slot", None) is None
            or torch.is_inference_mode_enabled()
        ):
            return None
        return bank.weights(self.adapter, task_ids, dtype, cache, recomputing=state.recomputing)

    def _weight_update(self, task: int) -> torch.Tensor:
        dW = self.adapter.delta_weight(task)  # (d_out, d_in)
        return (dW.t() if self.fan_in_fan_out else dW).to(self.base_layer.weight.dtype)

    @torch.no_grad()
    def merge(self, task: int) -> None:
        """Fold task ``task``'s constant update into the base weight; the layer then serves that task only."""
        if self.merged_task is not None:
            raise RuntimeError(f"task {self.merged_task} is already merged; unmerge first")
        self.base_layer.weight.add_(self._weight_update(task))
        self.merged_task = task

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged_task is None:
            return
        self.base_layer.weight.sub_(self._weight_update(self.merged_task))
        self.merged_task = None


@dataclass(frozen=True)
class ParamReport:
    """Trainable (adapter and gate) versus total parameter counts."""

    trainable: int
    total: int

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
            f"trainable%: {100 * self.trainable / max(self.total, 1):.4f}"
        )


def _layer_dims(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.weight.shape[1]
    return layer.in_features, layer.out_features


def _matches(name: str, patterns: Sequence[str]) -> bool:
    for p in patterns:
        if p.startswith("re:"):
            if re.fullmatch(p[3:], name):
                return True
        elif name == p or name.endswith("." + p):
            return True
    return False


def resolve_target_modules(model: nn.Module, target_modules: str | Sequence[str]) -> list[str]:
    """Turn ``auto``, a preset name or a pattern list into a pattern list.

    ``auto`` takes this project's preset for ``config.model_type`` (every attention and MLP projection); a model type
    without one falls back on PEFT's per-architecture mapping (``q``/``v`` projections mostly), with a warning that
    says which layers that adapts and how to choose others.
    """
    if isinstance(target_modules, str):
        key = target_modules
        if key == "auto":
            key = getattr(getattr(model, "config", None), "model_type", None)
            if key not in PRESETS:
                return _peft_target_modules(model, key)
        if key in PRESETS:
            return list(PRESETS[key])
        return [target_modules]
    return list(target_modules)


def _peft_target_modules(model: nn.Module, model_type: str | None) -> list[str]:
    """PEFT's default LoRA targets for ``model_type`` as our patterns, or an error that lists the model's layers."""
    layers = ", ".join(linear_layer_names(model))
    try:
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_mapping
    except ImportError:
        peft_mapping, hint = {}, " (with `peft` installed, its per-architecture mapping would be tried)"
    else:
        hint = " nor in PEFT's per-architecture mapping"
    found = peft_mapping.get(model_type)
    if not found:
        raise ValueError(
            f"no target-module preset for model_type {model_type!r}{hint}; set adapter.target_modules to a list of "
            f"layer names. Linear layers in this model: {layers}"
        )
    patterns = ["re:" + found] if isinstance(found, str) else list(found)
    warnings.warn(
        f"adapter.target_modules: auto has no preset of its own for model_type {model_type!r}; using PEFT's mapping "
        f"{patterns}. To adapt other layers, list them in adapter.target_modules (linear layers: {layers})",
        stacklevel=3,
    )
    return patterns


def linear_layer_names(model: nn.Module) -> list[str]:
    """Distinct leaf names of the layers an adapter can wrap, e.g. ``['q_proj', 'k_proj', ...]``."""
    names = [n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]
    return list(dict.fromkeys(names))


def is_adapter_param(name: str) -> bool:
    """Whether a parameter name (from ``model.named_parameters()``) is an adapter or gate tensor."""
    leaf = name.rsplit(".", 1)[-1]
    in_adapter = ".adapter." in name or name.startswith(SHARED_GATE_NAME + ".")
    return in_adapter and leaf.startswith(ADAPTER_PREFIXES)


def adapter_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    for name, p in model.named_parameters():
        if is_adapter_param(name):
            yield name, p


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    for name, m in model.named_modules():
        if isinstance(m, AdaptedLayer):
            yield name, m


def param_report(model: nn.Module) -> ParamReport:
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    # a MoDULA stage freezes some rows of tensors that require grad; they are not trained
    trainable -= sum(getattr(layer.adapter, "frozen_numel", 0) for _, layer in adapted_layers(model))
    return ParamReport(trainable, sum(p.numel() for p in params))


def _build_shared_gate(config: AdapterConfig, layout: TaskLayout, dtype, device) -> nn.Module | None:
    spec = method_spec(config.method)
    if not config.shared_gate or spec.shared_gate is None:
        return None
    return spec.shared_gate(config, layout, dtype, device)


def build_adapter(
    config: AdapterConfig,
    layout: TaskLayout,
    in_features: int,
    out_features: int,
    gate: nn.Module | None = None,
    dtype=None,
    device=None,
) -> Adapter:
    """The method's adapter for one layer of shape ``(d_out, d_in)`` (its registry entry's ``build``)."""
    common = dict(
        in_features=in_features,
        out_features=out_features,
        r=config.r,
        alpha=config.alpha,
        dropout=config.dropout,
        rslora=config.rslora,
        dtype=dtype,
        device=device,
    )
    adapter = method_spec(config.method).build(config, layout, gate, **common)
    if not isinstance(adapter, Adapter):
        raise TypeError(f"method {config.method!r} built a {type(adapter).__name__}, not an adapters.experts.Adapter")
    return adapter


@dataclass
class Injection:
    """What :func:`inject_adapters` did: kept on the model for merging, saving and export."""

    config: AdapterConfig
    layout: TaskLayout
    target_names: list[str]


def injection(model: nn.Module) -> Injection:
    routing_state(model)  # raises a clear error when there are no adapters
    return model.__dict__["_cgc_injection"]


#: Base weights in these dtypes get float32 adapters under ``adapter_dtype="auto"``.
HALF_DTYPES = (torch.bfloat16, torch.float16)


def adapter_param_dtype(base: torch.dtype, adapter_dtype: str | torch.dtype = "auto") -> torch.dtype:
    """The dtype of an adapter's parameters on a layer whose weight is in ``base``.

    ``auto``: float32 on a half-precision base (bf16, fp16), as PEFT keeps its adapters, otherwise the base's
    own (float32, float64). AdamW updates a parameter in its own dtype, and bf16 keeps 8 significant bits: an
    update below half the spacing at the parameter's value is rounded away (at 0.03 that is 1e-4, a typical
    Adam step), so bf16 gate logits stall near 0, their softmax near uniform. ``base``: the layer's own dtype
    (what every run used before ``auto``). A ``torch.dtype`` or its name: that dtype.
    """
    if adapter_dtype == "auto":
        return torch.float32 if base in HALF_DTYPES else base
    if adapter_dtype == "base":
        return base
    if isinstance(adapter_dtype, torch.dtype):
        return adapter_dtype
    from cgc_lightning.hf import DTYPES  # the names model.model.dtype takes

    if adapter_dtype not in DTYPES:
        raise ValueError(f"adapter_dtype must be auto, base or one of {', '.join(DTYPES)}; got {adapter_dtype!r}")
    return DTYPES[adapter_dtype]


def inject_adapters(
    model: nn.Module, config: AdapterConfig, layout: TaskLayout, adapter_dtype: str | torch.dtype = "auto"
) -> ParamReport:
    """Wrap the target layers of ``model`` with the configured method, in place, and freeze the rest.

    Args:
        model: any ``transformers`` causal LM (or any module with ``nn.Linear``/``Conv1D`` layers).
        config: the method and its hyperparameters.
        layout: the tasks and their clusters.
        adapter_dtype: the adapters' parameter dtype (:func:`adapter_param_dtype`): ``auto`` (float32 on a
            half-precision base), ``base``, or a dtype.

    Returns:
        Trainable versus total parameter counts.
    """
    if "_cgc_injection" in model.__dict__:
        raise RuntimeError("this model already has adapters; load a fresh base model to inject again")
    patterns = resolve_target_modules(model, config.target_modules)
    exclude = list(config.exclude_modules)
    targets = [(n, m) for n, m in model.named_modules() if n and _matches(n, patterns) and not _matches(n, exclude)]
    if not targets:
        examples = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))][:3]
        raise ValueError(
            f"no module matched target_modules {patterns}. Linear layers in this model: "
            f"{', '.join(linear_layer_names(model))} (full names look like {', '.join(examples)})"
        )
    wrong = [f"{n} ({type(m).__name__})" for n, m in targets if not isinstance(m, (nn.Linear, Conv1D))]
    if wrong:
        raise ValueError(
            f"target_modules matched layers that are not nn.Linear or Conv1D: {', '.join(wrong)}; "
            "use more specific patterns (a suffix such as 'q_proj', or 're:<regex>')"
        )

    ref = targets[0][1].weight
    state = RoutingState(layout.tasks, layout.task_cluster)
    gate = _build_shared_gate(config, layout, adapter_param_dtype(ref.dtype, adapter_dtype), ref.device)
    if gate is not None:
        model.add_module(SHARED_GATE_NAME, gate.train(model.training))
    modules = dict(model.named_modules())
    for name, layer in targets:
        d_in, d_out = _layer_dims(layer)
        dtype = adapter_param_dtype(layer.weight.dtype, adapter_dtype)
        adapter = build_adapter(config, layout, d_in, d_out, gate, dtype=dtype, device=layer.weight.device)
        wrapper = AdaptedLayer(layer, adapter, state).train(layer.training)  # new modules start in train mode
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, wrapper)
    attach_routing_state(model, state)
    model.__dict__["_cgc_injection"] = Injection(config, layout, [n for n, _ in targets])
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter_param(name))
    for _, layer in adapted_layers(model):
        if hasattr(layer.adapter, "set_stage"):  # a staged method (MoDULA) trains only its stage's part
            layer.adapter.set_stage(config.stage)
    return param_report(model)


def _task_index(model: nn.Module, task: int | str) -> int:
    tasks = injection(model).layout.tasks
    if isinstance(task, str):
        if task not in tasks:
            raise ValueError(f"unknown task {task!r}; this model's tasks are {list(tasks)}")
        return tasks.index(task)
    if not 0 <= task < len(tasks):
        raise ValueError(
            f"task id {task} is out of range: this model's adapters know {len(tasks)} tasks "
            f"(0..{len(tasks) - 1}: {', '.join(tasks)})"
        )
    return task


def check_mergeable(config: AdapterConfig) -> None:
    if not config.mergeable and config.method in MODULA_METHODS:
        raise ValueError(
            f"{config.method} in stage {config.stage!r} routes each token, so a task's update is not a constant "
            "matrix and cannot be merged or exported as LoRA; only the universal and domain stages are mergeable"
        )
    if not config.mergeable:
        raise ValueError(
            f"{config.method} with gate_input={config.gate_input!r} reads each token, so a task's "
            "update is not a constant matrix and cannot be merged or exported as LoRA; "
            "train with gate_input: task to merge"
        )


def merge_task(model: nn.Module, task: int | str) -> None:
    """Fold one task's update into the base weights (serving that task only, at base-model cost)."""
    check_mergeable(injection(model).config)
    t = _task_index(model, task)
    for _, layer in adapted_layers(model):
        layer.merge(t)
    routing_state(model).merged_task = t


def unmerge(model: nn.Module) -> None:
    """Undo :func:`merge_task`: base weights back to ``W0`` (within float rounding)."""
    for _, layer in adapted_layers(model):
        layer.unmerge()
    routing_state(model).merged_task = None
