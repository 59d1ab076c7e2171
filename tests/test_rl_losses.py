"""Property tests of the TAPO objective's parts (paper Eq. 2, 6, 7, 8) against NumPy references."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tapo_jax.config import RLConfig
from tapo_jax.rl import (
    aggregate,
    aggregate_terms,
    chunked_logprobs_and_entropy,
    clip_indicators,
    clipped_surrogate,
    kl_divergence,
    merge_loss_terms,
    metrics_from_terms,
    opsd_loss,
    ots_weights,
    tapo_loss,
    tapo_loss_denominators,
    tapo_loss_terms,
)
from tapo_jax.types import TrainBatch

try:
    import test_rl_reference as ref
except ImportError:  # tests/ imported as a package
    from tests import test_rl_reference as ref

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SEEDS = st.integers(0, 2**31 - 1)
TOL = dict(rtol=1e-6, atol=1e-6)
B, T, V = 8, 6, 37  # V is not a multiple of the vocabulary chunk (8): exercises the last chunk

# --------------------------------------------------------------------------------------------
# OTS weights (Eq. 7)
# --------------------------------------------------------------------------------------------

_ots = ref.jit_traced(ots_weights, 1, "ots")
_ots_custom = ref.jit_traced(functools.partial(ots_weights, w_min=0.2, w_max=3.0), 1, "ots_custom")


@SETTINGS
@given(seed=SEEDS, scale=st.sampled_from([1.0, 10.0, 1000.0]), custom=st.booleans())
def test_ots_matches_reference_and_is_bounded(seed, scale, custom):
    rng = np.random.default_rng(seed)
    lp = (-np.abs(rng.normal(size=(B, T))) * scale).astype(np.float32)
    ent = (np.abs(rng.normal(size=(B, T))) * scale).astype(np.float32)
    w = np.asarray((_ots_custom if custom else _ots)(lp, ent))
    lo, hi = (0.2, 3.0) if custom else (0.01, 10.0)
    np.testing.assert_allclose(w, ref.ots_weights(lp, ent, lo, hi), **TOL)
    assert np.all(np.isfinite(w)) and np.all(w >= lo) and np.all(w <= hi)


@SETTINGS
@given(seed=SEEDS)
def test_ots_unit_at_balance_monotone_and_no_gradient(seed):
    rng = np.random.default_rng(seed)
    ent = np.abs(rng.normal(size=(B, T))).astype(np.float32) * 3
    assert np.all(np.asarray(_ots(-ent, ent)) == 1.0)  # logprob = -entropy -> w = 1 exactly
    lp = np.sort(-np.abs(rng.normal(size=(B, T))) * 4, axis=1).astype(np.float32)
    w = np.asarray(_ots(lp, np.broadcast_to(ent[:, :1], (B, T))))
    assert np.all(np.diff(w, axis=1) >= 0)  # monotone non-decreasing in logprob
    g_lp, g_ent = jax.grad(lambda a, b: jnp.sum(ots_weights(a, b) * 3.0), argnums=(0, 1))(
        jnp.asarray(lp), jnp.asarray(ent))
    assert np.all(np.asarray(g_lp) == 0) and np.all(np.asarray(g_ent) == 0)


# --------------------------------------------------------------------------------------------
# Log-probs and entropies from hidden states, chunked over the vocabulary
# --------------------------------------------------------------------------------------------
# With hidden = logits and the identity as lm head (D = V), the head's output is the logits
# exactly, so the chunked kernel can be checked against formulas of the logits themselves.

EYE = np.eye(V, dtype=np.float32)


def _from_logits(chunk_size, temperature=1.0):
    def fn(logits, tgt):
        return chunked_logprobs_and_entropy(logits, EYE, tgt, chunk_size=chunk_size,
                                            temperature=temperature)
    return fn


_lpe_one = ref.jit_traced(_from_logits(V), 1, "lpe_one_chunk")
_lpe_chunk = ref.jit_traced(_from_logits(8), 1, "lpe_chunk")


@SETTINGS
@given(seed=SEEDS, scale=st.sampled_from([0.1, 3.0, 100.0, 1e4]))
def test_entropy_and_logprobs_match_reference(seed, scale):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(B, T, V)) * scale).astype(np.float32)
    tgt = rng.integers(0, V, (B, T)).astype(np.int32)
    want_h = ref.entropy(logits)
    want_lp = ref.target_logprobs(logits, tgt)
    # float32 logits of magnitude `scale` carry an absolute rounding error ~ scale * 6e-8
    tol = dict(rtol=1e-6, atol=max(1e-6, scale * 2e-7))
    for lp, h in (_lpe_one(logits, tgt), _lpe_chunk(logits, tgt)):
        np.testing.assert_allclose(np.asarray(lp), want_lp, **tol)
        np.testing.assert_allclose(np.asarray(h), want_h, **tol)


TEMP = 0.7


@jax.jit
def _lpe_grad_chunk(logits, tgt, c1, c2):
    def f(z):
        lp, h = _from_logits(8, TEMP)(z, tgt)
        return jnp.sum(lp * c1) + jnp.sum(h * c2)
    return jax.grad(f)(logits)


def test_chunked_gradient_matches_the_analytic_one():
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(B, T, V)) * 2).astype(np.float32)
    tgt = rng.integers(0, V, (B, T)).astype(np.int32)
    c1, c2 = rng.normal(size=(2, B, T)).astype(np.float32)
    g_chunk = np.asarray(_lpe_grad_chunk(logits, tgt, c1, c2))
    # analytic, z = logits / TEMP: d lp / dz = onehot - p ; d H / dz = -p (log p + H)
    z = logits.astype(np.float64) / TEMP
    logp = ref.log_softmax(z)
    p = np.exp(logp)
    h = ref.entropy(z)
    onehot = np.eye(V)[tgt]
    want = (c1[..., None] * (onehot - p) + c2[..., None] * (-p * (logp + h[..., None]))) / TEMP
    np.testing.assert_allclose(g_chunk, want, rtol=1e-5, atol=1e-6)


D = 16


@pytest.mark.parametrize("layout", ["DV", "VD"])
def test_chunked_from_hidden_matches_full_logits(layout):
    rng = np.random.default_rng(1)
    hidden = rng.normal(size=(B, T, D)).astype(np.float32)
    w_dv = (rng.normal(size=(D, V)) * 0.5).astype(np.float32)
    weight = w_dv if layout == "DV" else np.ascontiguousarray(w_dv.T)
    tgt = rng.integers(0, V, (B, T)).astype(np.int32)
    c1, c2 = rng.normal(size=(2, B, T)).astype(np.float32)
    temp = 0.7

    def chunked(h, w):
        return chunked_logprobs_and_entropy(h, w, tgt, chunk_size=8, weight_layout=layout,
                                            temperature=temp)

    def full(h, w):  # the [B, T, V] logits built whole, differentiated by autodiff
        z = jnp.einsum("btd,dv->btv", h, w if layout == "DV" else w.T) / temp
        logp = jax.nn.log_softmax(z, axis=-1)
        lp = jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
        return lp, -jnp.sum(jnp.exp(logp) * logp, axis=-1)

    lp, h = jax.jit(chunked)(hidden, weight)
    z64 = hidden.astype(np.float64) @ w_dv.astype(np.float64) / temp
    np.testing.assert_allclose(np.asarray(lp), ref.target_logprobs(z64, tgt), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(h), ref.entropy(z64), rtol=1e-5, atol=1e-5)

    def obj(fn):
        return jax.jit(jax.grad(lambda a, b: jnp.sum(fn(a, b)[0] * c1) + jnp.sum(fn(a, b)[1] * c2),
                                argnums=(0, 1)))

    gh_c, gw_c = obj(chunked)(hidden, weight)
    gh_f, gw_f = obj(full)(hidden, weight)
    np.testing.assert_allclose(np.asarray(gh_c), np.asarray(gh_f), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gw_c), np.asarray(gw_f), rtol=1e-5, atol=1e-5)


def test_chunked_never_materialises_full_float32_logits():
    """The jaxpr of the chunked path holds no [B, T, V] float32 array (forward and backward)."""
    big_v = 4096
    hidden = jax.ShapeDtypeStruct((2, 8, D), jnp.float32)
    weight = jax.ShapeDtypeStruct((D, big_v), jnp.float32)
    tgt = jax.ShapeDtypeStruct((2, 8), jnp.int32)

    def loss(h, w, t):
        lp, ent = chunked_logprobs_and_entropy(h, w, t, chunk_size=512)
        return jnp.sum(lp) + jnp.sum(ent)

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(hidden, weight, tgt)
    shapes = set()

    def walk(jp):
        for eqn in jp.eqns:
            shapes.update(tuple(getattr(v.aval, "shape", ())) for v in eqn.outvars)
            for p in eqn.params.values():
                for sub in p if isinstance(p, (list, tuple)) else [p]:
                    if hasattr(sub, "eqns"):
                        walk(sub)
                    elif hasattr(getattr(sub, "jaxpr", None), "eqns"):
                        walk(sub.jaxpr)

    walk(jaxpr.jaxpr)
    assert (2, 8, big_v) not in shapes
    assert (2, 8, 512) in shapes  # the chunked blocks are there


# --------------------------------------------------------------------------------------------
# Clipped surrogate (Eq. 2, 6) and KL
# --------------------------------------------------------------------------------------------

_CLIP_VARIANTS = {
    "sym": dict(eps_low=0.2, eps_high=0.2),
    "higher": dict(eps_low=0.2, eps_high=0.28),
    "dual": dict(eps_low=0.2, eps_high=0.28, dual_clip_c=3.0),
}
_surr = {k: ref.jit_traced(functools.partial(clipped_surrogate, **kw), 3, f"surr_{k}")
         for k, kw in _CLIP_VARIANTS.items()}
_surr_grad = {k: jax.jit(jax.grad(lambda lp, o, a, kw=kw: jnp.sum(clipped_surrogate(lp, o, a, **kw))))
              for k, kw in _CLIP_VARIANTS.items()}
_clip_ind = {k: ref.jit_traced(functools.partial(clip_indicators, **kw), 1, f"clipind_{k}")
             for k, kw in _CLIP_VARIANTS.items()}


def _ppo_inputs(seed, spread=1.0):
    rng = np.random.default_rng(seed)
    old = -rng.uniform(0.05, 4.0, (B, T)).astype(np.float32)
    lp = (old + rng.normal(size=(B, T)) * spread).astype(np.float32)
    adv = rng.normal(size=B).astype(np.float32)
    return lp, old, adv


@SETTINGS
@given(seed=SEEDS, variant=st.sampled_from(sorted(_CLIP_VARIANTS)), per_token=st.booleans())
def test_clipped_surrogate_matches_reference(seed, variant, per_token):
    lp, old, adv = _ppo_inputs(seed, spread=1.5)
    if per_token:
        adv = np.random.default_rng(seed + 1).normal(size=(B, T)).astype(np.float32)
    got = np.asarray(_surr[variant](lp, old, adv))
    np.testing.assert_allclose(got, ref.clipped_surrogate(lp, old, adv, **_CLIP_VARIANTS[variant]),
                               rtol=1e-6, atol=1e-5)


@SETTINGS
@given(seed=SEEDS, variant=st.sampled_from(sorted(_CLIP_VARIANTS)))
def test_clipped_surrogate_gradient(seed, variant):
    lp, old, adv = _ppo_inputs(seed, spread=0.6)
    kw = _CLIP_VARIANTS[variant]
    g = np.asarray(_surr_grad[variant](lp, old, adv))
    ratio = np.exp(lp.astype(np.float64) - old)
    a = np.broadcast_to(adv[:, None], (B, T))
    hi = (a > 0) & (ratio > 1 + kw["eps_high"])
    lo = (a < 0) & (ratio < 1 - kw["eps_low"])
    assert np.all(g[hi] == 0) and np.all(g[lo] == 0)
    inside = (ratio > 1 - kw["eps_low"]) & (ratio < 1 + kw["eps_high"])
    np.testing.assert_allclose(g[inside], (-a * ratio)[inside], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g, ref.clipped_surrogate_grad(lp, old, adv, **kw), rtol=1e-5, atol=1e-6)
    ind = _clip_ind[variant](lp, old, adv)
    np.testing.assert_array_equal(np.asarray(ind["high"]) > 0, hi)
    np.testing.assert_array_equal(np.asarray(ind["low"]) > 0, lo)
    if "dual_clip_c" in kw:
        np.testing.assert_array_equal(np.asarray(ind["dual"]) > 0, (a < 0) & (ratio > kw["dual_clip_c"]))


def test_clipped_surrogate_extreme_log_ratio_is_finite():
    lp = np.array([[0.0, -200.0, 0.0]], np.float32)
    old = np.array([[-200.0, 0.0, 0.0]], np.float32)
    for adv in (np.array([1.0], np.float32), np.array([-1.0], np.float32)):
        out = np.asarray(_surr["sym"](lp, old, adv))
        g = np.asarray(_surr_grad["sym"](lp, old, adv))
        assert np.all(np.isfinite(out)) and np.all(np.isfinite(g))


_kl = {k: ref.jit_traced(functools.partial(kl_divergence, kind=k), 1, f"kl_{k}") for k in ("k1", "k2", "k3")}


@SETTINGS
@given(seed=SEEDS, kind=st.sampled_from(["k1", "k2", "k3"]), spread=st.sampled_from([0.1, 3.0, 50.0]))
def test_kl_matches_reference(seed, kind, spread):
    lp, old, _ = _ppo_inputs(seed, spread)
    got = np.asarray(_kl[kind](lp, old))
    np.testing.assert_allclose(got, ref.kl(lp, old, kind), rtol=1e-5, atol=1e-5)
    if kind == "k3":
        assert np.all(got >= 0) and np.all(got <= 10.0)


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------


def test_aggregate_hand_examples():
    x = np.array([[1.0, 2.0, 3.0, 100.0], [4.0, 0.0, 0.0, 100.0], [7.0, 7.0, 7.0, 7.0]], np.float32)
    m = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], np.float32)
    # seq 0: sum 6 over 3 tokens; seq 1: sum 4 over 1 token; seq 2: no tokens (not counted)
    want = {
        "token-mean": 10.0 / 4.0,
        "seq-mean-token-mean": (2.0 + 4.0) / 2.0,
        "seq-mean-token-sum": (6.0 + 4.0) / 2.0,
        "seq-mean-token-sum-norm": (6.0 / 4.0 + 4.0 / 4.0) / 2.0,
    }
    for mode, v in want.items():
        assert float(aggregate(x, m, mode=mode)) == pytest.approx(v, rel=1e-7)
    assert float(aggregate(x, m, mode="seq-mean-token-sum-norm", max_len=10)) == pytest.approx(0.5)
    assert float(aggregate(x, np.zeros_like(m), mode="token-mean")) == 0.0
    with pytest.raises(ValueError, match="aggregation mode"):
        aggregate(x, m, mode="mean")


MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
_agg_terms = {k: ref.jit_traced(functools.partial(aggregate_terms, mode=k, max_len=T), 4, f"aggt_{k}")
              for k in MODES}


def _token_mask(rng, rows, t=T, p_row=0.8):
    start = rng.integers(1, t, rows)
    length = rng.integers(0, t, rows)
    cols = np.arange(t)[None]
    m = (cols >= start[:, None]) & (cols < (start + length)[:, None])
    return (m & (rng.uniform(size=rows) < p_row)[:, None]).astype(np.float32)


@SETTINGS
@given(seed=SEEDS, mode=st.sampled_from(MODES), split=st.sampled_from([1, 2, 4]))
def test_aggregate_reference_and_microbatches(seed, mode, split):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, T)).astype(np.float32)
    m = _token_mask(rng, B)
    val, num, den = ref.aggregate(x, m, mode)
    n_full, d_full = _agg_terms[mode](x, m)
    np.testing.assert_allclose(float(n_full / max(float(d_full), 1.0)), val, **TOL)
    assert float(d_full) == den
    nums, dens = zip(*[_agg_terms[mode](xs, ms) for xs, ms in
                       zip(np.split(x, split), np.split(m, split))])
    np.testing.assert_allclose(float(sum(nums)), float(n_full), **TOL)
    assert float(sum(dens)) == float(d_full)


# --------------------------------------------------------------------------------------------
# TAPO loss (Eq. 8)
# --------------------------------------------------------------------------------------------

VARIANTS = [
    RLConfig(),
    RLConfig(loss_agg="token-mean", eps_high=0.28),
    RLConfig(loss_agg="seq-mean-token-sum", ots=False, negatives=False),
    RLConfig(loss_agg="seq-mean-token-sum-norm", dual_clip_c=3.0, kl_coef=0.1, kl_kind="k3"),
    RLConfig(sft_only=True, lam=0.5, entropy_coef=0.01, kl_coef=0.05, kl_kind="k1"),
    RLConfig(loss_agg="token-mean", kl_coef=0.2, kl_kind="k2", entropy_coef=0.02, w_min=0.1,
             w_max=2.0, negatives=False),
]


def _vg(cfg):
    def f(lp, old, ent, batch):
        return tapo_loss(lp, old, ent, batch, cfg)
    return jax.value_and_grad(f, argnums=(0, 2), has_aux=True)


_tapo_vg = [ref.jit_traced(_vg(cfg), 1, f"tapo_vg_{i}") for i, cfg in enumerate(VARIANTS)]


def make_batch(seed, rows=B, t=T, p_refl=0.4, garbage=False):
    """Random batch: prompts then responses, right padding, some padding rows, rewards {0, 1}."""
    rng = np.random.default_rng(seed)
    loss_mask = _token_mask(rng, rows, t, p_row=1.0)
    row_mask = (rng.uniform(size=rows) < 0.85).astype(np.float32)
    refl = rng.uniform(size=rows) < p_refl
    rewards = rng.choice([0.0, 1.0], rows).astype(np.float32)
    adv = rng.normal(size=rows).astype(np.float32)
    old = -rng.uniform(0.05, 3.0, (rows, t)).astype(np.float32)
    lp = (old + rng.normal(size=(rows, t)) * 0.4).astype(np.float32)
    ent = rng.uniform(0.0, 3.0, (rows, t)).astype(np.float32)
    ref_lp = (old + rng.normal(size=(rows, t)) * 0.5).astype(np.float32)
    if garbage:  # junk wherever nothing is trained
        off = (loss_mask * row_mask[:, None]) == 0
        junk = np.where(rng.uniform(size=(rows, t)) < 0.5, np.nan, 1e30).astype(np.float32)
        lp, old, ent, ref_lp = (np.where(off, junk, a).astype(np.float32) for a in (lp, old, ent, ref_lp))
        pad = row_mask == 0
        adv = np.where(pad, np.nan, adv).astype(np.float32)
        rewards = np.where(pad, np.inf, rewards).astype(np.float32)
    zeros_i = np.zeros((rows, t), np.int32)
    batch = TrainBatch(
        tokens=zeros_i, positions=zeros_i, attention_mask=zeros_i + 1, loss_mask=loss_mask,
        query_index=np.zeros(rows, np.int32), is_reflection=refl, rewards=rewards,
        row_mask=row_mask, group_ids=np.zeros(rows, np.int32), advantages=adv,
        old_logprobs=old, ref_logprobs=ref_lp)
    return lp, old, ent, batch


def _np_batch(batch):
    return {k: np.asarray(getattr(batch, k)) for k in
            ("loss_mask", "row_mask", "is_reflection", "rewards", "advantages", "ref_logprobs")}


@SETTINGS
@given(seed=SEEDS, idx=st.integers(0, len(VARIANTS) - 1))
def test_tapo_loss_matches_reference(seed, idx):
    cfg = VARIANTS[idx]
    lp, old, ent, batch = make_batch(seed)
    (loss, met), (g_lp, g_ent) = _tapo_vg[idx](lp, old, ent, batch)
    want, want_g, want_g_ent, parts = ref.tapo_loss(lp, old, ent, _np_batch(batch), cfg)
    np.testing.assert_allclose(float(loss), want, **TOL)
    np.testing.assert_allclose(np.asarray(g_lp), want_g, **TOL)
    np.testing.assert_allclose(np.asarray(g_ent), want_g_ent, **TOL)
    np.testing.assert_allclose(float(met["pg_loss_orig"]), parts["pg_loss_orig"], **TOL)
    np.testing.assert_allclose(float(met["pg_loss_ref"]), parts["pg_loss_ref"], **TOL)
    m_r = parts["m_r"] > 0
    if m_r.any() and cfg.ots:
        w = ref.ots_weights(lp, ent, cfg.w_min, cfg.w_max)[m_r]
        np.testing.assert_allclose(float(met["ots_weight_mean"]), w.mean(), **TOL)
        np.testing.assert_allclose(float(met["ots_weight_min"]), w.min(), **TOL)
        np.testing.assert_allclose(float(met["ots_weight_max"]), w.max(), **TOL)
        np.testing.assert_allclose(float(met["ots_weight_frac_low"]), (w < 0.1).mean(), **TOL)
    assert float(met["num_ref_tokens"]) == parts["m_r"].sum()
    assert float(met["num_orig_tokens"]) == parts["m_o"].sum()
    assert all(v.shape == () and v.dtype == jnp.float32 for v in met.values())


@SETTINGS
@given(seed=SEEDS, idx=st.integers(0, len(VARIANTS) - 1))
def test_padding_values_change_nothing(seed, idx):
    clean = make_batch(seed)
    dirty = make_batch(seed, garbage=True)
    (l_c, m_c), g_c = _tapo_vg[idx](*clean)
    (l_d, m_d), g_d = _tapo_vg[idx](*dirty)
    assert float(l_c) == float(l_d)
    for a, b in zip(g_c, g_d):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for k in m_c:
        np.testing.assert_array_equal(np.asarray(m_c[k]), np.asarray(m_d[k]), err_msg=k)


@SETTINGS
@given(seed=SEEDS)
def test_tapo_without_reflection_rows_is_grpo(seed):
    """Reflection rows as padding (the step's GRPO) leave Eq. 2 alone."""
    lp, old, ent, batch = make_batch(seed, p_refl=0.5)
    orig = batch.replace(row_mask=batch.row_mask * (~batch.is_reflection))
    (l_t, m_t), (g_t, _) = _tapo_vg[0](lp, old, ent, orig)
    assert float(m_t["pg_loss_ref"]) == 0.0 and float(m_t["num_ref_rows"]) == 0.0
    want, want_g, _, _ = ref.tapo_loss(lp, old, ent, _np_batch(orig), VARIANTS[0])
    np.testing.assert_allclose(float(l_t), want, **TOL)
    np.testing.assert_allclose(np.asarray(g_t), want_g, **TOL)
    assert not np.asarray(g_t)[np.asarray(batch.is_reflection)].any()


def test_entropy_gradient_only_with_entropy_coef():
    lp, old, ent, batch = make_batch(3)
    _, (_, g0) = _tapo_vg[0](lp, old, ent, batch)
    _, (_, g1) = _tapo_vg[4](lp, old, ent, batch)
    assert np.all(np.asarray(g0) == 0)
    assert np.any(np.asarray(g1) != 0)


# Micro-batching: the full-batch denominators make micro-batch losses and gradients add up.
MB_VARIANTS = [dataclasses.replace(VARIANTS[3], loss_agg=m, kl_coef=0.1, entropy_coef=0.01,
                                   dual_clip_c=None) for m in MODES]


def _mb_vg(cfg):
    def f(lp, old, ent, batch, den):
        loss, _ = tapo_loss(lp, old, ent, batch, cfg, denominators=den)
        return loss, tapo_loss_terms(lp, old, ent, batch, cfg)
    return jax.value_and_grad(f, argnums=(0, 2), has_aux=True)


_mb = [ref.jit_traced(_mb_vg(cfg), 2, f"mb_{i}") for i, cfg in enumerate(MB_VARIANTS)]
_metrics = [jax.jit(functools.partial(metrics_from_terms, cfg=cfg)) for cfg in MB_VARIANTS]
_den = [ref.jit_traced(functools.partial(tapo_loss_denominators, cfg=cfg), 1, f"den_{i}")
        for i, cfg in enumerate(MB_VARIANTS)]
_merge = jax.jit(merge_loss_terms)


@SETTINGS
@given(seed=SEEDS, idx=st.integers(0, len(MODES) - 1))
def test_microbatches_add_up_to_full_batch(seed, idx):
    cfg = MB_VARIANTS[idx]
    lp, old, ent, batch = make_batch(seed)
    den = _den[idx](batch)
    (l_full, t_full), (g_full, ge_full) = _mb[idx](lp, old, ent, batch, den)
    for k, v in den.items():
        assert float(v) == float(t_full[k]), k
    want, want_g, want_ge, _ = ref.tapo_loss(lp, old, ent, _np_batch(batch), cfg)
    np.testing.assert_allclose(float(l_full), want, **TOL)
    np.testing.assert_allclose(np.asarray(g_full), want_g, **TOL)
    np.testing.assert_allclose(np.asarray(ge_full), want_ge, **TOL)
    half = B // 2

    def part(sl):
        sub = jax.tree.map(lambda a: a[sl], batch)
        return _mb[idx](lp[sl], old[sl], ent[sl], sub, den)

    (l1, t1), (g1, ge1) = part(slice(0, half))
    (l2, t2), (g2, ge2) = part(slice(half, B))
    np.testing.assert_allclose(float(l1 + l2), float(l_full), **TOL)
    np.testing.assert_allclose(np.concatenate([g1, g2]), np.asarray(g_full), **TOL)
    np.testing.assert_allclose(np.concatenate([ge1, ge2]), np.asarray(ge_full), **TOL)
    # merged metric terms give the full-batch metrics
    merged = _metrics[idx](_merge(t1, t2))
    full = _metrics[idx](t_full)
    for k in full:
        np.testing.assert_allclose(float(merged[k]), float(full[k]), rtol=1e-5, atol=1e-6, err_msg=k)


# --------------------------------------------------------------------------------------------
# OPSD
# --------------------------------------------------------------------------------------------

OPSD_VARIANTS = [dict(beta=0.0), dict(beta=1.0), dict(beta=0.5), dict(beta=0.3, temperature=0.7),
                 dict(beta=0.5, top_k=5)]


def _opsd_vg(kw):
    return jax.value_and_grad(lambda s, t, m: opsd_loss(s, t, m, **kw), argnums=(0, 1), has_aux=True)


_opsd = [ref.jit_traced(_opsd_vg(kw), 1, f"opsd_{i}") for i, kw in enumerate(OPSD_VARIANTS)]


@SETTINGS
@given(seed=SEEDS, idx=st.integers(0, len(OPSD_VARIANTS) - 1), same=st.booleans())
def test_opsd_reference_zero_iff_equal_and_student_only_gradient(seed, idx, same):
    kw = OPSD_VARIANTS[idx]
    rng = np.random.default_rng(seed)
    s = (rng.normal(size=(B, T, V)) * 2).astype(np.float32)
    if same:
        t = s.copy()
    else:  # move one token's logit: the distributions differ at every position
        t = s + 2.0 * np.eye(V, dtype=np.float32)[rng.integers(0, 5, (B, T))]
    m = _token_mask(rng, B)
    m[0, 1] = 1.0
    (loss, met), (g_s, g_t) = _opsd[idx](s, t, m)
    want = ref.opsd(s, t, m, kw["beta"], kw.get("temperature", 1.0), kw.get("top_k", 0))
    np.testing.assert_allclose(float(loss), want, **TOL)
    assert float(loss) >= 0.0
    assert np.all(np.asarray(g_t) == 0)  # teacher under stop-gradient
    if same:
        assert abs(float(loss)) < 1e-6
        np.testing.assert_allclose(np.asarray(g_s), 0.0, atol=1e-6)
    else:
        assert float(loss) > 1e-4
        assert np.any(np.abs(np.asarray(g_s)) > 1e-6)
    assert float(met["opsd_tokens"]) == m.sum()


@pytest.mark.parametrize("w_min, w_max", [(0.0, 10.0), (-1.0, 10.0), (2.0, 1.0)])
def test_ots_rejects_impossible_bounds(w_min, w_max):
    with pytest.raises(ValueError, match="w_min"):
        ots_weights(jnp.zeros((1, 2)), jnp.zeros((1, 2)), w_min=w_min, w_max=w_max)
