"""Group-relative advantages with Decoupled Advantage Estimation (DAE), paper Eq. 4-5.

Every row b of a training batch carries a scalar reward r_b, an integer group id g_b and a validity
mask m_b (0 for padding rows). Within a group G (its valid rows only)

    A_b = (r_b - mean_G) / (std_G + eps)                                   (Eq. 4, 5)

with the population standard deviation (``std_ddof=0``, the paper; ``std_ddof=1`` is the unbiased
variant some peers use). Conventions (docs/design.md, "Method", step 4):

- a group with exactly one valid member gets ``A = r`` ("equivalent to weighted SFT");
- a group of two or more members whose rewards are all equal gets ``A = 0`` exactly;
- padding rows (``mask == 0``) get ``A = 0`` and never enter any statistic.

DAE (section 3.4) gives the constructed trajectories of query q their own group
(``num_queries + q``) so that a correct construction does not raise the group mean of the original
rollouts ("advantage contamination"). ``decoupled=False`` is the "w/o DAE" ablation.

All functions are pure, jit-compatible and use static shapes: group statistics are
``jax.ops.segment_*`` reductions with a static ``num_groups``. Letters: B batch rows.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

__all__ = ["group_advantages", "assign_group_ids", "tapo_advantages"]


def _explicit_mesh() -> bool:
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and jax.sharding.AxisType.Explicit in tuple(mesh.axis_types)


def _replicate_if_explicit(*xs: jax.Array) -> tuple[jax.Array, ...]:
    """Under a mesh with Explicit axes, gather the (tiny) [B] arrays to every device first: the
    segment reductions' output sharding is otherwise ambiguous. A no-op under Auto meshes."""
    if not _explicit_mesh():
        return xs
    return tuple(jax.sharding.reshard(x, jax.sharding.PartitionSpec()) for x in xs)


def assign_group_ids(
    query_index: jax.Array,
    is_reflection: jax.Array,
    *,
    num_queries: int,
    decoupled: bool = True,
) -> jax.Array:
    """Advantage group of every row (DAE, Eq. 5).

    Args:
      query_index: int[B], the query each row answers, in ``[0, num_queries)``.
      is_reflection: bool[B], True for constructed trajectories y_ref.
      num_queries: static number of queries; the result lies in ``[0, 2 * num_queries)``.
      decoupled: True (default) puts the constructions of query q in group ``num_queries + q``
        (the paper's ``uid_reflected``); False puts them in group q with the original rollouts.

    Returns:
      int32[B] group ids; use ``num_groups = 2 * num_queries`` with :func:`group_advantages`.
    """
    q = jnp.asarray(query_index, jnp.int32)
    if not decoupled:
        return q
    return jnp.where(jnp.asarray(is_reflection, bool), q + num_queries, q).astype(jnp.int32)


