"""Evaluation: scoring answer choices on the prompt's KV cache equals scoring each prompt + choice whole."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from cgc_lightning.config import AdapterConfig
from cgc_lightning.hf import ModelSpec
from cgc_lightning.inject import adapter_parameters
from cgc_lightning.module import MultiTaskLoRAModule
from tests.conftest import tiny_config
from tests.test_datamodule import make_dm

FIXTURES = Path(__file__).parent / "fixtures"


def family_dir(tmp_path: Path, family: str) -> str:
    """A folder with a tiny ``family`` config and the fixture tokenizer (vocabulary 400)."""
    if family == "llama":
        return str(FIXTURES / "tiny-llama")
    folder = tmp_path / family
    cfg = tiny_config(family)
    cfg.vocab_size = 400
    cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = 0, 1, 2
    cfg.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(FIXTURES / "tiny-llama" / name, folder / name)
    return str(folder)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_choices_scored_on_the_prompt_cache_equal_whole_sequences(tmp_path, family):
    dm = make_dm(tmp_path, max_eval_examples=6)
    dm.setup("validate")
    torch.manual_seed(0)
    module = MultiTaskLoRAModule(
        ModelSpec(name_or_path=family_dir(tmp_path, family), random_init=True, dtype="float64"),
        adapter=AdapterConfig(method="cgc_lora", r=4),
        task_names=dm.task_names,
        task_clusters=dm.task_clusters,
    ).eval()
    with torch.no_grad():
        for _, p in adapter_parameters(module.model):  # B starts at zero: make the adapters matter
            p.normal_(0, 0.3)
    batch = next(iter(dm.val_dataloader()[0]))  # tiny_plausible: two choices per example
    assert (batch["prompt_mask"][:, 0] == 0).any(), "the batch should hold prompts of different lengths"
    calls = []  # batch size of each forward of the base model
    module.model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape[0]), with_kwargs=True)
    with torch.no_grad():
        cached = module.choice_loglik(batch, reuse_prompt=True)
        whole = module.choice_loglik(batch, reuse_prompt=False)
    B, N = len(batch["target_index"]), len(batch["choice_example"])
    assert calls == [B, N, N], "the cached path runs the prompts once, then the choices alone"
    assert cached.dtype == torch.float64 and cached.shape == batch["choice_example"].shape
    torch.testing.assert_close(cached, whole, rtol=1e-9, atol=1e-9)
    assert (whole < 0).all()


def test_eval_scores_from_metrics_on_other_devices_are_averaged_on_the_module_device(tmp_path):
    """On a GPU, choice accuracy computes on the module's device while ROUGE/BLEU/SQuAD compute on the host.

    Without a GPU, the meta device stands in for the accelerator: the module reports ``meta`` as its
    device and its choice metric returns a ``meta`` tensor, while the text metric really computes on the
    CPU. Averaging them used to fail with "Expected all tensors to be on the same device".
    """
    module = MultiTaskLoRAModule(
        ModelSpec(name_or_path=str(FIXTURES / "tiny-llama"), random_init=True),
        adapter=AdapterConfig(method="cgc_lora", r=2),
        task_names=["choose", "summarise"],
        task_metrics=["accuracy", "rouge_l"],
    )
    choice, text = module.metrics["val"]
    text.update_texts(["the cat sat", "a dog"], [["the cat sat"], ["the dog ran"]])
    rouge = float(text.compute())
    choice.compute = lambda: torch.tensor(0.25, device="meta")
    module._device = torch.device("meta")  # what .to("cuda") sets; no parameter is moved
    logged = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, value)
    module._log_eval("val")
    assert set(logged) == {"val/choose/accuracy", "val/summarise/rouge_l", "val/avg/score"}
    assert all(v.device.type == "meta" and v.dtype == torch.float32 for v in logged.values())
    assert 0 < rouge < 1
    # the average itself, recomputed on the host with the module back on the CPU
    module._device = torch.device("cpu")
    choice.compute = lambda: torch.tensor(0.25)
    text.update_texts(["the cat sat", "a dog"], [["the cat sat"], ["the dog ran"]])
    module._log_eval("val")
    torch.testing.assert_close(logged["val/avg/score"], torch.tensor((0.25 + rouge) / 2), rtol=1e-6, atol=1e-6)


def test_choice_predictions_under_a_bf16_default_dtype(tmp_path):
    """``precision="bf16-true"`` makes bf16 the default dtype while log-likelihoods stay float32."""
    dm = make_dm(tmp_path, max_eval_examples=6)
    dm.setup("validate")
    module = MultiTaskLoRAModule(
        ModelSpec(name_or_path=family_dir(tmp_path, "llama"), random_init=True),
        adapter=AdapterConfig(method="cgc_lora", r=4),
        task_names=dm.task_names,
        task_clusters=dm.task_clusters,
    ).eval()
    batch = next(iter(dm.val_dataloader()[0]))
    with torch.no_grad():
        expected = module._choice_predictions(batch)
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # what Lightning's bf16-true precision plugin does
        try:
            got = module._choice_predictions(batch)
        finally:
            torch.set_default_dtype(default)
    assert torch.equal(got, expected)


def test_a_checkpoint_of_other_adapters_is_refused_by_name(tmp_path):
    """Checkpoints hold adapter tensors only and load non-strictly: the module checks the names itself."""

    def module(method: str, r: int = 4) -> MultiTaskLoRAModule:
        return MultiTaskLoRAModule(
            ModelSpec(name_or_path=str(FIXTURES / "tiny-llama"), random_init=True),
            adapter=AdapterConfig(method=method, r=r),
            task_names=["a", "b"],
            task_clusters=["x", "y"],
        )

    saved = module("cgc_lora")
    checkpoint = {"state_dict": saved.state_dict()}
    saved.on_save_checkpoint(checkpoint)
    module("cgc_lora").on_load_checkpoint(dict(checkpoint))  # the same adapters: fine
    with pytest.raises(ValueError, match=r"0 missing \[\], \d+ unexpected .*Was it written with another"):
        module("joint_lora").on_load_checkpoint(dict(checkpoint))
    one_short = dict(checkpoint, state_dict=dict(list(checkpoint["state_dict"].items())[1:]))
    dropped = next(iter(checkpoint["state_dict"]))
    with pytest.raises(ValueError, match=rf"1 missing \['{re.escape(dropped)}'\], 0 unexpected"):
        module("cgc_lora").on_load_checkpoint(one_short)


def test_the_line_end_table_stops_where_decoding_the_whole_continuation_would():
    """The stopping rule reads one token per row against a table; decoding each row's whole continuation and
    looking for a line break after its first non-blank text is the reference."""
    from transformers import AutoTokenizer

    from cgc_lightning.evaluation import FirstLineEnded, LineEndTable

    tok = AutoTokenizer.from_pretrained(FIXTURES / "tiny-llama")
    table = LineEndTable(tok, 410, torch.device("cpu"))  # an embedding larger than the vocabulary
    texts = tok.batch_decode([[v] for v in range(len(tok))], skip_special_tokens=True)
    blank = [v for v, t in enumerate(texts) if not t.strip()]  # newline, spaces, special tokens
    g = torch.Generator().manual_seed(0)
    B, P, steps = 64, 3, 12
    # mostly blank and newline tokens, so rows end early, late, after leading blank lines, or never
    pool = torch.tensor(blank * 6 + list(range(len(tok))))
    ids = torch.cat(
        [torch.randint(0, len(tok), (B, P), generator=g), pool[torch.randint(0, len(pool), (B, steps), generator=g)]], 1
    )
    stop = FirstLineEnded(table, B)
    ended = torch.zeros(B, dtype=torch.bool)
    for k in range(1, steps + 1):
        done = stop(ids[:, : P + k], None)
        reference = torch.tensor(
            ["\n" in t.lstrip() for t in tok.batch_decode(ids[:, P : P + k], skip_special_tokens=True)]
        )
        assert torch.equal(done | ended, reference), f"step {k}"
        ended |= done
    assert 0 < int(ended.sum()) < B, "some rows end and some do not"


def _test_split_and_model(tmp_path, max_new_tokens: int, **data) -> tuple:
    """The fixture tasks' test split (6 examples a task) and a float64 tiny Llama with CGC-LoRA for them."""
    torch.manual_seed(0)
    dm = make_dm(tmp_path, max_eval_examples=6, **data)
    dm.setup("test")
    module = MultiTaskLoRAModule(
        ModelSpec(name_or_path=family_dir(tmp_path, "llama"), random_init=True, dtype="float64"),
        adapter=AdapterConfig(method="cgc_lora", r=4),
        task_names=dm.task_names,
        task_clusters=dm.task_clusters,
        task_metrics=dm.task_metrics,
        max_new_tokens=max_new_tokens,
    ).eval()
    return dm, module


