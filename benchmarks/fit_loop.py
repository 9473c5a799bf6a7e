r"""The real training loop against a bare PEFT loop over the same batches: step time, tokens/s, memory, host time.

``fit`` here is what ``python -m cgc_lightning fit --config <config>`` builds: ``MultiTaskLoRAModule``,
``MultiTaskDataModule`` on the config's tasks, the default callbacks (checkpoints, LR monitor, seesaw,
gradient-conflict and gate-use diagnostics unless ``--diagnostics off``, run guard) and the MLflow logger on a
throw-away SQLite store. Validation is pushed past the timed steps, so only training steps are timed.

``bare`` is the loop such a model would get without the framework: the same base model (``load_model`` of the
same spec), a PEFT LoRA of the method's active rank and dropout on the same modules, ``model(..., labels=...).loss``
(HF's own loss), ``backward``, AdamW, at the same precision, over the same batches in the same order (the data
module's own loader). Both loops step fit's AdamW implementation (``model.adamw``), and when fit compiles
(``model.compile``) the bare model is compiled with the same ``torch.compile`` arguments (``--bare-compile off``
keeps it eager), so that the ratios compare the method and the Trainer, not optimizer kernels or compilation.

The two loops run side by side: right after each of fit's steps (a callback, after fit's own step has been
timed), the bare loop takes a step on the same batch. Steps bound by the host vary by 20 % between runs on a
shared host; paired this way, both loops see the pace of the same moment, and the per-step ratio's median and
quartiles are printed. ``bare alone`` then runs the same loop over the same batches after ``fit``, alone in the
process, for its peak memory and as a check on the pairing.

``split`` then tells the module's share of fit's window from the Trainer's: fit's own module, stepped without the
Trainer (``_per_task_loss``: routing, the forward, the lean loss and the per-task sums; ``backward``; AdamW), and
the bare step, interleaved on the same batches, each phase (forward + loss, backward, optimizer) synchronised and
timed on its own. Module / bare is what the method costs; fit / bare beyond it, what Lightning's step, hooks and
logging add.

Per loop: the median step time (CUDA-synchronised at each step's start and end) after ``--warmup`` steps,
tokens/s over non-pad tokens, and peak GPU memory (``max_memory_allocated`` within each step, the most over
the steps; for ``fit`` less what the paired bare loop keeps on the device, its model and AdamW's state; for
``bare alone`` less what fit left there, such as a compiled fit's CUDA graph pool); and the first step's time
(compilation and first-use costs), outside the medians. For ``fit``, where the host time goes: Lightning's
``SimpleProfiler`` times every hook on the host (asynchronous CUDA work is not waited for), grouped as data
(fetching and moving the batch), forward + routing + per-task loss (``training_step``), backward, optimizer,
callbacks (their per-step hooks listed one by one, the largest first: a callback that waits for the GPU shows up
there) and logging.

``--size`` picks the model: ``config`` (the default) runs the one the config names; a size of
``benchmarks.shapes.SIZES`` (``tiny``, ``host``, ``135m``, ``1b``, ``3b``: Llama-3.2-1B and -3B for the last two)
runs a Llama of that shape with random weights instead, in the config's ``model.model.dtype``, its vocabulary
the length of the config model's tokenizer (which it keeps, so the data are tokenised as before); both loops
load it. The header names the size, the shape and the base parameter count.

    python -m benchmarks.fit_loop --config experiments/gpu.yaml --set data.batch_size=32       # GPU, real model
    python -m benchmarks.fit_loop --config experiments/gpu.yaml --size 1b \
        --set data.batch_size=8 --set data.max_length=512                                    # GPU, 1B shape
    python -m benchmarks.fit_loop --config experiments/tiny.yaml --steps 2 --warmup 1            # CPU smoke (CI)

A step of either loop that takes longer than ``SLOW_STEP_S`` (2 s: compilation, CUDA graph recording, a stall) is
reported on stderr as it ends (``fit: step 1 of 26 took 64.2 s``), so a long run shows where it is.

``--set key=value`` takes dotted LightningCLI overrides (``model.adapter.method=joint_lora``), any number.

``--profile N`` then runs N + 1 more steps of each loop, after its timed ones, under ``torch.profiler`` (the
first the profiler's warm-up; see :mod:`benchmarks.profile_steps`), and prints both loops' device and host
time per step, op and kernel counts, host syncs and where they come from, the attention backend, the dtypes
at the first adapted layer, and the top ops; the timed figures above are of the timed steps only. Chrome
traces go to ``--profile-dir`` (default: a new temporary folder, printed).

``--py-profile N`` then runs N more whole iterations of ``fit`` (each from one step's start to the next's: the
step, the hooks, logging and fetching the next batch) under ``cProfile`` and prints the Python functions by own
time and, of this repository's and Lightning's, by cumulative time, per step; ``fit.pstats`` goes to
``--profile-dir``. cProfile's hooks slow Python down, so read the shares, not the milliseconds.
"""

from __future__ import annotations

import argparse
import csv
import gc
import re
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml
from lightning.pytorch import Callback

from benchmarks.profile_steps import (
    DtypeProbe,
    FitProfiler,
    PyProfiler,
    StepProfiler,
    first_peft_layer,
    report,
    report_python,
)
from benchmarks.shapes import SIZES, llama_config
from cgc_lightning.config import AdapterConfig
from cgc_lightning.hf import ModelSpec
from datamodules.multitask import loader_options

#: Callback hooks listed under the host time's ``callbacks`` line, the largest first.
HOOK_LINES = 6
PER_STEP_HOOKS = ("on_train_batch_start", "on_train_batch_end", "on_before_backward", "on_after_backward",
                  "on_before_optimizer_step", "on_before_zero_grad")  # fmt: skip


