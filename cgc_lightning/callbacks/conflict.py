r"""Gradient conflict between tasks on the parameters they share.

For tasks a and b, let P_ab be the trainable tensors (or expert slices of them) that both use, and
g_t = dL_t/dtheta task t's gradient, L_t its mean target-token loss on a probe of its examples:

    cos(a, b) = <g_a, g_b>_{P_ab} / (|g_a|_{P_ab} |g_b|_{P_ab})      nan when P_ab is empty

What "shared" means is read off the adapters, not assumed per method:

* an expert (a slice ``lora_A[e]``, ``lora_B[e]`` of a stacked tensor) is used by the tasks whose
  route reaches it: every task for joint LoRA and MOELoRA, the tasks of one cluster for CGC-LoRA's
  shared experts, one task for a task-specific or independent expert (so not shared);
* gate and router tensors are used by every task, except the methods' per-task tables (their registry entries'
  ``per_task_rows``),
  whose row t only task t reads.

So CGC-LoRA pairs in different clusters share nothing (nan), and independent LoRA has no shared
parameter at all.

The gradients come from the callback's own forward and backward passes over a small probe batch,
one task at a time, with ``torch.autograd.grad`` on the unwrapped model (``pl_module.model``): no
``.grad`` is touched and no DDP reducer hook fires, so the optimizer and gradient sync never see
them. The passes run in eval mode (no dropout), which keeps them deterministic and leaves the
training run's random stream, hence its trajectory, exactly as without the callback.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from cgc_lightning.callbacks._log import Stopwatch, log_figure, log_metrics, log_rows
from cgc_lightning.inject import adapted_layers, adapter_parameters, injection
from cgc_lightning.methods import method_spec
from cgc_lightning.routing import route

#: Gate tensors whose leading axis is the task: row t is read by task t alone, so no row is shared.
#: Batch keys a probe needs (the training collator's).
PROBE_KEYS = ("input_ids", "attention_mask", "labels", "task_ids")


@dataclass
class SharedSlice:
    """Part of one trainable tensor that the same set of tasks uses."""

    name: str
    param: nn.Parameter
    experts: torch.Tensor | None
    """``(k,)`` indices along the leading (expert) axis, or ``None`` for the whole tensor."""
    users: torch.Tensor
    """``(n_tasks,)`` bool: the tasks whose loss depends on this slice."""


def expert_users(adapter: nn.Module, task_cluster: Sequence[int]) -> torch.Tensor:
    """``(E, n_tasks)`` bool: which task's route reaches each expert of one adapter."""
    n, E = len(task_cluster), adapter.experts.num_experts
    device = adapter.experts.lora_A.device
    x = torch.zeros(n, 1, adapter.experts.in_features, dtype=adapter.dtype, device=device)  # (n, 1, d_in)
    with torch.no_grad():
        index, _ = adapter.route(x, torch.arange(n, device=device), torch.tensor(task_cluster, device=device))
    if index is None:  # every expert for every task
        return torch.ones(E, n, dtype=torch.bool, device=device)
    return (index[:, :, None] == torch.arange(E, device=device)).any(1).t()  # (n, K, E) -> (E, n)


def shared_slices(model: nn.Module) -> list[SharedSlice]:
    """Every trainable slice that at least two tasks use (see the module docstring)."""
    layout = injection(model).layout
    n = len(layout.tasks)
    slices = []
    for name, layer in adapted_layers(model):
        experts = layer.adapter.experts
        users = expert_users(layer.adapter, layout.task_cluster)  # (E, n)
        groups: dict[tuple[bool, ...], list[int]] = {}
        for e, row in enumerate(users.tolist()):
            if sum(row) >= 2:
                groups.setdefault(tuple(row), []).append(e)
        for key, ids in groups.items():
            index = None if len(ids) == experts.num_experts else torch.tensor(ids, device=users.device)
            for pname in ("lora_A", "lora_B"):
                p = getattr(experts, pname)
                if p.requires_grad:
                    slices.append(SharedSlice(f"{name}.adapter.experts.{pname}", p, index, torch.tensor(key)))
    everyone = torch.ones(n, dtype=torch.bool)
    per_task = method_spec(injection(model).config.method).per_task_rows  # a row per task: not shared
    for name, p in adapter_parameters(model):
        if ".adapter.experts." in name or not p.requires_grad or name.rsplit(".", 1)[-1] in per_task:
            continue
        slices.append(SharedSlice(name, p, None, everyone))
    return slices


def task_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Mean next-token loss over the batch's target tokens (the training loss), routed by its task ids."""
    from cgc_lightning.module import token_losses

    with route(model, batch["task_ids"], validate=False):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    losses, mask = token_losses(logits, batch["labels"])
    return losses.sum() / mask.sum().clamp_min(1)


@dataclass
class ConflictStats:
    """Task-by-task gradient cosines on shared parameters."""

    tasks: tuple[str, ...]
    cos: torch.Tensor
    """``(n, n)`` cosine of each pair over the parameters both use; ``nan`` where they share none or a task
    had no probe. The diagonal is 1 for a task with a nonzero shared gradient."""
    norms: torch.Tensor
    """``(n,)`` each task's gradient norm over the shared parameters it uses (``nan`` without a probe, or when
    it shares nothing)."""

    def pairs(self) -> Iterator[tuple[int, int, float]]:
        """``(a, b, cos)`` for every pair ``a < b`` with a finite cosine."""
        n = len(self.tasks)
        for a in range(n):
            for b in range(a + 1, n):
                v = float(self.cos[a, b])
                if math.isfinite(v):
                    yield a, b, v

    @property
    def min_cos(self) -> float:
        return min((v for _, _, v in self.pairs()), default=math.nan)

    @property
    def negative_fraction(self) -> float:
        values = [v for _, _, v in self.pairs()]
        return sum(v < 0 for v in values) / len(values) if values else math.nan


def gradient_conflict(model: nn.Module, probes: Sequence[dict | None], slices: list[SharedSlice]) -> ConflictStats:
    """Per-task gradients of the shared slices, one forward and backward per task, and their cosines.

    Args:
        model: a model with adapters (``pl_module.model``), in the mode the caller wants (eval: no dropout).
        probes: for each task id, a batch of that task's examples (``input_ids``, ``attention_mask``,
            ``labels``, ``task_ids``), or ``None`` when it has none.
        slices: :func:`shared_slices` of ``model``.
    """
    tasks = injection(model).layout.tasks
    n = len(tasks)
    params = list({id(s.param): s.param for s in slices}.values())
    keys = sorted({tuple(s.users.tolist()) for s in slices})  # slices with the same users share a Gram block
    vectors: list[dict[tuple, torch.Tensor] | None] = []
    for batch in probes:
        if batch is None:
            vectors.append(None)
            continue
        with torch.enable_grad():
            grads = torch.autograd.grad(task_loss(model, batch), params, allow_unused=True)
        by_param = {id(p): g for p, g in zip(params, grads, strict=True)}
        parts: dict[tuple, list[torch.Tensor]] = {k: [] for k in keys}
        for s in slices:
            g = by_param[id(s.param)]
            g = torch.zeros_like(s.param) if g is None else g
            g = g if s.experts is None else g.index_select(0, s.experts)
            parts[tuple(s.users.tolist())].append(g.reshape(-1))
        vectors.append({k: torch.cat(v) for k, v in parts.items()})
    dot = torch.zeros(n, n, dtype=torch.float64)
    sq = torch.zeros(n, n, dtype=torch.float64)  # sq[a, b]: |g_a|^2 over the slices a shares with b
    present = torch.tensor([v is not None for v in vectors])
    for key in keys:
        users = torch.tensor(key) & present
        ids = users.nonzero().flatten().tolist()
        if not ids:
            continue
        G = torch.stack([vectors[t][key] for t in ids])  # (n_users, numel)
        G = G if G.dtype == torch.float64 else G.float()
        gram = (G @ G.t()).double().cpu()  # (n_users, n_users)
        idx = torch.tensor(ids)
        dot[idx[:, None], idx[None, :]] += gram
        sq[idx[:, None], idx[None, :]] += gram.diagonal()[:, None].expand_as(gram)
    denom = (sq * sq.t()).sqrt()
    cos = torch.where(denom > 0, dot / denom.clamp_min(1e-300), torch.full_like(dot, math.nan))
    uses = torch.stack([s.users for s in slices]).any(0) if slices else torch.zeros(n, dtype=torch.bool)
    norms = torch.where(present & uses, sq.diagonal().sqrt(), torch.full((n,), math.nan, dtype=torch.float64))
    return ConflictStats(tuple(tasks), cos, norms)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode inside the block, each put back to its own mode after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def fixed_probes(loader, num_tasks: int, per_task: int) -> list[dict | None]:
    """The first ``per_task`` training examples of each task, collated by the loader's own collate function.

    Works with a dataset of encoded rows that carry ``task_id`` (this project's data module), including a
    ``ConcatDataset`` of one dataset per task.
    """
    dataset = loader.dataset
    rows: list[list] = [[] for _ in range(num_tasks)]
    for part in getattr(dataset, "datasets", [dataset]):
        for i in range(min(len(part), 64 * per_task * num_tasks)):
            row = part[i]
            if not isinstance(row, dict) or "task_id" not in row:
                raise ValueError(
                    f"grad_conflict.probe=fixed needs training examples that are dicts with a 'task_id'; "
                    f"this loader's dataset yields {type(row).__name__}: use grad_conflict.probe=batch"
                )
            t = int(row["task_id"])
            if len(rows[t]) < per_task:
                rows[t].append(row)
            if all(len(r) >= per_task for r in rows):
                break
    collate = getattr(loader.collate_fn, "unpacked", loader.collate_fn)  # packed training: probes one per row
    return [collate(r) if r else None for r in rows]


