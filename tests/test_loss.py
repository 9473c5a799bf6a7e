"""The lean loss (target positions only, chunked, no full-batch logits) equals the full head's loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cgc_lightning import loss as loss_module
from cgc_lightning.config import AdapterConfig
from cgc_lightning.hf import ModelSpec
from cgc_lightning.loss import loss_positions, target_token_losses
from cgc_lightning.module import MultiTaskLoRAModule
from tests.conftest import randomize_adapters
from tests.test_datamodule import make_dm
from tests.test_eval import family_dir

logits_of_a_chunk, softmax_minus_onehot = loss_module._logits, loss_module._softmax_minus_onehot


def module_pair(tmp_path: Path, family: str, chunk: int, dm) -> tuple[MultiTaskLoRAModule, MultiTaskLoRAModule]:
    folder = family_dir(tmp_path, family)
    if family == "gemma3":  # soft-capped logits (Gemma 2's rule), which the lean loss must apply too
        config = json.loads((Path(folder) / "config.json").read_text())
        (Path(folder) / "config.json").write_text(json.dumps(config | {"final_logit_softcapping": 3.0}))
    modules = []
    for chunk_size in (chunk, None):
        torch.manual_seed(0)
        module = MultiTaskLoRAModule(
            ModelSpec(name_or_path=folder, random_init=True, dtype="float64"),
            adapter=AdapterConfig(method="cgc_lora", r=4, dropout=0.0),
            task_names=dm.task_names,
            task_clusters=dm.task_clusters,
            loss_chunk_size=chunk_size,
        )
        randomize_adapters(module.model, seed=3)
        modules.append(module.train())
    return modules[0], modules[1]


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
@pytest.mark.parametrize("chunk", [3, 4096], ids=["chunked", "one_chunk"])
def test_lean_loss_equals_the_full_logits_loss_with_gradients(tmp_path, family, chunk):
    dm = make_dm(tmp_path)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert "loss_positions" in batch and len(batch["loss_positions"]) > chunk or chunk == 4096
    lean, full = module_pair(tmp_path, family, chunk, dm)
    assert lean.loss_chunk_size == chunk and full.loss_chunk_size is None
    head_calls = []
    lean.model.get_output_embeddings().register_forward_hook(lambda *a: head_calls.append(1))
    results = []
    for module in (lean, full):
        torch.manual_seed(1)  # the same dropout masks (GPT-2 has dropout in the base model)
        loss, task_sum, task_tokens = module._per_task_loss(batch)
        loss.backward()
        grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
        results.append((loss, task_sum, task_tokens, grads))
    assert not head_calls, "the lean loss never runs the head over the whole batch"
    (loss_l, sum_l, tok_l, g_l), (loss_f, sum_f, tok_f, g_f) = results
    assert loss_l.dtype == torch.float64 and (tok_l > 0).sum() >= 2, "a batch of several tasks"
    torch.testing.assert_close(loss_l, loss_f, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sum_l, sum_f, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tok_l, tok_f, rtol=0, atol=0)
    assert g_l.keys() == g_f.keys() and len(g_l) > 0
    for name in g_l:
        torch.testing.assert_close(g_l[name], g_f[name], rtol=1e-10, atol=1e-12, msg=name)


def test_positions_from_the_batch_equal_positions_found_on_the_device():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, 8, -100, -100]])
    positions = loss_positions(labels)
    assert positions.tolist() == [1, 2, 5, 6]  # (row 0, t=1), (0, 2), (1, 0), (1, 1): the position before each target
    hidden = torch.randn(2, 5, 4, dtype=torch.float64)
    head = torch.nn.Linear(4, 9, bias=True).double()
    given, rows = target_token_losses(hidden, head, labels, positions, chunk_size=2)
    found, _ = target_token_losses(hidden, head, labels, chunk_size=2)
    assert rows.tolist() == [0, 0, 1, 1]
    torch.testing.assert_close(given, found, rtol=0, atol=0)
    logits = head(hidden)  # (B, L, V): the plain computation, position by position
    expected = [-logits[b, t].log_softmax(-1)[labels[b, t + 1]] for b, t in [(0, 1), (0, 2), (1, 0), (1, 1)]]
    torch.testing.assert_close(given, torch.stack(expected), rtol=1e-12, atol=1e-12)


def test_a_bad_chunk_size_is_refused_before_the_model_loads():
    with pytest.raises(ValueError, match="loss_chunk_size must be a positive number of positions or null, got 0"):
        MultiTaskLoRAModule(ModelSpec(name_or_path="/does/not/exist"), task_names=["a"], loss_chunk_size=0)


def test_heads_the_lean_loss_does_not_know_fall_back_loudly(tmp_path, caplog):
    folder = Path(family_dir(tmp_path, "llama"))
    scaled = tmp_path / "scaled"
    scaled.mkdir()
    for f in folder.iterdir():
        (scaled / f.name).write_bytes(f.read_bytes())
    config = json.loads((scaled / "config.json").read_text())
    (scaled / "config.json").write_text(json.dumps(config | {"logit_scale": 0.5}))  # Cohere-style scaled logits
    with caplog.at_level("WARNING", logger="cgc_lightning.module"):
        module = MultiTaskLoRAModule(ModelSpec(name_or_path=str(scaled), random_init=True), task_names=["a"])
    assert module.loss_chunk_size is None
    assert "computing the full logits instead, since its config scales the logits (logit_scale=0.5)" in caplog.text


@pytest.mark.parametrize("head_trains", [True, False], ids=["trained_head", "frozen_head"])
@pytest.mark.parametrize("softcap", [None, 2.0], ids=["plain", "softcapped"])
@pytest.mark.parametrize("chunk", [1, 3, 4096])
def test_the_fused_head_and_loss_give_the_plain_gradients_of_hidden_states_weight_and_bias(
    softcap, chunk, head_trains, monkeypatch
):
    torch.manual_seed(0)
    labels = torch.randint(0, 11, (3, 6))
    labels[0, :2], labels[1, 4:], labels[2, :5] = -100, -100, -100
    hidden = torch.randn(3, 6, 5, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(5, 11, bias=True).double().requires_grad_(head_trains)  # trained: its gradients too
    weights = torch.rand(len(loss_positions(labels)), dtype=torch.float64)  # each loss's own upstream gradient
    head_runs = []
    monkeypatch.setattr(loss_module, "_logits", lambda *a: head_runs.append(1) or logits_of_a_chunk(*a))
    losses, _ = target_token_losses(hidden, head, labels, chunk_size=chunk, softcap=softcap)
    in_forward = len(head_runs)
    (losses * weights).sum().backward()
    chunks = -(-len(weights) // chunk)
    # a frozen head's gradient is formed in forward (the chunk's logits at hand): backward recomputes none
    assert (in_forward, len(head_runs)) == (chunks, 2 * chunks if head_trains else chunks)
    trained = (hidden, head.weight, head.bias) if head_trains else (hidden,)
    fused = [t.grad.clone() for t in trained]
    for t in trained:
        t.grad = None
    logits = head(hidden)[:, :-1]  # (B, L-1, V): every position, then the targets' rows
    logits = softcap * torch.tanh(logits / softcap) if softcap else logits
    mask = labels[:, 1:] != -100
    plain = torch.nn.functional.cross_entropy(logits[mask], labels[:, 1:][mask], reduction="none")
    torch.testing.assert_close(losses, plain, rtol=1e-12, atol=1e-12)
    (plain * weights).sum().backward()
    for got, t, name in zip(fused, trained, ("hidden", "weight", "bias"), strict=False):
        torch.testing.assert_close(got, t.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_the_fused_loss_forms_no_gradient_where_no_backward_follows(monkeypatch):
    labels = torch.randint(0, 11, (2, 6))
    hidden = torch.randn(2, 6, 5, requires_grad=True)
    head = torch.nn.Linear(5, 11).requires_grad_(False)
    formed = []
    monkeypatch.setattr(loss_module, "_softmax_minus_onehot", lambda *a: formed.append(1) or softmax_minus_onehot(*a))
    with torch.no_grad():  # evaluation: the loss alone
        target_token_losses(hidden, head, labels, chunk_size=4)
    target_token_losses(hidden.detach(), head, labels, chunk_size=4)  # nothing needs a gradient
    assert not formed
    target_token_losses(hidden, head, labels, chunk_size=4)
    assert len(formed) == 3, "training: each chunk's gradient in forward"


def test_the_fused_loss_under_autocast_computes_the_head_in_autocasts_dtype_as_the_model_does():
    torch.manual_seed(0)
    labels = torch.randint(0, 50, (2, 9))
    labels[:, :3] = -100
    hidden = torch.randn(2, 9, 8, requires_grad=True)  # fp32 hidden states, as a bf16-mixed model's final norm
    head = torch.nn.Linear(8, 50, bias=False).to(torch.bfloat16).requires_grad_(False)  # a frozen bf16 head
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses, _ = target_token_losses(hidden, head, labels, chunk_size=4)
        mask = labels[:, 1:] != -100
        logits = head(hidden)[:, :-1][mask]  # autocast runs the head in bf16, the loss upcasts
        plain = torch.nn.functional.cross_entropy(logits.float(), labels[:, 1:][mask], reduction="none")
    assert losses.dtype == torch.float32
    torch.testing.assert_close(losses, plain, rtol=1e-6, atol=1e-6)
    (grad_fused,) = torch.autograd.grad(losses.sum(), hidden)
    (grad_plain,) = torch.autograd.grad(plain.sum(), hidden)
    assert grad_fused.dtype == torch.float32
    torch.testing.assert_close(grad_fused, grad_plain, rtol=2e-2, atol=2e-3)  # bf16 products of the same inputs


@pytest.mark.gpu
@pytest.mark.parametrize("chunk", [512, 4096])
def test_the_fused_loss_on_a_gpu_matches_the_plain_head_and_never_holds_the_batchs_logits(chunk):
    # SmolLM2-135M's head (d 576, vocabulary 49152) under bf16 autocast; rows of 256 with 40 targets each
    torch.manual_seed(0)
    B, L, d, V = 32, 256, 576, 49152
    labels = torch.randint(0, V, (B, L), device="cuda")
    labels[:, : L - 40] = -100
    hidden = torch.randn(B, L, d, device="cuda", requires_grad=True)
    head = torch.nn.Linear(d, V, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        losses, _ = target_token_losses(hidden, head, labels, chunk_size=chunk)
    (grad,) = torch.autograd.grad(losses.sum(), hidden)
    peak = torch.cuda.max_memory_allocated() - before
    one_chunk = min(chunk, B * 40) * V * (2 + 4 + 4)  # a chunk's logits in bf16 and fp32, and their gradient
    assert peak < one_chunk + 2**26, f"peak {peak / 2**30:.2f} GiB: more than one chunk's logits at a time"
    assert peak < B * L * V * 4 / 2, "the (B, L, V) fp32 logits alone would be twice this"
    mask = labels[:, 1:] != -100
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = head(hidden[:, :-1][mask])  # the plain head on the same positions (bf16 products), upcast
        plain = torch.nn.functional.cross_entropy(logits.float(), labels[:, 1:][mask], reduction="none")
    (grad_plain,) = torch.autograd.grad(plain.sum(), hidden)
    assert losses.dtype == torch.float32 and grad.dtype == torch.float32
    # a chunk's bf16 product may round a logit differently from the whole batch's (another GEMM tiling): by at most
    # a bf16 ulp of the largest logit, on the target's logit and on the log-sum-exp
    ulp = 2.0**-7 * logits.abs().max().item()
    torch.testing.assert_close(losses, plain, rtol=1e-5 if chunk >= len(plain) else 0, atol=1e-5 + 2 * ulp)
    torch.testing.assert_close(grad, grad_plain, rtol=2e-2, atol=1e-4)