def active_rank(cfg: AdapterConfig) -> int:
    """The LoRA rank one token goes through: what a single PEFT LoRA needs to match its compute."""
    if cfg.method == "cgc_lora":
        return (cfg.num_shared + cfg.num_specific) * cfg.r
    if cfg.method == "moelora":
        return cfg.num_experts * cfg.r
    if cfg.method.startswith("modula"):
        return (cfg.num_universal + 1) * cfg.r
    return cfg.r


def config_model_spec(config: str, sets: list[str]) -> ModelSpec:
    """The config's ``model.model`` with the ``--set model.model.<field>=<value>`` overrides applied."""
    with open(config) as f:
        fields = dict(((yaml.safe_load(f) or {}).get("model") or {}).get("model") or {})
    for kv in sets:
        key, _, value = kv.partition("=")
        if key.startswith("model.model."):
            fields[key.removeprefix("model.model.")] = yaml.safe_load(value)
    if "name_or_path" not in fields:
        raise SystemExit(f"--size needs the config's tokenizer, but {config} sets no model.model.name_or_path")
    return ModelSpec(**fields)


def sized_model(size: str, spec: ModelSpec, folder: Path) -> list[str]:
    """Write a Llama model folder of ``SIZES[size]`` (config only: fit builds random weights) with ``spec``'s
    tokenizer, the vocabulary that tokenizer's length; return the overrides that point ``fit`` at it."""
    from cgc_lightning.hf import load_tokenizer

    tokenizer = load_tokenizer(spec)  # as the data module loads it: a pad token (EOS) if the model has none
    cfg = llama_config(size, vocab_size=len(tokenizer))
    cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = (
        tokenizer.pad_token_id,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
    )
    cfg.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return [f"--model.model.name_or_path={folder}", "--model.model.random_init=true", "--model.model.gguf_file=null"]


def size_overrides(args: argparse.Namespace, folder: Path) -> list[str]:
    """For ``--size`` other than ``config``, the model folder :func:`sized_model` writes under ``folder`` and the
    overrides that point ``fit`` at it; nothing for ``config``."""
    if args.size == "config":
        return []
    return sized_model(args.size, config_model_spec(args.config, args.set), folder / f"llama-{args.size}")


def model_shape(size: str, model: torch.nn.Module) -> dict:
    """The base model's shape and parameter counts (frozen base, trainable adapters; tied tensors once)."""
    cfg = model.config
    params = list(model.parameters())
    return {
        "size": size,
        "hidden_size": cfg.hidden_size,
        "layers": cfg.num_hidden_layers,
        "vocab_size": cfg.vocab_size,
        "params": sum(p.numel() for p in params if not p.requires_grad),
        "trainable": sum(p.numel() for p in params if p.requires_grad),
    }


#: A step slower than this many seconds is reported on stderr as it ends (compilation, CUDA graph recording, a
#: stall), so that a long benchmark shows where it is; the report on stdout is unchanged.
SLOW_STEP_S = 2.0


def say_slow_step(loop: str, index: int, total: int | None, seconds: float) -> None:
    """``fit: step 3 of 36 took 64.2 s`` on stderr when ``seconds`` passes :data:`SLOW_STEP_S`."""
    if seconds > SLOW_STEP_S:
        of = f" of {total}" if total else ""
        print(f"{loop}: step {index + 1}{of} took {seconds:.1f} s", file=sys.stderr, flush=True)


class StepTimer(Callback):
    """Wall time of each training step (synchronised), its non-pad tokens, its examples and its width; on a GPU
    also the peak memory allocated within the step (``peaks``), less what a ``paired`` bare loop holds then.
    ``starts``: when each step began, so that whole iterations (the step plus what Lightning does between steps:
    fetching the next batch, logging) can be timed from one start to the next."""

    def __init__(self, cuda: bool, paired: BareLoop | None = None):
        self.cuda, self.paired = cuda, paired
        self.times, self.tokens, self.examples, self.widths, self.peaks, self.starts = [], [], [], [], [], []

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._sync()
        if self.cuda:
            self._other = self.paired.resident_bytes() if self.paired else 0
            torch.cuda.reset_peak_memory_stats()
        self._t = time.perf_counter()
        self.starts.append(self._t)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._sync()
        self.times.append(time.perf_counter() - self._t)
        say_slow_step("fit", len(self.times) - 1, trainer.max_steps, self.times[-1])
        if self.cuda:
            self.peaks.append(torch.cuda.max_memory_allocated() - self._other)
        packed = batch.get("attention_mask") is None  # data.packing: the batch counts its own tokens
        self.tokens.append(int(batch["n_tokens"]) if packed else int(batch["attention_mask"].sum()))
        self.examples.append(int(batch["n_examples"]) if packed else int(batch["input_ids"].shape[0]))
        self.widths.append(int(batch["input_ids"].shape[1]))


