"""How per-sample task and cluster ids reach every adapter layer.

No model code is edited and no ``task_id`` argument goes through a Hugging Face ``forward``:

    with route(model, task_ids=batch["task_ids"]):
        logits = model(input_ids).logits          # or model.generate(...)

``route`` puts the ids on one :class:`RoutingState` that every adapter layer of the model holds, and
puts the previous ids back on exit, so nested calls and the same model serving batch after batch
stay correct. Three cases need more than that:

* Activation (gradient) checkpointing re-runs layer forwards during ``backward()``, after the
  ``with`` block has closed, possibly after other batches went through. Every checkpointed layer's
  checkpoint function is wrapped so that each call snapshots the routing state at forward time and
  reinstates that snapshot while the layer is recomputed. This works however checkpointing was
  enabled (reentrant or not, offloaded or not).
* ``generate()`` with beams or several return sequences repeats each sample along the batch axis
  (``repeat_interleave``); the ids are repeated the same way when a layer sees ``m * B`` rows.
* Ids are moved to the model's device once per ``route`` call, not once per layer, and what the layers
  derive from them (a gate's 0/1 spread matrix, one-hot weights) is built by the first layer and kept
  for the others in the state's ``batch_cache``, which each ``route`` call starts empty.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from cgc_lightning.adapters.gate_bank import GateBank, gate_bank

_STATE_ATTR = "_cgc_routing"
_WRAPPED_ATTR = "_cgc_routing_wrapped"


class RoutingState:
    """The routing ids every adapter layer of one model reads.

    Args:
        task_names: names of the tasks, in task-id order (used in error messages).
        task_clusters: cluster index of each task.
    """

    def __init__(self, task_names: Sequence[str], task_clusters: Sequence[int]):
        self.task_names = tuple(task_names)
        self.task_cluster = torch.tensor(list(task_clusters), dtype=torch.long)  # (n_tasks,)
        self._task_cluster_on: dict[torch.device, torch.Tensor] = {}
        self.task_ids: torch.Tensor | None = None  # (B,), or (B, T) for packed rows (a task per token)
        self.cluster_ids: torch.Tensor | None = None  # the same shape
        # packed rows: the (B*T,) views every layer reads, one tensor object per batch so per-batch tables are shared
        self.flat_ids: tuple[torch.Tensor, torch.Tensor] | None = None
        # constants of the batch's ids that every layer needs (adapters.experts.per_batch): built by the first
        # layer, a new table with every batch route() sets, and this model's own
        self.batch_cache: dict[tuple, tuple] = {}
        self.disabled = False
        # route(..., persistent=True): one (task ids, cluster ids) pair per shape and device, refilled by every batch
        self._persistent: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.merged_task: int | None = None  # set by inject.merge_task: the weights then serve that task only
        self.checkpointed_modules: list[nn.Module] = []
        self.gate_bank: GateBank | None = None  # every table-gated layer's weights in one go (attach_routing_state)
        self.recomputing = False  # activation checkpointing is recomputing a forward (_replay_routing)

    def snapshot(self) -> tuple:
        return self.task_ids, self.cluster_ids, self.disabled, self.flat_ids, self.batch_cache, self.recomputing

    def restore(self, snap: tuple) -> None:
        self.task_ids, self.cluster_ids, self.disabled, self.flat_ids, self.batch_cache, self.recomputing = snap

    def clusters_of(self, tasks: torch.Tensor) -> torch.Tensor:
        """``(B,)`` cluster of each task id, on the ids' device.

        The table is copied to a device once: a copy from host memory on every batch would make the
        host wait for the GPU to finish the previous step before it can queue this one.
        """
        table = self._task_cluster_on.get(tasks.device)
        if table is None:
            table = self._task_cluster_on[tasks.device] = self.task_cluster.to(tasks.device)
        return table[tasks]

    def persistent_ids(self, tasks: torch.Tensor, clusters: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This batch's ids copied into the two tensors this state keeps for their shape and device.

        A compiled graph reads the ids from this state, an attribute of the model's modules, and dynamo
        takes such tensors to be fixed, as it does parameters: CUDA graphs (``mode: reduce-overhead``)
        record anew whenever one of them moves. A new ids tensor per batch made every compiled training
        step record its graphs again (5x the eager step); one tensor per shape lets them replay.
        """
        key = (tuple(tasks.shape), tasks.device)
        kept = self._persistent.get(key)
        if kept is None:
            kept = self._persistent[key] = (torch.empty_like(tasks), torch.empty_like(clusters))
        kept[0].copy_(tasks)
        kept[1].copy_(clusters)
        return kept

    def ids_for(self, rows: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Task and cluster ids for a layer input with ``rows`` samples on its batch axis (``(B, T)`` ids for packed
        rows, where every token has its own)."""
        if self.task_ids is None:
            return None, None
        n = self.task_ids.shape[0]
        if rows == n:
            return self.task_ids, self.cluster_ids
        if self.task_ids.dim() == 2:
            raise RuntimeError(
                f"an adapter layer got an input with {rows} rows for {n} packed rows of per-token task ids; "
                "packed rows are for training and scoring, not generate()"
            )
        if rows % n:
            raise RuntimeError(
                f"an adapter layer got an input with {rows} rows, but route() was given {n} task ids; "
                "give one task id per sample of the batch"
            )
        # generate() expands each sample m times with repeat_interleave (beams, num_return_sequences)
        m = rows // n
        return self.task_ids.repeat_interleave(m), self.cluster_ids.repeat_interleave(m)


def routing_state(model: nn.Module) -> RoutingState:
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise ValueError(
            f"{type(model).__name__} has no adapters: call cgc_lightning.inject.inject_adapters(model, ...) first"
        )
    return state


def attach_routing_state(model: nn.Module, state: RoutingState) -> None:
    """Make ``state`` the model's routing state, find the layers that may be checkpointed and bank the gates."""
    object.__setattr__(model, _STATE_ATTR, state)
    state.checkpointed_modules = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    bank = gate_bank(model)
    state.gate_bank = bank if len(bank) else None


def _replay_routing(checkpoint_fn, state: RoutingState):
    """Wrap a checkpoint function so a recomputed forward sees the routing of its original forward."""

    @functools.wraps(checkpoint_fn)
    def wrapped(function, *args, **kwargs):
        snap = state.snapshot()
        calls = 0

        def with_routing(*a, **kw):
            nonlocal calls
            if torch.compiler.is_compiling():
                # dynamo is tracing the checkpointed forward into the graph, whose backward recomputes it
                # from the ids the forward read (graph inputs); swapping the state here would be a side
                # effect that breaks the graph. Decided here, not in `wrapped`: when the layer cannot be traced
                # (a graph break in it, as transformers 5.25's kernels wrapper of the attention made), dynamo
                # runs the checkpoint call eagerly, this function with it, and the recompute needs the replay.
                return function(*a, **kw)
            saved = state.snapshot()
            state.restore(snap)
            state.recomputing = calls > 0  # the first call is the forward, later ones recompute it
            calls += 1
            try:
                return function(*a, **kw)
            finally:
                state.restore(saved)

        return checkpoint_fn(with_routing, *args, **kwargs)

    setattr(wrapped, _WRAPPED_ATTR, True)
    return wrapped


def _guard_checkpointing(state: RoutingState) -> None:
    for module in state.checkpointed_modules:
        fn = getattr(module, "_gradient_checkpointing_func", None)
        if fn is not None and not getattr(fn, _WRAPPED_ATTR, False):
            module._gradient_checkpointing_func = _replay_routing(fn, state)


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def route(
    model: nn.Module,
    task_ids: torch.Tensor | Sequence[int],
    cluster_ids: torch.Tensor | Sequence[int] | None = None,
    *,
    validate: bool = True,
    persistent: bool = False,
) -> Iterator[None]:
    """Route each sample of the batch run inside the block to its task's (and cluster's) experts.

    Args:
        model: a model returned by :func:`cgc_lightning.inject.inject_adapters`.
        task_ids: ``(B,)`` task id of each sample, or ``(B, T)`` one per token, for rows that pack examples
            of several tasks (``data.packing``): each token then goes through its own task's experts.
        cluster_ids: cluster ids of the same shape; derived from the task layout when omitted,
            checked against it when given.
        validate: check ids against the layout (one host sync); the training loop turns it off
            because its data module has checked them already.
        persistent: hand the layers the same ids tensors for every batch of one shape
            (:meth:`RoutingState.persistent_ids`), refilled with this batch's ids; what a compiled training
            step needs to replay CUDA graphs. A later ``persistent`` block overwrites them, so use it where
            each batch's forward and backward finish before the next batch is routed.
    """
    state = routing_state(model)
    device = _device_of(model)
    tasks = torch.as_tensor(task_ids, dtype=torch.long)
    if tasks.dim() not in (1, 2):
        raise ValueError(
            f"task_ids must be (B,), one id per sample, or (B, T), one per token of packed rows; "
            f"got shape {tuple(tasks.shape)}"
        )
    n_tasks = len(state.task_names)
    if validate:
        bad = tasks[(tasks < 0) | (tasks >= n_tasks)]
        if bad.numel():
            raise ValueError(
                f"task id {int(bad[0])} is out of range: this model's adapters know {n_tasks} tasks "
                f"(0..{n_tasks - 1}: {', '.join(state.task_names)})"
            )
    if state.merged_task is not None and bool((tasks != state.merged_task).any()):
        other = state.task_names[int(tasks[tasks != state.merged_task][0])]
        raise ValueError(
            f"task {state.task_names[state.merged_task]!r} is merged into the base weights, which now serve it "
            f"alone, but this batch routes {other!r} too: unmerge (cgc_lightning.inject.unmerge) to route tasks"
        )
    derived = state.clusters_of(tasks)
    if cluster_ids is not None:
        clusters = torch.as_tensor(cluster_ids, dtype=torch.long, device=tasks.device)
        if validate and not torch.equal(clusters, derived):
            i = tuple(int(j) for j in (clusters != derived).nonzero()[0])
            i = i[0] if len(i) == 1 else i
            raise ValueError(
                f"sample {i} has task {state.task_names[int(tasks[i])]!r}, which is in cluster {int(derived[i])}, "
                f"but cluster_ids says {int(clusters[i])}"
            )
    _guard_checkpointing(state)
    saved = state.snapshot()
    state.task_ids = tasks.to(device, non_blocking=True)
    state.cluster_ids = derived.to(device, non_blocking=True)
    if persistent:
        state.task_ids, state.cluster_ids = state.persistent_ids(state.task_ids, state.cluster_ids)
    state.flat_ids = (state.task_ids.reshape(-1), state.cluster_ids.reshape(-1)) if tasks.dim() == 2 else None
    state.batch_cache = {}
    try:
        yield
    finally:
        state.restore(saved)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the base model alone inside the block."""
    state = routing_state(model)
    _guard_checkpointing(state)
    saved = state.snapshot()
    state.disabled = True
    try:
        yield
    finally:
        state.restore(saved)
