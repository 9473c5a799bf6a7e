"""Cold-cache races: processes started at once on an empty cache build each cached folder once and share it."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from cgc_lightning import cache
from cgc_lightning.cache import build_once

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "tiny-llama"
PROCESSES = 4


def write_tiny_gguf(path: Path) -> np.ndarray:
    """A 2-layer Llama GGUF with the fixture's byte-level BPE vocabulary; returns its embedding matrix."""
    import gguf

    config = json.loads((TINY / "config.json").read_text())
    tok = json.loads((TINY / "tokenizer.json").read_text())
    special = {t["content"]: t["id"] for t in tok["added_tokens"]}
    ids = tok["model"]["vocab"] | special
    tokens = sorted(ids, key=ids.get)
    h, ffn, kv = config["hidden_size"], config["intermediate_size"], config["num_key_value_heads"] * config["head_dim"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(h)
    writer.add_feed_forward_length(ffn)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_dimension_count(config["head_dim"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])  # 3: control, 1: normal
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    rng = np.random.default_rng(0)
    weight = lambda *shape: (rng.standard_normal(shape) * 0.02).astype(np.float32)  # noqa: E731
    embed = weight(len(tokens), h)
    writer.add_tensor("token_embd.weight", embed)  # no output.weight: tied embeddings
    writer.add_tensor("output_norm.weight", np.ones(h, np.float32))
    for i in range(config["num_hidden_layers"]):
        for name, shape in [
            ("attn_q", (h, h)),
            ("attn_k", (kv, h)),
            ("attn_v", (kv, h)),
            ("attn_output", (h, h)),
            ("ffn_gate", (ffn, h)),
            ("ffn_up", (ffn, h)),
            ("ffn_down", (h, ffn)),
        ]:
            writer.add_tensor(f"blk.{i}.{name}.weight", weight(*shape))
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(h, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(h, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return embed


def race(worker, *args) -> list:
    """Run ``worker(barrier, *args)`` in PROCESSES fresh processes released together; results in rank order."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(PROCESSES), ctx.Queue()
    procs = [ctx.Process(target=_report, args=(rank, barrier, results, worker, args)) for rank in range(PROCESSES)]
    for p in procs:
        p.start()
    out = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    failed = {rank: r for rank, r in out.items() if isinstance(r, str) and r.startswith("FAILED")}
    assert not failed, failed
    return [out[rank] for rank in range(PROCESSES)]


def _report(rank, barrier, results, worker, args) -> None:
    try:
        results.put((rank, worker(barrier, *args)))
    except BaseException as e:  # the parent shows every failure, not a bare timeout
        results.put((rank, f"FAILED: {type(e).__name__}: {e}"))


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _convert(barrier, folder: str, cache_dir: str) -> tuple[str, bool]:
    from cgc_lightning.hf import ModelSpec, model_location

    records = _Records()
    logging.getLogger("cgc_lightning.hf").addHandler(records)
    spec = ModelSpec(name_or_path=folder, gguf_file="tiny.gguf", cache_dir=cache_dir)
    barrier.wait()  # everything is imported: now all of them find the cache empty at once
    location = model_location(spec)
    return location, any(m.startswith("converting ") for m in records.messages)


def _tokenise(barrier, cache_dir: str) -> tuple[int, dict]:
    from cgc_lightning.hf import ModelSpec
    from datamodules.multitask import MultiTaskDataModule

    task = {
        "name": "qa",
        "cluster": "c",
        "source": str(FIXTURES / "data" / "qa.jsonl"),
        "prompt": "{question}\nA:",
        "target": "answer",
        "metric": "exact_match",
    }
    dm = MultiTaskDataModule(
        tasks=[task], tokenizer=ModelSpec(name_or_path=str(TINY), random_init=True), cache_dir=cache_dir
    )
    dm.tokenizer  # noqa: B018 -- loaded before the race, so the processes race over the cache alone
    barrier.wait()
    splits = dm._build()
    return dm.cache_hits, splits


def test_four_processes_convert_one_gguf_once(tmp_path):
    from transformers import AutoModelForCausalLM

    embed = write_tiny_gguf(tmp_path / "tiny.gguf")
    cache_dir = tmp_path / "cache"
    results = race(_convert, str(tmp_path), str(cache_dir))
    assert len({location for location, _ in results}) == 1, results
    assert sum(converted for _, converted in results) == 1, f"conversions per process: {results}"
    location = Path(results[0][0])
    assert sorted(p.name for p in cache_dir.iterdir()) == [location.name, location.name + ".lock"], "no temp left"
    model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32)
    torch.testing.assert_close(model.get_input_embeddings().weight, torch.from_numpy(embed), rtol=0, atol=0)


def test_four_processes_tokenise_one_task_once(tmp_path):
    results = race(_tokenise, str(tmp_path / "data"))
    assert sorted(hits for hits, _ in results) == [0, 1, 1, 1], "one process writes, the others read its cache"
    splits = [s for _, s in results]
    assert all(s == splits[0] for s in splits[1:])
    assert [len(splits[0][s][0]) for s in ("train", "val", "test")] == [32, 4, 4]


# ------------------------------------------------------------------------------- the helper alone


def test_failed_build_leaves_nothing_and_the_next_one_builds(tmp_path):
    target = tmp_path / "thing"
    (tmp_path / "thing.tmp-999-dead").mkdir()  # left by a killed process

    def broken(tmp):
        tmp.mkdir()
        (tmp / "half").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        build_once(target, broken, marker="done")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thing.lock"]

    def good(tmp):
        tmp.mkdir()
        (tmp / "done").write_text("ok")

    assert build_once(target, good, marker="done") is True
    assert build_once(target, broken, marker="done") is False, "a ready folder is reused, not rebuilt"
    assert (target / "done").read_text() == "ok"


def test_a_waiting_process_says_whom_it_waits_for(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(cache, "WAIT_LOG_S", 0.1)
    target, started, release = tmp_path / "thing", threading.Event(), threading.Event()

    def slow(tmp):
        started.set()
        release.wait(10)
        tmp.mkdir()
        (tmp / "done").write_text("first")

    first = threading.Thread(target=lambda: build_once(target, slow, marker="done"))
    first.start()
    started.wait(10)
    threading.Timer(0.5, release.set).start()
    with caplog.at_level(logging.WARNING, logger="cgc_lightning.cache"):
        assert build_once(target, slow, marker="done") is False
    first.join()
    assert [r.getMessage() for r in caplog.records] == [f"waiting for another process building {target}"]
    assert (target / "done").read_text() == "first"


def test_a_truncated_gguf_is_named_and_leaves_no_cache(tmp_path):
    from cgc_lightning.hf import ModelLoadError, ModelSpec, model_location

    folder = tmp_path / "model"
    folder.mkdir()
    write_tiny_gguf(folder / "tiny.gguf")
    data = (folder / "tiny.gguf").read_bytes()
    (folder / "tiny.gguf").write_bytes(data[: len(data) * 2 // 3])  # an interrupted download
    spec = ModelSpec(name_or_path=str(folder), gguf_file="tiny.gguf", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ModelLoadError, match=r"tiny.gguf \([0-9,]+ bytes\) could not be read.*truncated or corrupt"):
        model_location(spec)
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []
