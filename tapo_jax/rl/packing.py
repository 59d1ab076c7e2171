"""Sequence packing: the rows of a right-padded [B, T] batch laid end to end in [R, L] rows.

A forward of a packed batch (old / reference log-probs, the update) runs over R x L tokens, about
the real token count, instead of B x T (every row padded to the longest). Segment ids keep
attention inside each original row and positions restart at 0 per row (the model's
``segment_ids``). Per-token outputs are gathered back to the [B, T] layout (:func:`unpack`), so
advantages, masks, old / reference log-probs and every loss stay per original row, unchanged.

Micro-batches: the step and the log-prob forward split a batch into M strided micro-batches
(rows i, i + M, ...). The rows of micro-batch i are packed into packed rows i, i + M, ..., and
``index`` addresses the packed rows of its own micro-batch, so splitting both layouts the same
way keeps every micro-batch self-contained.

Letters: B rows, T row length, R packed rows, L packed length, M micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class Packing:
    """Where the rows of a [B, T] batch sit in R packed rows of length L."""

    tokens: jax.Array  # int32[R, L]
    positions: jax.Array  # int32[R, L]  0.. within each segment
    segment_ids: jax.Array  # int32[R, L]  1, 2, .. per segment of a packed row; 0 = padding
    index: jax.Array  # int32[B, T]  flat index into its micro-batch's [R / M * L] (0 at padding)


@dataclass(frozen=True)
class PackingStats:
    real_tokens: int
    unpacked_tokens: int  # B x T
    packed_tokens: int  # R x L

    @property
    def padded_share_unpacked(self) -> float:
        return 1.0 - self.real_tokens / max(self.unpacked_tokens, 1)

    @property
    def padded_share_packed(self) -> float:
        return 1.0 - self.real_tokens / max(self.packed_tokens, 1)


def first_fit(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins of row ids (first-fit decreasing), each bin's lengths summing to <= capacity."""
    bins: list[list[int]] = []
    room: list[int] = []
    for r in sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i)):
        n = int(lengths[r])
        if n > capacity:
            raise ValueError(f"row {r} has {n} tokens; packed rows hold {capacity}")
        for j, free in enumerate(room):
            if n <= free:
                bins[j].append(r)
                room[j] -= n
                break
        else:
            bins.append([r])
            room.append(capacity - n)
    return bins


def packed_rows(bins_per_group: int, row_multiple: int = 1) -> int:
    """Packed rows per micro-batch: ``row_multiple`` times 1, 2, 3, 4, 6, 8, 12, 16, ... (a
    power of two or 1.5 times one: few shapes, at most a third of the rows padding)."""
    units = -(-max(bins_per_group, 1) // row_multiple)
    p = 1 << (units - 1).bit_length()
    return row_multiple * (3 * p // 4 if p >= 4 and units <= 3 * p // 4 else p)


def pack(tokens: np.ndarray, attention_mask: np.ndarray, *, length: int, groups: int = 1,
         row_multiple: int = 1) -> tuple[Packing, PackingStats]:
    """Pack right-padded rows (real tokens where ``attention_mask``) into rows of ``length``.

    ``groups`` = M micro-batches (must divide B); each packed row count per micro-batch is a
    multiple of ``row_multiple`` (data-parallel devices). Returns host (NumPy) arrays.
    """
    tokens = np.asarray(tokens)
    mask = np.asarray(attention_mask).astype(bool)
    B, T = tokens.shape
    if B % groups:
        raise ValueError(f"{groups} micro-batches must divide the batch's {B} rows")
    lengths = mask.sum(axis=1)
    if np.any(mask & (np.arange(T)[None, :] >= lengths[:, None])):
        raise ValueError("packing needs right-padded rows (real tokens first)")
    plans = [first_fit(lengths[g::groups], length) for g in range(groups)]
    per_group = packed_rows(max(len(p) for p in plans), row_multiple)
    R = per_group * groups
    p_tok = np.zeros((R, length), np.int32)
    p_pos = np.zeros((R, length), np.int32)
    p_seg = np.zeros((R, length), np.int32)
    index = np.zeros((B, T), np.int32)
    for g, bins in enumerate(plans):
        for local_row, members in enumerate(bins):
            r = local_row * groups + g  # packed row r belongs to micro-batch r % M
            at = 0
            for seg, i in enumerate(members, start=1):
                b = i * groups + g  # row i of group g is batch row b
                n = int(lengths[b])
                p_tok[r, at:at + n] = tokens[b, :n]
                p_pos[r, at:at + n] = np.arange(n)
                p_seg[r, at:at + n] = seg
                index[b, :n] = local_row * length + at + np.arange(n)
                at += n
    stats = PackingStats(real_tokens=int(lengths.sum()), unpacked_tokens=B * T,
                         packed_tokens=R * length)
    return Packing(tokens=p_tok, positions=p_pos, segment_ids=p_seg, index=index), stats


def unpack(x: jax.Array, index: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """[R, L, ...] values of packed rows -> [B, T, ...] at the original rows (``index`` from
    the same micro-batch); 0 where ``valid`` (bool [B, T]) is False."""
    flat = x.reshape((-1,) + x.shape[2:])
    out = jnp.take(flat, index, axis=0)
    if valid is None:
        return out
    return jnp.where(valid.reshape(valid.shape + (1,) * (out.ndim - 2)), out, 0)


def micro_batches(rows: int, micro_batch_size: int) -> int:
    """M as the train step and the log-prob forward split ``rows`` (``train.micro_batch_size``)."""
    if micro_batch_size <= 0 or micro_batch_size >= rows:
        return 1
    return rows // micro_batch_size


def pack_batch(batch: Any, *, micro_batch_size: int = 0, row_multiple: int = 1,
               rows_per_pack: int = 2) -> tuple[Any, PackingStats]:
    """``batch`` (a TrainBatch of host or device arrays) with its :class:`Packing` attached as
    host arrays (placed with the batch): packed rows of ``rows_per_pack`` times the batch's T
    (rows longer than half of T then still pair up), micro-batches as the step will split it."""
    tokens = np.asarray(batch.tokens)
    p, stats = pack(tokens, np.asarray(batch.attention_mask),
                    length=rows_per_pack * tokens.shape[1],
                    groups=micro_batches(tokens.shape[0], micro_batch_size),
                    row_multiple=row_multiple)
    return batch.replace(packing=p), stats
