"""The LightningModule: a frozen HF causal LM plus the configured adapters; steps, losses, per-task metrics.

No adapter math lives here: the model is loaded by :mod:`cgc_lightning.hf`, adapted by
:mod:`cgc_lightning.inject`, and each batch's task ids reach the adapters through
:func:`cgc_lightning.routing.route`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import asdict
from typing import Literal

import lightning as L
import torch
from torch import nn

from cgc_lightning.config import MODULA_METHODS, AdapterConfig, TaskLayout
from cgc_lightning.evaluation import EvaluationMixin, FirstLineEnded  # noqa: F401
from cgc_lightning.examples import ExampleRecorder
from cgc_lightning.export import init_from_adapter
from cgc_lightning.hf import ModelSpec, load_model, load_tokenizer
from cgc_lightning.inject import adapted_layers, adapter_parameters, inject_adapters, is_adapter_param, param_report
from cgc_lightning.loss import lean_loss_unsupported, loss_positions, target_token_losses, token_losses
from cgc_lightning.metrics import TaskMetric
from cgc_lightning.routing import route
from cgc_lightning.strategies import NAME as _DDP_STATIC  # noqa: F401  (registers trainer.strategy: ddp_static)

IGNORE = -100
log = logging.getLogger(__name__)
#: Leaf names of gate and router tensors: their own optimizer group (``gate_lr``, ``gate_weight_decay``).
GATE_PREFIXES = ("gate_", "router_")
#: ``model.adamw``: PyTorch's AdamW implementations, and ``auto``.
ADAMW_IMPLS = ("auto", "fused", "foreach", "for_loop")


def adamw_options(impl: str, cuda: bool) -> dict:
    """``torch.optim.AdamW``'s ``fused`` and ``foreach`` for ``model.adamw``, its tensors on CUDA or not.

    ``auto`` is ``fused`` on CUDA, else PyTorch's own choice (``None`` for both).
    """
    if impl not in ADAMW_IMPLS:
        raise ValueError(f"model.adamw must be one of {', '.join(ADAMW_IMPLS)}, got {impl!r}")
    if impl == "auto":
        return {"fused": True if cuda else None, "foreach": None}
    return {"fused": impl == "fused", "foreach": impl == "foreach"}


def rng_states() -> dict:
    """Python, NumPy and torch (CPU and every CUDA device) RNG states, as plain tensors and lists."""
    import random

    import numpy as np

    state = {"python": list(random.getstate()[1]) + [random.getstate()[2]], "torch": torch.get_rng_state()}
    np_state = np.random.get_state()
    state["numpy"] = [torch.from_numpy(np_state[1].astype("int64")), int(np_state[2])]
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state: dict) -> None:
    import random

    import numpy as np

    *words, gauss = state["python"]
    random.setstate((3, tuple(words), gauss))
    torch.set_rng_state(state["torch"])
    keys, pos = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype("uint32"), pos, 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def compile_options(value: bool | dict) -> dict | None:
    """``torch.compile`` keyword arguments from the ``compile`` setting, or ``None`` for no compilation."""
    if value is False or value is None:
        return None
    if value is True:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"model.compile must be true, false or a mapping of torch.compile arguments, got {value!r}")
    unknown = sorted(set(value) - set(MultiTaskLoRAModule.COMPILE_KEYS))
    if unknown:
        raise ValueError(
            f"model.compile: unknown torch.compile argument(s) {unknown}; "
            f"use {', '.join(MultiTaskLoRAModule.COMPILE_KEYS)}"
        )
    mode, backend = value.get("mode"), value.get("backend", "inductor")
    if mode is not None:
        if backend != "inductor":
            raise ValueError(f"model.compile: mode {mode!r} is inductor's; it cannot go with backend {backend!r}")
        modes = torch._inductor.list_mode_options()
        if mode not in modes:
            raise ValueError(f"model.compile: unknown mode {mode!r}; torch.compile knows {', '.join(modes)}")
    if isinstance(backend, str) and backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise ValueError(
            f"model.compile: unknown backend {backend!r}; "
            f"available: {', '.join(torch._dynamo.list_backends(exclude_tags=()))}"
        )
    return dict(value)


def uses_cuda_graphs(kwargs: dict | None) -> bool:
    """Whether ``torch.compile(**kwargs)`` replays CUDA graphs, whose outputs the next step may overwrite."""
    if kwargs is None:
        return False
    options = kwargs.get("options") or {}
    return (
        kwargs.get("mode") in ("reduce-overhead", "max-autotune")
        or kwargs.get("backend") == "cudagraphs"
        or bool(options.get("triton.cudagraphs"))
    )


def checkpoints_in_graph(compiled: bool) -> contextlib.AbstractContextManager:
    """Inside the block, dynamo traces a checkpointed layer whose forward sets Python state outside the layer into
    the compiled graph, and its backward recomputes the layer without setting that state again.

    Eager checkpointing sets it again, so by default dynamo gives up on such a layer and runs it eagerly, outside
    the graph. transformers 5.25 made ``kernels`` a dependency, whose ``use_kernelized_func`` wraps the attention
    forward of many models (Llama's included) in a set and a reset of a module-level context variable: every
    checkpointed decoder layer fell out of the graph. None of our forwards needs the replay: routing is left alone
    while dynamo traces (``routing._replay_routing``), and a router's ``aux_loss`` is read after the forward.
    """
    if not compiled or not hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        return contextlib.nullcontext()  # a torch without the option: such layers run eagerly, routed all the same
    return torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True)


class MultiTaskLoRAModule(EvaluationMixin, L.LightningModule):
    """Multi-task parameter-efficient fine-tuning of one frozen causal LM.

    Args:
        model: the base model to load.
        adapter: the method (``cgc_lora``, ``moelora``, ``joint_lora``, ``independent_lora``, ``modula_res``,
            ``modula_flan``) and its settings.
        task_names: task names in task-id order (linked from the data module by the CLI).
        task_clusters: cluster of each task (linked from the data module).
        task_metrics: metric of each task (linked from the data module).
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        warmup_ratio: share of the training steps spent warming the learning rate up linearly from 0.
        schedule: decay after warm-up: ``cosine`` (to 10% of ``lr``), ``linear`` (to 0) or ``constant``.
        gradient_checkpointing: recompute activations in backward to save memory.
        max_new_tokens: generation length for generative metrics and ``predict``.
        compile: run the training forward and backward through ``torch.compile``: ``true`` for its
            defaults, or its keyword arguments (``mode``, ``backend``, ``dynamic``, ``fullgraph``,
            ``options``), e.g. ``{mode: reduce-overhead}`` for CUDA graphs. Every method compiles into
            one graph. Worth it where the host issuing operations, not the GPU, sets the pace (small
            models or batches, see docs/benchmarks.md); the first steps pay the compilation.
            Validation, test and generation stay eager.
        loss_chunk_size: the loss runs the LM head on the target positions only, this many at a time, and
            backward recomputes each chunk's logits, so no full-vocabulary logits of the batch are ever held
            (:mod:`cgc_lightning.loss`); per-task losses are the same. ``null`` runs the model's own head on
            every position (the plain path, also taken for heads the lean loss does not know).
        gate_lr: learning rate of the gates and routers (``gate_*``, ``router_*`` tensors); ``null``:
            ``gate_lr_ratio * lr``.
        gate_lr_ratio: the gates' and routers' learning rate as a multiple of ``lr``, when ``gate_lr`` is null.
            Gates start uniform and get small gradients (every expert's output starts at zero), and AdamW
            moves a logit by about its learning rate per step, so at the experts' rate (``1``) they stay near
            an equal mix for hundreds of steps (the gate-usage diagnostics warn, see
            ``gate_usage.uniform_tolerance``). The default, 10, comes from the measurement in
            docs/results.md; ``1`` is the earlier behaviour.
        gate_weight_decay: AdamW weight decay of the gates and routers; ``null``: ``weight_decay``.
        log_val_examples: also log each validation's per-example results (``test`` always does;
            :mod:`cgc_lightning.examples`).
        adapter_dtype: dtype of the adapter parameters (gates and routers included). ``auto``: float32 when
            ``model.dtype`` is bfloat16 or float16, as PEFT keeps its adapters, else the base's dtype; under
            ``bf16-mixed`` the products still run in bf16. ``base``: the base model's dtype, what runs used
            before ``auto``: bf16 parameters lose every AdamW update below bf16's resolution at their value,
            and bf16 gate logits stall near uniform (:func:`cgc_lightning.inject.adapter_param_dtype`).
        adamw: PyTorch's implementation of AdamW: ``fused`` (a few kernels per parameter group a step),
            ``foreach`` (a few kernels per operation over lists of tensors) or ``for_loop`` (kernels per tensor);
            the update is the same up to rounding. ``auto``: ``fused`` when every trainable tensor is on a CUDA
            device, where an adapter's hundreds of small tensors make the optimizer step as long as it takes the
            host to issue its kernels (docs/benchmarks.md), else PyTorch's default. A resumed run steps with the
            implementation its config names, whichever wrote the checkpoint.
    """

    #: The keyword arguments of ``torch.compile`` that ``compile`` accepts.
    COMPILE_KEYS = ("mode", "backend", "dynamic", "fullgraph", "options")
    #: Whether a callback of this fit monitors a ``train/`` metric (``None``: not looked at yet).
    _train_metrics_monitored: bool | None = None

    def __init__(
        self,
        model: ModelSpec,
        adapter: AdapterConfig | None = None,
        task_names: list[str] | None = None,
        task_clusters: list[str] | None = None,
        task_metrics: list[str] | None = None,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_ratio: float = 0.05,
        schedule: Literal["cosine", "linear", "constant"] = "cosine",
        gradient_checkpointing: bool = False,
        max_new_tokens: int = 16,
        compile: bool | dict = False,
        loss_chunk_size: int | None = 4096,
        gate_lr: float | None = None,
        gate_lr_ratio: float = 10.0,
        gate_weight_decay: float | None = None,
        log_val_examples: bool = False,
        adapter_dtype: Literal["auto", "base", "float32", "bfloat16", "float16", "float64"] = "auto",
        adamw: Literal["auto", "fused", "foreach", "for_loop"] = "auto",
    ):
        super().__init__()
        compile_kwargs = compile_options(compile)
        # AdamW and the schedule would refuse these only once training starts, after the model loaded
        if not lr > 0:
            raise ValueError(f"lr must be positive, got lr={lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got weight_decay={weight_decay}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got betas={list(betas)}")
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got warmup_ratio={warmup_ratio}")
        if gate_lr is not None and not gate_lr > 0:
            raise ValueError(f"gate_lr must be positive or null (= gate_lr_ratio * lr), got gate_lr={gate_lr}")
        if not gate_lr_ratio > 0:
            raise ValueError(f"gate_lr_ratio must be positive, got gate_lr_ratio={gate_lr_ratio}")
        if gate_weight_decay is not None and gate_weight_decay < 0:
            raise ValueError(f"gate_weight_decay must be >= 0 or null, got gate_weight_decay={gate_weight_decay}")
        adamw_options(adamw, cuda=False)  # refuses an unknown name before the model loads
        if loss_chunk_size is not None and loss_chunk_size < 1:
            raise ValueError(
                f"model.loss_chunk_size must be a positive number of positions or null, got {loss_chunk_size}"
            )
        model = ModelSpec(**model) if isinstance(model, dict) else model
        adapter = AdapterConfig() if adapter is None else adapter
        adapter = AdapterConfig(**adapter) if isinstance(adapter, dict) else adapter
        if not task_names:
            raise ValueError(
                "model.task_names is empty: the CLI links it from data.tasks; set tasks in the data config"
            )
        clusters = list(task_clusters or ["all"] * len(task_names))
        cluster_names = list(dict.fromkeys(clusters))
        self.layout = TaskLayout(
            tuple(task_names), tuple(cluster_names), tuple(cluster_names.index(c) for c in clusters)
        )
        self.task_metrics = list(task_metrics or ["accuracy"] * len(task_names))
        # primitives only, so checkpoints load with weights_only=True
        self.save_hyperparameters(
            {
                "model": asdict(model),
                "adapter": asdict(adapter),
                "task_names": list(task_names),
                "task_clusters": clusters,
                "task_metrics": self.task_metrics,
                "lr": lr,
                "weight_decay": weight_decay,
                "betas": list(betas),
                "warmup_ratio": warmup_ratio,
                "schedule": schedule,
                "gradient_checkpointing": gradient_checkpointing,
                "max_new_tokens": max_new_tokens,
                "compile": compile if isinstance(compile, bool) else dict(compile),
                "loss_chunk_size": loss_chunk_size,
                "gate_lr": gate_lr,
                "gate_lr_ratio": gate_lr_ratio,
                "gate_weight_decay": gate_weight_decay,
                "log_val_examples": log_val_examples,
                "adapter_dtype": adapter_dtype,
                "adamw": adamw,
            },
            logger=False,
        )  # MLflowConfigCallback logs params under stable, flat names
        self.model_spec, self.adapter_config = model, adapter
        self.lr, self.weight_decay, self.betas, self.adamw = lr, weight_decay, tuple(betas), adamw
        self.warmup_ratio, self.schedule, self.max_new_tokens = warmup_ratio, schedule, max_new_tokens
        self.gate_lr = gate_lr if gate_lr is not None else gate_lr_ratio * lr
        self.gate_weight_decay, self.log_val_examples = gate_weight_decay, log_val_examples
        self.examples = ExampleRecorder()

        self.model = load_model(model)
        self.tokenizer = load_tokenizer(model)
        self.param_report = inject_adapters(self.model, adapter, self.layout, adapter_dtype)
        if adapter.init_adapter:  # the previous training stage's adapter (MoDULA), or a warm start
            init_from_adapter(self.model, adapter.init_adapter)
            self.param_report = param_report(self.model)
        if adapter.method in MODULA_METHODS and adapter.stage == "joint":
            log.warning(
                "%s with model.adapter.stage: joint trains every expert and the router at once, in one stage; "
                "MoDULA's method trains them in three (universal, domain, router): "
                "python -m cgc_lightning stages --config <stages config> (experiments/stages/)",
                adapter.method,
            )
        if weight_decay and adapter.method in MODULA_METHODS and adapter.stage in ("universal", "domain"):
            raise ValueError(
                f"stage {adapter.stage!r} freezes some experts of a stacked tensor by zeroing their gradient rows, "
                "and AdamW's weight decay would still move them: set model.weight_decay: 0 for this stage"
            )
        # router load-balancing losses (MoDULA) join the training loss; an empty list costs nothing
        self._aux_adapters = [
            layer.adapter
            for _, layer in adapted_layers(self.model)
            if getattr(layer.adapter, "load_balance_coef", 0.0) > 0
        ]
        self.model.train()  # from_pretrained returns eval mode; Lightning switches modes for eval loops
        if gradient_checkpointing:
            enable = (
                getattr(self.model, "activation_checkpointing_enable", None) or self.model.gradient_checkpointing_enable
            )
            enable({"use_reentrant": False})
            self.model.config.use_cache = False
            if compile_kwargs is not None and hasattr(self.model, "disable_input_require_grads"):
                # HF's hook marks the embeddings' output as requiring grad, which only reentrant
                # checkpointing needs; inside a compiled graph it forces a graph break
                self.model.disable_input_require_grads()
        unsupported = lean_loss_unsupported(self.model) if loss_chunk_size else None
        if unsupported:
            log.warning("model.loss_chunk_size: computing the full logits instead, since %s", unsupported)
        self.loss_chunk_size = None if unsupported else loss_chunk_size
        self._softcap = getattr(self.model.config, "final_logit_softcapping", None)
        # kept out of the module tree (a tuple, not an attribute nn.Module registers): the compiled
        # wrapper shares self.model's parameters and must not add a second copy of their names.
        # With the lean loss, training runs the decoder (hidden states) rather than the whole model.
        compiled = self.model.get_decoder() if self.loss_chunk_size else self.model
        self._compiled = () if compile_kwargs is None else (torch.compile(compiled, **compile_kwargs),)
        self._cuda_graphs = uses_cuda_graphs(compile_kwargs)
        # checkpoints hold adapter tensors only; the frozen base comes from model.name_or_path
        self.strict_loading = False
        self.metrics = nn.ModuleDict(
            {stage: nn.ModuleList([TaskMetric(m) for m in self.task_metrics]) for stage in ("val", "test")}
        )
        n = len(task_names)
        self.register_buffer("_task_loss_sum", torch.zeros(n), persistent=False)
        self.nonfinite: dict | None = None  # the last training loss's NaN/inf flag, for RunGuard
        self._step_at_batch: int | None = None  # global_step when the last training batch began
        self.register_buffer("_task_tokens", torch.zeros(n), persistent=False)
        self._eval_loss: dict[str, torch.Tensor] = {}
        self.results: dict[str, list[tuple]] = {}  # the last evaluation's per-task rows, by stage

    # ---------------------------------------------------------------------------------------- forward

    def forward(self, input_ids, attention_mask, task_ids, position_ids=None) -> torch.Tensor:
        """Logits ``(B, L, V)``; each sample goes through its own task's (and cluster's) adapters.

        Packed rows (``data.packing``) come with ``attention_mask=None``, ``position_ids`` that restart with each
        example (the model then attends within each example) and ``(B, L)`` task ids, one per token."""
        # the compiled model only where it was compiled for: training steps (eval shapes vary, no graph)
        compiled = bool(self._compiled) and self.training and torch.is_grad_enabled()
        model = self._compiled[0] if compiled else self.model
        # compiled: the ids at fixed addresses, which CUDA graphs need to replay (RoutingState.persistent_ids)
        with route(self.model, task_ids, validate=False, persistent=compiled), checkpoints_in_graph(compiled):
            return model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            ).logits

    def hidden_states(self, input_ids, attention_mask, task_ids, position_ids=None) -> torch.Tensor:
        """The final hidden states ``(B, L, d)`` that the LM head reads, each sample through its own adapters."""
        compiled = bool(self._compiled) and self.training and torch.is_grad_enabled()
        decoder = self._compiled[0] if compiled else self.model.get_decoder()
        with route(self.model, task_ids, validate=False, persistent=compiled), checkpoints_in_graph(compiled):
            return decoder(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            ).last_hidden_state

    def _per_task_loss(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean target-token loss of the batch, and per-task sums of token losses and token counts."""
        labels, task_ids = batch["labels"], batch["task_ids"]
        inputs = (batch["input_ids"], batch["attention_mask"], task_ids, batch.get("position_ids"))
        packed = task_ids.dim() == 2  # packed rows: each token's loss belongs to its own example's task
        if self.loss_chunk_size:
            positions = batch.get("loss_positions")
            if positions is None:
                positions = loss_positions(labels)
            losses, rows = target_token_losses(
                self.hidden_states(*inputs),
                self.model.get_output_embeddings(),
                labels,
                positions,
                chunk_size=self.loss_chunk_size,
                softcap=self._softcap,
            )  # (N,) over the batch's target tokens
            # the task of each loss: its row's, or in packed rows the task of the token it predicts
            owner = task_ids.reshape(-1).index_select(0, positions + 1) if packed else task_ids.index_select(0, rows)
            n = len(self.layout.tasks)
            task_sum = losses.new_zeros(n).index_add_(0, owner, losses)
            task_tokens = losses.new_zeros(n).index_add_(0, owner, losses.new_ones(losses.shape))
            return losses.sum() / max(losses.shape[0], 1), task_sum, task_tokens  # N is known without a sync
        losses, mask = token_losses(self(*inputs), labels)
        if packed:
            per_token, tokens, owner = losses.reshape(-1), mask.reshape(-1).to(losses.dtype), task_ids[:, 1:]
            owner = owner.reshape(-1)
        else:
            per_token, tokens, owner = losses.sum(1), mask.sum(1).to(losses.dtype), task_ids  # (B,)
        n = len(self.layout.tasks)
        task_sum = torch.zeros(n, device=losses.device, dtype=losses.dtype).index_add_(0, owner, per_token)
        task_tokens = torch.zeros(n, device=losses.device, dtype=losses.dtype).index_add_(0, owner, tokens)
        return losses.sum() / tokens.sum().clamp_min(1), task_sum, task_tokens

    # --------------------------------------------------------------------------------------- training

    def training_step(self, batch, batch_idx):
        if self._cuda_graphs:  # a new step: the graphs may overwrite the previous step's outputs
            torch.compiler.cudagraph_mark_step_begin()
        loss, task_sum, task_tokens = self._per_task_loss(batch)
        log_now = self._logs_step_metrics()
        if log_now:  # under DDP the mean over every rank's batch (one scalar all-reduce), not rank 0's share of it
            self.log(
                "train/loss",
                loss,
                prog_bar=True,
                batch_size=batch["input_ids"].shape[0],
                sync_dist=self._world_size > 1,
            )
        aux = [a.aux_loss for a in self._aux_adapters if a.aux_loss is not None]  # left by this step's forward
        if aux:
            aux_loss = torch.stack(aux).sum()
            if log_now:
                self.log("train/aux_loss", aux_loss, batch_size=batch["input_ids"].shape[0])
            loss = loss + aux_loss
            for a in self._aux_adapters:
                a.aux_loss = None
        self._task_loss_sum += task_sum.detach()
        self._task_tokens += task_tokens
        # read by RunGuard before the optimizer step (a NaN stops the run there); no host sync here
        flag = ~torch.isfinite(loss.detach())
        previous = self.nonfinite  # micro-batches of one accumulated step
        self.nonfinite = {
            "flag": flag if previous is None else previous["flag"] | flag,
            "loss": loss.detach(),
            "task_ids": batch["task_ids"],
            "task_sum": task_sum.detach(),
        }
        self._step_at_batch = self.global_step  # on_train_batch_end logs when the optimizer has stepped since
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # The per-task losses, averaged over the logging interval, are read at the steps Lightning logs (the
        # optimizer has just stepped and the new step count is a multiple of log_every_n_steps), once per log,
        # not once per micro-batch. The read is a host sync: here the step's backward and optimizer step are
        # already queued, where in training_step it stalled the host between forward and backward until the
        # GPU had caught up, one idle host per logging step.
        every, step = self.trainer.log_every_n_steps, self.global_step
        if every and self._step_at_batch not in (None, step) and step % every == 0:
            self._log_task_losses()

    def _logs_step_metrics(self) -> bool:
        """Whether this training step logs ``train/loss`` (and ``train/aux_loss``).

        At the steps Lightning sends to the logger (every ``log_every_n_steps``) and the fit's first and last
        steps, the steps the progress bar reads (``callbacks.progress``); at every step when a callback monitors
        a ``train/`` metric (a checkpoint or early stopping on ``train/loss`` sees each step's value), when
        logging is off (``log_every_n_steps: 0``: the bar shows the loss) and under ``fast_dev_run``. Logging a
        value costs Lightning ~0.3 ms of host time, on a small model a good share of the loop's own overhead
        per step; the history the logger gets is the same either way.
        """
        trainer = self._trainer
        if trainer is None or not trainer.log_every_n_steps or trainer.fast_dev_run:
            return True
        first = self._train_metrics_monitored is None
        if first:
            self._train_metrics_monitored = any(
                isinstance(getattr(cb, "monitor", None), str) and cb.monitor.startswith("train/")
                for cb in trainer.callbacks
            )
        last = trainer.max_steps is not None and 0 < trainer.max_steps <= self.global_step + 1
        # Lightning's own rule for the steps it logs (private: a Lightning without it logs every step)
        due = getattr(getattr(trainer, "_logger_connector", None), "should_update_logs", True)
        return first or last or self._train_metrics_monitored or due

    @property
    def _world_size(self) -> int:
        """Processes training together (1 when not attached to a Trainer)."""
        return self._trainer.world_size if self._trainer is not None else 1

    def _log_task_losses(self) -> None:
        both = torch.stack([self._task_loss_sum, self._task_tokens])
        if self._world_size > 1:  # every rank's tokens: a rank may have seen none of a task
            both = self.trainer.strategy.reduce(both, reduce_op="sum")
        sums, tokens = both.tolist()
        values = {f"train/{name}/loss": s / c for name, s, c in zip(self.layout.tasks, sums, tokens, strict=True) if c}
        if values:
            self.log_dict(values, on_step=True, on_epoch=False)
        self._task_loss_sum.zero_()
        self._task_tokens.zero_()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # the frozen base is not saved: it is reloaded from model.name_or_path
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if is_adapter_param(k.removeprefix("model."))
        }
        # RNG states (dropout), so a resumed run draws what the uninterrupted one would have; every rank's,
        # since ranks with batches of other shapes have drawn different amounts (all ranks save together)
        checkpoint["rng_states"] = rng_states()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            per_rank = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(per_rank, checkpoint["rng_states"])
            checkpoint["rng_states_per_rank"] = per_rank

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # A loaded optimizer state brings its param groups' settings, "fused" and "foreach" among them, which
        # would override model.adamw; the state itself is the same for every implementation. This runs before
        # Lightning restores the optimizers, and may run before it moves the model to its device.
        if checkpoint.get("optimizer_states"):
            device = self._trainer.strategy.root_device if self._trainer is not None else self.device
            impl = adamw_options(self.adamw, device.type == "cuda")
            for state in checkpoint["optimizer_states"]:
                for group in state.get("param_groups", ()):
                    group.update(impl)
        # the base is not in checkpoints, so loading is not strict: check the adapter tensors ourselves
        saved = set(checkpoint.get("state_dict", {}))
        expected = {k for k in self.state_dict() if is_adapter_param(k.removeprefix("model."))}
        missing, unexpected = sorted(expected - saved), sorted(saved - expected)
        if missing or unexpected:
            raise ValueError(
                f"the checkpoint's adapter tensors do not match this model's: {len(missing)} missing "
                f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}. Was it written with another "
                "model.adapter (method, r, num_shared, num_specific, target_modules) or model? Load it with the "
                "config it was trained with (the run's config.yaml artifact)"
            )
        if "rng_states" in checkpoint and self._trainer is not None and self._trainer.state.fn == "fit":
            per_rank = checkpoint.get("rng_states_per_rank") or []
            rank = self._trainer.global_rank
            self._rng_to_restore = per_rank[rank] if rank < len(per_rank) else checkpoint["rng_states"]

    def on_train_start(self) -> None:
        self._train_metrics_monitored = None  # this fit's callbacks decide (_logs_step_metrics)
        # restored here, not on load: building the loaders' iterators in between draws from the RNG too
        state = self.__dict__.pop("_rng_to_restore", None)
        if state is not None:
            set_rng_states(state)

    def make_optimizer(self) -> torch.optim.AdamW:
        """AdamW over the trainable adapter tensors: the experts at ``lr``, the gates and routers in their own group."""
        trainable = [(n, p) for n, p in adapter_parameters(self.model) if p.requires_grad]
        gates = [p for n, p in trainable if n.rsplit(".", 1)[-1].startswith(GATE_PREFIXES)]
        experts = [p for n, p in trainable if not n.rsplit(".", 1)[-1].startswith(GATE_PREFIXES)]
        groups = [{"params": experts, "name": "experts"}] if experts else []
        if gates:  # their own rate (gate_lr, or gate_lr_ratio x lr) and decay (the experts' unless set)
            groups.append(
                {
                    "params": gates,
                    "name": "gates",
                    "lr": self.gate_lr,
                    "weight_decay": self.gate_weight_decay if self.gate_weight_decay is not None else self.weight_decay,
                }
            )
        cuda = bool(trainable) and all(p.device.type == "cuda" for _, p in trainable)
        return torch.optim.AdamW(
            groups, lr=self.lr, weight_decay=self.weight_decay, betas=self.betas, **adamw_options(self.adamw, cuda)
        )

    def configure_optimizers(self):
        opt = self.make_optimizer()
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = int(self.warmup_ratio * total)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            if self.schedule == "constant":
                return 1.0
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            if self.schedule == "linear":
                return 1.0 - progress
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------------------------- evaluation
