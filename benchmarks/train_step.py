r"""Training-step benchmark: PEFT LoRA against our adapters on a Llama-architecture model (issue 7).

Times whole training steps (forward, backward, AdamW over the trainable tensors) of a randomly
initialised Llama model built from a ``LlamaConfig``, on batches of ``B`` sequences of ``T`` tokens
that mix 4 tasks from 2 clusters, and the peak memory of each step. All variants adapt the same
modules (q, k, v, o, gate, up, down projections), with dropout 0 and scaling ``alpha / r = 2``:

    peft_lora     PEFT LoRA, r = 24 = (S + P) r, the active rank of one CGC-LoRA task: the speed bar
    joint_lora    ours, one LoRA of r = 24
    cgc_lora      ours, S = 2 shared + P = 1 specific experts of r = 8 per task, 2 clusters x 2 tasks:
                  8 experts per layer, 3 of them (rank 24) seen by each sample; a task gate per layer
    moelora       ours, 8 experts sharing a total rank of 24 (r_e = 3, MOELoRA's split), all active,
                  one task-embedding gate for the model: the same parameter count as peft_lora
    moelora_loop  the same MOELoRA computed the way MOELoRA-peft does: one Linear pair per expert,
                  a Python loop over experts, each expert's output scaled by its gate weight

Every variant starts from its own copy of one base model. Before any timing, each variant's loss at
init (B = 0) must equal the base model's bit for bit, and the fused moelora must equal the loop after
B and the gate are randomised (float32, at the benchmark's size and on its device); ``--check``
(implied by ``--size tiny``) also runs every variant on a tiny float64 model on the CPU, logits at
init compared exactly and fused against loop logits and gradients to 1e-10. ``--profile DIR`` adds
torch.profiler tables per variant and, on CUDA, how long the GPU was busy in each step.

Timing: every variant is warmed up, then all are timed in interleaved rounds (``--rounds`` rounds of
``--steps`` steps each); a step time is the median over rounds, ``time/peft`` the ratio of those medians and
``paired`` the median over rounds of the ratio within a round (robust to the machine's pace drifting between
rounds, as it does where the host sets the pace). Peak memory is
``torch.cuda.max_memory_allocated`` during the warm-up steps minus what was allocated before the
variant was built, so it counts the variant's own model copy, adapters, gradients, optimizer state
and activations.

Model FLOPs per step, one count for every variant (so MFU is proportional to speed):

    FLOPs = tokens * (4 N_mm + 6 N_lora + 12 L d T)

with N_mm the frozen matmul weights (every Linear and the LM head, not the embedding lookup; 2 N for
the forward and 2 N for the input gradient, no weight gradient), N_lora the weights of a rank-24 LoRA
on the adapted modules (forward, input and weight gradients), and 12 L d T the attention products
(QK^T and AV, forward and backward, causal mask not halved: PaLM's convention). MFU is that over the
step time and the GPU's dense bf16 peak (H100/H200 SXM: 989 TFLOP/s).

    python -m benchmarks.train_step --size 1b --device cuda
    python -m benchmarks.train_step --size tiny --device cpu --steps 2
    python -m benchmarks.train_step --size host --device cpu --seq 8 --threads 1   # host cost per step
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.profiler import ProfilerActivity
from torch.profiler import profile as torch_profile
from torch.testing import assert_close
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.moelora_loop import fused_grads, loop_grads, sync_loop, to_loop
from benchmarks.shapes import SIZES, llama_config
from cgc_lightning.config import AdapterConfig, TaskLayout
from cgc_lightning.inject import PRESETS, adapter_parameters, inject_adapters
from cgc_lightning.module import uses_cuda_graphs
from cgc_lightning.routing import disable_adapters, route

#: Dense bf16 matrix peak by GPU name (TFLOP/s), for MFU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}
TARGETS = list(PRESETS["llama"])
#: Two clusters, tasks interleaved by id, so a batch of ids 0..3 mixes both clusters.
LAYOUT = TaskLayout(("qa", "nli", "sum", "ner"), ("reason", "extract"), (0, 1, 0, 1))
ACTIVE_RANK = 24  # (S + P) r of one CGC-LoRA task
CONFIGS = {
    "joint_lora": AdapterConfig(method="joint_lora", target_modules=TARGETS, r=24, alpha=48.0, dropout=0.0),
    "cgc_lora": AdapterConfig(
        method="cgc_lora", target_modules=TARGETS, r=8, alpha=16.0, dropout=0.0, num_shared=2, num_specific=1
    ),
    "moelora": AdapterConfig(
        method="moelora", target_modules=TARGETS, r=24, alpha=48.0, dropout=0.0, num_experts=8, split_rank=True
    ),
}
VARIANTS = ("peft_lora", "joint_lora", "cgc_lora", "moelora", "moelora_loop")
#: ``--compile`` modes: "eager" (no compilation) or a ``torch.compile`` mode, with the suffix its rows get.
MODE_TAGS = {
    "eager": "",
    "default": "compile",
    "reduce-overhead": "cudagraphs",
    "max-autotune-no-cudagraphs": "autotune",
    "max-autotune": "autotune+cudagraphs",
}


def build_base(size: str, device: str, dtype: torch.dtype, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    with torch.device(device):  # random init on the device: fast for the larger sizes
        model = LlamaForCausalLM(llama_config(size))
    return model.to(dtype).train()


def build_variant(name: str, base: nn.Module, device: str) -> tuple[nn.Module, bool]:
    """A fresh copy of ``base`` on ``device`` with variant ``name``; returns it and whether it needs task ids."""
    model = copy.deepcopy(base).to(device)
    if name == "peft_lora":
        cfg = LoraConfig(r=ACTIVE_RANK, lora_alpha=2 * ACTIVE_RANK, lora_dropout=0.0, target_modules=TARGETS)
        # keep the adapters in the model's dtype, as ours are (PEFT would upcast them to float32)
        return get_peft_model(model, cfg, autocast_adapter_dtype=False), False
    # in the model's dtype as PEFT's above: the framework's own default on a bf16 base is float32 adapters
    inject_adapters(model, CONFIGS["moelora" if name == "moelora_loop" else name], LAYOUT, "base")
    if name == "moelora_loop":
        to_loop(model)
    return model, name != "joint_lora"


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_batch(size: str, batch: int, seq: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, SIZES[size][5], (batch, seq), generator=g).to(device)  # (B, T) token ids
    tasks = (torch.arange(batch) % len(LAYOUT.tasks)).to(device)  # (B,) 0, 1, 2, 3, 0, ...: both clusters
    return ids, tasks


def forward(model: nn.Module, routed: bool, ids: torch.Tensor, tasks: torch.Tensor, logits: bool = False):
    ctx = route(model, tasks, validate=False) if routed else contextlib.nullcontext()
    with ctx:
        out = model(input_ids=ids, labels=ids)
    return out.logits if logits else out.loss


@torch.no_grad()
def randomize(params: list[nn.Parameter], seed: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * scale)


def check_fused_equals_loop(fused, loop, ids, tasks, *, rtol: float, atol: float, grads: bool) -> float:
    """Randomise the fused moelora's B and gate, copy them into the loop, and compare the two models.

    With ``grads`` (the tiny float64 check): logits and every adapter gradient, elementwise. Without
    (float32 at the benchmark's size): the logits' change from the base model must agree,
    ``|L_fused - L_loop| / |L_fused - L_base| < rtol`` in Frobenius norm. (In bf16 the loop is no
    reference: it rounds the layer output to bf16 once per expert, which alone moves the logits'
    change by several percent at the 1B size.)

    Returns:
        The largest elementwise logit difference (``grads``) or that relative error.
    """
    lora_b_and_gate = [p for n, p in adapter_parameters(fused) if n.endswith("lora_B") or n.startswith("adapter_gate.")]
    randomize(lora_b_and_gate, seed=1, scale=0.05)
    sync_loop(loop, fused)
    out_f, out_l = forward(fused, True, ids, tasks, logits=True), forward(loop, True, ids, tasks, logits=True)
    if not grads:
        with torch.no_grad(), disable_adapters(fused):
            out_0 = forward(fused, True, ids, tasks, logits=True)
        rel = ((out_f.float() - out_l.float()).norm() / (out_f.float() - out_0.float()).norm()).item()
        assert rel < rtol, f"moelora fused != loop: |L_fused - L_loop| / |L_fused - L_base| = {rel:.2e} >= {rtol:g}"
        fused.zero_grad(set_to_none=True)
        return rel
    assert_close(out_f, out_l, rtol=rtol, atol=atol, msg=lambda m: f"moelora fused != loop: {m}")
    (out_f.float().square().mean()).backward()
    (out_l.float().square().mean()).backward()
    for a, b in zip(fused_grads(fused), loop_grads(loop), strict=True):
        assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"moelora fused != loop (gradients): {m}")
    for m in (fused, loop):
        m.zero_grad(set_to_none=True)
    return (out_f - out_l).abs().max().item()


def check_at_size(size: str, base: nn.Module, ids: torch.Tensor, tasks: torch.Tensor, dev: str) -> str:
    """Fused moelora == loop at the benchmark's size and on its device, in float32 (see check_fused_equals_loop)."""
    base32 = copy.deepcopy(base).float()
    fused, _ = build_variant("moelora", base32, dev)
    loop, _ = build_variant("moelora_loop", base32, dev)
    del base32
    with torch.no_grad():
        rel = check_fused_equals_loop(fused, loop, ids, tasks, rtol=1e-3, atol=0, grads=False)
    del fused, loop
    gc.collect()  # injected models hold reference cycles (layers <-> routing state): free them now, not later
    if dev == "cuda":
        torch.cuda.empty_cache()
    return (
        f"check ({size}, float32, {dev}): moelora fused == loop after randomising B and the gate: "
        f"|L_fused - L_loop| / |L_fused - L_base| = {rel:.1e} (< 1e-3)"
    )


def check_tiny_float64(batch: int, seq: int) -> list[str]:
    """Every variant on a tiny float64 model (CPU): logits at init exactly the base's; fused moelora == loop."""
    base = build_base("tiny", "cpu", torch.float64)
    ids, tasks = make_batch("tiny", batch, seq, "cpu", seed=1)
    with torch.no_grad():
        reference = base(input_ids=ids).logits
    models = {}
    for name in VARIANTS:
        model, routed = build_variant(name, base, "cpu")
        with torch.no_grad():
            logits = forward(model, routed, ids, tasks, logits=True)
        assert torch.equal(logits, reference), f"{name}: logits at init differ from the base model's"
        models[name] = model
    diff = check_fused_equals_loop(
        models["moelora"], models["moelora_loop"], ids, tasks, rtol=1e-10, atol=1e-12, grads=True
    )
    return [
        "check (tiny, float64, cpu): logits at init == base for every variant (exact)",
        f"check (tiny, float64, cpu): moelora fused == loop after randomising B and the gate, logits and "
        f"gradients (rtol 1e-10; max |logit diff| {diff:.1e})",
    ]


@dataclass
class Run:
    """One variant under test."""

    name: str
    model: nn.Module
    routed: bool
    opt: torch.optim.Optimizer | None
    n_trainable: int
    peak_bytes: int | None = None
    times: list[float] = field(default_factory=list)
    error: str | None = None
    mode: str = "eager"  # or a torch.compile mode
    step_model: nn.Module | None = None  # what a training step calls: ``model``, or ``torch.compile(model)``
    first_step_s: float | None = None  # the first training step, compilation included

    @property
    def label(self) -> str:
        return self.name if self.mode == "eager" else f"{self.name}+{MODE_TAGS[self.mode]}"


def timer(device: str) -> Callable[[Callable[[], None]], float]:
    """Seconds one call of ``fn`` takes on ``device`` (device events on CUDA)."""

    def run(fn):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return run


def start_variant(name, base, dev, ids, tasks, ref_loss, warmup: int, lines: list[str], mode: str = "eager") -> Run:
    """Build variant ``name``, check its loss at init against the base's, warm it up and take its peak memory.

    With a ``torch.compile`` ``mode``, the training steps call the compiled model (the init check runs
    eagerly, so that no separate inference graph is compiled); the first warm-up step compiles it.
    """
    cuda = dev == "cuda"
    gc.collect()  # so that no earlier garbage is freed while this variant's peak is measured
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    model, routed = build_variant(name, base, dev)
    params = trainable(model)
    run = Run(name, model, routed, None, sum(p.numel() for p in params), mode=mode)
    run.step_model = model if mode == "eager" else torch.compile(model, mode=mode)
    try:
        with torch.no_grad():
            loss = forward(model, routed, ids, tasks)
        # B = 0: the loss at init is the base model's, bit for bit (the update adds exact zeros)
        if not torch.equal(loss, ref_loss):
            assert_close(loss, ref_loss, rtol=1e-3, atol=0, msg=lambda m: f"{name}: loss at init != base: {m}")
            lines.append(f"check: {name} loss at init {loss.item():.6f} vs base {ref_loss.item():.6f} (not bitwise)")
        # fused on either device: one multi-tensor update, whatever the number of trainable tensors
        run.opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=True)
        run.first_step_s = timer(dev)(lambda: train_steps(run, ids, tasks, 1))
        train_steps(run, ids, tasks, warmup - 1)
        if cuda:
            torch.cuda.synchronize()
            run.peak_bytes = torch.cuda.max_memory_allocated() - before
    except torch.OutOfMemoryError:
        run.error, run.model, run.opt = "OOM", None, None
        del model, params
        gc.collect()
        torch.cuda.empty_cache()
    return run


