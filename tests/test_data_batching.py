"""Training-batch assembly: masks, alignment, buckets and truncation (group ids and advantages
are the device's to fill)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tapo_jax.data.batching import Row, build_batch_arrays, build_train_batch, pick_bucket

PAD = 0


def _rows(spec):
    """spec: (prompt_len, completion_len, query, is_reflection, reward); token values encode
    where they come from: prompt tokens 1000 + i, completion tokens 2000 + i."""
    return [Row(list(range(1000, 1000 + p)), list(range(2000, 2000 + c)), q, refl, r)
            for p, c, q, refl, r in spec]


def test_masks_exclude_prompt_and_padding_tokens():
    spec = [(3, 4, 0, False, 1.0), (5, 1, 1, False, 0.0), (2, 6, 0, True, 1.0)]
    arr, st_ = build_batch_arrays(_rows(spec), num_queries=2, pad_id=PAD, length_buckets=(8, 16),
                                  row_buckets=(4, 8))
    assert arr["tokens"].shape == (4, 8) and st_.rows == 4 and st_.length == 8
    tok, lm, am = arr["tokens"], arr["loss_mask"], arr["attention_mask"]
    # loss exactly on completion tokens (value >= 2000), never on prompt or padding
    np.testing.assert_array_equal(lm, (tok >= 2000).astype(np.float32))
    np.testing.assert_array_equal(am, (tok != PAD).astype(np.int32))
    assert lm.sum() == 4 + 1 + 6 == st_.response_tokens
    assert lm[:, 0].sum() == 0
    # right padding, positions 0.. per real token
    np.testing.assert_array_equal(tok[0], [1000, 1001, 1002, 2000, 2001, 2002, 2003, PAD])
    np.testing.assert_array_equal(arr["positions"][0], [0, 1, 2, 3, 4, 5, 6, 0])
    np.testing.assert_array_equal(arr["positions"][2], np.arange(8))
    assert arr["row_mask"].tolist() == [1, 1, 1, 0]
    assert arr["tokens"][3].tolist() == [PAD] * 8 and arr["loss_mask"][3].sum() == 0
    assert arr["rewards"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert arr["is_reflection"].tolist() == [False, False, True, False]
    assert arr["query_index"].tolist() == [0, 1, 0, 0]
    for k in ("group_ids", "advantages", "old_logprobs", "ref_logprobs"):
        assert not arr[k].any()


def test_truncation_is_counted_and_keeps_the_prompt():
    spec = [(4, 20, 0, False, 1.0), (4, 3, 0, False, 1.0)]
    arr, st_ = build_batch_arrays(_rows(spec), num_queries=1, pad_id=PAD, length_buckets=(8, 16))
    assert st_.length == 16 and st_.truncated_rows == 1 and st_.truncated_tokens == 8
    assert arr["tokens"][0, :4].tolist() == [1000, 1001, 1002, 1003]
    assert arr["loss_mask"][0].sum() == 12
    with pytest.raises(ValueError, match="prompt of 16 tokens"):
        build_batch_arrays(_rows([(16, 1, 0, False, 0.0)]), num_queries=1, pad_id=PAD,
                           length_buckets=(8, 16))
    with pytest.raises(ValueError, match="query_index 3"):
        build_batch_arrays(_rows([(2, 1, 3, False, 0.0)]), num_queries=2, pad_id=PAD)


def test_logprobs_are_aligned_with_completion_tokens():
    rows = [Row([5, 6], [7, 8, 9], 0, False, 1.0, logprobs=[-0.1, -0.2, -0.3])]
    arr, _ = build_batch_arrays(rows, num_queries=1, pad_id=PAD, length_buckets=(8,))
    np.testing.assert_allclose(arr["old_logprobs"][0], [0, 0, -0.1, -0.2, -0.3, 0, 0, 0],
                               rtol=0, atol=1e-7)


def test_row_buckets_and_multiple():
    rows = _rows([(2, 2, 0, False, 0.0)] * 5)
    _, s = build_batch_arrays(rows, num_queries=1, pad_id=PAD)
    assert s.rows == 8  # next power of two
    _, s = build_batch_arrays(rows, num_queries=1, pad_id=PAD, row_buckets=(6, 12), row_multiple=4)
    assert s.rows == 8  # 6 rounded up to a multiple of 4
    with pytest.raises(ValueError, match="exceed the largest row bucket"):
        build_batch_arrays(rows, num_queries=1, pad_id=PAD, row_buckets=(4,))
    assert pick_bucket(9, (8, 16, 32)) == 16 and pick_bucket(99, (8, 16)) == 16


def test_train_batch_types():
    batch, _ = build_train_batch(_rows([(2, 3, 0, True, 1.0)]), num_queries=1, pad_id=PAD)
    dtypes = {k: str(getattr(batch, k).dtype) for k in (
        "tokens", "positions", "attention_mask", "loss_mask", "query_index", "is_reflection",
        "rewards", "row_mask", "group_ids", "advantages", "old_logprobs", "ref_logprobs")}
    assert dtypes == dict(tokens="int32", positions="int32", attention_mask="int32",
                          loss_mask="float32", query_index="int32", is_reflection="bool",
                          rewards="float32", row_mask="float32", group_ids="int32",
                          advantages="float32", old_logprobs="float32", ref_logprobs="float32")


@given(lens=st.lists(st.tuples(st.integers(1, 12), st.integers(0, 12)), min_size=1, max_size=9))
@settings(max_examples=40, deadline=None)
def test_mask_property_against_an_independent_layout(lens):
    spec = [(p, c, 0, False, 0.0) for p, c in lens]
    arr, s = build_batch_arrays(_rows(spec), num_queries=1, pad_id=PAD, length_buckets=(8, 16),
                                row_buckets=(4, 8, 16))
    for b, (p, c) in enumerate(lens):
        keep = min(c, s.length - p)
        row = [1000 + i for i in range(p)] + [2000 + i for i in range(keep)]
        row += [PAD] * (s.length - len(row))
        assert arr["tokens"][b].tolist() == row
        assert arr["loss_mask"][b].tolist() == [0.0] * p + [1.0] * keep + [0.0] * (
            s.length - p - keep)
    assert arr["row_mask"].sum() == len(lens)
