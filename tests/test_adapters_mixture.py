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
