"""Dataset loading, field mapping, prompt formatting, resumable order and accuracy filtering."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tapo_jax.config import DataConfig
from tapo_jax.data import datasets as D
from tapo_jax.data.datasets import DataError, DataIterator, Record

ROWS = [
    {"question": "What is 1 + 1?", "solution": "1 + 1 = 2 #### 2", "uid": "a", "meta": {"q": "x1"}},
    {"question": "What is 2 * 1,000?", "solution": "#### 2,000", "uid": "b", "meta": {"q": "x2"}},
    {"question": "Name 3.", "solution": 3, "uid": 7, "meta": {"q": "x3"}},
]
EXPECTED = [Record("What is 1 + 1?", "2", "a"), Record("What is 2 * 1,000?", "2000", "b"),
            Record("Name 3.", "3", "7")]
FIELDS = dict(prompt_field="question", answer_field="solution", id_field="uid")


def _write(path, rows, fmt):
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({k: [str(r[k]) if k in ("solution", "uid") else r[k] for r in rows]
                          for k in rows[0]})
        pq.write_table(table, path)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet"])
def test_loaders_map_fields_and_extract_gsm8k_answers(tmp_path, fmt):
    path = _write(tmp_path / f"d.{fmt}", ROWS, fmt)
    assert D.load_records(path, **FIELDS) == EXPECTED
    # nested field, ids default to the row index, raw answers kept as written
    recs = D.load_records(path, prompt_field="meta.q", answer_field="solution",
                          answer_format="raw")
    assert [r.prompt for r in recs] == ["x1", "x2", "x3"]
    assert [r.id for r in recs] == ["0", "1", "2"]
    assert recs[0].answer == "1 + 1 = 2 #### 2"


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet"])
def test_missing_field_names_file_and_field(tmp_path, fmt):
    rows = [dict(r) for r in ROWS]
    del rows[1]["solution"]
    if fmt == "parquet":  # a column cannot be absent from one row only: drop it everywhere
        rows = [{k: v for k, v in r.items() if k != "solution"} for r in rows]
    path = _write(tmp_path / f"d.{fmt}", rows, fmt)
    with pytest.raises(DataError, match=r"d\.%s.*'solution'" % fmt):
        D.load_records(path, **FIELDS)


def test_empty_missing_and_malformed_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl.*empty"):
        D.load_records(empty)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        D.load_records(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "x", "answer": "1"}\n{oops\n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        D.load_records(bad)
    txt = tmp_path / "d.csv"
    txt.write_text("a,b\n")
    with pytest.raises(DataError, match="d.csv.*unknown data format"):
        D.load_records(txt)
    nomark = tmp_path / "g.json"
    nomark.write_text(json.dumps([{"problem": "p", "answer": "no marker"}]))
    with pytest.raises(DataError, match="g.json.*####"):
        D.load_records(nomark, answer_format="gsm8k")
    blank = tmp_path / "blank.json"
    blank.write_text(json.dumps([{"problem": "  ", "answer": "1"}]))
    with pytest.raises(DataError, match="blank.json.*'problem'"):
        D.load_records(blank)


def test_hf_kind_without_datasets_package_is_a_clear_error():
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match="pip install datasets"):
            D.load_records("openai/gsm8k", kind="hf")
    else:
        pytest.skip("datasets is installed")


def test_write_then_load_with_default_config_fields(tmp_path):
    path = D.write_records(tmp_path / "sub" / "kept.jsonl", EXPECTED)
    cfg = DataConfig(kind="file", path=str(path), id_field="id")
    assert D.load_from_config(cfg) == EXPECTED


def test_load_from_config_arithmetic_is_seeded():
    cfg = DataConfig(num_train=20, num_eval=5)
    a = D.load_from_config(cfg, seed=1)
    assert a == D.load_from_config(cfg, seed=1)
    assert len(a) == 20 and len(D.load_from_config(cfg, seed=1, eval_split=True)) == 5
    assert all(r.prompt.startswith("Compute ") and int(r.answer) == int(r.answer) for r in a)


class _ChatTok:
    """A minimal tokenizer stand-in that records what the chat template was asked."""

    def __init__(self, template):
        self.chat_template = template
        self.calls = []

    def apply_chat_template(self, messages, **kwargs):
        self.calls.append(kwargs)
        return "|".join(f"{m['role']}:{m['content']}" for m in messages) + "|assistant:"


def test_format_prompt_template_and_qwen3_non_thinking():
    tmpl = "{prompt}\nPut the final answer in \\boxed{}."
    assert D.format_prompt("Q?", None, template=tmpl) == "Q?\nPut the final answer in \\boxed{}."
    qwen = _ChatTok("{% if enable_thinking is defined and enable_thinking is false %}...")
    out = D.format_prompt("Q?", qwen, template=tmpl)
    assert out == "user:Q?\nPut the final answer in \\boxed{}.|assistant:"
    assert qwen.calls[-1] == dict(tokenize=False, add_generation_prompt=True,
                                  enable_thinking=False)
    plain = _ChatTok("{{ messages }}")
    D.format_prompt("Q?", plain, system="sys")
    assert "enable_thinking" not in plain.calls[-1]
    assert D.format_prompt("Q?", plain, chat=False) == "Q?"


def test_epoch_order_is_a_seeded_permutation():
    a = D.epoch_order(50, seed=3, epoch=0)
    assert sorted(a.tolist()) == list(range(50))
    assert np.array_equal(a, D.epoch_order(50, seed=3, epoch=0))
    assert not np.array_equal(a, D.epoch_order(50, seed=3, epoch=1))
    assert not np.array_equal(a, D.epoch_order(50, seed=4, epoch=0))
    assert np.array_equal(D.epoch_order(5, 0, 0, shuffle=False), np.arange(5))


@given(n=st.integers(1, 23), bs=st.integers(1, 9), stop=st.integers(0, 12),
       total=st.integers(1, 15), seed=st.integers(0, 100), shuffle=st.booleans())
@settings(max_examples=50, deadline=None)
def test_resumed_iteration_equals_uninterrupted(n, bs, stop, total, seed, shuffle):
    records = list(range(n))
    full = DataIterator(records, bs, seed=seed, shuffle=shuffle)
    expected = [next(full) for _ in range(stop + total)]
    first = DataIterator(records, bs, seed=seed, shuffle=shuffle)
    got = [next(first) for _ in range(stop)]
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    resumed = DataIterator(records, bs, seed=seed, shuffle=shuffle)
    resumed.load_state_dict(state)
    got += [next(resumed) for _ in range(total)]
    assert got == expected
    # independent reference: concatenated per-epoch permutations, cut into batches
    stream = np.concatenate([D.epoch_order(n, seed, e, shuffle) for e in range(
        (stop + total) * bs // n + 1)])
    ref = [stream[i * bs:(i + 1) * bs].tolist() for i in range(stop + total)]
    assert expected == ref


def test_iterator_rejects_a_changed_dataset():
    it = DataIterator(list(range(10)), 3, seed=0)
    next(it)
    state = it.state_dict()
    with pytest.raises(DataError, match="10 records"):
        DataIterator(list(range(11)), 3, seed=0).load_state_dict(state)
    with pytest.raises(DataError, match="empty"):
        DataIterator([], 3)


def test_filter_by_pass_rate_bounds_are_inclusive():
    recs = [Record(str(i), "1", str(i)) for i in range(6)]
    rates = [0.0, 0.125, 0.5, 0.875, 0.9, 1.0]
    assert [r.id for r in D.filter_by_pass_rate(recs, rates)] == ["1", "2", "3"]
    assert [r.id for r in D.filter_by_pass_rate(recs, rates, lo=0.0, hi=1.0)] == list("012345")
    with pytest.raises(DataError):
        D.filter_by_pass_rate(recs, rates[:-1])


def test_filter_dataset_samples_scores_and_keeps_the_middle():
    recs = [Record(f"Compute {i} + 0.", str(i), str(i)) for i in range(4)]
    correct_counts = {0: 0, 1: 1, 2: 4, 3: 8}  # of n = 8 samples

    def sample_fn(prompts, n):
        out = []
        for p in prompts:
            i = int(p.split()[1])
            out.append([f"\\boxed{{{i}}}"] * correct_counts[i]
                       + [f"\\boxed{{{i + 1}}}"] * (n - correct_counts[i]))
        return out

    kept, rates = D.filter_dataset(recs, sample_fn, 8)  # real verifier (integer fast path)
    np.testing.assert_allclose(rates, [0.0, 0.125, 0.5, 1.0])
    assert [r.id for r in kept] == ["1", "2"]
