r"""Stacked LoRA experts: the one product every method in this package is built from.

    delta(x_b) = s * sum_{k < K} w_{b,k} B_{e(b,k)} A_{e(b,k)} x_b

A method decides, for each sample ``b``, which ``K`` of its ``E`` experts the sample sees
(``e(b, k)``) and with what weight (``w_{b,k}``, per sample or per token). Experts are stacked:

    lora_A: (E, r, d_in)     A_e, as in LoRA
    lora_B: (E, r, d_out)    B_e stored transposed, so concat_e B_e^T is a view, not a copy

and the mixture is two matrix products whatever E, K, or the mix of tasks in the batch:

    x (B, T, d_in) -> [A_sel] -> z (B, T, K*r) -> * s w -> [B_sel] (+ out) -> (B, T, d_out)

Two ways to pick the experts, the same function either way:

* dense (``E r <= DENSE_MAX_RANK``: joint LoRA, independent LoRA over a few tasks, MOELoRA with a
  split rank, CGC-LoRA up to 16 experts of rank 8): every expert for every sample,
  the ones a sample does not see at weight 0. One plain product with all of ``A`` and one with all
  of ``B``: no per-sample copies of expert tensors, nothing extra saved for backward. The adapter
  products are bound by reading ``x`` and writing the output, not by arithmetic, so ``E r`` columns
  cost what ``K r`` do until ``E r`` reaches the hundreds. Forward and backward are written out in
  :class:`DenseMixture`, one autograd node per layer: at LoRA sizes a training step spends as much
  host time launching small operations as the GPU spends on them, so every operation counts.
* gathered (larger ``E r``): each sample's ``K`` experts are gathered, ``(B, K*r, d)``, and
  multiplied with batched products, so the work stays that of rank ``K r``.

The weights multiply the small ``z``, the scaling rides on the products, and the frozen layer's
output ``out`` is added inside the last product (``addmm``), so no pass over a ``(B, T, d_out)``
tensor is spent on any of them.

A gate that is one softmax per task over a table of logits (CGC-LoRA's and MOELoRA's task gates)
runs inside the same node (:class:`GatedMixture`): the sample-by-expert weights are one product of
the softmaxed table with a 0/1 matrix that depends only on the batch's task ids
(:func:`task_spread`), built once per batch and shared by every layer, and the gate's backward is
that product transposed and the softmax's backward. Per layer this leaves five kernels forward and
nine backward, and no autograd node besides the mixture's own. Under autocast the gate stays in its own
dtype (float32 gate logits with bf16 products): one cast of the small weights, none of the table. In an
eager forward of a routed batch the model's gate bank (:mod:`~cgc_lightning.adapters.gate_bank`) does that
gate work once for every layer, and each layer runs :class:`DenseMixture` with its weights.

In an eager step the frozen layer itself, a plain ``nn.Linear``, runs inside the same node
(:class:`LinearMixture`, called by ``inject.AdaptedLayer``): ``x W^T`` is the node's first product, and the
input's gradient ``g W + g_z A`` one ``addmm``, so the frozen layer costs no module call and no autograd node of
its own, and autograd adds no two gradients of ``x``.

Everything here imports only torch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

#: Largest total rank ``E r`` computed densely (all experts, unseen ones at weight 0); see the module docstring.
#: On an H100 (d = 2048..8192, 4096 tokens) one layer's forward + backward was faster dense than gathered up to
#: E r = 512; the limit is lower so that the unseen experts' arithmetic stays small next to the frozen layer's.
DENSE_MAX_RANK = 128


def check_rank(r: int) -> None:
    if not isinstance(r, int) or r <= 0:
        raise ValueError(f"LoRA rank r must be a positive integer, got r={r!r}")


class StackedExperts(nn.Module):
    """``E`` LoRA pairs held as two tensors with a leading expert axis.

    Args:
        num_experts: ``E``.
        in_features: ``d_in`` of the wrapped layer.
        out_features: ``d_out`` of the wrapped layer.
        r: rank of every expert.
    """

    def __init__(self, *, num_experts: int, in_features: int, out_features: int, r: int, dtype=None, device=None):
        super().__init__()
        check_rank(r)
        if num_experts <= 0:
            raise ValueError(f"num_experts must be positive, got {num_experts}")
        self.num_experts, self.r = num_experts, r
        self.in_features, self.out_features = in_features, out_features
        self.lora_A = nn.Parameter(torch.empty(num_experts, r, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, r, out_features, dtype=dtype, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # kaiming_uniform(a=sqrt(5)) per expert, as nn.Linear and PEFT do; on the stacked tensor
        # torch would take fan_in = r * d_in, so the bound is written out. B = 0 keeps the model unchanged.
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.lora_A, -bound, bound)
        nn.init.zeros_(self.lora_B)

    def forward(
        self,
        x: torch.Tensor,
        index: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
        *,
        rows: torch.Tensor | None = None,
        scaling: float = 1.0,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mix the experts.

        Args:
            x: ``(B, T, d_in)``.
            index: ``(B, K)`` expert ids each sample sees, or ``None`` for all ``E`` experts (``K = E``).
            weight: ``(B, T, K)`` per token or ``(B, 1, K)`` per sample, or ``None`` for weight 1; with
                ``rows`` (and ``index=None``), a table ``(n, E)`` of which sample ``b`` uses row ``rows[b]``.
            rows: ``(B,)`` or ``None``, see ``weight``.
            scaling: ``s``.
            out: ``(B, T, d_out)`` to add the mixture to, or ``None``.

        Returns:
            ``(B, T, d_out)``: ``out + s * sum_k w_{b,t,k} B_{e(b,k)} A_{e(b,k)} x_{b,t}`` (``out`` = 0 if ``None``).
        """
        if index is None:
            return apply_mixture(DenseMixture, x, self.lora_A, self.lora_B, weight, rows, out, scaling)
        if rows is not None:
            raise ValueError("rows (the table row of each sample) go with index=None: a table over all E experts")
        if self.dense:
            weight = spread_weights(weight, index, self.num_experts, x.dtype)  # (B, T|1, E)
            return apply_mixture(DenseMixture, x, self.lora_A, self.lora_B, weight, None, out, scaling)
        n, T, _ = x.shape
        K, r = index.shape[1], self.r
        A_sel = self.lora_A[index].flatten(1, 2)  # (B, K, r, d_in) -> (B, K*r, d_in)
        B_sel = self.lora_B[index].flatten(1, 2)  # (B, K*r, d_out)
        z = torch.bmm(x, A_sel.transpose(1, 2))  # (B, T, K*r)
        w = scaling if weight is None else (weight * scaling).unsqueeze(-1)  # (B, T|1, K, 1)
        z = (z.view(n, T, K, r) * w).view(n, T, K * r)
        return torch.bmm(z, B_sel) if out is None else torch.baddbmm(out, z, B_sel)  # (B, T, d_out)

    @property
    def dense(self) -> bool:
        """Whether a mixture of some of the experts is computed over all of them (see the module docstring)."""
        return self.num_experts * self.r <= DENSE_MAX_RANK


