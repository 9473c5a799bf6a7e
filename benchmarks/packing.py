r"""Tokens/s of the real ``fit`` with ``data.packing`` against padded batches of the same number of rows.

Both variants are :mod:`benchmarks.fit_loop`'s ``fit`` (the CLI's module, data module, callbacks and logger)
on the same config and steps; only ``data.packing`` differs. Padded, a step trains ``batch_size`` examples,
each row padded to the batch's longest; packed, a step trains ``batch_size`` rows of ``max_length`` tokens
holding as many examples as fit, each attending only to itself and each token routed to its own task's
experts (per-task losses equal the padded batch's: ``tests/test_packing.py``, float64). Reported per variant:
median ms per step, non-pad tokens/s, examples per step, peak GPU memory, and packed / padded ratios.
``--size`` runs both on a Llama shape with random weights, as in :mod:`benchmarks.fit_loop`.

    python -m benchmarks.packing --config experiments/gpu.yaml --set data.batch_size=32 --set data.max_length=256
    python -m benchmarks.packing --config experiments/tiny.yaml --steps 2 --warmup 1    # CPU smoke (CI)
"""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path

import torch

from benchmarks.fit_loop import parse_args, run_fit, size_overrides


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv, __doc__, diagnostics="off", bare=False)
    if args.profile:
        raise SystemExit("--profile is benchmarks.fit_loop's: profile a packed fit there with --set data.packing=true")
    cuda = torch.cuda.is_available()
    results, cli = {}, None
    with tempfile.TemporaryDirectory() as model_dir:
        sized = size_overrides(args, Path(model_dir))  # one model folder for both runs
        for name, packing in (("padded", False), ("packed", True)):
            overrides = [f"--{kv}" for kv in args.set] + sized + [f"--data.packing={str(packing).lower()}"]
            with tempfile.TemporaryDirectory() as tmp:
                cli, results[name], _ = run_fit(args, overrides, Path(tmp), cuda)
            # a fresh start for the next variant's compilation, as its own `fit` run would have: the first
            # variant's graphs and guards otherwise stay, and the second compiles as a recompilation of the first
            torch._dynamo.reset()
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    dm, device = cli.datamodule, torch.cuda.get_device_name() if cuda else "cpu"
    print(
        f"packing: {args.config} {' '.join(args.set)}, size={args.size}, method={cli.model.adapter_config.method}, "
        f"precision={cli.trainer.precision}, rows={dm.batch_size} x max_length={dm.max_length}, diagnostics "
        f"{args.diagnostics}, device={device}; median of {args.steps} steps after {args.warmup}"
    )
    head = f"{'batches':<8} {'ms/step':>9} {'tokens/s':>11} {'examples/step':>14} {'peak GiB':>9}"
    print(f"{head} {'tokens/s x padded':>18}")
    base = results["padded"]["tokens_per_s"]
    for name, r in results.items():
        mem = f"{r['peak_gib']:>9.2f}" if r["peak_gib"] is not None else f"{'n/a':>9}"
        print(
            f"{name:<8} {r['ms']:>9.1f} {r['tokens_per_s']:>11,.0f} {r['examples_per_step']:>14.1f} {mem} "
            f"{r['tokens_per_s'] / base:>18.2f}"
        )
    return results


if __name__ == "__main__":
    main()