def group_advantages(
    rewards: jax.Array,
    group_ids: jax.Array,
    mask: jax.Array,
    *,
    num_groups: int,
    eps: float = 1e-6,
    std_normalize: bool = True,
    std_ddof: int = 0,
    scale: Literal["group", "batch"] = "group",
) -> jax.Array:
    """Group-normalised advantages, paper Eq. 4 (original groups) and Eq. 5 (reflection groups).

    Args:
      rewards: float[B] scalar rewards.
      group_ids: int[B] group of each row, in ``[0, num_groups)`` for valid rows (padding rows may
        hold any id; they are ignored).
      mask: float/bool[B], 1 for real rows, 0 for padding rows.
      num_groups: static number of groups.
      eps: added to the standard deviation (Eq. 4).
      std_normalize: divide by ``std + eps`` (default); False gives ``r - mean`` (Dr. GRPO).
      std_ddof: 0 = population std (paper), 1 = unbiased std (denominator ``n - 1``).
      scale: ``"group"`` divides by the std of the row's own group (paper); ``"batch"`` centres
        by the group mean but divides by the std of all valid rewards in the batch (the
        "group mean, batch std" normalisation of Lite PPO).

    Returns:
      float32[B]; 0 on padding rows, ``r`` on rows that are alone in their group, 0 on groups of
      two or more rows with equal rewards.
    """
    if std_ddof not in (0, 1):
        raise ValueError(f"std_ddof must be 0 or 1, got {std_ddof}")
    if scale not in ("group", "batch"):
        raise ValueError(f"scale must be 'group' or 'batch', got {scale!r}")
    rewards = jnp.asarray(rewards, jnp.float32)
    out_spec = jax.typeof(rewards).sharding.spec if _explicit_mesh() else None
    rewards, group_ids, mask = _replicate_if_explicit(
        rewards, jnp.asarray(group_ids, jnp.int32), jnp.asarray(mask))
    valid = mask > 0
    m = valid.astype(jnp.float32)
    r = jnp.where(valid, rewards, 0.0)
    gid = jnp.where(valid, group_ids, 0)

    def seg(x):
        return jax.ops.segment_sum(x, gid, num_segments=num_groups)

    count = seg(m)  # [G]
    mean = seg(r) / jnp.maximum(count, 1.0)
    centred = jnp.where(valid, r - mean[gid], 0.0)  # [B]
    # Exact zero for groups whose valid rewards are all equal (no rounding residue in the mean).
    big = jnp.finfo(jnp.float32).max
    gmax = jax.ops.segment_max(jnp.where(valid, r, -big), gid, num_segments=num_groups)
    gmin = jax.ops.segment_min(jnp.where(valid, r, big), gid, num_segments=num_groups)
    centred = jnp.where(gmax[gid] > gmin[gid], centred, 0.0)

    if std_normalize:
        if scale == "group":
            var = seg(centred * centred) / jnp.maximum(count - std_ddof, 1.0)
            std = jnp.sqrt(var)[gid]
        else:
            n = jnp.sum(m)
            bmean = jnp.sum(r) / jnp.maximum(n, 1.0)
            bdev = jnp.where(valid, r - bmean, 0.0)
            std = jnp.sqrt(jnp.sum(bdev * bdev) / jnp.maximum(n - std_ddof, 1.0))
        adv = centred / (std + eps)
    else:
        adv = centred
    single = count[gid] == 1.0
    adv = jnp.where(single, r, adv)
    adv = jnp.where(valid, adv, 0.0).astype(jnp.float32)
    if out_spec is not None:  # back to the rows' sharding
        adv = jax.sharding.reshard(adv, out_spec)
    return adv


def tapo_advantages(
    rewards: jax.Array,
    query_index: jax.Array,
    is_reflection: jax.Array,
    mask: jax.Array,
    *,
    num_queries: int,
    decoupled: bool = True,
    ref_group_includes_originals: bool = False,
    eps: float = 1e-6,
    std_normalize: bool = True,
    std_ddof: int = 0,
    scale: Literal["group", "batch"] = "group",
) -> tuple[jax.Array, jax.Array]:
    """Advantages of a TAPO batch (original rollouts plus constructions), Eq. 4-5.

    ``decoupled=True`` (DAE): originals are normalised within the originals of their query (Eq. 4),
    constructions within the constructions of their query (Eq. 5). ``ref_group_includes_originals``
    is the reading of paper section 4.5: the statistics of a construction's group are taken over
    the originals *and* the constructions of the query, while the originals keep their own
    statistics (so originals are never contaminated). ``decoupled=False`` pools both kinds into one
    group per query ("w/o DAE" ablation).

    Returns:
      ``(advantages float32[B], group_ids int32[B])``; group ids as :func:`assign_group_ids`.
    """
    kw = dict(eps=eps, std_normalize=std_normalize, std_ddof=std_ddof, scale=scale)
    refl = jnp.asarray(is_reflection, bool)
    gids = assign_group_ids(query_index, refl, num_queries=num_queries, decoupled=decoupled)
    adv = group_advantages(rewards, gids, mask, num_groups=2 * num_queries, **kw)
    if decoupled and ref_group_includes_originals:
        pooled = group_advantages(
            rewards, jnp.asarray(query_index, jnp.int32), mask, num_groups=num_queries, **kw
        )
        adv = jnp.where(refl, pooled, adv)
    return adv, gids
