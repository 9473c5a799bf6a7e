"""The lean loss (target positions only, chunked, checkpointed) equals the model's own head on every position."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cgc_lightning.config import AdapterConfig
from cgc_lightning.hf import ModelSpec
from cgc_lightning.loss import loss_positions, target_token_losses
from cgc_lightning.module import MultiTaskLoRAModule
from tests.conftest import randomize_adapters
from tests.test_datamodule import make_dm
from tests.test_eval import family_dir


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