def _evaluate(module, dm, mix: bool) -> tuple[dict, list]:
    """One test pass of ``module`` over ``dm``'s test loaders: what it logs, and its per-example rows in order."""
    logged = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    with torch.no_grad():
        for loader in dm._eval_loaders("test", mix=mix):
            for batch in loader:
                module._eval_step(batch, "test")
    rows = sorted(module.examples.pop("test"), key=lambda r: (r["task"], r["example_id"]))
    module._log_eval("test")
    return logged, rows


def _perturb_adapters(module) -> None:
    """B starts at zero: make the adapters matter."""
    with torch.no_grad():
        for _, p in adapter_parameters(module.model):
            p.normal_(0, 0.3)


def test_mixed_task_batches_score_every_task_as_per_task_loaders_do(tmp_path):
    """The same model scores the same examples the same, whether a batch holds one task or several (float64):
    per-task metrics and losses, and every per-example record."""
    dm, module = _test_split_and_model(tmp_path, max_new_tokens=6, eval_batch_size=4)
    _perturb_adapters(module)
    (mixed_loader,) = dm._eval_loaders("test", mix=True)
    assert any(len(b["task_rows"]) > 1 for b in mixed_loader), "the mixed loader must mix tasks"
    per_task, per_task_rows = _evaluate(module, dm, mix=False)
    mixed, mixed_rows = _evaluate(module, dm, mix=True)
    assert set(mixed) == set(per_task) and any(k.endswith("/loss") for k in mixed)
    for key, value in per_task.items():
        assert mixed[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert mixed_rows == per_task_rows and len(mixed_rows) == sum(c["test"] for c in dm.example_counts().values())


@pytest.mark.parametrize("mix", [True, False])
def test_a_generation_batch_size_of_its_own_scores_as_the_default_does(tmp_path, mix):
    """``generate_batch_size`` only regroups the generated rows (float64): per-task metrics and losses, and every
    per-example record, equal those of the default (every batch ``eval_batch_size``), in either layout."""
    dm, module = _test_split_and_model(tmp_path, max_new_tokens=6, eval_batch_size=2)
    _perturb_adapters(module)
    bigger = make_dm(tmp_path, max_eval_examples=6, eval_batch_size=2, generate_batch_size=7)  # the same cache
    bigger.setup("test")
    sizes = {
        name: sorted({(b["kind"], len(b["references"])) for loader in d._eval_loaders("test", mix=mix) for b in loader})
        for name, d in (("default", dm), ("bigger", bigger))
    }
    assert max(n for kind, n in sizes["bigger"] if kind == "text") > 2, "generated rows in larger batches"
    assert {n for kind, n in sizes["bigger"] if kind == "choice"} == {2} == {n for _, n in sizes["default"]}
    default, default_rows = _evaluate(module, dm, mix)
    regrouped, regrouped_rows = _evaluate(module, bigger, mix)
    assert set(regrouped) == set(default) and any(k.endswith("/loss") for k in default)
    for key, value in default.items():
        assert regrouped[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert regrouped_rows == default_rows and len(default_rows) == sum(c["test"] for c in dm.example_counts().values())
    generated = [r["prediction"] for r in default_rows if r["task"] != "plausible"]
    assert len(set(generated)) > 1, "the generated answers differ from row to row (a real comparison)"


def test_batches_of_ones_own_loader_without_task_groups_are_scored_too(tmp_path):
    """A loader of one's own (the plain ``Collator``, no ``kind``/``task_rows``): each task's rows are found from
    ``task_ids`` and a batch of choice tasks is scored by its choices, as the data module's batches are."""
    from datamodules.collate import Collator

    dm, module = _test_split_and_model(tmp_path, max_new_tokens=4)
    plain = Collator(dm.tokenizer.pad_token_id, dm.task_cluster_ids, eval_mode=True)
    with torch.no_grad():
        for rows in dm._build()["test"]:
            module._eval_step(plain(rows), "test")
        ours = {t: module.metrics["test"][i].compute().item() for i, t in enumerate(dm.task_names)}
        for m in module.metrics["test"]:
            m.reset()
        for loader in dm._eval_loaders("test", mix=True):
            for batch in loader:
                module._eval_step(batch, "test")
    assert ours == {t: module.metrics["test"][i].compute().item() for i, t in enumerate(dm.task_names)}
    assert module.examples.pop("test"), "per-example rows recorded from the plain batches too"