def apply_mixture(fn, x, A, B, a, b, out, scaling: float, *, cast_weights: bool = True) -> torch.Tensor:
    """``fn.apply(x, A, B, a, b, out, scaling)`` for :class:`DenseMixture` and :class:`GatedMixture`.

    Under autocast (``bf16-mixed``, ``16-mixed``) a hand-written node would compute its forward products
    in the autocast dtype but its backward, which runs outside autocast, in the tensors' own dtypes, and
    fail on the mix. So the node runs with autocast off on its floating inputs cast to the autocast
    dtype: the casts are autograd ops, and float32 adapter weights get float32 gradients through them.

    ``cast_weights=False`` leaves ``a`` and ``b`` (the weights, or a gate table and its spread) in their own
    dtype: :class:`GatedMixture` runs its gate in the logits' dtype and casts only the small weights. The
    choice is the caller's argument, not an attribute of ``fn``: Dynamo cannot read a custom attribute of
    an autograd function class, and broke the compiled graph at every adapted layer on it.
    """
    device = x.device.type
    cast = _autocast_cast(device)
    if cast is None:
        return fn.apply(x, A, B, a, b, out, scaling)
    if cast_weights:
        a, b = cast(a), cast(b)
    with torch.autocast(device, enabled=False):
        return fn.apply(cast(x), cast(A), cast(B), a, b, cast(out), scaling)


