r"""Next-token losses at the target positions only, in chunks, without full-vocabulary logits for the batch.

The plain loss runs the LM head on every position and upcasts the ``(B, L, V)`` logits to fp32: at batch 32,
length 256 and SmolLM2's 49152-token vocabulary that is 0.8 GB in bf16 plus 1.6 GB in fp32, held for
backward, most of it for prompt and padding positions whose loss is masked out. Here::

    h: (B, L, d) final hidden states   ──select──▶  (N, d) the positions whose next token is a target
    per chunk of C positions:  logits = h_c W^T (+ b) ──▶ fp32 ──▶ softcap? ──▶ cross-entropy  (C,)

With a frozen head (LoRA's), forward forms each chunk's hidden-state gradient, ``(softmax - one-hot) W``, while
the chunk's logits exist and keeps that ``(N, d)``; backward scales each row by its upstream grad (the gradient is
linear in it), so no logits are computed twice. A head that trains needs ``sum_i grad_i (softmax_i - onehot_i)^T
h_i``, which the upstream grads enter before the sum: forward then keeps each position's log-sum-exp (``N``
floats), and backward recomputes a chunk's ``(C, V)`` logits to form ``(softmax - one-hot) * grad`` in place.
Either way peak memory is about one chunk's logits whatever the batch. One autograd node covers every chunk
(no activation-checkpointing machinery and no cross-entropy graph to rebuild a chunk; that host time counts in
a host-bound step). The per-token losses equal
the plain computation's (the same products in the same dtype, under autocast as the model's own head), so
per-task sums are exact.

The positions come with the batch (``loss_positions``, built by the collator on the host), so selecting
them costs the GPU no host synchronisation; batches without them (tests, probes) have them computed here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

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


def _matmul_dtype(h: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear(h, ...)`` computes in here: autocast's (it leaves float64 alone), else ``h``'s."""
    kind = h.device.type
    if h.dtype != torch.float64 and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return h.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    """``cross_entropy(softcap(h W^T + b), targets)`` per row, ``C`` rows of logits at a time (module docstring).

    The logits are upcast to fp32 (kept in fp64 for fp64 models) before the softmax, as the model's own loss does.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk_size: int, softcap: float | None, grad_now: bool):
        dtype = _matmul_dtype(h)
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        losses, lses = [], []
        grad_h = torch.empty_like(h) if grad_now else None  # rows' d(loss)/dh, scaled by backward's grad
        with torch.autocast(h.device.type, enabled=False):
            for i in range(0, h.shape[0], chunk_size):
                rows = slice(i, i + chunk_size)
                z, tanh = _logits(h[rows].to(dtype), w, b, softcap)  # (C, V)
                lse = torch.logsumexp(z, dim=-1)  # (C,)
                losses.append(lse - z.gather(1, targets[rows, None]).squeeze(1))
                if grad_h is not None:
                    grad_h[rows] = _softmax_minus_onehot(z, lse, targets[rows], tanh).to(dtype) @ w
                else:
                    lses.append(lse)
                del z, tanh  # before the next chunk's logits exist, so one chunk's are held at a time
        losses = losses[0] if len(losses) == 1 else torch.cat(losses)
        if grad_h is not None:
            ctx.save_for_backward(grad_h)
        else:
            lse = lses[0] if len(lses) == 1 else torch.cat(lses)
            ctx.save_for_backward(h, weight, bias, targets, lse)
        ctx.chunk_size, ctx.softcap, ctx.dtype, ctx.grad_now = chunk_size, softcap, dtype, grad_now
        return losses

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # grad: (N,), d(loss)/d(each row's cross-entropy)
        if ctx.grad_now:  # each row's gradient is linear in its upstream grad
            (grad_h,) = ctx.saved_tensors
            return grad_h * grad[:, None].to(grad_h.dtype), None, None, None, None, None, None
        h, weight, bias, targets, lse = ctx.saved_tensors
        dtype, C = ctx.dtype, ctx.chunk_size
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        grad_b = torch.zeros_like(bias) if bias is not None and ctx.needs_input_grad[2] else None
        with torch.autocast(h.device.type, enabled=False):
            for i in range(0, h.shape[0], C):
                rows = slice(i, i + C)
                h_c = h[rows].to(dtype)
                z, tanh = _logits(h_c, w, b, ctx.softcap)
                dz = _softmax_minus_onehot(z, lse[rows], targets[rows], tanh)
                dz = dz.mul_(grad[rows, None].to(dz.dtype)).to(dtype)
                del z, tanh  # the fp32 softmax, once its copy in the matmul dtype is made
                if grad_h is not None:
                    grad_h[rows] = dz @ w
                if grad_w is not None:
                    grad_w += (dz.t() @ h_c).to(grad_w.dtype)
                if grad_b is not None:
                    grad_b += dz.sum(0).to(grad_b.dtype)
                del dz
        return grad_h, grad_w, grad_b, None, None, None, None


def _softmax_minus_onehot(z, lse, targets, tanh) -> torch.Tensor:
    """``d(cross-entropy)/d(logits)`` of a chunk, in place of its logits ``z`` (``lse``: their log-sum-exp),
    through the soft-cap's ``softcap * tanh(z / softcap)`` when ``tanh`` is given (it is overwritten too)."""
    dz = z.sub_(lse[:, None]).exp_()  # softmax
    dz.scatter_add_(1, targets[:, None], dz.new_full((dz.shape[0], 1), -1.0))  # minus the one-hot
    if tanh is not None:
        dz.mul_(tanh.mul_(tanh).neg_().add_(1))
    return dz


def _logits(h, weight, bias, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A chunk's logits for the softmax (upcast, soft-capped), and ``tanh(z / softcap)`` when capped."""
    z = upcast(F.linear(h, weight, bias))  # (C, V)
    if not softcap:
        return z, None
    tanh = torch.tanh(z / softcap)
    return tanh * softcap, tanh


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
    if h.shape[0] == 0:
        losses = hidden.new_zeros(0, dtype=torch.float64 if hidden.dtype == torch.float64 else torch.float32)
    else:
        # A frozen head (LoRA's) needs no weight gradient, and each row's hidden-state gradient is then its
        # softmax-minus-one-hot times the head, times its upstream grad: formed here while the logits exist,
        # so backward recomputes none of them. Not under no_grad (evaluation), where no backward follows.
        grad_now = (
            torch.is_grad_enabled()
            and h.requires_grad
            and not head.weight.requires_grad
            and (head.bias is None or not head.bias.requires_grad)
        )
        losses = _LinearCrossEntropy.apply(h, head.weight, head.bias, targets, chunk_size, softcap, grad_now)
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
