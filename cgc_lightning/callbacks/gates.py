r"""Gate and router use: how much weight each task puts on each expert, and how spread out it is.

For layer l, task t, expert e, over the target tokens i of task t's examples in the probe:

    use[l, t, e] = mean_i g_{l,i,e}                 (a task gate: the same g for every token)
    H[l, t]      = mean_i ( - sum_e p_{l,i,e} log p_{l,i,e} ),   p = g / sum_e g   (sum_e g = 1 but for MoDULA-Res)

The weights are read off each adapter's own ``route`` during the validation loop's forward pass of
the first batch of each task, so a token-reading gate (CGC-LoRA ``gate_input: token``, MoDULA's router) is
measured on real inputs. Methods without a gate (joint and independent LoRA, MoDULA's universal and
domain stages) have nothing to report.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from cgc_lightning.adapters.experts import spread_weights
from cgc_lightning.callbacks._log import Stopwatch, log_figure, log_json, log_metrics, log_rows
from cgc_lightning.config import AdapterConfig, TaskLayout
from cgc_lightning.inject import adapted_layers, injection
from cgc_lightning.methods import method_spec
from cgc_lightning.routing import route
from cgc_lightning.tracking import mlflow_logger
from datamodules.collate import group_rows

log = logging.getLogger(__name__)


def expert_labels(config: AdapterConfig, layout: TaskLayout, num_experts: int) -> list[str]:
    """A name for each expert of a layer, in expert-axis order (the method's registry entry).

    CGC-LoRA: ``shared.<cluster>.<i>`` (``shared.<i>`` with one cluster) and ``specific.<task>.<j>``;
    MoDULA: ``universal``, ``domain.<cluster>``; MOELoRA: ``expert.<e>``; independent LoRA: the task's name;
    joint LoRA: ``lora``.
    """
    return method_spec(config.method).expert_labels(config, layout, num_experts)


@dataclass
class GateUsage:
    """Average gate weights per layer, task and expert."""

    layers: list[str]
    tasks: tuple[str, ...]
    experts: list[str]
    weight: torch.Tensor
    """``(L, n_tasks, E)`` mean gate weight; ``nan`` for an expert the task cannot reach or a task without data."""
    entropy: torch.Tensor
    """``(L, n_tasks)`` mean gate entropy in nats; ``nan`` for a task without data."""

    def mean_weight(self) -> torch.Tensor:
        """``(n_tasks, E)`` averaged over layers."""
        return self.weight.mean(0)

    def mean_entropy(self) -> torch.Tensor:
        """``(n_tasks,)`` averaged over layers."""
        return self.entropy.mean(0)

    def to_dict(self) -> dict:
        return {
            "layers": self.layers,
            "tasks": list(self.tasks),
            "experts": self.experts,
            "weight": _nan_to_none(self.weight.tolist()),
            "entropy": _nan_to_none(self.entropy.tolist()),
        }


def distance_from_uniform(weight: torch.Tensor) -> float:
    """Largest ``|w - 1/E_t|`` over layers, tasks and reachable experts of ``(L, n_tasks, E)`` gate weights, where
    ``E_t`` is the number of experts task ``t`` reaches (``nan`` entries: unreachable, or a task without data)."""
    reach = torch.isfinite(weight)
    n = reach.sum(-1, keepdim=True).clamp_min(1)  # (L, n_tasks, 1)
    dist = torch.where(reach, (weight - 1.0 / n).abs(), torch.zeros_like(weight))
    return float(dist.max()) if reach.any() else math.nan


def _nan_to_none(values):
    if isinstance(values, list):
        return [_nan_to_none(v) for v in values]
    return None if math.isnan(values) else values


class _Recorder:
    """Forward pre-hooks on every adapter that add up each task's gate weights and entropies.

    :meth:`expect` names the batch that goes through next: its shape, its token mask and which rows
    count. A hook records an adapter's input only when its shape is that batch's, and only once per
    :meth:`expect`, so other forwards of the same step (answer choices, generation) are left out.
    """

    def __init__(self, model: nn.Module, n_tasks: int):
        self.layers = list(adapted_layers(model))
        L, E = len(self.layers), self.layers[0][1].adapter.experts.num_experts
        self.weight = torch.zeros(L, n_tasks, E, dtype=torch.float64)
        self.entropy = torch.zeros(L, n_tasks, dtype=torch.float64)
        self.tokens = torch.zeros(L, n_tasks, dtype=torch.float64)
        self.reach = torch.zeros(L, n_tasks, E, dtype=torch.float64)  # > 0: the task's route reaches the expert
        self.gated = [False] * L
        self._mask: torch.Tensor | None = None  # (B, T), 0 on padding and on rows that do not count
        self._pending = [False] * L
        self._handles = []

    def expect(self, attention_mask: torch.Tensor, rows: int | torch.Tensor | None = None) -> None:
        """The next forward is of a batch with this ``(B, T)`` mask; count its first ``rows`` samples, or the
        samples where ``rows: (B,)`` is true."""
        mask = attention_mask.to(torch.float64)
        if isinstance(rows, torch.Tensor):
            mask = mask * rows.to(mask.device, torch.float64)[:, None]
        elif rows is not None and rows < mask.shape[0]:
            mask = torch.cat([mask[:rows], mask.new_zeros(mask.shape[0] - rows, mask.shape[1])])
        self._mask, self._pending = mask, [True] * len(self.layers)

    def __enter__(self):
        for i, (_, layer) in enumerate(self.layers):
            self._handles.append(layer.adapter.register_forward_pre_hook(self._hook(i), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, i: int):
        def hook(adapter, args, kwargs):
            x, task_ids, cluster_ids = args[:3]  # (B, T, d_in), (B,), (B,)
            if not self._pending[i] or tuple(x.shape[:2]) != tuple(self._mask.shape):
                return
            self._pending[i] = False
            index, weight = adapter.route(x, task_ids, cluster_ids)
            if weight is None:  # no gate: joint or independent LoRA
                return
            self.gated[i] = True
            E = adapter.experts.num_experts
            w = (weight if index is None else spread_weights(weight, index, E, weight.dtype)).double()  # (B, T|1, E)
            mask = self._mask.to(w.device)  # (B, T)
            if w.shape[1] == 1:
                w = w.expand(-1, mask.shape[1], -1)  # a task gate: one weight for every token
            p = w / w.sum(-1, keepdim=True).clamp_min(1e-30)  # MoDULA-Res: universal at 1 beside the router's mix
            ent = -(p * p.clamp_min(1e-30).log()).sum(-1)  # (B, T)
            if index is None:
                reach = torch.ones(x.shape[0], E, dtype=torch.float64, device=w.device)
            else:
                reach = (index[:, :, None] == torch.arange(E, device=index.device)).any(1).double()  # (B, E)
            counted = (mask.sum(1) > 0).double()[:, None]  # (B, 1)
            ids = task_ids.cpu()
            self.weight[i].index_add_(0, ids, (w * mask[..., None]).sum(1).cpu())
            self.entropy[i].index_add_(0, ids, (ent * mask).sum(1).cpu())
            self.tokens[i].index_add_(0, ids, mask.sum(1).cpu())
            self.reach[i].index_add_(0, ids, (reach * counted).cpu())

        return hook

    def result(self, model: nn.Module) -> GateUsage | None:
        if not any(self.gated):
            return None
        inj = injection(model)
        keep = [i for i, g in enumerate(self.gated) if g]
        tokens = self.tokens[keep]  # (L, n)
        nan = torch.tensor(math.nan, dtype=torch.float64)
        reached = (self.reach[keep] > 0) & (tokens[..., None] > 0)
        weight = torch.where(reached, self.weight[keep] / tokens[..., None].clamp_min(1), nan)
        entropy = torch.where(tokens > 0, self.entropy[keep] / tokens.clamp_min(1), nan)
        labels = expert_labels(inj.config, inj.layout, self.weight.shape[-1])
        return GateUsage([self.layers[i][0] for i in keep], inj.layout.tasks, labels, weight, entropy)


def gate_usage(model: nn.Module, batches: Sequence[dict]) -> GateUsage | None:
    """Gate weights of every adapted layer on ``batches`` (each with ``input_ids``, ``attention_mask``,
    ``task_ids``), one forward pass each; ``None`` when the model's method has no gate."""
    with torch.no_grad(), _Recorder(model, len(injection(model).layout.tasks)) as rec:
        for batch in batches:
            rec.expect(batch["attention_mask"])
            with route(model, batch["task_ids"], validate=False):
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return rec.result(model)


class GateUsageMonitor(Callback):
    """At each validation during ``fit``: each task's average gate weight per expert, and gate entropy.

    Logs (step = ``global_step``): ``gate/entropy`` (the mean over tasks); each task's weight per expert
    (averaged over layers, experts the task can reach) and its entropy as rows of the table
    ``diagnostics/gate_weights.json`` (or as metrics ``gate/<task>/<expert>`` and ``gate/<task>/entropy`` with
    ``per_task_metrics``); artifacts ``diagnostics/gate_usage.png`` (task x expert, averaged over layers) and
    ``diagnostics/gate_usage.json`` (per layer), refreshed each time.
    The weights are read, through forward pre-hooks, off the validation loop's own forward pass of the first
    ``examples_per_task`` examples of each task that validation meets (in batches of any tasks): no extra pass.

    Gates that do not learn: for a softmax gate (CGC-LoRA, MOELoRA), ``gate/max_from_uniform`` is the largest
    distance, over layers, tasks and the experts a task reaches, of a gate weight from the uniform 1/E. At a
    validation after the warm-up, if it is below ``uniform_tolerance``, every gate is still an equal mix: the
    run gets the tag ``gate.uniform = true`` (``false`` once they move) and one warning saying what to change.

    Args:
        enabled: turn the callback off.
        examples_per_task: examples of each task that count, the first that validation meets.
        plot: log the heatmap and the per-layer table.
        uniform_tolerance: distance from uniform under which a gate counts as not having learned.
        per_task_metrics: log each task's weights and entropy as metrics too, not only as the table.
    """

    def __init__(
        self,
        enabled: bool = True,
        examples_per_task: int = 8,
        plot: bool = True,
        uniform_tolerance: float = 0.02,
        per_task_metrics: bool = False,
    ):
        if examples_per_task < 1:
            raise ValueError(f"gate_usage.examples_per_task must be >= 1, got {examples_per_task}")
        if not 0 <= uniform_tolerance < 1:
            raise ValueError(f"gate_usage.uniform_tolerance must be in [0, 1), got {uniform_tolerance}")
        self.enabled, self.examples_per_task, self.plot = enabled, examples_per_task, plot
        self.uniform_tolerance, self.per_task_metrics = uniform_tolerance, per_task_metrics
        self._warned_uniform = False
        self.last: GateUsage | None = None
        self.stopwatch = Stopwatch()
        self._recorder: _Recorder | None = None
        self._counted: list[int] = []  # examples of each task recorded at this validation
        self._no_gate = False

    def _active(self, trainer: Trainer) -> bool:
        return (
            self.enabled
            and not self._no_gate
            and trainer.is_global_zero
            and not trainer.sanity_checking
            and trainer.state.fn == TrainerFn.FITTING
        )

    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not self._active(trainer) or (self._recorder is not None and min(self._counted) >= self.examples_per_task):
            return
        with self.stopwatch():
            if self._recorder is None:
                self._recorder = _Recorder(pl_module.model, len(pl_module.layout.tasks)).__enter__()
                self._counted = [0] * len(pl_module.layout.tasks)
            # each task's rows of this batch (host lists) up to its quota
            keep = torch.zeros(batch["attention_mask"].shape[0], dtype=torch.bool)
            for task, rows in group_rows(batch).items():
                take = rows[: max(0, self.examples_per_task - self._counted[task])]
                keep[take] = True
                self._counted[task] += len(take)
            if keep.any():
                self._recorder.expect(batch["attention_mask"], keep)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._recorder is None:
            return
        with self.stopwatch():
            recorder, self._recorder = self._recorder, None
            recorder.__exit__()
            usage = recorder.result(pl_module.model)
            if usage is None:
                self._no_gate = True
                return
            self.last = usage
            step = trainer.global_step
            mean_w, mean_h = usage.mean_weight(), usage.mean_entropy()
            per_task, rows = {}, []
            for t, task in enumerate(usage.tasks):
                entropy = float(mean_h[t]) if math.isfinite(float(mean_h[t])) else None
                for e, label in enumerate(usage.experts):
                    if math.isfinite(float(mean_w[t, e])):
                        per_task[f"gate/{task}/{label}"] = float(mean_w[t, e])
                        rows.append({"step": step, "task": task, "expert": label, "weight": float(mean_w[t, e])})
                        rows[-1]["task_entropy"] = entropy
                if entropy is not None:
                    per_task[f"gate/{task}/entropy"] = entropy
            entropies = [float(h) for h in mean_h.tolist() if math.isfinite(h)]
            out = dict(per_task) if self.per_task_metrics else {}
            if entropies:
                out["gate/entropy"] = sum(entropies) / len(entropies)
            log_rows(trainer, rows, "diagnostics/gate_weights.json")
            if method_spec(pl_module.adapter_config.method).softmax_gate:  # weights that sum to 1 over a task's reach
                out["gate/max_from_uniform"] = distance_from_uniform(usage.weight)
                self._check_uniform(trainer, pl_module, out["gate/max_from_uniform"])
            log_metrics(trainer, out, step)
            if self.plot and trainer.loggers:
                weights, tasks, experts = mean_w.tolist(), usage.tasks, usage.experts
                title = f"mean gate weight per task and expert, step {step}\n(blank: the task cannot reach it)"

                def build():
                    from cgc_lightning.callbacks.plots import heatmap

                    return heatmap(weights, tasks, experts, title, vmin=0, vmax=1, cmap="viridis", colorbar="mean")

                log_figure(trainer, build, "diagnostics/gate_usage.png")
                log_json(trainer, {"step": step, **usage.to_dict()}, "diagnostics/gate_usage.json")

    def _check_uniform(self, trainer: Trainer, pl_module: LightningModule, distance: float) -> None:
        warmup = int(getattr(pl_module, "warmup_ratio", 0.0) * max(int(trainer.estimated_stepping_batches), 1))
        if trainer.global_step <= warmup:
            return
        uniform = distance < self.uniform_tolerance
        logger = mlflow_logger(trainer)
        if logger is not None:
            logger.experiment.set_tag(logger.run_id, "gate.uniform", str(uniform).lower())
        if uniform and not self._warned_uniform:
            self._warned_uniform = True
            lr = getattr(pl_module, "gate_lr", None) or getattr(pl_module, "lr", None)
            log.warning(
                "step %d: every gate is still within %.3g of uniform (largest distance %.3g): the experts are mixed "
                "in equal parts, the gates have not learned. Give the gates their own, larger learning rate "
                "(model.gate_lr, now %s), or train longer; the run is tagged gate.uniform=true",
                trainer.global_step,
                self.uniform_tolerance,
                distance,
                lr,
            )

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if self._recorder is not None:
            self._recorder.__exit__()
            self._recorder = None