def _autocast_cast(device: str):
    """Under autocast on ``device``, a cast of floating tensors (``None`` passes) to its dtype; else ``None``."""
    if not torch.is_autocast_enabled(device):
        return None
    dtype = torch.get_autocast_dtype(device)
    return lambda t: t.to(dtype) if t is not None and t.is_floating_point() else t


def mixture_forward(x, A, B, w, out, scaling: float):
    """``out + s ((x A^T) * w) B``, the forward both mixture nodes share: ``(y (B, T, d_out), z, u)``.

    ``x (B, T, d_in)``, ``A (E, r, d_in)``, ``B (E, r, d_out)``, ``w (B, T|1, E, 1)`` or ``None`` (weight 1),
    ``out (B, T, d_out)`` or ``None``; ``z = x A^T`` and ``u = z * w`` are ``(B*T, E*r)``, kept for backward.
    """
    n, T, d_in = x.shape
    E, r, d_out = B.shape
    z = torch.mm(x.reshape(n * T, d_in), A.view(E * r, d_in).t())  # (B*T, E*r)
    u = z if w is None else (z.view(n, T, E, r) * w).view(n * T, E * r)  # (B*T, E*r)
    B2 = B.view(E * r, d_out)
    y = torch.mm(u, B2) * scaling if out is None else torch.addmm(out.reshape(n * T, d_out), u, B2, alpha=scaling)
    return y.view(n, T, d_out), z, u


def mixture_backward(
    grad, x, A, B, z, u, w, scaling: float, needs: tuple[bool, bool, bool, bool], per_token: bool, g_x_into=None
):
    """The backward of :func:`mixture_forward` from ``grad (B, T, d_out)``, shared by the mixture nodes.

    ``needs``: whether ``x``, ``A``, ``B`` and ``w`` need a gradient; ``per_token``: ``w`` is ``(B, T, E, 1)``;
    ``g_x_into``: ``(B*T, d_in)`` another gradient of ``x`` that ``g_x`` is added to inside its product, or ``None``.
    Returns ``(g_x, g_A, g_B, g_w)``, ``None`` where not needed, ``g_w (B, T|1, E)`` shaped as ``w`` is.
    """
    n, T, d_in = x.shape
    E, r, d_out = B.shape
    need_x, need_A, need_B, need_w = needs
    g = grad.reshape(n * T, d_out)
    B2 = B.view(E * r, d_out)
    # s * (g B^T) and s * (u^T g) as addmm with beta=0: the first argument only gives the shape
    # (it is not read), and the scaling is free in the product.
    g_u = torch.addmm(u, g, B2.t(), beta=0, alpha=scaling)  # (B*T, E*r)
    g_x = g_A = g_B = g_w = None
    if need_B:
        g_B = torch.addmm(B2, u.t(), g, beta=0, alpha=scaling).view(E, r, d_out)
    if need_w:
        g_uz = g_u.view(n, T, E, r) * z.view(n, T, E, r)
        g_w = g_uz.sum(3) if per_token else g_uz.sum((1, 3)).unsqueeze(1)  # (B, T|1, E)
    if need_x or need_A:
        g_z = g_u if w is None else (g_u.view(n, T, E, r) * w).view(n * T, E * r)  # (B*T, E*r)
        if need_A:
            g_A = torch.mm(g_z.t(), x.reshape(n * T, d_in)).view(E, r, d_in)
        if need_x:
            A2 = A.view(E * r, d_in)
            g_x = torch.mm(g_z, A2) if g_x_into is None else torch.addmm(g_x_into, g_z, A2)
            g_x = g_x.view(n, T, d_in)
    return g_x, g_A, g_B, g_w