class BareLoop:
    """The bare loop for ``cli``'s model and method: the same base model (``load_model`` of the same spec), a PEFT
    LoRA of the method's active rank and dropout on the same modules, HF's own loss, ``backward``, AdamW, at the
    same precision. :meth:`step` trains it on one batch of the data module's.

    ``compile``: compile the model with fit's ``model.compile`` arguments (none when fit does not compile), as a
    user compiling a bare loop would: ``torch.compile`` of the whole PEFT model, HF's loss included."""

    def __init__(self, cli, cuda: bool, compile: bool = True):
        from peft import LoraConfig, get_peft_model

        from cgc_lightning.hf import load_model
        from cgc_lightning.inject import adapted_layers
        from cgc_lightning.module import adamw_options, compile_options, uses_cuda_graphs

        self.device = torch.device("cuda" if cuda else "cpu")
        precision = str(cli.trainer.precision)
        cfg = cli.model.adapter_config
        self.rank = active_rank(cfg)
        model = load_model(cli.model.model_spec)
        if precision.startswith("bf16-true"):
            model = model.to(torch.bfloat16)
        targets = sorted({name.rsplit(".", 1)[-1] for name, _ in adapted_layers(cli.model.model)})  # as resolved
        lora = LoraConfig(
            r=self.rank, lora_alpha=self.rank * cfg.alpha / cfg.r, lora_dropout=cfg.dropout, target_modules=targets
        )  # as the fit
        self.model = get_peft_model(model, lora).to(self.device)
        # fit's AdamW implementation (model.adamw: fused on a GPU by default), so the two loops differ in the method
        # and the Trainer, not in the optimizer's kernels
        self.adamw = adamw_options(cli.model.adamw, cuda)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=cli.model.lr, **self.adamw)
        self.compile = compile_options(cli.model.hparams.get("compile", False)) if compile else None
        self.cuda_graphs = uses_cuda_graphs(self.compile)
        self.run = self.model if self.compile is None else torch.compile(self.model, **self.compile)
        self.autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if precision.startswith("bf16-mixed")
            else nullcontext()
        )
        self._resident = (None, 0)  # (AdamW's state entries when counted, bytes): see resident_bytes

    def forward(self, batch) -> torch.Tensor:
        """HF's own loss on the batch (moved to the device if it is not there)."""
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        if self.cuda_graphs:  # a new step: the graphs may overwrite the previous step's outputs
            torch.compiler.cudagraph_mark_step_begin()
        with self.autocast:
            return self.run(input_ids=ids, attention_mask=mask, labels=batch["labels"].to(self.device)).loss

    def optimizer(self) -> None:
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def step(self, batch) -> torch.Tensor:
        loss = self.forward(batch)
        loss.backward()
        self.optimizer()
        # a replayed CUDA graph writes the next step's loss where this one is
        return loss.detach().clone() if self.cuda_graphs else loss.detach()

    def resident_bytes(self) -> int:
        """What the loop keeps between steps on its device: the model's tensors and AdamW's state.

        Tensors are matched by device type: ``torch.device("cuda")`` is not equal to a tensor's ``cuda:0``."""
        # counted again only when AdamW's state gains entries (its first step): the walk over every tensor took
        # ~6 ms of host time at 135M on an H200, in each of fit's steps (StepTimer), between two timed windows
        key = len(self.opt.state)
        if self._resident[0] != key:
            tensors = [*self.model.parameters(), *self.model.buffers()]
            tensors += [v for state in self.opt.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
            here = [t for t in tensors if t.device.type == self.device.type]
            self._resident = key, sum(t.numel() * t.element_size() for t in here)
        return self._resident[1]

    @property
    def base_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if not p.requires_grad)


class PairedBare(Callback):
    """A bare step on each of ``fit``'s first ``steps`` batches, right after fit's own step on it (place it after
    ``StepTimer``): both loops are timed on the same batch at the same moment, so a drift of the machine's pace
    (host-bound steps on a shared host vary by 20 % between runs) moves both alike."""

    def __init__(self, bare: BareLoop, steps: int, cuda: bool):
        self.bare, self.steps, self.cuda, self.times, self.losses = bare, steps, cuda, [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if len(self.times) == self.steps or batch.get("attention_mask") is None:  # packed rows: no bare twin
            return
        if self.cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = self.bare.step(batch)
        if self.cuda:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - t)
        self.losses.append(loss)
        say_slow_step("bare (paired)", len(self.times) - 1, self.steps, self.times[-1])


PHASES = ("forward + loss", "backward", "optimizer")


