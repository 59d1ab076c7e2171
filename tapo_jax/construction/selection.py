"""Difficulty-aware Candidate Selection (DCS, paper §3.2).

A query is eligible (in its "zone of proximal development") iff it has at least ``n_pos`` correct
and at least ``n_neg`` incorrect responses among its K rollouts. For each eligible query, up to
``m_max`` incorrect responses are drawn uniformly without replacement, and each is paired with a
correct reference drawn uniformly (with replacement) from the query's correct set.

Every draw comes from an explicit ``numpy.random.Generator``; :func:`selection_rng` derives one
from (seed, step), so a resumed run pairs exactly as the uninterrupted run did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

__all__ = ["Pair", "Selection", "select_candidates", "selection_rng"]


class Pair(NamedTuple):
    """(query_idx, wrong_sample_idx, ref_sample_idx)."""

    query: int  # query index q in [0, Q)
    wrong: int  # sample index of the incorrect response, in [0, K)
    ref: int  # sample index of the correct reference, in [0, K)


@dataclass(frozen=True)
class Selection:
    pairs: list[Pair]
    eligible: np.ndarray  # bool[Q]
    num_correct: np.ndarray  # int[Q]
    num_incorrect: np.ndarray  # int[Q]

    @property
    def eligible_share(self) -> float:
        """Share of queries that are eligible (0 for an empty batch)."""
        return float(self.eligible.mean()) if self.eligible.size else 0.0


def selection_rng(seed: int, step: int) -> np.random.Generator:
    """The DCS generator of training step ``step`` (independent of every other stream)."""
    return np.random.default_rng(np.random.SeedSequence([seed, step, 0xDC5]))


def _as_generator(rng: Any) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)):
        return np.random.default_rng(int(rng))
    try:  # a JAX PRNG key (typed or raw uint32)
        import jax

        data = np.asarray(jax.random.key_data(rng) if jax.dtypes.issubdtype(
            rng.dtype, jax.dtypes.prng_key) else rng).astype(np.uint32).ravel()
        return np.random.default_rng(np.random.SeedSequence(data.tolist()))
    except Exception as e:
        raise TypeError(
            f"rng must be a numpy Generator, an int seed or a JAX key, got {rng!r}") from e


def select_candidates(
    rewards: np.ndarray,
    *,
    n_pos: int = 2,
    n_neg: int = 4,
    m_max: int = 4,
    rng: Any,
    valid: np.ndarray | None = None,
) -> Selection:
    """DCS on a [Q, K] reward matrix.

    Args:
      rewards: float[Q, K]; a response is correct iff its reward is > 0.
      n_pos, n_neg: eligibility thresholds on the numbers of correct / incorrect responses.
      m_max: at most this many incorrect responses per eligible query.
      rng: numpy Generator (advanced in place), int seed or JAX key.
      valid: optional bool[Q, K]; invalid responses are neither candidates nor references.

    Returns:
      :class:`Selection` with pairs in query order (within a query, in sample order of the
      chosen incorrect responses).
    """
    r = np.asarray(rewards, np.float64)
    if r.ndim != 2:
        raise ValueError(f"rewards must be [Q, K], got shape {r.shape}")
    if n_pos < 1 or n_neg < 1 or m_max < 1:
        raise ValueError(f"n_pos, n_neg, m_max must be >= 1, got {n_pos}, {n_neg}, {m_max}")
    v = np.ones(r.shape, bool) if valid is None else np.asarray(valid, bool)
    if v.shape != r.shape:
        raise ValueError(f"valid shape {v.shape} != rewards shape {r.shape}")
    gen = _as_generator(rng)
    correct = (r > 0) & v
    incorrect = (r <= 0) & v
    n_c, n_i = correct.sum(1), incorrect.sum(1)
    eligible = (n_c >= n_pos) & (n_i >= n_neg)
    pairs: list[Pair] = []
    for q in np.flatnonzero(eligible):
        neg = np.flatnonzero(incorrect[q])
        pos = np.flatnonzero(correct[q])
        m = min(m_max, len(neg))
        chosen = np.sort(gen.choice(neg, size=m, replace=False))
        refs = gen.choice(pos, size=m, replace=True)
        pairs.extend(Pair(int(q), int(w), int(p)) for w, p in zip(chosen, refs))
    return Selection(pairs, eligible, n_c.astype(np.int64), n_i.astype(np.int64))