def _rows_weights(w, rows):
    """``(B, T|1, E, 1)`` per-sample weights from ``w (B, T|1, E)``, or from a table ``w (n, E)`` and ``rows (B,)``."""
    if w is None:
        return None
    return (w.index_select(0, rows).unsqueeze(1) if rows is not None else w).unsqueeze(-1)


def _table_grad(g_w, rows, table_rows: int):
    """The gradient of a table ``(table_rows, E)`` from its rows' ``g_w (B, 1, E)``: a one-hot product, deterministic
    unlike ``index_add``."""
    one_hot = rows[:, None] == torch.arange(table_rows, device=rows.device)  # (B, n)
    return torch.mm(one_hot.to(g_w.dtype).t(), g_w.view(rows.shape[0], -1))  # (n, E)


class DenseMixture(torch.autograd.Function):
    """``out + s * ((x A^T) * w) B`` over all ``E`` experts, forward and backward by hand, one autograd node.

    Shapes: ``x (B, T, d_in)``, ``A (E, r, d_in)``, ``B (E, r, d_out)``, ``w (B, T|1, E)`` or ``None``
    (weight 1) or, with ``rows (B,)``, a table ``(n, E)`` of per-sample rows; ``out (B, T, d_out)`` or
    ``None``. Kept for backward: ``x`` (which the frozen layer keeps anyway), ``z = x A^T`` and
    ``u = z * w``, both ``(B*T, E*r)``, and the small weights. The products are :func:`mixture_forward`
    and :func:`mixture_backward`.
    """

    @staticmethod
    def forward(ctx, x, A, B, w, rows, out, scaling: float):
        ws = _rows_weights(w, rows)  # (B, T|1, E, 1) or None
        y, z, u = mixture_forward(x, A, B, ws, out, scaling)
        ctx.save_for_backward(x, A, B, z, u, ws, rows)
        ctx.scaling, ctx.table_rows = scaling, None if rows is None else w.shape[0]
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, A, B, z, u, ws, rows = ctx.saved_tensors
        T = x.shape[1]
        need_x, need_A, need_B, need_w, _, need_out, _ = ctx.needs_input_grad
        per_token = ws is not None and ws.shape[1] == T
        g_x, g_A, g_B, g_w = mixture_backward(
            grad, x, A, B, z, u, ws, ctx.scaling, (need_x, need_A, need_B, need_w), per_token
        )
        if need_w and rows is not None:  # back to the table's rows
            g_w = _table_grad(g_w, rows, ctx.table_rows)
        return g_x, g_A, g_B, g_w, None, grad if need_out else None, None


