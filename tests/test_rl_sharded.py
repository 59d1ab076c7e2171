"""Every RL objective on 8 virtual devices (batch sharded over data x fsdp) equals one device.

Needs ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (set by CI).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from tapo_jax.config import RLConfig
from tapo_jax.rl import (
    AGG_MODES,
    aggregate,
    chunked_logprobs_and_entropy,
    clipped_surrogate,
    group_advantages,
    kl_divergence,
    opsd_loss,
    ots_weights,
    tapo_advantages,
    tapo_loss,
)

try:
    from test_rl_losses import make_batch
except ImportError:  # tests/ imported as a package
    from tests.test_rl_losses import make_batch

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8,
    reason="needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8",
)

B, T, V, D, NQ = 16, 6, 37, 8, 4
CFG = RLConfig(kl_coef=0.05, entropy_coef=0.01, eps_high=0.28)
# outputs that are sums over every row of the batch (the gradient of the replicated lm-head weight)
REDUCED_OVER_DEVICES = {"head_gw"}


def everything(x):
    """All public objectives of one batch; returns a flat dict of arrays."""
    out = {}
    out["adv"] = group_advantages(x["rewards"], x["gids"], x["row_mask"], num_groups=2 * NQ)
    out["adv_batch"] = group_advantages(x["rewards"], x["gids"], x["row_mask"], num_groups=2 * NQ,
                                        std_ddof=1, scale="batch")
    out["tapo_adv"], out["tapo_gid"] = tapo_advantages(
        x["rewards"], x["query"], x["refl"], x["row_mask"], num_queries=NQ,
        ref_group_includes_originals=True)
    out["ots"] = ots_weights(x["lp"], x["ent"])
    out["surr"] = clipped_surrogate(x["lp"], x["old"], x["adv_in"], eps_high=0.28, dual_clip_c=3.0)
    out["kl"] = kl_divergence(x["lp"], x["ref"])
    for mode in AGG_MODES:
        out[f"agg_{mode}"] = aggregate(out["surr"], x["loss_mask"], mode=mode)
    def head(h, w):
        lp, ent = chunked_logprobs_and_entropy(h, w, x["tgt"], chunk_size=8)
        return jnp.sum(lp) + 0.5 * jnp.sum(ent), (lp, ent)

    (_, (out["head_lp"], out["head_h"])), (out["head_gh"], out["head_gw"]) = jax.value_and_grad(
        head, argnums=(0, 1), has_aux=True)(x["hidden"], x["weight"])

    def tapo(lp, ent):
        return tapo_loss(lp, x["old"], ent, x["batch"], CFG)

    (out["tapo"], metrics), (out["tapo_glp"], out["tapo_gent"]) = jax.value_and_grad(
        tapo, argnums=(0, 1), has_aux=True)(x["lp"], x["ent"])
    out.update({f"m_{k}": v for k, v in metrics.items()})
    (out["opsd"], _), out["opsd_g"] = jax.value_and_grad(
        lambda s: opsd_loss(s, x["teacher"], x["loss_mask"], beta=0.5), has_aux=True)(x["logits"])
    return out


def _inputs():
    rng = np.random.default_rng(0)
    lp, old, ent, batch = make_batch(5, rows=B, t=T)
    query = rng.integers(0, NQ, B).astype(np.int32)
    refl = np.asarray(batch.is_reflection)
    gids = np.where(refl, query + NQ, query).astype(np.int32)
    batch = batch.replace(query_index=query, group_ids=gids)
    return {
        "rewards": np.asarray(batch.rewards), "gids": gids, "row_mask": np.asarray(batch.row_mask),
        "query": query, "refl": refl, "lp": lp, "old": old, "ent": ent,
        "ref": np.asarray(batch.ref_logprobs), "adv_in": np.asarray(batch.advantages),
        "loss_mask": np.asarray(batch.loss_mask),
        "logits": (rng.normal(size=(B, T, V)) * 2).astype(np.float32),
        "teacher": (rng.normal(size=(B, T, V)) * 2).astype(np.float32),
        "tgt": rng.integers(0, V, (B, T)).astype(np.int32),
        "hidden": rng.normal(size=(B, T, D)).astype(np.float32),
        "weight": rng.normal(size=(D, V)).astype(np.float32),
        "batch": batch,
    }


@pytest.mark.parametrize("axis_type", ["auto", "explicit"])
def test_sharded_equals_single_device(axis_type):
    x = _inputs()
    single = jax.devices()[0]
    x_single = jax.device_put(x, single)
    fn = jax.jit(everything)
    want = jax.device_get(fn(x_single))
    kind = AxisType.Auto if axis_type == "auto" else AxisType.Explicit
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(kind, kind),
                         devices=jax.devices()[:8])
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    repl = NamedSharding(mesh, P())

    def place(path, a):
        name = jax.tree_util.keystr(path)
        if "weight" in name:  # the lm-head weight is not a batch array
            return jax.device_put(a, repl)
        return jax.device_put(a, rows)

    x_sharded = jax.tree_util.tree_map_with_path(place, x)
    assert len(x_sharded["lp"].sharding.device_set) == 8
    with jax.set_mesh(mesh):
        got_arrays = fn(x_sharded)
    assert len(got_arrays["tapo_glp"].sharding.device_set) == 8
    got = jax.device_get(got_arrays)
    assert set(got) == set(want)
    for k in want:
        if k in REDUCED_OVER_DEVICES:
            # a sum over all B x T rows that the sharded program adds up device by device: the
            # order of the float32 additions differs, so the error is relative to the sum's
            # scale, not to each (possibly near-cancelling) entry: normwise relative error 1e-6
            scale = float(np.abs(want[k]).max())
            np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-6 * scale, err_msg=k)
        else:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6, err_msg=k)
    # The reduced gradient, one device and eight, against float64 NumPy within the float32
    # error bound of its sum (below): an independent check that reordering the additions
    # across devices moves it by rounding only.
    ref, bound = _head_gw_reference(x)
    for name, value in (("single device", want["head_gw"]), ("8 devices", got["head_gw"])):
        err = np.abs(np.asarray(value, np.float64) - ref)
        assert np.all(err <= bound), (name, float((err / bound).max()))
    # sanity: the batch has both kinds of rows and nothing degenerate
    assert 0 < float(want["m_num_ref_rows"]) and 0 < float(want["m_num_orig_rows"])
    assert np.any(want["tapo_glp"] != 0) and np.isfinite(want["tapo"])




def _head_gw_reference(x):
    """The gradient of ``sum(lp) + 0.5 * sum(entropy)`` with respect to the lm-head weight in
    float64 NumPy, and a first-order bound on the error of a float32 evaluation of it.

    With z = h w, p = softmax(z) and y the one-hot target, d/dz of the loss is
    g = y - p - 0.5 p (log p + H) per row (H the row's entropy), and the gradient is the sum over
    the n = B x T rows of h^T g. A float32 sum of n terms, each with a few roundings of its own
    (the softmax, log and product), errs by at most about (n + c) u sum |h_i g_j| with
    u = 2^-24; c = 16 covers the per-term roundings and the log-sum-exp."""
    h = x["hidden"].astype(np.float64).reshape(-1, D)
    z = h @ x["weight"].astype(np.float64)
    z -= z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    p = np.exp(logp)
    ent = -(p * logp).sum(-1, keepdims=True)
    y = np.eye(V)[x["tgt"].reshape(-1)]
    g = y - p - 0.5 * p * (logp + ent)
    n, u = h.shape[0], 2.0 ** -24
    return h.T @ g, (n + 16) * u * (np.abs(h).T @ np.abs(g))
