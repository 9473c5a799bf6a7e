r"""Next-token losses at the target positions only, in chunks, without full-vocabulary logits for the batch.

The plain loss runs the LM head on every position and upcasts the ``(B, L, V)`` logits to fp32: at batch 32,
length 256 and SmolLM2's 49152-token vocabulary that is 0.8 GB in bf16 plus 1.6 GB in fp32, held for
backward, most of it for prompt and padding positions whose loss is masked out. Here::

    h: (B, L, d) final hidden states   ──select──▶  (N, d) the positions whose next token is a target
    per chunk of C positions:  logits = h_c W^T (+ b) ──▶ fp32 ──▶ softcap? ──▶ cross-entropy  (C,)

Each chunk runs under activation checkpointing, so backward recomputes its ``(C, V)`` logits instead of
keeping them: peak memory is one chunk's logits whatever the batch. The per-token losses equal the plain
computation's (the same products in the same dtype), so per-task sums are exact.

The positions come with the batch (``loss_positions``, built by the collator on the host), so selecting
them costs the GPU no host synchronisation; batches without them (tests, probes) have them computed here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE = -100


def loss_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices into ``(B, L)`` of the positions ``t`` whose next token ``labels[b, t + 1]`` is a target.

    Args:
        labels: ``(B, L)`` with ``-100`` where no loss is taken.

    Returns:
        ``(N,)`` long, ``b * L + t`` in row-major order.
    """
    B, L = labels.shape
    b, t = (labels[:, 1:] != IGNORE).nonzero(as_tuple=True)  # (N,), (N,)
    return b * L + t


def _chunk_losses(h: torch.Tensor, weight, bias, targets: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = F.linear(h, weight, bias)  # (C, V), in the autocast dtype like the model's own head
    logits = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, targets, reduction="none")  # (C,)


def target_token_losses(
    hidden: torch.Tensor,
    head: nn.Linear,
    labels: torch.Tensor,
    positions: torch.Tensor | None = None,
    *,
    chunk_size: int = 4096,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of each target token given the hidden state before it.

    Args:
        hidden: ``(B, L, d)`` the model's final hidden states (what its LM head reads).
        head: the LM head, a linear layer ``d -> V``.
        labels: ``(B, L)`` with ``-100`` where no loss is taken.
        positions: :func:`loss_positions` of ``labels``, if the batch brings them.
        chunk_size: positions per chunk of logits.
        softcap: the model's final logit soft-capping (Gemma 2), if any.

    Returns:
        ``losses: (N,)`` fp32 (fp64 for fp64 models) and ``rows: (N,)`` the batch row of each.
    """
    B, L, d = hidden.shape
    positions = loss_positions(labels) if positions is None else positions
    h = hidden.reshape(B * L, d).index_select(0, positions)  # (N, d)
    targets = labels.reshape(B * L).index_select(0, positions + 1)  # (N,) the next token of each position
    chunks = [
        checkpoint(
            _chunk_losses, h[i : i + chunk_size], head.weight, head.bias, targets[i : i + chunk_size], softcap,
            use_reentrant=False,
        )
        if torch.is_grad_enabled()
        else _chunk_losses(h[i : i + chunk_size], head.weight, head.bias, targets[i : i + chunk_size], softcap)
        for i in range(0, h.shape[0], chunk_size)
    ]  # fmt: skip
    losses = torch.cat(chunks) if chunks else hidden.new_zeros(0, dtype=torch.float32)
    return losses, torch.div(positions, L, rounding_mode="floor")


def lean_loss_unsupported(model: nn.Module) -> str | None:
    """Why the lean loss cannot stand in for this model's own head, or ``None`` when it can."""
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:
        return f"its LM head is a {type(head).__name__}, not a plain Linear"
    config = model.config
    for name in ("logit_scale", "logits_scaling", "output_multiplier_scale"):
        if getattr(config, name, None) not in (None, 1, 1.0):
            return f"its config scales the logits ({name}={getattr(config, name)})"
    return None


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Half precision to float32 for a softmax; float32 and float64 as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy per position.

    Args:
        logits: ``(B, L, V)``.
        labels: ``(B, L)`` with ``-100`` where no loss is taken (prompt, padding).

    Returns:
        ``losses: (B, L-1)`` (zero where masked) and ``mask: (B, L-1)``.
    """
    logits, labels = upcast(logits[:, :-1]), labels[:, 1:]
    mask = labels != IGNORE
    losses = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).clamp_min(0), reduction="none"
    ).view(labels.shape)  # (B, L-1)
    return losses * mask, mask