class LinearMixture(torch.autograd.Function):
    """:class:`DenseMixture` with the frozen linear layer inside: ``x W^T (+ b) + s ((x_a A^T) * w) B``, one node.

    Shapes: ``x (B, T, d_in)`` the layer's input; ``x_a`` the adapter's (the dropout of ``x``), or ``None`` when it
    is ``x`` itself; ``W (d_out, d_in)`` and ``bias (d_out,)`` or ``None``, frozen (no gradient); ``A``, ``B``,
    ``w``, ``rows`` and ``scaling`` as for :class:`DenseMixture`. Against the frozen layer called on its own, an
    eager step spends no module call and no autograd node on it, and with ``x_a = None`` the input's gradient is
    ``g W`` and ``g_z A`` in one ``addmm`` where autograd would take two products and add them.
    Kept for backward: what :class:`DenseMixture` keeps, with ``W`` (a parameter, no copy) for the input gradient.
    """

    @staticmethod
    def forward(ctx, x, x_a, W, bias, A, B, w, rows, scaling: float):
        n, T, d_in = x.shape
        x2 = x.reshape(n * T, d_in)
        out = torch.mm(x2, W.t()) if bias is None else torch.addmm(bias, x2, W.t())  # (B*T, d_out)
        x_a = x if x_a is None else x_a
        ws = _rows_weights(w, rows)
        y, z, u = mixture_forward(x_a, A, B, ws, out.view(n, T, -1), scaling)
        ctx.save_for_backward(x_a, W, A, B, z, u, ws, rows)
        ctx.scaling, ctx.table_rows, ctx.shared = scaling, None if rows is None else w.shape[0], x_a is x
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x_a, W, A, B, z, u, ws, rows = ctx.saved_tensors
        need_x, need_xa, need_W, need_bias, need_A, need_B, need_w, _, _ = ctx.needs_input_grad
        if need_W or need_bias:
            raise RuntimeError("LinearMixture's frozen layer needs no gradient; its weight requires one")
        n, T, _ = x_a.shape
        g_x = torch.mm(grad.reshape(n * T, -1), W) if need_x else None  # (B*T, d_in), the frozen layer's share
        per_token = ws is not None and ws.shape[1] == T
        if ctx.shared:  # x_a is x: the adapter's share goes into the same product
            g_x, g_A, g_B, g_w = mixture_backward(
                grad, x_a, A, B, z, u, ws, ctx.scaling, (need_x, need_A, need_B, need_w), per_token, g_x_into=g_x
            )
            g_xa = None
        else:
            g_xa, g_A, g_B, g_w = mixture_backward(
                grad, x_a, A, B, z, u, ws, ctx.scaling, (need_xa, need_A, need_B, need_w), per_token
            )
            g_x = None if g_x is None else g_x.view(n, T, -1)
        if need_w and rows is not None:
            g_w = _table_grad(g_w, rows, ctx.table_rows)
        return g_x, g_xa, None, None, g_A, g_B, g_w, None, None


def apply_linear_mixture(x, x_a, W, bias, A, B, w, rows, scaling: float) -> torch.Tensor:
    """``LinearMixture.apply`` with :func:`apply_mixture`'s handling of autocast: every floating input cast to the
    autocast dtype (the frozen weight too, as ``F.linear`` under autocast casts it) and the node run outside it."""
    device = x.device.type
    cast = _autocast_cast(device)
    if cast is None:
        return LinearMixture.apply(x, x_a, W, bias, A, B, w, rows, scaling)
    with torch.autocast(device, enabled=False):
        return LinearMixture.apply(cast(x), cast(x_a), cast(W), cast(bias), cast(A), cast(B), cast(w), rows, scaling)