def split_by_task(batch: dict, num_tasks: int, per_task: int) -> list[dict | None]:
    """A training batch cut into one batch per task (at most ``per_task`` examples each)."""
    if batch["task_ids"].dim() != 1:
        raise ValueError(
            "grad_conflict.probe=batch cuts the training batch by task, and packed batches (data.packing) mix "
            "tasks within rows: use grad_conflict.probe=fixed"
        )
    out: list[dict | None] = []
    for t in range(num_tasks):
        sel = (batch["task_ids"] == t).nonzero().flatten()[:per_task]
        if sel.numel() == 0:
            out.append(None)
            continue
        part = {k: batch[k].index_select(0, sel) for k in PROBE_KEYS}
        width = int(part["attention_mask"].sum(1).max())  # right-padded: drop columns no example uses
        out.append({k: v[:, :width] if v.dim() == 2 else v for k, v in part.items()})
    return out


def _to(batch: dict | None, device: torch.device) -> dict | None:
    if batch is None:
        return None
    return {k: batch[k].to(device) for k in PROBE_KEYS}


class GradientConflictMonitor(Callback):
    """Every ``every_n_steps`` optimizer steps: task-by-task gradient cosines on the shared parameters.

    Logs (step = ``global_step``): ``grad_conflict/min_cos`` and ``grad_conflict/neg_frac`` (share of the pairs
    that share parameters with a negative cosine); each pair's cosine and each task's gradient norm as rows of
    the tables ``diagnostics/grad_cosines.json`` and ``diagnostics/grad_norms.json``, written at each validation
    and at the end of ``fit`` (or as metrics ``grad_conflict/cos/<a>/<b>`` and ``grad_conflict/<task>/grad_norm``
    with ``per_task_metrics``); and at each validation the heatmap of the latest matrix,
    ``diagnostics/grad_cosine.png``. Runs on rank 0 only, on ``pl_module.model`` (outside DDP).
    Nothing is logged for a method whose tasks share no parameter (independent LoRA).

    Args:
        enabled: turn the callback off.
        every_n_steps: measure after optimizer steps 1, 1 + n, 1 + 2n, ...; 0 turns it off. A measurement
            costs about one training step per task (``docs/benchmarks.md``), so at 100 it stays a few
            percent of training.
        examples_per_task: probe examples per task; each measurement is one forward and backward per task.
        probe: ``fixed``, the first training examples of each task every time (the curve then follows
            the parameters, not the data), or ``batch``, the current training batch split by task
            (tasks missing from it get ``nan``).
        plot: log the heatmap at each validation.
        per_task_metrics: log each pair's cosine and each task's norm as metrics too, not only as tables.
    """

    def __init__(
        self,
        enabled: bool = True,
        every_n_steps: int = 100,
        examples_per_task: int = 4,
        probe: Literal["fixed", "batch"] = "fixed",
        plot: bool = True,
        per_task_metrics: bool = False,
    ):
        if every_n_steps < 0 or examples_per_task < 1:
            raise ValueError(
                f"grad_conflict needs every_n_steps >= 0 and examples_per_task >= 1, got "
                f"{every_n_steps} and {examples_per_task}"
            )
        if probe not in ("fixed", "batch"):
            raise ValueError(f"grad_conflict.probe must be 'fixed' or 'batch', got {probe!r}")
        self.enabled = enabled and every_n_steps > 0
        self.every_n_steps, self.examples_per_task, self.probe, self.plot = (
            every_n_steps,
            examples_per_task,
            probe,
            plot,
        )
        self.per_task_metrics = per_task_metrics
        self.history: list[tuple[int, ConflictStats]] = []
        self._unlogged = 0  # measurements in `history` not yet written to the tables
        self.stopwatch = Stopwatch()
        self._slices: list[SharedSlice] | None = None
        self._probes: list[dict | None] | None = None
        self._last_step = -1

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._slices, self._probes, self._last_step, self.history, self._unlogged = None, None, -1, [], 0

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        # with gradient accumulation several batches end at one global step: measure once
        if not self.enabled or not trainer.is_global_zero or step == self._last_step:
            return
        if (step - 1) % self.every_n_steps:
            return
        self._last_step = step
        with self.stopwatch():
            stats = self.measure(trainer, pl_module, batch)
            if stats is not None:
                self.history.append((step, stats))
                self._unlogged += 1
                log_metrics(trainer, self._metrics(stats, self.per_task_metrics), step)

    def measure(self, trainer: Trainer, pl_module: LightningModule, batch: dict) -> ConflictStats | None:
        model = pl_module.model
        if self._slices is None:
            self._slices = shared_slices(model)
        if not self._slices:
            return None
        n = len(pl_module.layout.tasks)
        if self.probe == "batch":
            probes = split_by_task(batch, n, self.examples_per_task)
        else:
            if self._probes is None:
                self._probes = [
                    _to(b, pl_module.device) for b in fixed_probes(trainer.train_dataloader, n, self.examples_per_task)
                ]
            probes = self._probes
        with eval_mode(model), trainer.strategy.precision_plugin.forward_context():
            return gradient_conflict(model, probes, self._slices)

    @staticmethod
    def _metrics(stats: ConflictStats, per_task: bool = True) -> dict[str, float]:
        pairs = {f"grad_conflict/cos/{stats.tasks[a]}/{stats.tasks[b]}": v for a, b, v in stats.pairs()}
        out = dict(pairs) if per_task else {}
        if pairs:
            out["grad_conflict/min_cos"] = stats.min_cos
            out["grad_conflict/neg_frac"] = stats.negative_fraction
        if per_task:
            for t, v in zip(stats.tasks, stats.norms.tolist(), strict=True):
                if math.isfinite(v):
                    out[f"grad_conflict/{t}/grad_norm"] = v
        return out

    def _log_tables(self, trainer: Trainer) -> None:
        """Append the measurements since the last call to ``diagnostics/grad_cosines.json`` and ``grad_norms.json``."""
        new, self._unlogged = (self.history[-self._unlogged :] if self._unlogged else []), 0
        cosines = [
            {"step": step, "task_a": s.tasks[a], "task_b": s.tasks[b], "cos": v}
            for step, s in new
            for a, b, v in s.pairs()
        ]
        norms = [
            {"step": step, "task": t, "grad_norm": v}
            for step, s in new
            for t, v in zip(s.tasks, s.norms.tolist(), strict=True)
            if math.isfinite(v)
        ]
        log_rows(trainer, cosines, "diagnostics/grad_cosines.json")
        log_rows(trainer, norms, "diagnostics/grad_norms.json")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.enabled and trainer.is_global_zero:
            with self.stopwatch():
                self._log_tables(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not (self.enabled and self.history) or trainer.sanity_checking:
            return
        if trainer.state.fn != TrainerFn.FITTING or not trainer.is_global_zero or not trainer.loggers:
            return
        with self.stopwatch():
            self._log_tables(trainer)
            if not self.plot:
                return
            step, stats = self.history[-1]
            cos, tasks = stats.cos.tolist(), stats.tasks
            title = f"gradient cosine on shared parameters, step {step}\n(blank: the pair shares nothing)"

            def build():  # matplotlib is imported only when a figure is drawn
                from cgc_lightning.callbacks.plots import heatmap

                return heatmap(cos, tasks, tasks, title, vmin=-1, vmax=1, cmap="RdBu", colorbar="cosine")

            log_figure(trainer, build, "diagnostics/grad_cosine.png")
