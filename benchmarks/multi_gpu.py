r"""Multi-GPU benchmark: MultiTaskLoRAModule under Lightning's own DDP and FSDP, 1 device vs N (issue 7).

Trains :class:`~cgc_lightning.module.MultiTaskLoRAModule` with ``lightning.Trainer`` on a synthetic
multi-task set (random token sequences of ``--seq`` tokens, task ids cycling 0, 1, 2, 3 over 4
tasks in 2 clusters, batches built by :class:`datamodules.collate.Collator`), for every method,
with and without gradient checkpointing, on one device and on ``--devices`` devices with each
strategy, and prints tokens/s side by side with the scaling ratio

    ratio = tokens/s(N devices, strategy) / tokens/s(1 device, no strategy)      (same method, same GC)

Weak scaling: every device gets ``--batch`` sequences per step, so N devices train on N times the
tokens per step. The model is a random-init Llama built from the ``LlamaConfig`` of
``benchmarks.train_step --size`` written to a temporary folder (bf16-true on GPU), and the adapter
configs are that benchmark's (plus ``independent_lora``, r = 24). ``logger=False``, no checkpointing.

Lightning's ``DistributedSampler`` hands rank ``r`` of ``N`` the samples ``r, r + N, ...``, so with
2 devices rank 0 sees tasks 0 and 2 (cluster 0 only) and rank 1 tasks 1 and 3: every rank's batches
miss half the tasks, one whole cluster's experts and gates. DDP runs with
``find_unused_parameters=False`` (Lightning's ``ddp``): an adapter tensor without a gradient on
one rank would stop the second step with DDP's "Expected to have finished reduction" error. Each
run asserts that every trainable tensor got a gradient (DDP and one device), that the loss stayed
finite and that, after DDP, the adapter weights are bitwise identical on every rank.

FSDP: ``FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer}, use_orig_params=True)``; each decoder
layer is one unit holding frozen and trainable tensors, which needs ``use_orig_params``.

DDP's own settings are named after ``ddp`` with ``+``, so several can run side by side in one call
(``--strategy ddp,ddp+view,ddp+view+static+cap100``): ``view`` is ``gradient_as_bucket_view=True``
(gradients live in the all-reduce buckets: no copy into and out of them), ``static`` is
``static_graph=True`` (the same tensors take part in every step, which holds for every method here),
``capN`` is ``bucket_cap_mb=N`` (PyTorch's default 25).

Every (devices, strategy) group runs in its own process group, launched by this script with
``torch.distributed.run`` (the same environment as a ``torchrun`` or SLURM launch, see
docs/multi_gpu.md); inside it, one ``Trainer.fit`` per (method, checkpointing).

    python -m benchmarks.multi_gpu --size 1b --devices 2                      # GPU: bf16, T = 1024
    python -m benchmarks.multi_gpu --accelerator cpu --devices 2 --strategy ddp   # CPU, gloo, tiny model
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from torch.utils.data import DataLoader
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from benchmarks.shapes import SIZES, llama_config
from benchmarks.train_step import CONFIGS, LAYOUT, TARGETS
from cgc_lightning.config import AdapterConfig
from cgc_lightning.hf import ModelSpec
from cgc_lightning.inject import adapter_parameters
from cgc_lightning.module import MultiTaskLoRAModule
from datamodules.collate import Collator

METHODS = ("cgc_lora", "moelora", "joint_lora", "independent_lora")
ADAPTERS: dict[str, AdapterConfig] = {
    **CONFIGS,
    "independent_lora": AdapterConfig(method="independent_lora", target_modules=TARGETS, r=24, alpha=48.0, dropout=0.0),
}
STRATEGIES = ("ddp", "fsdp")
TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tiny-llama"
RESULT = "RESULT "


def write_model_dir(size: str, folder: str) -> str:
    """A model folder that ``ModelSpec(random_init=True)`` loads: the size's LlamaConfig and a tokenizer."""
    llama_config(size).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the module loads one; any will do, it only generates
        shutil.copy(TOKENIZER_DIR / name, folder)
    return folder