class GatedMixture(torch.autograd.Function):
    """:class:`DenseMixture` whose weights come from a gate table, the gate's forward and backward inside the node.

    Shapes: ``x (B, T, d_in)``, ``A (E, r, d_in)``, ``B (E, r, d_out)``, ``logits (n, k)`` (one softmax per
    row, e.g. per task), ``spread (B*E, n*k)`` from :func:`task_spread`, ``out (B, T, d_out)`` or ``None``.
    The weight of expert ``e`` for sample ``b`` is ``w[b, e] = sum_{t,k} spread[(b, e), (t, k)] softmax(logits)[t, k]``,
    one ``mv``; its gradient goes back to the table through ``spread^T`` and the softmax's backward. Kept for
    backward: what :class:`DenseMixture` keeps, plus the softmaxed table ``p (n, k)`` and ``w (B, E)``.

    The gate runs in the dtype of ``logits`` (``spread`` must have it too), also under autocast (applied with
    ``apply_mixture(..., cast_weights=False)``, as :class:`Adapter` does): float32 gate
    logits are softmaxed in float32 and only ``w`` is cast to the products' dtype, so a layer spends no cast
    of its table or of the spread forward and no cast node backward, and ``g_logits`` comes back in the
    logits' own dtype.
    """

    @staticmethod
    def forward(ctx, x, A, B, logits, spread, out, scaling: float):
        n, E = x.shape[0], B.shape[0]
        p = torch.softmax(logits, dim=-1)  # (n_rows, k)
        w = torch.mv(spread, p.view(-1)).view(n, 1, E, 1)  # (B, 1, E, 1): 0 for the experts a sample does not see
        w = w.to(x.dtype)  # no copy unless the gate's dtype differs (float32 gates under bf16 autocast)
        y, z, u = mixture_forward(x, A, B, w, out, scaling)
        ctx.save_for_backward(x, A, B, z, u, p, w, spread)
        ctx.scaling = scaling
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, A, B, z, u, p, w, spread = ctx.saved_tensors
        need_x, need_A, need_B, need_logits, _, need_out, _ = ctx.needs_input_grad
        g_x, g_A, g_B, g_w = mixture_backward(
            grad, x, A, B, z, u, w, ctx.scaling, (need_x, need_A, need_B, need_logits), per_token=False
        )
        g_logits = None
        if need_logits:
            g_p = torch.mv(spread.t(), g_w.view(-1).to(spread.dtype)).view(p.shape).to(p.dtype)  # (n_rows, k)
            # softmax's own backward kernel, p * (g_p - <g_p, p>) in one launch instead of four
            g_logits = torch._softmax_backward_data(g_p, p, -1, p.dtype)
        return g_x, g_A, g_B, g_logits, None, grad if need_out else None, None


def task_spread(task_ids: torch.Tensor, table: torch.Tensor, num_experts: int, dtype: torch.dtype) -> torch.Tensor:
    """The 0/1 matrix that lays a gate table's rows out over each sample's experts, for :class:`GatedMixture`.

    Args:
        task_ids: ``(B,)``, the table row of each sample.
        table: ``(n, k)``, the expert id of each column of each row (CGC-LoRA: the experts task ``t`` sees).
        num_experts: ``E``.
        dtype: the gate logits' dtype.

    Returns:
        ``(B*E, n*k)``: entry ``((b, e), (t, k))`` is 1 where ``t = task_ids[b]`` and ``table[t, k] = e``.
    """
    n, k = table.shape
    rows = task_ids[:, None] == torch.arange(n, device=task_ids.device)  # (B, n)
    cols = table[:, :, None] == torch.arange(num_experts, device=table.device)  # (n, k, E)
    spread = rows[:, None, :, None] & cols.permute(2, 0, 1)[None]  # (B, E, n, k)
    return spread.reshape(-1, n * k).to(dtype)


#: Per-batch constants of the task ids, one entry per key: (the id tensor it was built for, that tensor's
#: version, the value). A model's routing state holds one (``RoutingState.batch_cache``) and replaces it
#: with every batch it routes, so models never share one and nothing outlives its batch.
BatchCache = dict[tuple, tuple[torch.Tensor, int, object]]


def per_batch(cache: BatchCache | None, task_ids: torch.Tensor, key: tuple, build):
    """``build()``, a constant of the batch's task ids, built once per batch and shared by every layer.

    Every adapted layer of a model receives the same ``task_ids`` tensor for one batch and the same
    ``cache`` (the routing state's), so the first layer builds the value and the others reuse it:
    per-batch routing work is done once per step, not once per layer. The entry is tied to that tensor
    object and its version counter, so new ids (a new tensor, or the same one written in place) rebuild
    it. ``key`` names what is built and everything it depends on besides the ids (layout, dtype,
    device). Without a cache (an adapter called on its own), under inference mode or while compiling,
    where tensors cannot be reused that way, the value is built every time.
    """
    # is_compiling first: Dynamo cannot trace is_inference_mode_enabled (docs/benchmarks.md, third pass)
    if torch.compiler.is_compiling() or cache is None or torch.is_inference_mode_enabled() or task_ids.is_inference():
        return build()
    hit = cache.get(key)
    if hit is not None and hit[0] is task_ids and hit[1] == task_ids._version:
        return hit[2]
    value = build()
    cache[key] = (task_ids, task_ids._version, value)
    return value