class ModuleLoop:
    """``fit``'s own module stepped without the Trainer, in :class:`BareLoop`'s phases: ``forward`` is
    ``_per_task_loss`` (routing, the forward and the per-task losses), then ``backward``, then ``optimizer``, an
    AdamW over its trainable tensors; at fit's precision (autocast as Lightning's ``bf16-mixed`` applies it).
    Its step against the bare step tells the module's share of fit's window (the adapters, the lean loss, the
    per-task sums) from the Trainer's (its step, hooks and logging)."""

    def __init__(self, cli, bare: BareLoop):
        self.module, self.device, self.autocast = cli.model, bare.device, bare.autocast
        self.module.to(self.device).train()  # fit's teardown moved it back to the host
        self.opt = self.module.make_optimizer()  # fit's: its groups (experts, gates) and implementation

    def forward(self, batch) -> torch.Tensor:
        if self.module._cuda_graphs:  # as training_step: a new step, the graphs may overwrite the last one's outputs
            torch.compiler.cudagraph_mark_step_begin()
        with self.autocast:
            return self.module._per_task_loss(batch)[0]

    def optimizer(self) -> None:
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def run_split(args, cli, bare: BareLoop, cuda: bool) -> dict:
    """The module's step and the bare step interleaved over the same batches (after ``fit``), each phase timed
    on its own (synchronised before and after): ms per phase (medians after ``--warmup``) of each loop, and the
    median per-step ratio of the whole steps, module / bare (both see the machine's pace of the same moment).

    Returns ``{"module": {phase: ms, "step": ms}, "bare": {...}, "ratio": median, "quartiles": (q1, q3)}``."""
    ours = ModuleLoop(cli, bare)
    loops = {"module": (ours.forward, ours.optimizer), "bare": (bare.forward, bare.optimizer)}
    times = {name: {ph: [] for ph in PHASES} for name in loops}
    loader = cli.datamodule.train_dataloader()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for i, batch in enumerate(epochs(loader)):
        if i == args.warmup + args.steps:
            break
        batch = {k: v.to(bare.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        for name, (forward, optimizer) in loops.items():
            sync()
            t0 = time.perf_counter()
            loss = forward(batch)
            sync()
            t1 = time.perf_counter()
            loss.backward()
            sync()
            t2 = time.perf_counter()
            optimizer()
            sync()
            t3 = time.perf_counter()
            for phase, t in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                times[name][phase].append(t)
    out = {}
    for name, phases in times.items():
        out[name] = {ph: statistics.median(t[args.warmup :]) * 1e3 for ph, t in phases.items()}
        out[name]["step_s"] = [sum(ts) for ts in zip(*phases.values(), strict=True)][args.warmup :]
        out[name]["step"] = statistics.median(out[name]["step_s"]) * 1e3
    per_step = [m / b for m, b in zip(out["module"]["step_s"], out["bare"]["step_s"], strict=True)]
    q = statistics.quantiles(per_step, n=4) if len(per_step) > 1 else per_step * 3
    return out | {"ratio": statistics.median(per_step), "quartiles": (q[0], q[2])}


def summarise(
    times: list[float], tokens: list[int], warmup: int, peak: int | None, examples=None, widths=None, met=()
) -> dict:
    """Median ms, tokens/s, peak GiB (and examples per step) of the steps after ``warmup``; with ``widths``, the
    steps' sequence widths, also how many timed steps came at a width first met there (after the warm-up, or by
    no step of ``met``, the widths an earlier loop in this process ran), which on a GPU build new attention
    kernel plans (``new_widths``), and the median of the others (``ms_known_widths``)."""
    t, n = times[warmup:], tokens[warmup:]
    ms = statistics.median(t) * 1e3
    out = {
        "ms": ms,
        "tokens_per_s": statistics.mean(n) / (ms / 1e3),
        "peak_gib": None if peak is None else peak / 2**30,
        "step_s": t,
        "step_tokens": tokens,
        "first_s": times[0],
    }
    if examples:
        out["examples_per_step"] = statistics.mean(examples[warmup:])
    if widths:
        seen, new = set(met), []
        for w in widths:
            new.append(w not in seen)
            seen.add(w)
        known = [x for x, fresh in zip(t, new[warmup:], strict=True) if not fresh]
        out["widths"] = widths
        out["new_widths"] = sum(new[warmup:])
        out["new_at"] = new[warmup:]  # per timed step
        out["ms_known_widths"] = statistics.median(known) * 1e3 if known else None
    return out


def step_calls_ms(profiler, steps: int, after: int = 0) -> dict[str, list[float]]:
    """Each per-step action's calls in the timed steps, in ms (the ``steps`` calls before the last ``after``, the
    profiled steps)."""
    return {
        a: [x * 1e3 for x in d[len(d) - after - steps : len(d) - after]]
        for a, d in profiler.recorded_durations.items()
        if len(d) >= steps + after
    }


def per_step_ms(profiler, steps: int, after: int = 0) -> dict[str, float]:
    """Host ms per timed step of each per-step action the profiler recorded (see ``step_calls_ms``)."""
    return {a: sum(calls) / steps for a, calls in step_calls_ms(profiler, steps, after).items()}


def callback_hooks(per_step: dict[str, float]) -> dict[str, float]:
    """The callbacks' per-step hooks (``[Callback]<name>.<hook>``: ms per step) in ``per_step``, largest first; not the
    benchmark's own (``StepTimer``, ``PairedBare``)."""
    hooks = {
        a: ms
        for a, ms in per_step.items()
        if a.startswith("[Callback]")
        and not any(c in a for c in ("StepTimer", "PairedBare"))
        and a.endswith(PER_STEP_HOOKS)
    }
    return dict(sorted(hooks.items(), key=lambda kv: -kv[1]))


def host_time(profiler, steps: int, step_ms: float, after: int = 0) -> dict[str, float]:
    """Host ms per timed step by where it goes, from the profiler's per-hook durations (of each per-step action,
    the ``steps`` calls before the last ``after``, the profiled steps; ``optimizer`` is ``optimizer_step`` less
    what runs inside its closure)."""
    per_step = per_step_ms(profiler, steps, after)

    def total(*keys: str, exclude: str = "") -> float:
        return sum(ms for a, ms in per_step.items() if any(k in a for k in keys) and not (exclude and exclude in a))

    data = total("train_dataloader_next", "batch_to_device", "transfer_batch_to_device", "batch_transfer")
    forward = total("Strategy.training_step")
    backward = total("Strategy.backward")
    callbacks = sum(callback_hooks(per_step).values())
    inside = forward + backward + total("on_before_backward", "on_after_backward", "on_before_optimizer_step")
    optimizer = max(total("Module.optimizer_step") - inside, 0.0) + total("optimizer_zero_grad")
    out = {
        "data (fetch, collate, to device)": data,
        "forward + routing + per-task loss": forward,
        "backward": backward,
        "optimizer": optimizer,
        "callbacks (diagnostics, checkpoints, guard)": callbacks,
    }
    out["rest (loop, logging, GPU waits)"] = max(step_ms - sum(out.values()), 0.0)
    return out


def build_cli(config: str, args: list[str], store: Path, experiment: str, progress_bar: bool = False):
    """The CLI's module, data module and trainer for ``config`` plus ``args``, not run; MLflow logs and outputs go
    to a throw-away ``store`` folder. ``progress_bar``: the CLI's own bar, as a user gets it (else none)."""
    from cgc_lightning.cli import TRAINER_DEFAULTS, CGCLightningCLI
    from cgc_lightning.module import MultiTaskLoRAModule
    from cgc_lightning.tracking import MLflowConfigCallback
    from datamodules.multitask import MultiTaskDataModule

    return CGCLightningCLI(
        MultiTaskLoRAModule,
        MultiTaskDataModule,
        save_config_callback=MLflowConfigCallback,
        trainer_defaults=TRAINER_DEFAULTS,
        args=[
            "--config",
            config,
            *args,
            f"--trainer.enable_progress_bar={str(progress_bar).lower()}",
            f"--trainer.default_root_dir={store / 'outputs'}",
            f"--trainer.logger.init_args.tracking_uri=sqlite:///{store / 'mlflow.db'}",
            f"--trainer.logger.init_args.experiment_name={experiment}",
        ],
        run=False,
    )


def run_fit(args, overrides: list[str], store: Path, cuda: bool, profiler: StepProfiler | None = None, pair=False):
    """Time ``fit``'s steps; with a ``profiler``, run its steps after the timed ones under it (not timed). With
    ``pair``, a :class:`BareLoop` runs a step on each of the timed batches right after fit's (:class:`PairedBare`),
    returned as the fourth value; fit's peak memory leaves out what the bare loop holds."""
    timed_steps = args.warmup + args.steps
    profiled = profiler.runs if profiler else 0
    # steps after the timed ones: the profiled ones, the Python-profiled ones, and one whose start ends the last
    after = profiled + args.py_profile + 1
    total = timed_steps + after
    off = (
        [f"--{c}.enabled=false" for c in ("seesaw", "grad_conflict", "gate_usage")] if args.diagnostics == "off" else []
    )
    timed = [
        f"--trainer.max_steps={total}",
        f"--trainer.val_check_interval={total + 1}",
        "--trainer.check_val_every_n_epoch=null",
        "--trainer.num_sanity_val_steps=0",
        # the per-hook host times; its report goes to a file, not the screen
        '--trainer.profiler={"class_path": "lightning.pytorch.profilers.SimpleProfiler", '
        f'"init_args": {{"dirpath": "{store}", "filename": "profile"}}}}',
    ]
    cli = build_cli(args.config, [*overrides, *off, *timed], store, "fit-loop-benchmark", args.progress_bar == "on")
    paired = PairedBare(BareLoop(cli, cuda, args.bare_compile == "same"), timed_steps, cuda) if pair else None
    timer = StepTimer(cuda, paired.bare if paired else None)
    cli.trainer.callbacks.append(timer)
    if paired:  # after the timer, so fit's step is timed without it
        cli.trainer.callbacks.append(paired)
    probe = FitProfiler(profiler, start_at=timed_steps) if profiler else None
    if probe:  # after the timer: a profiled step holds the timer's synchronisations, as a timed one
        cli.trainer.callbacks.append(probe)
    python = PyProfiler(start_at=timed_steps + profiled, steps=args.py_profile) if args.py_profile else None
    if python:
        cli.trainer.callbacks.append(python)
    cli.trainer.fit(cli.model, cli.datamodule)
    n = timed_steps
    peak = max(timer.peaks[:n]) if cuda else None  # the timed steps' (and their warm-up's), not the profiled ones
    fit = summarise(timer.times[:n], timer.tokens[:n], args.warmup, peak, timer.examples[:n], timer.widths[:n])
    fit |= iterations(timer.starts, paired.times if paired else None, args.warmup, n)
    if profiler:
        fit["profile"] = profiler.summarise() | {"dtypes": probe.dtypes}
    if python:
        fit["python"] = python.stats
    fit["probes"] = conflict_probes(cli.trainer.callbacks, args.warmup, n)
    host = host_time(cli.trainer.profiler, args.steps, fit["ms"], after=after)
    fit["callback_hooks"] = callback_hooks(per_step_ms(cli.trainer.profiler, args.steps, after=after))
    # a mean over the timed steps can be one call (a checkpoint save, a probe): each hook's median and largest call
    calls = step_calls_ms(cli.trainer.profiler, args.steps, after=after)
    fit["callback_hook_calls"] = {
        h: {"median_ms": statistics.median(calls[h]), "max_ms": max(calls[h])} for h in fit["callback_hooks"]
    }
    return (cli, fit, host, paired) if pair else (cli, fit, host)


def conflict_probes(callbacks, warmup: int, n: int) -> dict | None:
    """The gradient-conflict probes that ran inside timed steps (batches ``warmup .. n - 1``, which end at optimizer
    steps ``warmup + 1 .. n``): a probe runs in its step's ``on_train_batch_end``, inside the step's window, so
    those steps' times hold it. ``None`` without the callback or with it off.

    Returns ``{"timed": probes in timed steps, "every": grad_conflict.every_n_steps, "ms": mean ms a probe}``."""
    from cgc_lightning.callbacks.conflict import GradientConflictMonitor

    monitor = next((c for c in callbacks if isinstance(c, GradientConflictMonitor) and c.enabled), None)
    if monitor is None:
        return None
    steps = [step for step, _ in monitor.history]
    ms = monitor.stopwatch.seconds / len(steps) * 1e3 if steps else None
    return {"timed": sum(warmup < step <= n for step in steps), "every": monitor.every_n_steps, "ms": ms}


def adamw_label(options: dict) -> str:
    """``fused``, ``foreach``, ``for_loop`` or PyTorch's default, for :func:`cgc_lightning.module.adamw_options`."""
    if options.get("fused"):
        return "fused"
    if options.get("foreach") is not None:
        return "foreach" if options["foreach"] else "for_loop"
    return "PyTorch's default"


def compile_label(setting, bare: bool) -> str:
    """What the header says of ``model.compile`` (``setting``) and whether the bare loop compiles too (``bare``)."""
    if not setting:
        return "no torch.compile"
    return f"torch.compile in {'both loops' if bare else 'fit only (--bare-compile off)'}: model.compile={setting}"


def graph_memory_note(cuda: bool, graphs: bool) -> str | None:
    """Why the peak-memory ratios are left out, or ``None``: a CUDA graph replays in a private memory pool, and the
    buffers it uses inside the graph are not allocations ``max_memory_allocated`` sees during the step. The bare
    loop runs its whole step in graphs (the PEFT model with HF's loss; fit compiles the decoder, its loss runs
    outside), so its peak reads far low: at 135M, B = 32, 1.19 GiB with ``{mode: reduce-overhead}`` against 6.57 GiB
    compiled without graphs (docs/benchmarks.md, fifteenth session)."""
    if not (cuda and graphs):
        return None
    return (
        "peak memory under CUDA graphs: a replayed graph's buffers are not counted by max_memory_allocated and the "
        "bare loop runs its whole step in graphs, so its peak reads low; mem x bare is left out. Compare memory with "
        "model.compile=true (inductor without CUDA graphs) or without model.compile"
    )


def iterations(starts: list[float], paired: list[float] | None, warmup: int, n: int) -> dict:
    """Whole training iterations of the timed steps ``warmup .. n - 1``, from one step's start to the next's, less
    the paired bare step that runs inside each: the step plus what the step's own window leaves out (fetching and
    collating the next batch, moving it to the device, Lightning's logging, hooks between steps). A mean, not a
    median: logging every ``log_every_n_steps`` steps costs in those steps only.

    Returns ``iteration_ms`` (the mean), ``iteration_s`` (each) and, with ``paired``, ``paired_mean_ms``."""
    gaps = [starts[i + 1] - starts[i] - (paired[i] if paired else 0.0) for i in range(warmup, n)]
    out = {"iteration_ms": statistics.mean(gaps) * 1e3, "iteration_s": gaps}
    if paired:
        out["paired_mean_ms"] = statistics.mean(paired[warmup:n]) * 1e3
    return out


def epochs(loader):
    """The loader's batches, epoch after epoch: the bare loop runs as many steps as ``fit``, whatever the epoch."""
    while True:
        yield from loader


def run_bare(args, cli, cuda: bool, profiler: StepProfiler | None = None, met=(), bare: BareLoop | None = None):
    """Time the bare loop's steps, alone in the process (``fit``'s model has gone back to the host); with a
    ``profiler``, run its steps after the timed ones under it (not timed). ``met``: the sequence widths ``fit`` ran
    before it in this process; ``bare``: the loop to run (the one paired with fit's steps), or a new one."""
    bare = bare or BareLoop(cli, cuda)
    loader = cli.datamodule.train_dataloader()
    times, tokens, widths, probe, dtypes, timed_steps, peak = [], [], [], None, {}, args.warmup + args.steps, None
    others = 0  # what other code left on the device (a compiled fit's CUDA graph pool), not the bare loop's
    if cuda:
        torch.cuda.synchronize()
        others = torch.cuda.memory_allocated() - bare.resident_bytes()
        torch.cuda.reset_peak_memory_stats()
    for i, batch in enumerate(epochs(loader)):
        if i == timed_steps + (profiler.runs if profiler else 0):
            break
        if cuda:
            torch.cuda.synchronize()
        if profiler and i == timed_steps:
            probe = DtypeProbe(*first_peft_layer(bare.model))
            profiler.begin(compiled=bare.compile is not None)
        t = time.perf_counter()
        loss = bare.step(batch)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
        say_slow_step("bare alone", i, timed_steps, seconds)
        if i >= timed_steps:
            if i == timed_steps:  # the probe's one step
                dtypes = probe.remove()
            profiler.end_step()
            continue
        times.append(seconds)
        tokens.append(int(batch["attention_mask"].sum()))
        widths.append(int(batch["input_ids"].shape[1]))
        peak = torch.cuda.max_memory_allocated() - others if cuda else None
    assert torch.isfinite(loss), f"bare loop: non-finite loss {loss}"
    out = summarise(times, tokens, args.warmup, peak, widths=widths, met=met)
    out |= {"rank": bare.rank, "params": bare.base_params}  # the base model, as fit's count
    return out | ({"profile": profiler.summarise() | {"dtypes": dtypes}} if profiler else {})


def parse_args(
    argv: list[str] | None, description: str, diagnostics: str = "on", bare: bool = True
) -> argparse.Namespace:
    """The options of a benchmark built on :func:`run_fit` (this one, ``benchmarks.packing``), checked; such a
    benchmark applies ``--size`` with :func:`size_overrides`.

    Args:
        argv: the command line, or ``None`` for ``sys.argv``.
        description: the benchmark's ``--help`` text (its module docstring).
        diagnostics: the default of ``--diagnostics``.
        bare: whether the benchmark runs the bare loop (and takes ``--bare-compile``).
    """
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="experiment config, as for `fit --config`")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override, repeatable")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--diagnostics", choices=["on", "off"], default=diagnostics, help="the diagnostics callbacks")
    p.add_argument(
        "--progress-bar",
        choices=["on", "off"],
        default="off",
        help="fit's progress bar as the CLI adds it (on: what a user at a terminal gets; it reads the logged metrics)",
    )
    p.add_argument(
        "--size",
        choices=["config", *SIZES],
        default="config",
        help="the config's model, or a Llama of this shape with random weights (benchmarks.shapes.SIZES)",
    )
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after the timed steps, N more of each loop under torch.profiler (not timed); 0: off",
    )
    p.add_argument(
        "--py-profile",
        type=int,
        default=0,
        metavar="N",
        help="after the timed (and --profile) steps, N more whole iterations of fit under cProfile (not timed): "
        "the Python functions the host spends its time in, per step; 0: off",
    )
    p.add_argument(
        "--profile-dir", type=Path, help="where the Chrome traces and fit.pstats go (default: a new temporary folder)"
    )
    if bare:
        p.add_argument(
            "--bare-compile",
            choices=["same", "off"],
            default="same",
            help="same: compile the bare loop's model as fit's model.compile says (nothing when fit does not compile); "
            "off: keep the bare loop eager",
        )
        p.add_argument(
            "--steps-csv",
            type=Path,
            metavar="PATH",
            help="write each timed step's fit and paired bare ms (and their ratio) to this CSV, to see how the "
            "steps spread (a probe step, a slow phase of the run) behind the medians",
        )
        p.add_argument(
            "--split",
            choices=["on", "off"],
            default="on",
            help="on: after fit, step fit's module without the Trainer against the bare step, phase by phase; off: "
            "skip it (compiled on a cold cache it compiles again; the fit / bare headline does not need it)",
        )
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.profile < 0 or args.py_profile < 0:
        p.error("--steps must be >= 1, --warmup >= 0, --profile >= 0 and --py-profile >= 0")
    return args


