"""Llama-architecture model shapes the benchmarks share, and the ``LlamaConfig`` of each (random weights)."""

from __future__ import annotations

from transformers import LlamaConfig

#: Model shapes: (hidden, layers, heads, kv heads, intermediate, vocab, RoPE theta); no RoPE scaling (same cost).
SIZES: dict[str, tuple[int, int, int, int, int, int, float]] = {
    "tiny": (64, 2, 4, 2, 128, 256, 10000.0),
    # Llama-3.2-1B's depth (16 layers, 112 adapted projections) at a tiny width: on the CPU with a few
    # tokens, a step is almost all per-operation host time, what bounds the GPU step at 1B, B = 4
    "host": (64, 16, 4, 2, 128, 256, 10000.0),
    "135m": (576, 30, 9, 3, 1536, 49152, 100000.0),  # SmolLM2-135M
    "1b": (2048, 16, 32, 8, 8192, 128256, 500000.0),  # Llama-3.2-1B
    "3b": (3072, 28, 24, 8, 8192, 128256, 500000.0),  # Llama-3.2-3B
}


def llama_config(size: str, vocab_size: int | None = None) -> LlamaConfig:
    """The ``LlamaConfig`` of ``SIZES[size]``, tied embeddings, SDPA attention.

    Args:
        size: a key of ``SIZES``.
        vocab_size: the vocabulary in place of the size's own (a real tokenizer's length), or ``None``.
    """
    d, layers, heads, kv_heads, ffn, vocab, theta = SIZES[size]
    cfg = LlamaConfig(
        hidden_size=d,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=ffn,
        vocab_size=vocab if vocab_size is None else vocab_size,
        rope_theta=theta,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        use_cache=False,
    )
    cfg._attn_implementation = "sdpa"
    return cfg
