"""The two hand-written autograd nodes (DenseMixture, GatedMixture) against finite differences, in float64.

Both nodes share one forward and one backward (``mixture_forward``, ``mixture_backward`` in
``adapters/experts.py``); gradcheck covers every weight form each node takes, with and without the frozen
layer's output, and with only some inputs needing a gradient (each branch of the backward).
"""

from __future__ import annotations

import pytest
import torch

from cgc_lightning.adapters.experts import DenseMixture, GatedMixture, task_spread

N, T, D_IN, D_OUT, E, R, N_ROWS = 3, 2, 5, 4, 4, 2, 3
F64 = dict(dtype=torch.float64)
ROWS = torch.tensor([2, 0, 2])  # the table row of each sample: row 1 unused, row 2 twice
VISIBLE = torch.tensor([[0, 1, 3], [1, 2, 0], [3, 2, 1]])  # (N_ROWS, k): the experts each row's gate covers
#: which of x, A, B, weights, out need a gradient
NEEDS = {"all": (1, 1, 1, 1, 1), "weights": (0, 0, 0, 1, 0), "x": (1, 0, 0, 0, 0), "experts": (0, 1, 1, 0, 0)}


def inputs(weights: str, with_out: bool):
    g = torch.Generator().manual_seed(0)
    x, A, B = (torch.randn(*s, generator=g, **F64) for s in ((N, T, D_IN), (E, R, D_IN), (E, R, D_OUT)))
    w = {
        "none": None,
        "per_token": torch.randn(N, T, E, generator=g, **F64),
        "per_sample": torch.randn(N, 1, E, generator=g, **F64),
        "table": torch.randn(N_ROWS, E, generator=g, **F64),  # with ROWS
        "gate": torch.randn(N_ROWS, VISIBLE.shape[1], generator=g, **F64),  # logits, with the spread matrix
    }[weights]
    out = torch.randn(N, T, D_OUT, generator=g, **F64) if with_out else None
    return x, A, B, w, out


@pytest.mark.parametrize("needs", list(NEEDS))
@pytest.mark.parametrize("with_out", [False, True], ids=["no_out", "out"])
@pytest.mark.parametrize("weights", ["none", "per_token", "per_sample", "table", "gate"])
def test_mixture_backward_passes_gradcheck(weights, with_out, needs):
    tensors = list(inputs(weights, with_out))
    for t, need in zip(tensors, NEEDS[needs], strict=True):
        if t is not None:
            t.requires_grad_(bool(need))
    if not any(t is not None and t.requires_grad for t in tensors):
        pytest.skip("no input of this form needs a gradient")
    x, A, B, w, out = tensors
    scaling = 0.7
    if weights == "gate":
        spread = task_spread(ROWS, VISIBLE, E, torch.float64)  # (N*E, N_ROWS*k)

        def fn(x, A, B, w, out):
            return GatedMixture.apply(x, A, B, w, spread, out, scaling)
    else:
        rows = ROWS if weights == "table" else None

        def fn(x, A, B, w, out):
            return DenseMixture.apply(x, A, B, w, rows, out, scaling)

    assert torch.autograd.gradcheck(fn, (x, A, B, w, out), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_under_autocast_the_gate_runs_in_its_own_dtype_and_only_its_weights_are_cast():
    """bf16-mixed with float32 adapters: the gate table and its spread go into the node as they are (no cast of
    either forward, no cast node backward); the softmax runs in float32 and only the per-sample weights are cast
    for the bf16 products. Output and gradients are the float64 computation's, to bf16 rounding."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from cgc_lightning.adapters.experts import apply_mixture

    class Copies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ == "_to_copy":
                self.shapes.append(tuple(args[0].shape))
            return func(*args, **(kwargs or {}))

    x64, A64, B64, logits64, out64 = inputs("gate", with_out=True)
    spread64 = task_spread(ROWS, VISIBLE, E, torch.float64)
    reference = GatedMixture.apply(x64, A64, B64, logits64, spread64, out64, 0.7)
    x, A, B, logits, out = (t.float().requires_grad_() for t in (x64, A64, B64, logits64, out64))
    spread = spread64.float()
    with Copies() as copies:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = apply_mixture(GatedMixture, x, A, B, logits, spread, out, 0.7, cast_weights=False)
        y.float().square().sum().backward()
    assert y.dtype == torch.bfloat16
    assert logits.shape not in copies.shapes and spread.shape not in copies.shapes, copies.shapes
    assert (N, 1, E, 1) in copies.shapes, "the per-sample weights are cast for the bf16 products"
    assert logits.grad.dtype == torch.float32
    torch.testing.assert_close(y.double(), reference, rtol=3e-2, atol=3e-2)
    ref = [t.detach().requires_grad_() for t in (x64, A64, B64, logits64, out64)]
    GatedMixture.apply(ref[0], ref[1], ref[2], ref[3], spread64, ref[4], 0.7).square().sum().backward()
    for name, got, want in zip(["x", "A", "B", "logits", "out"], (x, A, B, logits, out), ref, strict=True):
        assert (got.grad.double() - want.grad).norm() <= 3e-2 * want.grad.norm(), name


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("adapter_input", ["same", "own"])  # x_a = x (None), or a separate input (dropout's)
@pytest.mark.parametrize("weights", ["none", "per_token", "per_sample", "table"])
def test_linear_mixture_passes_gradcheck_and_equals_the_frozen_layer_plus_dense_mixture(weights, adapter_input, bias):
    """The frozen linear layer inside the node: output and gradients of x, x_a, A, B and the weights against
    finite differences, and the output against ``F.linear`` + :class:`DenseMixture`."""
    from cgc_lightning.adapters.experts import LinearMixture

    x, A, B, w, _ = inputs(weights, with_out=False)
    g = torch.Generator().manual_seed(1)
    W = torch.randn(D_OUT, D_IN, generator=g, **F64)
    b = torch.randn(D_OUT, generator=g, **F64) if bias else None
    x_a = torch.randn(N, T, D_IN, generator=g, **F64) if adapter_input == "own" else None
    rows = ROWS if weights == "table" else None
    for t in (x, x_a, A, B, w):
        if t is not None:
            t.requires_grad_()

    def fn(x, x_a, A, B, w):
        return LinearMixture.apply(x, x_a, W, b, A, B, w, rows, 0.7)

    assert torch.autograd.gradcheck(fn, (x, x_a, A, B, w), eps=1e-6, atol=1e-7, rtol=1e-6)
    out = torch.nn.functional.linear(x, W, b)
    want = DenseMixture.apply(x if x_a is None else x_a, A, B, w, rows, out, 0.7)
    torch.testing.assert_close(fn(x, x_a, A, B, w), want, rtol=1e-13, atol=1e-13)


def test_linear_mixture_refuses_a_frozen_layer_that_needs_a_gradient():
    from cgc_lightning.adapters.experts import LinearMixture

    x, A, B, _, _ = inputs("none", with_out=False)
    W = torch.randn(D_OUT, D_IN, **F64, requires_grad=True)
    y = LinearMixture.apply(x.requires_grad_(), None, W, None, A, B, None, None, 0.7)
    with pytest.raises(RuntimeError, match="needs no gradient"):
        y.sum().backward()