def write_steps_csv(path: Path, warmup: int, fit_s: list[float], bare_s: list[float]) -> None:
    """One row per timed step: its number in the run (after ``warmup`` untimed ones), fit's and the paired bare ms."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["step", "fit_ms", "bare_ms", "fit_over_bare"])
        for i, (f_s, b_s) in enumerate(zip(fit_s, bare_s, strict=True)):
            out.writerow([warmup + i + 1, f"{f_s * 1e3:.3f}", f"{b_s * 1e3:.3f}", f"{f_s / b_s:.4f}"])
    print(f"per-step times: {path}")


def print_split(split: dict, fit_ratio: float) -> None:
    module, bare_split = split["module"], split["bare"]
    print(
        "split (after fit): fit's module stepped without the Trainer (routing, forward, per-task loss; backward; "
        "AdamW) and the bare step, interleaved on the same batches, each phase synchronised; medians, ms:"
    )
    for phase in (*PHASES, "step"):
        m, b = module[phase], bare_split[phase]
        print(f"  {phase:<16} module {m:>8.1f}  bare {b:>8.1f}  {m / b:>5.2f}x")
    print(
        f"  per-step module / bare: median {split['ratio']:.2f}x, quartiles {split['quartiles'][0]:.2f}-"
        f"{split['quartiles'][1]:.2f}x; fit's window / bare above, {fit_ratio:.2f}x, less this is "
        "what the Trainer adds (its step, hooks, logging) to the module's own cost"
    )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv, __doc__)
    overrides = [f"--{kv}" for kv in args.set]
    cuda = torch.cuda.is_available()
    profilers = dict.fromkeys(("fit", "bare"))
    folder = None
    if args.profile or args.py_profile:
        folder = args.profile_dir or Path(tempfile.mkdtemp(prefix="fit-loop-profile-"))
    if args.profile:
        profilers = {n: StepProfiler(n, args.profile, cuda, folder) for n in profilers}
    with tempfile.TemporaryDirectory() as tmp:
        overrides += size_overrides(args, Path(tmp))
        cli, fit, host, paired = run_fit(args, overrides, Path(tmp), cuda, profilers["fit"], pair=True)
        shape = model_shape(args.size, cli.model.model)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        if len(paired.times) != len(fit["widths"]):
            raise SystemExit(
                "fit_loop pairs fit's padded batches with a bare loop; for packed rows use benchmarks.packing"
            )
        # the bare steps paired with fit's, on the same batches; its peak memory is the bare loop's alone
        bare = summarise(paired.times, fit["step_tokens"], args.warmup, None, widths=fit["widths"], met=fit["widths"])
        per_step = [f / b for f, b in zip(fit["step_s"], bare["step_s"], strict=True)]
        print(  # first, so that a run cut short after fit (the bare loop alone, the split) still has its headline
            f"fit / paired bare step: median {statistics.median(per_step):.2f}x over {len(per_step)} timed steps, "
            f"fit {fit['ms']:.1f} ms, bare {bare['ms']:.1f} ms (the table below has the details)",
            flush=True,
        )
        if args.steps_csv:
            write_steps_csv(args.steps_csv, args.warmup, fit["step_s"], bare["step_s"])
        alone = run_bare(args, cli, cuda, profilers["bare"], met=fit["widths"], bare=paired.bare)
        split = run_split(args, cli, paired.bare, cuda) if args.split == "on" else None
    assert all(torch.isfinite(x) for x in paired.losses), "bare loop: a non-finite loss"
    bare |= {"rank": alone["rank"], "params": alone["params"], "peak_gib": alone["peak_gib"]}
    device = torch.cuda.get_device_name() if cuda else "cpu"
    cfg = cli.model.adapter_config
    adamw = adamw_label(paired.bare.adamw)
    compiled = compile_label(cli.model.hparams.get("compile", False), paired.bare.compile is not None)
    loader = loader_options(cli.datamodule.num_workers, "cuda" if cuda else "cpu")
    data = {"workers": loader["num_workers"], "pinned": loader["pin_memory"]}
    print(
        f"fit loop vs bare PEFT loop: {args.config} {' '.join(args.set)}, method={cfg.method}, "
        f"precision={cli.trainer.precision}, batch={cli.datamodule.batch_size}, diagnostics {args.diagnostics}, "
        f"device={device}; median of {args.steps} steps after {args.warmup}; PEFT LoRA r={bare['rank']}; "
        f"AdamW in both loops: model.adamw={cli.model.adamw} ({adamw}); {compiled}; "
        f"data.num_workers={cli.datamodule.num_workers}: "
        f"{data['workers']} loader workers, batches {'pinned' if data['pinned'] else 'not pinned'}"
    )
    spec = cli.model.model_spec
    name = f"size {args.size} (Llama-shaped)" if args.size != "config" else f"size config ({spec.name_or_path})"
    weights = "random" if spec.random_init else "pretrained"
    loss = f"LM head in chunks of {cli.model.loss_chunk_size}" if cli.model.loss_chunk_size else "full logits"
    print(
        f"model: {name}, d={shape['hidden_size']} x {shape['layers']} layers, vocab {shape['vocab_size']:,}, "
        f"{shape['params']:,} base parameters ({weights} weights, {spec.dtype}), "
        f"{shape['trainable']:,} trainable; fit loss: {loss}"
    )
    memory_note = graph_memory_note(cuda, paired.bare.cuda_graphs)
    print(f"{'loop':<10} {'ms/step':>9} {'tokens/s':>11} {'peak GiB':>9} {'ms x bare':>10} {'mem x bare':>11}")
    for name, r in (("fit", fit), ("bare", bare), ("bare alone", alone)):
        mem = f"{r['peak_gib']:>9.2f}" if r["peak_gib"] is not None else f"{'n/a':>9}"
        comparable = r["peak_gib"] and bare["peak_gib"] and not memory_note
        ratio_mem = f"{r['peak_gib'] / bare['peak_gib']:>11.2f}" if comparable else f"{'n/a':>11}"
        print(f"{name:<10} {r['ms']:>9.1f} {r['tokens_per_s']:>11,.0f} {mem} {r['ms'] / bare['ms']:>10.2f} {ratio_mem}")
    if memory_note:
        print(memory_note)
    q = statistics.quantiles(per_step, n=4) if len(per_step) > 1 else per_step * 3
    print(
        "bare: a bare step on each of fit's batches right after fit's own (paired, so both see the machine's pace "
        f"of that moment); per-step fit / bare: median {statistics.median(per_step):.2f}x, quartiles "
        f"{q[0]:.2f}-{q[2]:.2f}x. bare alone: the same loop over the same batches after fit, alone in the process "
        "(its peak memory is the bare row's)"
    )
    new = fit["new_at"]
    known = [i for i, fresh in enumerate(new) if not fresh]
    line = (
        f"sequence widths: {len(set(fit['widths']))} in fit's {len(fit['widths'])} steps; timed steps at a width new "
        f"to the process (a GPU builds attention plans for it): fit {fit['new_widths']} of {args.steps}, "
        f"bare alone {alone['new_widths']} (a paired bare step finds fit's plans built)"
    )
    if known and len(known) < len(new):
        kf = statistics.median(fit["step_s"][i] for i in known) * 1e3
        kb = statistics.median(bare["step_s"][i] for i in known) * 1e3
        line += f"; median of the others: fit {kf:.1f} ms, bare {kb:.1f} ms, {kf / kb:.2f}x"
    print(line)
    print(
        f"first step: fit {fit['first_s']:.1f} s, bare {bare['first_s']:.1f} s (compilation, first-use costs; "
        "not in the medians)"
    )
    probes = fit["probes"]
    if probes and probes["timed"]:
        print(
            f"the gradient-conflict probe ran in {probes['timed']} of the {args.steps} timed steps of fit "
            f"(grad_conflict.every_n_steps={probes['every']}), {probes['ms']:.1f} ms a probe, in those steps' times; "
            "the library's default is every 100 steps (--set grad_conflict.every_n_steps=100)"
        )
    window = statistics.mean(fit["step_s"]) * 1e3
    print(
        f"fit, whole iterations (mean of the timed steps, each from its start to the next step's, less the paired "
        f"bare step): {fit['iteration_ms']:.1f} ms, {fit['iteration_ms'] / fit['paired_mean_ms']:.2f}x the paired bare "
        f"step's mean ({fit['paired_mean_ms']:.1f} ms); the step's own window averages {window:.1f} ms, so "
        f"{fit['iteration_ms'] - window:.1f} ms a step go to fetching the next batch, logging (every "
        f"{cli.trainer.log_every_n_steps} steps) and the hooks between steps, which the bare rows do not time"
    )
    if split is not None:
        print_split(split, statistics.median(per_step))
    print("fit, host time per step by where it goes (SimpleProfiler, not synchronised):")
    for group, ms in host.items():
        print(f"  {group:<44} {ms:>8.1f} ms  {ms / fit['ms']:>5.0%} of the step")
        if group.startswith("callbacks"):  # which hooks: a GPU wait inside one shows up here, not in the GPU time
            for hook, hook_ms in list(fit["callback_hooks"].items())[:HOOK_LINES]:
                name = re.sub(r"\{.*\}", "", hook.removeprefix("[Callback]"))  # ModelCheckpoint{...}: its state key
                one = fit["callback_hook_calls"][hook]
                print(
                    f"    {name:<56} {hook_ms:>6.2f} ms  (median call {one['median_ms']:.2f} ms, "
                    f"largest {one['max_ms']:.1f} ms)"
                )
    if args.profile:
        report({"fit": fit["profile"], "bare": alone["profile"]}, cuda)
    if args.py_profile:
        fit["python_stats"] = str(report_python(fit["python"], args.py_profile, folder / "fit.pstats"))
        del fit["python"]
    return {
        "fit": fit,
        "bare": bare,
        "bare_alone": alone,
        "split": split,
        "host": host,
        "model": shape,
        "adamw": adamw,
        "compile": compiled,
        "memory_note": memory_note,
        "data": data,
    }


if __name__ == "__main__":
    main()
