"""The method registry: everything the framework needs to know of an adapter method, in one entry.

A method is its adapter class (one file under ``cgc_lightning/adapters/``, torch only) plus one
:class:`MethodSpec` registered here. Injection builds each layer's adapter with ``spec.build``, the
config validates its fields with ``spec.check``, MLflow logs ``spec.fields`` as its params, the gate-use
diagnostics name experts with ``spec.labels``, the gradient-conflict diagnostics skip ``spec.per_task_rows``,
and merging and PEFT export run where ``spec.mergeable`` says the update per task is a constant matrix.
``docs/adding_a_method.md`` walks through adding one::

    from cgc_lightning.methods import MethodSpec, register

    register(MethodSpec(name="my_lora", build=lambda config, layout, gate, **common: MyLoRA(**common)))

after which ``model.adapter.method: my_lora`` trains, logs and exports like the built-in methods.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from cgc_lightning.adapters.experts import Adapter
    from cgc_lightning.config import AdapterConfig, TaskLayout


@dataclass(frozen=True)
class MethodSpec:
    """One adapter method.

    Args:
        name: the value of ``model.adapter.method``.
        build: ``build(config, layout, gate, **common) -> Adapter`` for one layer; ``common`` holds
            ``in_features``, ``out_features``, ``r``, ``alpha``, ``dropout``, ``rslora``, ``dtype``, ``device``,
            and ``gate`` is the model-wide gate of ``shared_gate`` (or ``None``).
        fields: the ``AdapterConfig`` fields it reads besides the common ones (``method``, ``target_modules``,
            ``r``, ``alpha``, ``dropout``, ``rslora``, ``exclude_modules``, ``init_adapter``); only these are
            logged as params, so runs of different methods compare without meaningless columns.
        check: raises ``ValueError`` naming the field and the rule when the config's values do not suit it.
        labels: ``labels(config, layout, num_experts) -> [name of each expert]`` for the gate-use diagnostics;
            default ``expert.<e>``.
        shared_gate: ``shared_gate(config, layout, dtype, device) -> nn.Module | None``, one gate for every layer.
        per_task_rows: names of gate tensors with one row per task (a task's gradient touches only its row):
            the gradient-conflict diagnostics do not count them as shared.
        softmax_gate: its gate weights are a softmax over the experts a task reaches (the gate-use monitor then
            checks whether they stay uniform).
        mergeable: whether a task's whole update is a constant matrix ``dW_t`` (merging, per-task PEFT export);
            a bool or ``mergeable(config) -> bool``.
    """

    name: str
    build: Callable[..., Adapter]
    fields: tuple[str, ...] = ()
    check: Callable[[AdapterConfig], None] | None = None
    labels: Callable[[AdapterConfig, TaskLayout, int], list[str]] | None = None
    shared_gate: Callable[..., nn.Module | None] | None = None
    per_task_rows: frozenset[str] = frozenset()
    softmax_gate: bool = False
    mergeable: bool | Callable[[AdapterConfig], bool] = True
    shared_gate_default: bool = False
    """With ``gate_per_layer`` unset, one gate for the whole model (True) or one per layer."""

    def expert_labels(self, config: AdapterConfig, layout: TaskLayout, num_experts: int) -> list[str]:
        return self.labels(config, layout, num_experts) if self.labels else [f"expert.{e}" for e in range(num_experts)]

    def is_mergeable(self, config: AdapterConfig) -> bool:
        return self.mergeable(config) if callable(self.mergeable) else bool(self.mergeable)


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec, *, replace: bool = False) -> MethodSpec:
    """Make ``spec.name`` a value of ``model.adapter.method``; a name already taken is an error unless ``replace``."""
    _builtins()
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"method {spec.name!r} is registered already; pass replace=True to replace it")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove a method added with :func:`register` (tests)."""
    _REGISTRY.pop(name, None)


def method_names() -> tuple[str, ...]:
    _builtins()
    return tuple(_REGISTRY)


def method_spec(name: str) -> MethodSpec:
    """The registered method ``name``; an unknown name is a ``ValueError`` that lists the known ones."""
    _builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {tuple(_REGISTRY)}") from None


# ------------------------------------------------------------------------------------------- built-in methods


def _cgc_check(c: AdapterConfig) -> None:
    if c.num_shared < 0 or c.num_specific < 0 or c.num_shared + c.num_specific == 0:
        raise ValueError(
            f"cgc_lora needs num_shared >= 0, num_specific >= 0, and S + P >= 1; got "
            f"num_shared={c.num_shared}, num_specific={c.num_specific}"
        )
    if c.gate_input not in ("task", "token", "task+token"):
        raise ValueError(f"gate_input must be task, token or task+token, got {c.gate_input!r}")
    if c.gate_input != "task" and c.gate_per_layer is False:
        raise ValueError(
            "a token-reading gate depends on each layer's input, so it cannot be shared by all "
            "layers: set gate_per_layer: true or gate_input: task"
        )


def _cgc_build(c, layout, gate, **common):
    from cgc_lightning.adapters.cgc_lora import CGCLoRA

    return CGCLoRA(
        task_clusters=layout.task_cluster,
        num_shared=c.num_shared,
        num_specific=c.num_specific,
        gate_input=c.gate_input,
        gate=gate,
        **common,
    )


def _cgc_gate(c, layout, dtype, device):
    from cgc_lightning.adapters.cgc_lora import TaskLogitGate, expert_layout

    visible, _ = expert_layout(layout.task_cluster, c.num_shared, c.num_specific)
    return TaskLogitGate(num_tasks=len(layout.tasks), num_visible=visible.shape[1], dtype=dtype, device=device)


def _cgc_labels(c, layout, num_experts):
    """``shared.<cluster>.<i>`` (``shared.<i>`` with one cluster) and ``specific.<task>.<j>``."""
    from cgc_lightning.adapters.cgc_lora import expert_layout

    labels = [""] * num_experts
    visible, _ = expert_layout(layout.task_cluster, c.num_shared, c.num_specific)
    for t, row in enumerate(visible.tolist()):
        cluster = layout.clusters[layout.task_cluster[t]]
        for i, e in enumerate(row[: c.num_shared]):
            labels[e] = f"shared.{cluster}.{i}" if len(layout.clusters) > 1 else f"shared.{i}"
        for j, e in enumerate(row[c.num_shared :]):
            labels[e] = f"specific.{layout.tasks[t]}.{j}"
    return labels


def _moelora_check(c: AdapterConfig) -> None:
    if c.num_experts <= 0:
        raise ValueError(f"moelora needs num_experts >= 1, got {c.num_experts}")
    if c.split_rank and c.r % c.num_experts:
        raise ValueError(f"split_rank needs r divisible by num_experts, got r={c.r}, num_experts={c.num_experts}")
    if c.gate_dim <= 0:
        raise ValueError(f"gate_dim must be positive, got {c.gate_dim}")


def _moelora_build(c, layout, gate, **common):
    from cgc_lightning.adapters.moelora import MoELoRA

    return MoELoRA(
        num_tasks=len(layout.tasks),
        num_experts=c.num_experts,
        split_rank=c.split_rank,
        gate=gate,
        gate_dim=c.gate_dim,
        **common,
    )


def _moelora_gate(c, layout, dtype, device):
    from cgc_lightning.adapters.moelora import TaskEmbeddingGate

    return TaskEmbeddingGate(
        num_tasks=len(layout.tasks), num_experts=c.num_experts, dim=c.gate_dim, dtype=dtype, device=device
    )


def _modula_check(c: AdapterConfig) -> None:
    if c.num_universal < 1:
        raise ValueError(f"{c.method} needs num_universal >= 1, got {c.num_universal}")
    if c.router_top_k is not None and c.router_top_k < 1:
        raise ValueError(f"router_top_k must be >= 1 or null (dense), got {c.router_top_k}")
    if c.load_balance_coef < 0:
        raise ValueError(f"load_balance_coef must be >= 0, got {c.load_balance_coef}")


def _modula_build(c, layout, gate, **common):
    from cgc_lightning.adapters.modula import MoDULA

    return MoDULA(
        task_clusters=layout.task_cluster,
        variant=c.method.removeprefix("modula_"),
        num_universal=c.num_universal,
        stage=c.stage,
        top_k=c.router_top_k,
        load_balance_coef=c.load_balance_coef,
        **common,
    )


def _modula_labels(c, layout, num_experts):
    from cgc_lightning.adapters.modula import expert_labels

    return expert_labels(layout.clusters, c.num_universal)


def _joint_build(c, layout, gate, **common):
    from cgc_lightning.adapters.lora import JointLoRA

    return JointLoRA(**common)


def _independent_build(c, layout, gate, **common):
    from cgc_lightning.adapters.lora import IndependentLoRA

    return IndependentLoRA(num_tasks=len(layout.tasks), **common)


_MODULA_FIELDS = ("stage", "num_universal", "router_top_k", "load_balance_coef")
_CGC_GATES = frozenset({"gate_logits", "gate_token_W"})
_BUILTINS = (
    MethodSpec(
        "cgc_lora",
        _cgc_build,
        ("num_shared", "num_specific", "gate_input", "gate_per_layer"),
        check=_cgc_check,
        labels=_cgc_labels,
        shared_gate=_cgc_gate,
        per_task_rows=_CGC_GATES,
        softmax_gate=True,
        mergeable=lambda c: c.gate_input == "task",  # a gate that reads tokens makes the update input-dependent
    ),
    MethodSpec(
        "moelora",
        _moelora_build,
        ("num_experts", "split_rank", "gate_per_layer", "gate_dim"),
        check=_moelora_check,
        shared_gate=_moelora_gate,
        per_task_rows=frozenset({"gate_task_emb"}),
        softmax_gate=True,
        shared_gate_default=True,
    ),
    MethodSpec("joint_lora", _joint_build, labels=lambda c, layout, n: ["lora"]),
    MethodSpec("independent_lora", _independent_build, labels=lambda c, layout, n: list(layout.tasks)),
    *(
        MethodSpec(
            name,
            _modula_build,
            _MODULA_FIELDS,
            check=_modula_check,
            labels=_modula_labels,
            mergeable=lambda c: c.stage in ("universal", "domain"),  # no router yet: a constant update per task
        )
        for name in ("modula_res", "modula_flan")
    ),
)


def _builtins() -> None:
    if not _REGISTRY:
        _REGISTRY.update({s.name: s for s in _BUILTINS})
