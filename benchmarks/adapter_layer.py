"""Micro-benchmark: forward + backward of one adapted linear layer, measured side by side.

Compares, on the same input (a batch mixing 4 tasks from 2 clusters):
  * plain LoRA of the same active rank as one CGC-LoRA task, (S + P) * r  (the speed bar)
  * CGC-LoRA, stacked experts (ours)
  * CGC-LoRA as a Python loop over experts with masked gates (the MOELoRA-peft style)
each alone and with the frozen base ``nn.Linear`` in front, and prints times and ratios.

    python -m benchmarks.adapter_layer --d 1024 --tokens 1024 --device cpu
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from cgc_lightning.adapters import CGCLoRA, JointLoRA


class LoopCGCLoRA(nn.Module):
    """The naive peer: the same parameters as ``ours``, one product per expert, gates masked per sample."""

    def __init__(self, ours: CGCLoRA):
        super().__init__()
        self.ours = ours

    def forward(self, x, task_ids, cluster_ids):
        experts = self.ours.experts
        idx, w = self.ours.route(x, task_ids, cluster_ids)  # (B, K), (B, 1, K)
        out = 0
        for e in range(experts.num_experts):
            # weight of expert e per sample: its gate weight where visible, else 0
            we = (w * (idx == e).unsqueeze(1)).sum(-1, keepdim=True)  # (B, 1, 1)
            out = out + we * (x @ experts.lora_A[e].t() @ experts.lora_B[e])
        return self.ours.scaling * out


def bench(fn, steps: int, warmup: int, device: str) -> float:
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=1024, help="d_in = d_out of the layer")
    ap.add_argument("--tokens", type=int, default=1024, help="sequence length T")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--shared", type=int, default=2)
    ap.add_argument("--specific", type=int, default=1)
    ap.add_argument("--tasks-per-cluster", type=int, default=2)
    ap.add_argument("--clusters", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    dev, dtype = args.device, getattr(torch, args.dtype)
    task_clusters = [c for c in range(args.clusters) for _ in range(args.tasks_per_cluster)]
    n_tasks = len(task_clusters)
    kw = dict(in_features=args.d, out_features=args.d, alpha=16.0, dtype=dtype, device=dev)
    ours = CGCLoRA(task_clusters=task_clusters, r=args.r, num_shared=args.shared, num_specific=args.specific, **kw)
    with torch.no_grad():
        ours.experts.lora_B.normal_(0, 0.02)
    loop = LoopCGCLoRA(ours)
    plain = JointLoRA(r=(args.shared + args.specific) * args.r, **kw)
    base = nn.Linear(args.d, args.d, bias=False, dtype=dtype, device=dev).requires_grad_(False)

    x = torch.randn(args.batch, args.tokens, args.d, dtype=dtype, device=dev, requires_grad=True)
    tasks = torch.arange(args.batch, device=dev) % n_tasks
    # correctness first: the loop and the fused path agree
    torch.testing.assert_close(loop(x, tasks, None), ours(x, tasks, None), rtol=2e-2, atol=2e-3)

    def step(adapter, with_base):
        def run():
            out = adapter(x, tasks, None)
            if with_base:
                out = out + base(x)
            out.sum().backward()

        return run

    rows = []
    for with_base in (False, True):
        t_plain = bench(step(plain, with_base), args.steps, 3, dev)
        t_ours = bench(step(ours, with_base), args.steps, 3, dev)
        t_loop = bench(step(loop, with_base), args.steps, 3, dev)
        rows.append((with_base, t_plain, t_ours, t_loop))
    k = args.shared + args.specific
    print(
        f"device={dev} dtype={args.dtype} d={args.d} B={args.batch} T={args.tokens} tasks={n_tasks} "
        f"clusters={args.clusters} S={args.shared} P={args.specific} r={args.r} "
        f"experts/layer={ours.experts.num_experts} plain LoRA rank={k * args.r}"
    )
    print(
        f"{'what':<22}{'plain LoRA ms':>14}{'CGC fused ms':>14}{'CGC loop ms':>13}{'fused/plain':>13}{'loop/fused':>12}"
    )
    for with_base, tp, to, tl in rows:
        what = "adapter + base Linear" if with_base else "adapter alone"
        print(f"{what:<22}{tp * 1e3:>14.3f}{to * 1e3:>14.3f}{tl * 1e3:>13.3f}{to / tp:>13.2f}{tl / to:>12.2f}")


if __name__ == "__main__":
    main()
