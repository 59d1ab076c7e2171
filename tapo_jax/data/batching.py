"""Assemble the fixed-shape training batch (:class:`tapo_jax.types.TrainBatch`) from rows of
(prompt ids, completion ids, query index, is_reflection, reward).

Layout (right padding, see tapo_jax/types.py): row b holds its P prompt tokens, then its C
completion tokens, then padding. ``loss_mask[b, t] = 1`` exactly for t in [P + S, P + C) (entry t
refers to predicting ``tokens[b, t]``; S is the row's ``loss_start``, 0 unless the start of the
completion is context only), so prompt and padding tokens are never trained.
Shapes come from buckets (T from ``length_buckets``, B from ``row_buckets``) so that the jitted
step compiles once per bucket; padding rows have ``row_mask = 0``.

``group_ids`` and ``advantages`` are left at zero here: both are computed on the device from
``query_index``, ``is_reflection`` and ``rewards`` by :func:`tapo_jax.rl.tapo_advantages`
(DAE, paper Eq. 5) before the update.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tapo_jax.types import TrainBatch

__all__ = [
    "BatchStats",
    "Row",
    "build_batch_arrays",
    "build_train_batch",
    "pick_bucket",
    "power_of_two_buckets",
]


@dataclass(frozen=True)
class Row:
    prompt_ids: Sequence[int]
    completion_ids: Sequence[int]
    query_index: int
    is_reflection: bool = False
    reward: float = 0.0
    logprobs: Sequence[float] | None = None  # per completion token, optional (old_logprobs)
    # completion tokens before this index are context only (loss-masked), e.g. the erroneous
    # prefix of a reconstruction under rl.ref_loss_from_reflection
    loss_start: int = 0
    # (start, end) completion tokens of a reconstruction's reflection line (diagnostics)
    reflection_span: tuple[int, int] | None = None


@dataclass(frozen=True)
class BatchStats:
    num_rows: int  # real rows
    rows: int  # B (row bucket)
    length: int  # T (length bucket)
    truncated_rows: int  # rows whose completion was cut to fit T
    truncated_tokens: int  # completion tokens removed by truncation
    response_tokens: int  # trained tokens (sum of loss_mask)


def power_of_two_buckets(lo: int, hi: int) -> tuple[int, ...]:
    """Powers of two from ``lo`` up to the first >= ``hi`` (hi itself ends the list)."""
    out, b = [], max(1, lo)
    while b < hi:
        out.append(b)
        b *= 2
    out.append(hi)
    return tuple(sorted(set(out)))


def pick_bucket(n: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= n, or the largest bucket when none is large enough."""
    bs = sorted(buckets)
    for b in bs:
        if b >= n:
            return b
    return bs[-1]


def build_batch_arrays(
    rows: Sequence[Row],
    *,
    num_queries: int,
    pad_id: int,
    length_buckets: Sequence[int] | None = None,
    row_buckets: Sequence[int] | None = None,
    max_len: int = 4096,
    row_multiple: int = 1,
) -> tuple[dict[str, np.ndarray], BatchStats]:
    """Host (NumPy) arrays of a TrainBatch, keyed by field name, and batch statistics.

    ``length_buckets`` defaults to powers of two from 16 to ``max_len``; a row longer than the
    largest bucket has its completion truncated (counted in the stats; a prompt that alone does
    not fit raises). ``row_buckets`` defaults to powers of two; the chosen B is rounded up to a
    multiple of ``row_multiple`` (e.g. the number of data-parallel devices).
    """
    if not rows:
        raise ValueError("build_batch_arrays: no rows")
    if row_multiple < 1:
        raise ValueError(f"row_multiple must be >= 1, got {row_multiple}")
    n = len(rows)
    lengths = [len(r.prompt_ids) + len(r.completion_ids) for r in rows]
    if length_buckets is None:
        length_buckets = power_of_two_buckets(16, max_len)
    T = pick_bucket(max(lengths), length_buckets)
    if row_buckets is None:
        row_buckets = (1 << (n - 1).bit_length(),)  # next power of two
    B = pick_bucket(n, row_buckets)
    if B < n:
        raise ValueError(f"{n} rows exceed the largest row bucket {B}")
    B = -(-B // row_multiple) * row_multiple

    tokens = np.full((B, T), pad_id, np.int32)
    positions = np.zeros((B, T), np.int32)
    attention_mask = np.zeros((B, T), np.int32)
    loss_mask = np.zeros((B, T), np.float32)
    old_logprobs = np.zeros((B, T), np.float32)
    query_index = np.zeros((B,), np.int32)
    is_reflection = np.zeros((B,), bool)
    rewards = np.zeros((B,), np.float32)
    row_mask = np.zeros((B,), np.float32)
    truncated_rows = truncated_tokens = 0
    for b, r in enumerate(rows):
        P, C = len(r.prompt_ids), len(r.completion_ids)
        if P + min(C, 1) > T:
            raise ValueError(f"row {b}: prompt of {P} tokens leaves no room for a response in "
                             f"the largest length bucket ({T}); raise the bucket or max_len")
        if not 0 <= r.query_index < num_queries:
            raise ValueError(f"row {b}: query_index {r.query_index} not in [0, {num_queries})")
        keep = min(C, T - P)
        if keep < C:
            truncated_rows += 1
            truncated_tokens += C - keep
        L = P + keep
        tokens[b, :P] = np.asarray(r.prompt_ids, np.int32)
        tokens[b, P:L] = np.asarray(r.completion_ids[:keep], np.int32)
        positions[b, :L] = np.arange(L, dtype=np.int32)
        attention_mask[b, :L] = 1
        loss_mask[b, P + min(max(r.loss_start, 0), keep):L] = 1.0
        if r.logprobs is not None:
            if len(r.logprobs) != C:
                raise ValueError(f"row {b}: {len(r.logprobs)} logprobs for {C} completion tokens")
            old_logprobs[b, P:L] = np.asarray(r.logprobs[:keep], np.float32)
        query_index[b] = r.query_index
        is_reflection[b] = bool(r.is_reflection)
        rewards[b] = r.reward
        row_mask[b] = 1.0
    loss_mask[:, 0] = 0.0  # column 0 is never predicted
    arrays = dict(
        tokens=tokens, positions=positions, attention_mask=attention_mask, loss_mask=loss_mask,
        query_index=query_index, is_reflection=is_reflection, rewards=rewards, row_mask=row_mask,
        group_ids=np.zeros((B,), np.int32), advantages=np.zeros((B,), np.float32), old_logprobs=old_logprobs,
        ref_logprobs=np.zeros((B, T), np.float32),
    )
    stats = BatchStats(num_rows=n, rows=B, length=T, truncated_rows=truncated_rows,
                       truncated_tokens=truncated_tokens, response_tokens=int(loss_mask.sum()))
    return arrays, stats


def build_train_batch(rows: Sequence[Row], **kwargs):
    """:func:`build_batch_arrays` as a ``TrainBatch`` of host arrays (same kwargs), to be placed
    on the devices once (:func:`tapo_jax.train.assembly.place_batch`).
    Returns ``(TrainBatch, BatchStats)``."""
    arrays, stats = build_batch_arrays(rows, **kwargs)
    return TrainBatch(**arrays), stats
