"""Data that flows between modules (docs/design.md, "Data flow"). Plain pytrees, static
shapes.

Per-token arrays are aligned with ``tokens``: entry ``[b, t]`` refers to *predicting* ``tokens[b, t]``
from ``tokens[b, :t]`` (so column 0 is never a trained token and always has ``loss_mask == 0``).
Rows are right-padded (prompt, then response, then padding).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax


class CheckpointError(ValueError):
    """A checkpoint (an HF directory or training checkpoints) is missing, unsupported or cannot
    be read; the message names the path, tensor or config field."""


@flax.struct.dataclass
class TrainBatch:
    tokens: jax.Array  # int32[B, T]
    positions: jax.Array  # int32[B, T]   position ids (0.. for real tokens)
    attention_mask: jax.Array  # int32[B, T]   1 = real token (prompt or response)
    loss_mask: jax.Array  # float32[B, T] 1 = response token that is trained
    query_index: jax.Array  # int32[B]      query the row answers (0..num_queries-1)
    is_reflection: jax.Array  # bool[B]       constructed trajectory y_ref vs original rollout
    rewards: jax.Array  # float32[B]
    row_mask: jax.Array  # float32[B]    1 = real row, 0 = padding row
    group_ids: jax.Array  # int32[B]      advantage group (DAE, see rl.assign_group_ids)
    advantages: jax.Array  # float32[B]    filled by rl.group_advantages before the update
    old_logprobs: jax.Array  # float32[B, T] rollout-policy log-probs (teacher-forced)
    ref_logprobs: jax.Array  # float32[B, T] reference-policy log-probs (zeros when unused)
    # the rows packed end to end (tapo_jax.rl.packing.Packing; train.packing), or None: forwards
    # then run on the packed rows and map back to this [B, T] layout
    packing: Any = None