def spread_weights(
    weight: torch.Tensor | None, index: torch.Tensor, num_experts: int, dtype: torch.dtype
) -> torch.Tensor:
    """Weights of the experts ``index: (B, K)`` laid out over all ``E``: ``(B, T|1, K) -> (B, T|1, E)``, 0 elsewhere.

    ``weight=None`` means weight 1 for each listed expert. An expert listed twice gets the sum of its
    weights. A product with a one-hot tensor rather than a scatter: deterministic, forward and backward.
    """
    n, K = index.shape
    if weight is None:
        weight = torch.ones(n, 1, K, dtype=dtype, device=index.device)
    one_hot = index[:, :, None] == torch.arange(num_experts, device=index.device)  # (B, K, E)
    return torch.bmm(weight, one_hot.to(weight.dtype))


class Adapter(nn.Module):
    """Base of every method: stacked experts, a scaling, input dropout, and a routing rule.

    A subclass implements :meth:`route` (which experts each sample sees, with what weight) and, when
    its update for a task is a constant matrix, :meth:`task_route` (the same for one task, no input
    needed), which is what merging and PEFT export are built on.
    """

    #: True when a task's whole update is a constant ``dW_t``, so it can be merged and exported.
    mergeable: bool = True
    #: False only for methods that treat every sample alike (joint LoRA).
    needs_task_ids: bool = True

    def __init__(
        self,
        *,
        in_features: int,
        out_features: int,
        r: int,
        num_experts: int,
        scaling: float,
        dropout: float = 0.0,
        dtype=None,
        device=None,
    ):
        super().__init__()
        self.experts = StackedExperts(
            num_experts=num_experts, in_features=in_features, out_features=out_features, r=r, dtype=dtype, device=device
        )
        self.scaling = float(scaling)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def route(self, x: torch.Tensor, task_ids: torch.Tensor | None, cluster_ids: torch.Tensor | None):
        """Return ``(index (B, K) | None, weight (B, T|1, K) | None)`` for the batch ``x: (B, T, d_in)``."""
        raise NotImplementedError

    def route_dense(
        self,
        x: torch.Tensor,
        task_ids: torch.Tensor | None,
        cluster_ids: torch.Tensor | None,
        cache: BatchCache | None = None,
    ):
        """:meth:`route` with the weights laid out over all ``E`` experts, for the dense path.

        ``cache``: where constants of the batch's ids are kept for the other layers (:func:`per_batch`).

        Returns:
            ``(weight, rows)``: ``weight (B, T|1, E)`` and ``rows = None``, or a table ``(n, E)`` and
            ``rows (B,)``, the row each sample uses (a constant per task or domain, such as MoDULA's
            domain stage: no per-sample copy, and no indexing in the backward); ``weight = None`` means
            weight 1.
        """
        index, weight = self.route(x, task_ids, cluster_ids)
        if index is not None:
            weight = spread_weights(weight, index, self.experts.num_experts, x.dtype)  # (B, T|1, E)
        return weight, None

    def route_table(
        self,
        x: torch.Tensor,
        task_ids: torch.Tensor | None,
        cluster_ids: torch.Tensor | None,
        cache: BatchCache | None = None,
    ):
        """For a gate that is one softmax per task over a table of logits, the dense path's fastest form.

        ``cache``: as for :meth:`route_dense`.

        Returns:
            ``None`` (the default: use :meth:`route_dense`), or ``(logits (n, k), spread (B*E, n*k))`` for
            :class:`GatedMixture`: every task's gate logits, and :func:`task_spread` of the batch, so that
            ``route_dense``'s weights are ``spread @ softmax(logits)``.
        """
        return None

    def table_gate(self) -> nn.Module | None:
        """The module holding this adapter's gate when :meth:`route_table` serves it, else ``None``.

        Adapters with such a gate join the model's gate bank (:mod:`~cgc_lightning.adapters.gate_bank`), which
        computes every layer's weights in one go; adapters sharing one gate module share one set of weights.
        """
        return None

    def task_route(self, task: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Return ``(index (K,) | None, weight (K,) | None)``: the experts task ``task`` uses and their weights."""
        raise NotImplementedError(f"{type(self).__name__} has no constant per-task update")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the adapter computes in (its expert tensors')."""
        return self.experts.lora_A.dtype

    def forward(
        self,
        x: torch.Tensor,
        task_ids: torch.Tensor | None,
        cluster_ids: torch.Tensor | None,
        out: torch.Tensor | None = None,
        *,
        cache: BatchCache | None = None,
        weights: torch.Tensor | None = None,
        base: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """The update for a batch, or the frozen layer's output plus the update.

        Args:
            x: ``(B, T, d_in)``.
            task_ids: ``(B,)`` or ``None``.
            cluster_ids: ``(B,)`` or ``None``.
            out: ``(B, T, d_out)``, the frozen layer's output, or ``None``. Given, it is added inside
                the last product instead of by a separate pass over the output.
            cache: the model's per-batch constants of the ids (:func:`per_batch`), or ``None``.
            weights: ``(B, 1, E)``, this batch's gate weights from the model's gate bank (an adapter with a
                :meth:`table_gate`), or ``None`` to compute them here.
            base: ``(W, bias)`` of the frozen linear layer, in place of ``out``: its output is computed here,
                inside the mixture's node where the experts are dense (:class:`LinearMixture`).

        Returns:
            ``(B, T, d_out)``: the update, or ``out`` (or the frozen layer's output) plus the update.
        """
        A, B = self.experts.lora_A, self.experts.lora_B
        x_a = self.dropout(x)
        rows = None
        if weights is None and self.experts.dense:
            table = self.route_table(x, task_ids, cluster_ids, cache)
            if table is not None:
                out = out if base is None else F.linear(x, *base)
                return apply_mixture(GatedMixture, x_a, A, B, *table, out, self.scaling, cast_weights=False)
            weights, rows = self.route_dense(x, task_ids, cluster_ids, cache)
        elif weights is None:
            index, weight = self.route(x, task_ids, cluster_ids)
            out = out if base is None else F.linear(x, *base)
            return self.experts(x_a, index, weight, scaling=self.scaling, out=out)
        if base is not None:
            return apply_linear_mixture(x, None if x_a is x else x_a, *base, A, B, weights, rows, self.scaling)
        return apply_mixture(DenseMixture, x_a, A, B, weights, rows, out, self.scaling)

    def task_factors(self, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Task ``task``'s update as one LoRA pair, gate weights and scaling folded into ``B'``.

        Returns:
            ``A': (K*r, d_in)`` and ``B': (d_out, K*r)`` with ``B' @ A' = s * sum_k w_k B_k A_k = dW_t``.
        """
        index, weight = self.task_route(task)
        A, B = self.experts.lora_A, self.experts.lora_B  # (E, r, d_in), (E, r, d_out)
        if index is not None:
            A, B = A[index], B[index]  # (K, r, d_in), (K, r, d_out)
        if weight is not None:
            B = B * weight.to(B.dtype)[:, None, None]
        K, r, d_in = A.shape
        return A.reshape(K * r, d_in), (self.scaling * B).reshape(K * r, -1).t()

    def delta_weight(self, task: int) -> torch.Tensor:
        """``dW_t: (d_out, d_in)``, the constant update of task ``task``."""
        A, B = self.task_factors(task)
        return B @ A


def require_task_ids(task_ids: torch.Tensor | None, method: str) -> torch.Tensor:
    if task_ids is None:
        raise RuntimeError(
            f"{method} needs per-sample task ids, and none are set: call the model inside "
            "`with cgc_lightning.routing.route(model, task_ids=...):`"
        )
    return task_ids
