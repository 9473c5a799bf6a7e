r"""Every table-gated layer's expert weights for a batch, computed in one go.

CGC-LoRA's task gate (and MOELoRA's) is one softmax per task over a small table of logits, and a
sample's weights are its task's row laid out over the experts. Layer by layer that is a softmax and a
spread product in each layer's forward and their backward in each layer's backward (:class:`GatedMixture`):
small kernels the host must issue 112 times a step at Llama-3.2-1B's depth, which is what bounds an eager
step at small batches. The bank does it once for every layer::

    G: (L, n, k) every gate's logits ──softmax──▶ P ──(B E, n k) spread @ P^T──▶ W: (B E, L) ──▶ L x (B, 1, E)

and each layer runs :class:`DenseMixture` (or :class:`LinearMixture`, with the frozen layer inside) with its own
``(B, 1, E)`` slice. Autograd gathers the L
slices' gradients in one node and takes them back through one product and one softmax backward. The
spread product runs in float64 (float32 on MPS): each output has exactly one nonzero term, so the weights
are the softmax's values exactly, whatever TF32 setting the float32 matrix products run under.

When the bank is (re)built:

* by the first layer that asks during a forward; it lives in the routing state's per-batch cache, which
  every ``route()`` starts empty, keyed by the products' dtype and the grad mode;
* again when a layer asks a second time: that starts a new forward (two forwards in one ``route`` block,
  with the gate perhaps stepped in between, or a layer called twice), so no forward reuses another's
  autograd graph or stale gate values;
* never while activation checkpointing recomputes a layer: the layer computes its own slice with the same
  operations (the same values), so a reentrant recomputation backpropagates through its own small graph
  and not the forward's shared one.

Compiled graphs, inference mode, packed rows (a task per token: the bank would be ``B T E x L``) and
``generate()``'s expanded ids keep the per-layer :class:`GatedMixture`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from cgc_lightning.adapters.experts import Adapter, BatchCache

_KEY = "gate_bank"


class _Entry:
    """One forward's weights: a ``(B, 1, E)`` tensor per slot, and the layers already served."""

    __slots__ = ("served", "weights")

    def __init__(self, weights: dict[int, torch.Tensor]):
        self.weights = weights
        self.served: set[int] = set()


class GateBank:
    """The table-gated adapters of one model, one slot per distinct gate (a shared gate is one slot).

    Args:
        adapters: the model's adapters; those with a dense table gate (:meth:`Adapter.table_gate`) join.
    """

    def __init__(self, adapters: Iterable[Adapter]):
        self.owners: list[Adapter] = []  # the first adapter of each slot, whose route_table gives its logits
        slots: dict[int, int] = {}
        for adapter in adapters:
            gate = adapter.table_gate() if adapter.experts.dense else None
            if gate is None:
                continue
            slot = slots.setdefault(id(gate), len(slots))
            if slot == len(self.owners):
                self.owners.append(adapter)
            adapter._bank_slot = slot

    def __len__(self) -> int:
        return len(self.owners)

    def weights(
        self,
        adapter: Adapter,
        task_ids: torch.Tensor,
        dtype: torch.dtype,
        cache: BatchCache,
        *,
        recomputing: bool = False,
    ) -> torch.Tensor:
        """``(B, 1, E)``: the weights of ``adapter``'s experts for each sample of the batch, in ``dtype``.

        Args:
            adapter: a member (it has a ``_bank_slot``).
            task_ids: ``(B,)`` the routed ids, the tensor the routing state holds for this batch.
            dtype: the dtype of the layer's products.
            cache: the routing state's per-batch cache.
            recomputing: activation checkpointing is recomputing the layer: compute its slice alone.
        """
        slot = adapter._bank_slot
        if recomputing:
            return self._build(task_ids, dtype, cache, [slot])[slot]
        key = (_KEY, dtype, torch.is_grad_enabled())
        hit = cache.get(key)
        me = id(adapter)
        if hit is None or hit[0] is not task_ids or hit[1] != task_ids._version or me in hit[2].served:
            entry = _Entry(self._build(task_ids, dtype, cache, range(len(self.owners))))
            cache[key] = (task_ids, task_ids._version, entry)
        else:
            entry = hit[2]
        entry.served.add(me)
        return entry.weights[slot]

    def _build(
        self, task_ids: torch.Tensor, dtype: torch.dtype, cache: BatchCache, slots: Iterable[int]
    ) -> dict[int, torch.Tensor]:
        n, device = task_ids.shape[0], task_ids.device.type
        exact = torch.float32 if device == "mps" else torch.float64  # MPS has no float64
        out = {}
        # The gate in its own dtype, as GatedMixture runs it. What its backward keeps is kept as is, never by the
        # saved-tensor hooks of a checkpointed layer that happens to build the bank: that layer's recomputation
        # would then have to produce the bank's tensors too.
        with torch.autocast(device, enabled=False), torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
            groups: dict[int, tuple[torch.Tensor, list[int], list[torch.Tensor]]] = {}
            for slot in slots:
                logits, spread = self.owners[slot].route_table(None, task_ids, None, cache)  # (n_rows, k), (B*E, .)
                _, members, tables = groups.setdefault(id(spread), (spread, [], []))
                members.append(slot)
                tables.append(logits)
            for spread, members, tables in groups.values():
                p = torch.softmax(torch.stack(tables), dim=-1)  # (L, n_rows, k)
                w = torch.mm(spread.to(exact), p.to(exact).view(len(members), -1).t())  # (B*E, L)
                w = w.t().reshape(len(members), n, 1, -1).to(dtype)  # (L, B, 1, E)
                out.update(zip(members, w.unbind(0), strict=True))
        return out


def _keep(t: torch.Tensor) -> torch.Tensor:
    return t


def gate_bank(model: nn.Module) -> GateBank:
    """A bank of ``model``'s adapters (:class:`~cgc_lightning.inject.AdaptedLayer` ``.adapter``)."""
    return GateBank(m for m in model.modules() if isinstance(m, Adapter))
