"""Rows -> the update batch on the mesh: bucketed host arrays (:mod:`tapo_jax.data.batching`),
packed when ``train.packing``, placed once with the batch sharding (:func:`place_batch`, the one
host-to-device transfer of a batch); padding metrics come from the host arrays.

Row buckets are multiples of the data-parallel size times the micro-batch size and the mini-batch
count; length buckets are powers of two up to the longest prompt plus response or construction,
so the step compiles a bounded number of times whatever the number of constructions.

With ``train.packing`` the shapes are fixed instead: every batch has the largest row bucket and
the largest length bucket (padding rows and columns cost nothing there: the forwards run on the
packed rows), packed into rows of that length, whose count is the only shape that varies (1, 2,
3, 4, 6, 8, 12, ... per micro-batch). An RL run then compiles its update and log-prob forwards
for a few packed-row counts, however the number and length of its rows move from step to step
(without packing, TAPO's reflection rows change both the row and the length bucket).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import numpy as np

from tapo_jax.config import Config, construction_budget
from tapo_jax.data.batching import Row, build_batch_arrays, power_of_two_buckets
from tapo_jax.models import sharding as sharding_lib
from tapo_jax.models.sharding import data_parallel_size
from tapo_jax.rl import packing
from tapo_jax.train import rollout
from tapo_jax.train.step import OPSDBatch
from tapo_jax.types import TrainBatch


def _row_multiple(cfg: Config, mesh: Any) -> int:
    n_dp = data_parallel_size(mesh)
    micro = max(cfg.train.micro_batch_size, 1)
    return math.lcm(n_dp, micro) * cfg.train.mini_batches


def _buckets(cfg: Config, mesh: Any, num_queries: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Row and length buckets: a handful of static shapes, so the step compiles a bounded number
    of times whatever the number of constructions."""
    s, rl = cfg.sampling, cfg.rl
    mult = _row_multiple(cfg, mesh)
    base = num_queries * rl.num_samples
    extra = num_queries * rl.m_max if rl.algorithm == "tapo" else 0
    rows = sorted({-(-(base + f) // mult) * mult for f in (0, extra // 4, extra // 2, extra)})
    longest = s.max_prompt_len + max(s.max_new_tokens, construction_budget(cfg))
    lengths = power_of_two_buckets(32, -(-longest // 16) * 16)
    if cfg.train.packing:  # one [B, T] shape: the forwards run on the packed rows
        return (rows[-1],), (lengths[-1],)
    return tuple(rows), lengths


def place_batch(arrays: Any, mesh: Any) -> Any:
    """Host arrays (the same on every process) as global arrays with their leading dim over
    ``("data", "fsdp")``: each process puts its own devices' rows (an explicit transfer, the
    one a batch makes)."""
    def place(x):
        x = np.asarray(x)
        return sharding_lib.put_global(x.shape, sharding_lib.batch_sharding(mesh, x.ndim),
                                       lambda index: x[index])

    return jax.tree.map(place, arrays)


def _batch_arrays(col: rollout.Collected, cfg: Config, mesh: Any, pad_id: int
                  ) -> tuple[dict[str, np.ndarray], Any]:
    """Host arrays of the bucketed batch (overlong rows keep their reward but train no tokens)
    and its statistics (``response_tokens``: the tokens that train)."""
    rows_b, len_b = _buckets(cfg, mesh, cfg.train.batch_size)
    arrays, stats = build_batch_arrays(
        col.rows, num_queries=max(col.num_queries, 1), pad_id=pad_id, length_buckets=len_b,
        row_buckets=rows_b, max_len=len_b[-1], row_multiple=_row_multiple(cfg, mesh))
    for i in col.overlong_masked:
        arrays["loss_mask"][i] = 0.0
    return arrays, dataclasses.replace(stats, response_tokens=int(arrays["loss_mask"].sum()))


def assemble_batch(col: rollout.Collected, cfg: Config, mesh: Any, pad_id: int
                   ) -> tuple[TrainBatch, Any, dict[str, float]]:
    """Rows -> a bucketed TrainBatch (packed when ``train.packing``) placed on ``mesh``
    (overlong rows keep their reward but train no tokens), its statistics and its padding
    metrics (from the host arrays)."""
    arrays, stats = _batch_arrays(col, cfg, mesh, pad_id)
    batch = TrainBatch(**arrays)
    if cfg.train.packing:
        batch, _ = packing.pack_batch(batch, micro_batch_size=cfg.train.micro_batch_size,
                                      row_multiple=data_parallel_size(mesh), rows_per_pack=1)
    return place_batch(batch, mesh), stats, padding_metrics(batch, cfg, mesh)


def padding_metrics(batch: TrainBatch, cfg: Config, mesh: Any) -> dict[str, float]:
    """Share of padded tokens in the update batch (host arrays) without and with packing
    (whichever runs)."""
    am = np.asarray(batch.attention_mask)
    if batch.packing is not None:
        packed = int(np.prod(batch.packing.tokens.shape))
    else:
        packed = packing.pack_batch(batch, micro_batch_size=cfg.train.micro_batch_size,
                                    row_multiple=data_parallel_size(mesh))[1].packed_tokens
    real = float(am.sum())
    return {"tokens/padded_share_unpacked": 1.0 - real / max(am.size, 1),
            "tokens/padded_share_packed": 1.0 - real / max(packed, 1),
            "batch/packed": float(batch.packing is not None)}


def assemble_opsd_batch(col: rollout.Collected, cfg: Config, mesh: Any, pad_id: int,
                        encode: Callable) -> tuple[Any, Any, int, dict[str, float]]:
    """Student rows (the rollouts) and teacher rows (question + a correct solution, then the
    same response). Groups without a correct rollout carry no distillation signal (masked)."""
    teacher_prompts = rollout.opsd_teacher_rows(col, encode)
    student, stats = _batch_arrays(col, cfg, mesh, pad_id)
    t_rows, skipped = [], 0
    for r in col.rows:
        tp = teacher_prompts[r.query_index]
        if tp is None:
            skipped += 1
            tp = r.prompt_ids
        t_rows.append(Row(tp, r.completion_ids, r.query_index, reward=r.reward))
    _, len_b = _buckets(cfg, mesh, cfg.train.batch_size)
    longest = max(len(r.prompt_ids) + len(r.completion_ids) for r in t_rows)
    t_len = power_of_two_buckets(32, max(len_b[-1], -(-longest // 16) * 16))
    t_arr, _ = build_batch_arrays(
        t_rows, num_queries=max(col.num_queries, 1), pad_id=pad_id, length_buckets=t_len,
        row_buckets=(student["tokens"].shape[0],), max_len=t_len[-1],
        row_multiple=_row_multiple(cfg, mesh))
    s_mask = student["loss_mask"]
    t_mask = t_arr["loss_mask"]
    for b, r in enumerate(col.rows):
        if teacher_prompts[r.query_index] is None or s_mask[b].sum() != t_mask[b].sum():
            s_mask[b] = 0.0
            t_mask[b] = 0.0
    stats = dataclasses.replace(stats, response_tokens=int(s_mask.sum()))
    t_pack = None
    if cfg.train.packing:
        t_pack = packing.pack(
            t_arr["tokens"], t_arr["attention_mask"], length=2 * t_arr["tokens"].shape[1],
            groups=packing.micro_batches(len(t_mask), cfg.train.micro_batch_size),
            row_multiple=data_parallel_size(mesh))[0]
    student = TrainBatch(**student)
    if cfg.train.packing:
        student, _ = packing.pack_batch(student, micro_batch_size=cfg.train.micro_batch_size,
                                        row_multiple=data_parallel_size(mesh), rows_per_pack=1)
    batch = OPSDBatch(student=student, teacher_packing=t_pack,
                      teacher_tokens=t_arr["tokens"], teacher_positions=t_arr["positions"],
                      teacher_attention_mask=t_arr["attention_mask"], teacher_loss_mask=t_mask)
    return place_batch(batch, mesh), stats, skipped, padding_metrics(student, cfg, mesh)
