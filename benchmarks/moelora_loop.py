"""MOELoRA computed the way MOELoRA-peft does it (one Linear pair per expert, a Python loop over experts): the
naive reference that ``benchmarks/train_step.py`` times and checks the fused :class:`MoELoRA` against."""

from __future__ import annotations

import torch
from torch import nn

from cgc_lightning.adapters import MoELoRA
from cgc_lightning.inject import adapted_layers


class LoopMoELoRA(nn.Module):
    """MOELoRA the way MOELoRA-peft computes it: the naive peer of :class:`MoELoRA`, same function.

    One ``nn.Linear`` pair per expert and a Python loop over the experts; each expert's full
    ``(B, T, d_out)`` output is scaled and multiplied by its gate weight before it is added, so
    autograd keeps one such tensor per expert for the gate's gradient.

    Args:
        fused: the layer's :class:`MoELoRA`; its values are copied and its (model-wide) gate is shared.
    """

    needs_task_ids = True

    def __init__(self, fused: MoELoRA):
        super().__init__()
        E, r, d_in = fused.experts.lora_A.shape
        d_out = fused.experts.out_features
        kw = dict(bias=False, dtype=fused.dtype, device=fused.experts.lora_A.device)
        self.lora_A = nn.ModuleList(nn.Linear(d_in, r, **kw) for _ in range(E))
        self.lora_B = nn.ModuleList(nn.Linear(r, d_out, **kw) for _ in range(E))
        self.scaling = fused.scaling
        self.dropout = fused.dropout
        self.__dict__["gate"] = fused.gate  # the model's gate, registered at its root
        self.copy_from(fused)

    @property
    def dtype(self) -> torch.dtype:
        return self.lora_A[0].weight.dtype

    @torch.no_grad()
    def copy_from(self, fused: MoELoRA) -> None:
        for e, (a, b) in enumerate(zip(self.lora_A, self.lora_B, strict=True)):
            a.weight.copy_(fused.experts.lora_A[e])  # (r, d_in)
            b.weight.copy_(fused.experts.lora_B[e].t())  # (d_out, r)

    def forward(self, x, task_ids, cluster_ids, out=None, *, cache=None):  # no per-batch tables: the loop needs none
        """x: (B, T, d_in), task_ids: (B,) -> out + update, (B, T, d_out)."""
        w = self.gate(task_ids)  # (B, E)
        result = 0 if out is None else out
        for e, (a, b) in enumerate(zip(self.lora_A, self.lora_B, strict=True)):
            result = result + b(a(self.dropout(x))) * self.scaling * w[:, e, None, None]  # (B, T, d_out)
        return result


def to_loop(model: nn.Module) -> None:
    """Replace every MoELoRA adapter of ``model`` by its loop twin (same values, trainable)."""
    for _, layer in adapted_layers(model):
        layer.adapter = LoopMoELoRA(layer.adapter).requires_grad_(True)


def sync_loop(loop_model: nn.Module, fused_model: nn.Module) -> None:
    """Give ``loop_model`` the adapter and gate values of ``fused_model``."""
    for (_, a), (_, b) in zip(adapted_layers(loop_model), adapted_layers(fused_model), strict=True):
        a.adapter.copy_from(b.adapter)
    loop_model.adapter_gate.load_state_dict(fused_model.adapter_gate.state_dict())


def loop_grads(model: nn.Module) -> list[torch.Tensor]:
    """The loop model's adapter gradients, stacked like the fused model's (gate, then A and B per layer)."""
    grads = [p.grad for p in model.adapter_gate.parameters()]
    for _, layer in adapted_layers(model):
        grads.append(torch.stack([m.weight.grad for m in layer.adapter.lora_A]))  # (E, r, d_in)
        grads.append(torch.stack([m.weight.grad.t() for m in layer.adapter.lora_B]))  # (E, r, d_out)
    return grads


def fused_grads(model: nn.Module) -> list[torch.Tensor]:
    grads = [p.grad for p in model.adapter_gate.parameters()]
    for _, layer in adapted_layers(model):
        grads += [layer.adapter.experts.lora_A.grad, layer.adapter.experts.lora_B.grad]
    return grads
