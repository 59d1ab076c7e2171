"""Difficulty-aware Candidate Selection: eligibility, caps, pairing and determinism."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tapo_jax.construction.selection import Pair, select_candidates, selection_rng


def _group(n_correct, n_wrong):
    return [1.0] * n_correct + [0.0] * n_wrong


@pytest.mark.parametrize("n_correct, n_wrong, eligible, n_pairs", [
    (2, 6, True, 4),    # exactly n_pos correct; m_max = 4 caps 6 wrong
    (1, 7, False, 0),   # one correct short of n_pos
    (4, 4, True, 4),    # exactly n_neg wrong
    (5, 3, False, 0),   # one wrong short of n_neg
    (8, 0, False, 0),   # all correct
    (0, 8, False, 0),   # all wrong
    (3, 5, True, 4),
])
def test_counts_on_hand_made_groups(n_correct, n_wrong, eligible, n_pairs):
    sel = select_candidates(np.array([_group(n_correct, n_wrong)]), n_pos=2, n_neg=4, m_max=4,
                            rng=0)
    assert bool(sel.eligible[0]) is eligible
    assert len(sel.pairs) == n_pairs
    assert sel.num_correct[0] == n_correct and sel.num_incorrect[0] == n_wrong


def test_m_max_cap_and_fewer_wrong_than_m_max():
    r = np.array([_group(2, 6), _group(2, 6)])
    assert len(select_candidates(r, n_pos=2, n_neg=2, m_max=10, rng=0).pairs) == 12
    assert len(select_candidates(r, n_pos=2, n_neg=2, m_max=1, rng=0).pairs) == 2
    assert len(select_candidates(r, n_pos=2, n_neg=6, m_max=6, rng=0).pairs) == 12


def test_pairs_index_the_right_sets_and_share():
    rewards = np.array([
        [1, 0, 0, 1, 0, 0, 0, 0],  # eligible: 2 correct, 6 wrong
        [1, 1, 1, 1, 1, 1, 1, 0],  # too easy
        [0, 0.5, 0, 0, 0, 2, 0, 0],  # eligible (rewards > 0 count as correct)
        [0, 0, 0, 0, 0, 0, 0, 0],  # too hard
    ], dtype=np.float32)
    sel = select_candidates(rewards, n_pos=2, n_neg=4, m_max=4, rng=np.random.default_rng(5))
    assert sel.eligible.tolist() == [True, False, True, False]
    assert sel.eligible_share == 0.5
    assert all(isinstance(p, Pair) for p in sel.pairs)
    for q in (0, 2):
        mine = [p for p in sel.pairs if p.query == q]
        assert len(mine) == 4
        wrong = [p.wrong for p in mine]
        assert len(set(wrong)) == 4 and wrong == sorted(wrong)  # without replacement, ordered
        assert all(rewards[q, p.wrong] <= 0 and rewards[q, p.ref] > 0 for p in mine)
    q, w, r = sel.pairs[0]  # unpacks as (query_idx, wrong_sample_idx, ref_sample_idx)
    assert q == 0


def test_valid_mask_excludes_samples():
    r = np.array([_group(2, 4)])
    valid = np.ones_like(r, bool)
    valid[0, 0] = False  # one correct sample invalid -> 1 correct left -> not eligible
    assert not select_candidates(r, rng=0, valid=valid).eligible[0]


def test_determinism_by_seed_and_jax_key():
    r = np.random.default_rng(0).integers(0, 2, size=(32, 8)).astype(np.float32)
    a = select_candidates(r, n_pos=1, n_neg=1, m_max=3, rng=selection_rng(7, 3))
    b = select_candidates(r, n_pos=1, n_neg=1, m_max=3, rng=selection_rng(7, 3))
    c = select_candidates(r, n_pos=1, n_neg=1, m_max=3, rng=selection_rng(7, 4))
    assert a.pairs == b.pairs and a.pairs != c.pairs
    import jax

    k1 = select_candidates(r, n_pos=1, n_neg=1, m_max=3, rng=jax.random.key(1))
    k2 = select_candidates(r, n_pos=1, n_neg=1, m_max=3, rng=jax.random.key(1))
    k3 = select_candidates(r, n_pos=1, n_neg=1, m_max=3, rng=jax.random.PRNGKey(2))
    assert k1.pairs == k2.pairs and k1.pairs != k3.pairs


def test_reference_is_uniform_over_the_correct_set():
    r = np.array([[1, 1, 1, 0, 0, 0, 0, 0]], np.float32)
    gen = np.random.default_rng(0)
    counts = np.zeros(8)
    for _ in range(3000):
        for p in select_candidates(r, n_pos=2, n_neg=4, m_max=1, rng=gen).pairs:
            counts[p.ref] += 1
    # 3000 draws over 3 references: each ~1000, binomial sd ~26
    assert counts[3:].sum() == 0
    np.testing.assert_allclose(counts[:3], 1000, atol=120)


@given(seed=st.integers(0, 10_000), n_pos=st.integers(1, 4), n_neg=st.integers(1, 4),
       m_max=st.integers(1, 5))
@settings(max_examples=40, deadline=None)
def test_counts_match_an_independent_formula(seed, n_pos, n_neg, m_max):
    r = np.random.default_rng(seed).integers(0, 2, size=(10, 8)).astype(np.float32)
    sel = select_candidates(r, n_pos=n_pos, n_neg=n_neg, m_max=m_max, rng=seed)
    for q in range(10):
        c = int(r[q].sum())
        w = 8 - c
        ok = c >= n_pos and w >= n_neg
        assert sel.eligible[q] == ok
        assert sum(p.query == q for p in sel.pairs) == (min(m_max, w) if ok else 0)