def train_steps(run: Run, ids: torch.Tensor, tasks: torch.Tensor, n: int) -> None:
    graphs = uses_cuda_graphs({"mode": run.mode})
    for _ in range(n):
        if graphs:  # a new step: the previous step's graph outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        forward(run.step_model, run.routed, ids, tasks).backward()
        run.opt.step()
        run.opt.zero_grad(set_to_none=True)


def model_flops(cfg: LlamaConfig, tokens: int, seq: int) -> float:
    """``tokens * (4 N_mm + 6 N_lora + 12 L d T)``: see the module docstring."""
    d, f, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    shapes = [(d, d), (d, kv), (d, kv), (d, d), (d, f), (d, f), (f, d)]  # (d_in, d_out) of q k v o gate up down
    n_mm = L * sum(a * b for a, b in shapes) + V * d
    n_lora = L * ACTIVE_RANK * sum(a + b for a, b in shapes)
    return tokens * (4 * n_mm + 6 * n_lora + 12 * L * d * seq)


def peak_tflops(device: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="tiny", choices=list(SIZES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per variant (peak memory is taken here)")
    ap.add_argument("--seq", type=int, default=1024, help="tokens per sequence T")
    ap.add_argument("--batch", type=int, default=4, help="sequences per batch B (task ids cycle 0..3)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    ap.add_argument("--check", action="store_true", help="also run the float64 tiny-model check (implied by tiny)")
    ap.add_argument("--profile", default="", help="write a torch.profiler table per variant into this folder")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument(
        "--compile",
        default="eager",
        help="comma-separated: eager and/or torch.compile modes (" + ", ".join(list(MODE_TAGS)[1:]) + "); every "
        "variant runs in every mode, all timed side by side, each compared with peft_lora in the same mode",
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    modes = [m for m in args.compile.split(",") if m]
    bad = sorted(set(modes) - set(MODE_TAGS))
    if bad or not modes:
        raise SystemExit(f"unknown --compile mode(s) {bad}; choose from {', '.join(MODE_TAGS)}")
    if args.warmup < 1:
        raise SystemExit("--warmup must be at least 1 (peak memory and compilation are taken there)")
    dev = args.device
    if dev == "cpu" and any(uses_cuda_graphs({"mode": m}) for m in modes):
        raise SystemExit(f"--compile {args.compile}: CUDA graphs need --device cuda")
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    lines = []
    if args.check or args.size == "tiny":
        lines += check_tiny_float64(batch=4, seq=min(args.seq, 16))
        print("\n".join(lines), flush=True)

    # one base model, kept on the host; every variant is a fresh copy of it
    base = build_base(args.size, dev, dtype)
    ids, tasks = make_batch(args.size, args.batch, args.seq, dev)
    with torch.no_grad():
        ref_loss = forward(base, False, ids, tasks)
    n_params = sum(p.numel() for p in base.parameters())
    base = base.cpu()
    if args.size != "tiny" and {"moelora", "moelora_loop"} <= set(names):
        lines.append(check_at_size(args.size, base, ids, tasks, dev))
        print(lines[-1], flush=True)
    measure = timer(dev)

    if modes != ["eager"]:
        # every variant is its own model object: one compiled graph (and guard set) each
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 8 * len(names) * len(modes))
    runs: dict[str, Run] = {}
    for mode in modes:
        for name in names:
            run = start_variant(name, base, dev, ids, tasks, ref_loss, args.warmup, lines, mode)
            runs[run.label] = run
            first = f", first step {run.first_step_s:.1f} s" if run.first_step_s is not None else ""
            print(f"built {run.label}: {run.error or 'ok'}{first}", flush=True)

    built = ", ".join(dict.fromkeys(r.name for r in runs.values() if r.error is None))
    lines.append(f"check ({args.size}, {dev}): loss at init == base model's (bitwise unless noted) for {built}")
    live = [r for r in runs.values() if r.error is None]
    for _ in range(args.rounds):
        for run in live:
            run.times.append(measure(lambda run=run: train_steps(run, ids, tasks, args.steps)) / args.steps)

    if args.profile:
        lines += profile(live, ids, tasks, args.profile, dev)
    result = report(args, runs, lines, dtype, n_params)
    print(result["text"])
    return result


def profile(runs: list[Run], ids: torch.Tensor, tasks: torch.Tensor, folder: str, dev: str) -> list[str]:
    """Two steps of each variant under torch.profiler: top ops by device and host time go to ``folder/<variant>.txt``.

    Returns one summary line per variant: wall time per step and, on CUDA, the time kernels kept the GPU busy.
    """
    os.makedirs(folder, exist_ok=True)
    cuda = dev == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    lines = []
    for run in runs:
        with torch_profile(activities=acts) as prof:
            wall = timer(dev)(lambda run=run: train_steps(run, ids, tasks, 2)) / 2
        ka = prof.key_averages()
        busy = sum(e.self_device_time_total for e in ka if e.device_type == torch.autograd.DeviceType.CUDA) / 2e3
        line = f"profile {run.label}: {wall * 1e3:.1f} ms/step wall"
        line += f", GPU busy {busy:.1f} ms/step" if cuda else ""
        lines.append(line)
        with open(os.path.join(folder, f"{run.label}.txt"), "w") as f:
            f.write(line + "\n")
            if cuda:
                f.write(ka.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=60) + "\n")
            f.write(ka.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60) + "\n")
    return lines


def report(args, runs: dict[str, Run], lines: list[str], dtype: torch.dtype, n_params: int) -> dict:
    """The table: each run against ``peft_lora`` in its own mode and, with several modes, against eager PEFT."""
    cfg = llama_config(args.size)
    tokens = args.batch * args.seq
    flops = model_flops(cfg, tokens, args.seq)
    peak = peak_tflops(args.device)
    where = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    modes = list(dict.fromkeys(r.mode for r in runs.values()))

    def bar(mode: str) -> tuple[float | None, int | None]:
        run = next((r for r in runs.values() if r.name == "peft_lora" and r.mode == mode and r.times), None)
        return (statistics.median(run.times), run.peak_bytes) if run else (None, None)

    def paired(run: Run) -> float | None:
        """Median over rounds of the run's time / PEFT's in the same round (its own mode): the rounds interleave
        the variants, so each round's ratio sees one pace of the machine, which drifts on a host-bound step."""
        ref = next((r for r in runs.values() if r.name == "peft_lora" and r.mode == run.mode and r.times), None)
        if ref is None or len(ref.times) != len(run.times):
            return None
        return statistics.median(t / r for t, r in zip(run.times, ref.times, strict=True))

    t_eager = bar("eager")[0] if len(modes) > 1 else None
    w = max(14, *(len(label) + 2 for label in runs))
    out = [
        *lines,
        f"size={args.size} ({n_params / 1e6:.0f}M params) "
        f"device={where} dtype={str(dtype).removeprefix('torch.')} B={args.batch} T={args.seq} tasks=4 clusters=2 "
        f"rounds={args.rounds} x {args.steps} steps (median), warmup={args.warmup}",
        f"model FLOPs/step = tokens*(4*N_mm + 6*N_lora(r=24) + 12*L*d*T) = {flops / 1e12:.2f} TFLOP; "
        f"MFU vs {f'{peak:g} TFLOP/s bf16 dense' if peak else 'n/a'}",
        f"{'variant':<{w}}{'trainable':>12}{'ms/step':>10}{'spread':>8}{'tokens/s':>11}{'peak GiB':>10}"
        f"{'time/peft':>11}{'paired':>8}{'mem/peft':>10}{'MFU':>8}"
        + (f"{'/eager peft':>13}{'1st step s':>12}" if t_eager else ""),
    ]
    rows = {}
    for label, run in runs.items():
        if run.error:
            out.append(f"{label:<{w}}{run.n_trainable:>12,}{run.error:>10}")
            continue
        t_bar, m_bar = bar(run.mode)
        t = statistics.median(run.times)
        spread = (max(run.times) - min(run.times)) / t
        mem = run.peak_bytes / 2**30 if run.peak_bytes is not None else None
        ratio = paired(run)
        rows[label] = dict(
            ms=t * 1e3, tokens_per_s=tokens / t, peak_gib=mem, times=run.times, mode=run.mode, paired=ratio
        )
        out.append(
            f"{label:<{w}}{run.n_trainable:>12,}{t * 1e3:>10.2f}{100 * spread:>7.1f}%{tokens / t:>11,.0f}"
            + (f"{mem:>10.2f}" if mem is not None else f"{'n/a':>10}")
            + (f"{t / t_bar:>11.3f}" if t_bar else f"{'':>11}")
            + (f"{ratio:>8.3f}" if ratio is not None else f"{'':>8}")
            + (f"{run.peak_bytes / m_bar:>10.3f}" if m_bar and run.peak_bytes else f"{'n/a':>10}")
            + (f"{100 * flops / t / (peak * 1e12):>7.1f}%" if peak else f"{'n/a':>8}")
            + (f"{t / t_eager:>13.3f}{run.first_step_s:>12.1f}" if t_eager else "")
        )
    for mode in modes:
        suffix = "" if mode == "eager" else f"+{MODE_TAGS[mode]}"
        loop = rows.get("moelora_loop" + suffix)
        if loop:
            ours = [n for n in ("cgc_lora", "moelora") if n + suffix in rows]
            faster = [f"{n} {loop['ms'] / rows[n + suffix]['ms']:.2f}x" for n in ours]
            out.append(f"faster than moelora_loop{suffix} (8 experts): " + ", ".join(faster))
    return dict(text="\n".join(out), rows=rows, checks=lines, flops=flops)


if __name__ == "__main__":
    main()