def synthetic_rows(n: int, seq: int, vocab: int, seed: int = 0) -> list[dict]:
    """``n`` encoded rows of ``seq`` random tokens, every token a target; row ``i`` has task id ``i % 4``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, seq), generator=g).tolist()  # (n, T); ids 0..2 are pad/bos/eos
    return [{"input_ids": s, "labels": s, "task_id": i % len(LAYOUT.tasks)} for i, s in enumerate(ids)]


def ddp_options(name: str) -> dict | None:
    """``DDPStrategy`` keyword arguments for ``ddp[+view][+static][+capN]``, or ``None`` if ``name`` is not DDP."""
    base, *options = name.split("+")
    if base != "ddp":
        return None
    # find_unused_parameters=False (the default): every adapter tensor gets a gradient each step,
    # also on a rank whose batch misses tasks (see docs/multi_gpu.md)
    kwargs: dict = dict(find_unused_parameters=False)
    for opt in options:
        if opt == "view":
            kwargs["gradient_as_bucket_view"] = True
        elif opt == "static":
            kwargs["static_graph"] = True
        elif re.fullmatch(r"cap\d+", opt):
            kwargs["bucket_cap_mb"] = int(opt[3:])
        else:
            raise ValueError(f"unknown DDP option {opt!r} in strategy {name!r}; use view, static or cap<MB>")
    return kwargs


def make_strategy(name: str, accelerator: str):
    """Lightning strategy for ``single`` (one device, none), ``ddp[+options]`` (see :func:`ddp_options`) or ``fsdp``."""
    if name == "single":
        return "auto"
    ddp = ddp_options(name)
    if ddp is not None:
        return DDPStrategy(**ddp)
    if name == "fsdp":
        # one unit per decoder layer; each mixes frozen base weights and trainable adapters: use_orig_params
        return FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer}, use_orig_params=True)
    raise ValueError(f"unknown strategy {name!r}; choose single, ddp or fsdp")


class StepTimer(L.Callback):
    """Times the steps after ``warmup``, keeps the losses, and checks every trainable tensor got a gradient."""

    def __init__(self, warmup: int, cuda: bool):
        self.warmup, self.cuda = warmup, cuda
        self.t0 = self.t1 = 0.0
        self.losses: list[torch.Tensor] = []
        self.no_grad: list[str] = []

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.t0 = self._now()

    def on_after_backward(self, trainer, pl_module):
        # FSDP keeps each tensor's gradient as a shard, which may be empty on a rank: checked for DDP and one device
        if not isinstance(trainer.strategy, FSDPStrategy):
            missing = [n for n, p in pl_module.named_parameters() if p.requires_grad and p.grad is None]
            self.no_grad = sorted(set(self.no_grad) | set(missing))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach().float())
        if batch_idx == trainer.max_steps - 1:
            self.t1 = self._now()


def replicas_equal(module: MultiTaskLoRAModule, device: torch.device) -> bool:
    """Whether every rank holds bitwise the same adapter tensors (all-gathered, compared on each rank)."""
    # after fit, Lightning's teardown has moved the module to the CPU; NCCL gathers on the GPU
    flat = torch.cat([p.detach().float().flatten() for _, p in adapter_parameters(module.model)]).to(device)
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])


def train_once(args, method: str, checkpointing: bool) -> dict:
    """One ``Trainer.fit`` of ``warmup + steps`` steps; returns the figures (the same on every rank)."""
    cuda = args.accelerator == "gpu"
    world = args.devices * args.num_nodes
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    torch.manual_seed(0)
    spec = ModelSpec(
        name_or_path=args.model_dir,
        random_init=True,
        dtype="bfloat16" if cuda else "float32",
        attn_implementation="sdpa",
    )
    with device:  # random init on the device: seconds, not a minute, at 1B
        module = MultiTaskLoRAModule(
            spec,
            adapter=ADAPTERS[method],
            task_names=list(LAYOUT.tasks),
            task_clusters=[LAYOUT.clusters[c] for c in LAYOUT.task_cluster],
            lr=1e-4,
            warmup_ratio=0.0,
            schedule="constant",
            gradient_checkpointing=checkpointing,
            compile=False if args.compile == "eager" else {"mode": args.compile},
        )
    steps = args.warmup + args.steps
    rows = synthetic_rows(steps * args.batch * world, args.seq, SIZES[args.size][5])
    loader = DataLoader(rows, batch_size=args.batch, collate_fn=Collator(0, list(LAYOUT.task_cluster)))
    timer = StepTimer(args.warmup, cuda)
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=make_strategy(args.strategy, args.accelerator),
        precision="bf16-true" if cuda else "32-true",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[timer],
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    trainer.fit(module, train_dataloaders=loader)
    losses = torch.stack(timer.losses).tolist()
    assert all(math.isfinite(x) for x in losses), f"{method}: non-finite loss {losses}"
    assert not timer.no_grad, f"{method}: trainable tensors without a gradient: {timer.no_grad[:5]}"
    if isinstance(trainer.strategy, DDPStrategy):
        assert not trainer.strategy._ddp_kwargs.get("find_unused_parameters", False)
    is_ddp = ddp_options(args.strategy) is not None
    same = replicas_equal(module, trainer.strategy.root_device) if is_ddp and world > 1 else None
    assert same is not False, f"{method}: adapter weights differ across ranks after DDP"
    seconds = (timer.t1 - timer.t0) / args.steps
    result = dict(
        method=method,
        strategy=args.strategy,
        world=world,
        checkpointing=checkpointing,
        ms_per_step=1e3 * seconds,
        tokens_per_s=args.batch * args.seq * world / seconds,
        peak_gib=torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        loss_first=losses[0],
        loss_last=losses[-1],
        replicas_equal=same,
    )
    del trainer, module, loader
    gc.collect()  # injected models hold reference cycles (layers <-> routing state)
    if cuda:
        torch.cuda.empty_cache()
    return result


def worker(args) -> None:
    """One process of one (devices, strategy) group: a fit per run, results printed by global rank 0."""
    if args.accelerator == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // (args.devices * args.num_nodes)))
    for run in args.runs.split(","):
        method, checkpointing = run.split(":")
        result = train_once(args, method, checkpointing == "gc")
        if int(os.environ.get("RANK", 0)) == 0:
            print(RESULT + json.dumps(result), flush=True)


def launch(args, devices: int, strategy: str, runs: list[str]) -> tuple[list[dict], str | None]:
    """Run one group as its own process group; returns its results and the error, if it failed."""
    flags = ["--worker", "--devices", str(devices), "--strategy", strategy, "--runs", ",".join(runs)]
    for key in ("size", "accelerator", "batch", "seq", "warmup", "steps", "model_dir", "compile"):
        flags += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    cmd = [sys.executable, "-m", "benchmarks.multi_gpu", *flags]
    if devices > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={devices}", *cmd[1:]]
    print(f"== {devices} device(s), {strategy}: {' '.join(runs)}", flush=True)
    results, tail = [], []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            if line.startswith(RESULT):
                results.append(json.loads(line[len(RESULT) :]))
                print(line.rstrip(), flush=True)
            else:
                tail = (tail + [line.rstrip()])[-200:]
                if args.verbose:
                    print(line.rstrip(), flush=True)
    if proc.returncode:
        print("\n".join(tail[-40:]), flush=True)
        errors = [x for x in tail if re.match(r"\w+(Error|Exception): ", x) and "ChildFailedError" not in x]
        return results, (errors[0] if errors else f"exit code {proc.returncode}")[:200]
    return results, None


def table(args, results: list[dict], errors: dict[tuple, str], world: int) -> str:
    """Tokens/s on 1 device and on ``world`` devices per strategy, and their ratio, per method and GC."""
    by = {(r["method"], r["strategy"], r["world"], r["checkpointing"]): r for r in results}
    where = torch.cuda.get_device_name() if args.accelerator == "gpu" else f"cpu ({os.cpu_count()} cores)"
    head = (
        f"size={args.size} device={where} B={args.batch}/device T={args.seq} tasks=4 clusters=2 "
        f"steps={args.steps} timed after {args.warmup} warm-up, tokens/s = B*T*devices/step time"
        + ("" if args.compile == "eager" else f", model.compile mode={args.compile}")
    )
    width = max(10, *(len(x) + 2 for x in args.strategies.split(",")))
    cols = f"{'method':<18}{'GC':<5}{'strategy':<{width}}{'1 dev tok/s':>13}{f'{world} dev tok/s':>13}{'ratio':>8}"
    cols += f"{'ms/step 1':>11}{f'ms/step {world}':>11}{'peak GiB 1':>12}{f'peak GiB {world}':>12}"
    cols += f"{'loss first->last':>20}"
    out = [head, cols]
    for method in args.methods.split(","):
        for gc_on in args.gc_modes:
            one = by.get((method, "single", 1, gc_on))
            for strategy in args.strategies.split(","):
                many = by.get((method, strategy, world, gc_on))
                err = errors.get((world, strategy, method, gc_on))
                line = f"{method:<18}{'on' if gc_on else 'off':<5}{strategy:<{width}}"
                line += f"{one['tokens_per_s']:>13,.0f}" if one else f"{'-':>13}"
                if many is None:
                    out.append(line + f"  {err or 'not run'}")
                    continue
                line += f"{many['tokens_per_s']:>13,.0f}"
                line += f"{many['tokens_per_s'] / one['tokens_per_s']:>8.2f}" if one else f"{'-':>8}"
                line += f"{one['ms_per_step']:>11.1f}" if one else f"{'-':>11}"
                line += f"{many['ms_per_step']:>11.1f}"
                mem = [r["peak_gib"] if r and r["peak_gib"] is not None else None for r in (one, many)]
                line += "".join(f"{m:>12.2f}" if m is not None else f"{'n/a':>12}" for m in mem)
                line += f"{many['loss_first']:>11.3f}->{many['loss_last']:.3f}"
                out.append(line)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--accelerator", default="gpu" if torch.cuda.is_available() else "cpu", choices=["gpu", "cpu"])
    ap.add_argument("--size", default=None, choices=list(SIZES), help="model shape (default: 1b on GPU, tiny on CPU)")
    ap.add_argument("--devices", type=int, default=2, help="devices of the multi-device runs (1-device runs always)")
    ap.add_argument(
        "--strategy",
        "--strategies",
        dest="strategies",
        default=None,
        help="multi-device strategies (default: ddp,fsdp on GPU; ddp on CPU, where Lightning has no FSDP)",
    )
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--gc", default="off,on", help="gradient checkpointing: off, on, or off,on")
    ap.add_argument(
        "--only",
        default="",
        help="restrict to comma-separated strategy:method:gc triples of the multi-device runs, "
        "e.g. ddp:*:off,fsdp:cgc_lora:*,ddp:cgc_lora:on (1-device baselines follow)",
    )
    ap.add_argument("--batch", type=int, default=None, help="sequences per device per step (default: 8 GPU, 2 CPU)")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: 10 GPU, 2 CPU)")
    ap.add_argument(
        "--compile",
        default="eager",
        help="eager, or a torch.compile mode for model.compile (e.g. reduce-overhead); "
        "the first warm-up step compiles, so give --warmup 3 or more",
    )
    ap.add_argument("--json", default="", help="also write the results to this file")
    ap.add_argument("--verbose", action="store_true", help="print the workers' output")
    # worker-only flags, set by launch()
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--runs", default="", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", default="", help=argparse.SUPPRESS)
    ap.add_argument("--num-nodes", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    gpu = args.accelerator == "gpu"
    args.size = args.size or ("1b" if gpu else "tiny")
    args.batch = args.batch or (8 if gpu else 2)
    args.steps = args.steps or (10 if gpu else 2)
    args.strategies = args.strategies or (",".join(STRATEGIES) if gpu else "ddp")
    if args.worker:
        args.strategy = args.strategies
        worker(args)
        return []
    for name in args.strategies.split(","):
        if name != "fsdp" and ddp_options(name) is None:
            ap.error(f"unknown strategy {name!r}; choose fsdp or ddp[+view][+static][+capN]")
    for m in args.methods.split(","):
        if m not in ADAPTERS:
            raise SystemExit(f"unknown method {m!r}; choose from {', '.join(ADAPTERS)}")
    args.gc_modes = [{"off": False, "on": True}[g] for g in args.gc.split(",")]
    modes = list(torch._inductor.list_mode_options())
    if args.compile != "eager" and args.compile not in modes:
        ap.error(f"unknown --compile mode {args.compile!r}; choose eager or {', '.join(modes)}")

    def wanted(strategy: str, method: str, gc_on: bool) -> bool:
        if not args.only:
            return True
        for triple in args.only.split(","):
            s, m, g = triple.split(":")
            if s in ("*", strategy) and m in ("*", method) and g in ("*", "on" if gc_on else "off"):
                return True
        return False

    groups = {
        s: [(m, g) for m in args.methods.split(",") for g in args.gc_modes if wanted(s, m, g)]
        for s in args.strategies.split(",")
    }
    baseline = sorted({mg for runs in groups.values() for mg in runs}, key=lambda mg: (mg[1], mg[0]))
    results, errors = [], {}
    with tempfile.TemporaryDirectory() as folder:
        args.model_dir = write_model_dir(args.size, folder)
        for devices, strategy, runs in [(1, "single", baseline)] + [(args.devices, s, r) for s, r in groups.items()]:
            if not runs:
                continue
            got, err = launch(args, devices, strategy, [f"{m}:{'gc' if g else 'nogc'}" for m, g in runs])
            results += got
            done = {(r["method"], r["checkpointing"]) for r in got}
            for m, g in runs:
                if (m, g) not in done:
                    errors[(devices, strategy, m, g)] = err or "no result"
    print(table(args, results, errors, args.devices))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if errors:
        raise SystemExit(f"{len(errors)} run(s) failed: {errors}")
    return results


if __name__ == "__main__":
    main()
