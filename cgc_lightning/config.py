"""Typed configs: which method, where it goes, and how tasks are grouped into clusters."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

from cgc_lightning.methods import method_spec

#: The built-in methods; ``cgc_lightning.methods.register`` adds others.
METHODS: tuple[str, ...] = ("cgc_lora", "moelora", "joint_lora", "independent_lora", "modula_res", "modula_flan")
MODULA_METHODS: tuple[str, ...] = ("modula_res", "modula_flan")
Stage = Literal["joint", "universal", "domain", "router"]
STAGES: tuple[str, ...] = ("joint", "universal", "domain", "router")


@dataclass(frozen=True)
class TaskLayout:
    """Tasks and the cluster each belongs to; task ``i`` has task id ``i``."""

    tasks: tuple[str, ...]
    """Task names in task-id order."""
    clusters: tuple[str, ...]
    """Cluster names in cluster-id order."""
    task_cluster: tuple[int, ...]
    """Cluster id of each task."""

    def __post_init__(self):
        if not self.tasks:
            raise ValueError("the task layout has no tasks")
        if len(set(self.tasks)) != len(self.tasks):
            dup = sorted({t for t in self.tasks if self.tasks.count(t) > 1})
            raise ValueError(f"task names must be unique; repeated: {dup}")
        if len(self.task_cluster) != len(self.tasks):
            raise ValueError(f"{len(self.tasks)} tasks but {len(self.task_cluster)} cluster assignments")
        for t, c in zip(self.tasks, self.task_cluster, strict=True):
            if not 0 <= c < len(self.clusters):
                raise ValueError(
                    f"task {t!r} is assigned to cluster id {c}, but there are {len(self.clusters)} clusters"
                )
        empty = [name for c, name in enumerate(self.clusters) if c not in self.task_cluster]
        if empty:
            raise ValueError(f"cluster(s) {empty} have no tasks; remove them or assign tasks to them")

    @classmethod
    def from_clusters(cls, clusters: Mapping[str, Sequence[str]], tasks: Sequence[str] | None = None) -> TaskLayout:
        """Build from ``{cluster: [task, ...]}``.

        Args:
            clusters: the tasks of each cluster.
            tasks: every task, in task-id order; defaults to the clusters' order. A task listed here
                and in no cluster, or in two clusters, is an error.
        """
        owner: dict[str, str] = {}
        for cname, members in clusters.items():
            if not members:
                raise ValueError(f"cluster {cname!r} has no tasks; remove it or assign tasks to it")
            for t in members:
                if t in owner:
                    raise ValueError(
                        f"task {t!r} is in two clusters, {owner[t]!r} and {cname!r}; a task belongs to one"
                    )
                owner[t] = cname
        order = list(tasks) if tasks is not None else list(owner)
        missing = [t for t in order if t not in owner]
        if missing:
            raise ValueError(f"task(s) {missing} are in no cluster; clusters are {dict(clusters)}")
        extra = [t for t in owner if t not in order]
        if extra:
            raise ValueError(f"cluster(s) list task(s) {extra} that are not among the tasks {order}")
        names = list(clusters)
        return cls(tuple(order), tuple(names), tuple(names.index(owner[t]) for t in order))

    @classmethod
    def single(cls, tasks: Sequence[str]) -> TaskLayout:
        """Every task in one cluster named ``all``."""
        return cls(tuple(tasks), ("all",), (0,) * len(tasks))

    def to_dict(self) -> dict:
        return {"tasks": list(self.tasks), "clusters": list(self.clusters), "task_cluster": list(self.task_cluster)}


#: The AdapterConfig fields every method reads; each method's own are in its registry entry
#: (``cgc_lightning.methods.MethodSpec.fields``): run params list only these, so runs of different methods compare
#: without columns that mean nothing for one of them.
COMMON_FIELDS = ("method", "target_modules", "r", "alpha", "dropout", "rslora", "exclude_modules", "init_adapter")


@dataclass
class AdapterConfig:
    """The adapter method and its hyperparameters. Fields not used by the chosen method are ignored."""

    method: str = "cgc_lora"
    """``cgc_lora``, ``moelora``, ``joint_lora``, ``independent_lora``, ``modula_res``, ``modula_flan``, or a
    method added with ``cgc_lightning.methods.register``."""
    target_modules: str | list[str] = "auto"
    """Layers to adapt: ``auto`` (the preset for the model's family, else PEFT's per-architecture mapping, with a
    warning), a preset name (``llama``, ``qwen2``, ``gemma``, ``gemma3``, ``gpt2``, ``phi3``, ``stablelm``), or a
    list of patterns: an exact module name, a
    suffix such as ``q_proj``, or ``re:<regex>`` matched against the full name."""
    r: int = 8
    """LoRA rank of each expert (the total rank for ``moelora`` with ``split_rank``)."""
    alpha: float = 16.0
    """LoRA alpha; the update is scaled by ``alpha / r``."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    rslora: bool = False
    """Scale by ``alpha / sqrt(r)`` instead of ``alpha / r``."""
    num_shared: int = 2
    """cgc_lora: ``S``, task-common experts per cluster."""
    num_specific: int = 1
    """cgc_lora: ``P``, task-specific experts per task."""
    gate_input: Literal["task", "token", "task+token"] = "task"
    """cgc_lora: what the gate reads. Only ``task`` is mergeable."""
    num_experts: int = 8
    """moelora: ``E``, experts shared by all tasks."""
    split_rank: bool = False
    """moelora: split ``r`` across the experts (``r / E`` each), as the MOELoRA paper does."""
    gate_per_layer: bool | None = None
    """One gate per adapted layer (True) or one for the whole model (False). Default: per layer for
    cgc_lora, one for the model for moelora."""
    gate_dim: int = 64
    """moelora: size of the task embedding the gate reads."""
    exclude_modules: list[str] = field(default_factory=list)
    """Patterns (same forms as ``target_modules``) of layers never to adapt."""
    stage: Stage = "joint"
    """modula_*: the training stage (METHODS.md section 3). ``universal`` trains the universal expert
    alone; ``domain`` the domain experts not trained yet, each on its own domain's samples (routed by
    the cluster label), universal frozen; ``router`` the router alone, every expert frozen; ``joint``
    everything at once, routed by the router (a single-stage run). ``python -m cgc_lightning stages``
    chains them."""
    init_adapter: str | None = None
    """Start from this saved adapter instead of fresh weights: a directory written by ``save_adapter``
    (an MLflow ``best_adapter`` artifact), an MLflow ``runs:/<run id>/best_adapter`` URI, or a
    ``.ckpt`` of ``fit``. For modula_*, domains are matched by cluster name: a saved domain missing from
    the data's clusters is an error, a new cluster gets a fresh expert, and the ``domain`` stage trains
    only the domains the saved adapter had not trained."""
    num_universal: int = 1
    """modula_*: universal experts (one in the paper)."""
    router_top_k: int | None = None
    """modula_*: route each token to its ``k`` likeliest experts, at their softmax probabilities (not
    renormalised, as in the Switch Transformer); ``None``: the dense softmax over all of them."""
    load_balance_coef: float = 0.0
    """modula_*: weight of the router's load-balancing loss (Switch Transformer's), added to the
    training loss in the stages that train the router; 0 turns it off."""

    def __post_init__(self):
        spec = method_spec(self.method)  # an unknown method: a ValueError that lists the known ones
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got r={self.r!r}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be positive, got alpha={self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if spec.check is not None:
            spec.check(self)
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}; choose one of {STAGES}")
        if self.method not in MODULA_METHODS and self.stage != "joint":
            raise ValueError(
                f"stage {self.stage!r} is a MoDULA setting; method {self.method!r} trains in one stage "
                f"(stage: joint). Staged methods: {MODULA_METHODS}"
            )

    @property
    def shared_gate(self) -> bool:
        """Whether one gate serves every layer."""
        if self.gate_per_layer is None:
            return method_spec(self.method).shared_gate_default
        return not self.gate_per_layer

    @property
    def mergeable(self) -> bool:
        """Whether a task's whole update is a constant matrix (merging, per-task export), as its method says."""
        return method_spec(self.method).is_mergeable(self)

    def to_dict(self) -> dict:
        return asdict(self)
