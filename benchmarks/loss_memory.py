r"""Peak memory and time of one training step with the lean loss, the full-logits loss and a bare PEFT loop.

The step is what `fit` runs per batch: ``MultiTaskLoRAModule._per_task_loss`` (per-task sums included),
backward, AdamW; the bare loop is HF's model with a PEFT LoRA of the same active rank on the same modules,
``model(..., labels=...).loss`` (HF's own loss), backward, AdamW. The base is a randomly initialised
Llama-architecture model of SmolLM2-135M's shape (30 layers, d 576, vocabulary 49152) or a 1B shape, in bf16
under bf16 autocast (``precision: bf16-mixed``); batches look like BIG-bench's: each row a prompt of
``T - target`` tokens and ``target`` target tokens (the loss is taken on those only), right-padded to ``T``.

Peak memory is ``torch.cuda.max_memory_allocated`` over the steps minus what was allocated before the
variant was built (its model copy, adapters, optimizer state, activations and loss). Times are medians of
``--steps`` steps after ``--warmup``; every variant runs in this one process, one after another, and the
ratios are against the bare PEFT loop.

    python -m benchmarks.loss_memory --device cuda --batch 32 --seq 256 --target 8
    python -m benchmarks.loss_memory --device cpu --size tiny --steps 2 --warmup 1     # smoke run (CI)
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

from cgc_lightning.config import AdapterConfig
from cgc_lightning.hf import ModelSpec
from cgc_lightning.module import MultiTaskLoRAModule
from datamodules.collate import Collator

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
}  # fmt: skip
TARGETS = ["q_proj", "v_proj"]
TASKS, CLUSTERS = ["a", "b", "c", "d"], ["x", "x", "y", "y"]


def model_folder(size: str, where: Path) -> str:
    """A model folder: the shape's config and the fixture tokenizer (the benchmark feeds token ids directly)."""
    LlamaConfig(max_position_embeddings=4096, **SHAPES[size]).save_pretrained(where)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ROOT / "tests/fixtures/tiny-llama" / name, where / name)
    return str(where)


def batches(n: int, batch: int, seq: int, target: int, vocab: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    collate = Collator(0, [0, 0, 1, 1])
    out = []
    for _ in range(n):
        rows = []
        for i in range(batch):
            length = int(torch.randint(seq // 2, seq + 1, (1,), generator=g))
            ids = torch.randint(3, vocab, (length,), generator=g).tolist()
            rows.append({"input_ids": ids, "labels": [-100] * (length - target) + ids[-target:], "task_id": i % 4})
        out.append(collate(rows))
    return out


def step_fn(kind: str, folder: str, device: str):
    """(parameters to optimise, one training step's loss) for a variant; lean and full get the same weights."""
    torch.manual_seed(0)
    if kind == "peft":
        model = AutoModelForCausalLM.from_config(LlamaConfig.from_pretrained(folder), dtype=torch.bfloat16).to(device)
        model = get_peft_model(model, LoraConfig(r=24, lora_alpha=48, lora_dropout=0.0, target_modules=TARGETS))
        model.train()

        def loss(b):
            return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss

        return [p for p in model.parameters() if p.requires_grad], loss, model
    module = MultiTaskLoRAModule(
        ModelSpec(name_or_path=folder, random_init=True, dtype="bfloat16"),
        adapter=AdapterConfig(method="cgc_lora", r=8, num_shared=2, num_specific=1, dropout=0.0,
                              target_modules=TARGETS),
        task_names=TASKS,
        task_clusters=CLUSTERS,
        loss_chunk_size=4096 if kind == "lean" else None,
    ).to(device)  # fmt: skip
    module.train()
    return [p for p in module.parameters() if p.requires_grad], lambda b: module._per_task_loss(b)[0], module


def measure(kind: str, folder: str, data: list[dict], device: str, warmup: int, steps: int) -> dict:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    params, loss_of, holder = step_fn(kind, folder, device)
    opt = torch.optim.AdamW(params, lr=1e-4)
    times, first = [], None
    for i in range(warmup + steps):
        b = {k: v.to(device) for k, v in data[i % len(data)].items()}
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = loss_of(b)
        first = float(loss) if first is None else first
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() - before if device == "cuda" else 0
    del holder, opt, params
    return {"ms": 1000 * statistics.median(times), "peak_gib": peak / 2**30, "loss": float(loss), "first": first}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=list(SHAPES), default="smollm2-135m")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--target", type=int, default=8, help="target tokens per row (the rest is prompt)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--variants", default="peft,lean,full")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = model_folder(args.size, Path(tmp))
        data = batches(4, args.batch, args.seq, args.target, SHAPES[args.size]["vocab_size"])
        results = {k: measure(k, folder, data, args.device, args.warmup, args.steps) for k in args.variants.split(",")}
    if "lean" in results and "full" in results:  # the same weights and batch: the same first loss
        lean, full = results["lean"]["first"], results["full"]["first"]
        if abs(lean - full) > 1e-2 * abs(full):
            raise SystemExit(f"the lean loss {lean} differs from the full-logits loss {full} on the same step")
        print(f"first-step loss, lean {lean:.5f} and full logits {full:.5f}: equal within bf16")
    ref = results.get("peft")
    print(f"{args.size}, batch {args.batch} x {args.seq} ({args.target} target tokens a row), {args.device}")
    print(f"{'variant':<8} {'ms/step':>9} {'peak GiB':>9} {'ms x peft':>10} {'mem x peft':>11}  loss")
    for k, r in results.items():
        ratio_t = f"{r['ms'] / ref['ms']:.3f}" if ref else "-"
        ratio_m = f"{r['peak_gib'] / ref['peak_gib']:.3f}" if ref and ref["peak_gib"] else "-"
        print(f"{k:<8} {r['ms']:>9.1f} {r['peak_gib']:>9.2f} {ratio_t:>10} {ratio_m:>11}  {r['loss']:.4f}")


if __name__ == "__main__":
    main()
