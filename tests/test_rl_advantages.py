"""Property tests of group advantages and DAE group ids (paper Eq. 4, 5; docs/design.md,
"Method")."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tapo_jax.rl import assign_group_ids, group_advantages, tapo_advantages

try:
    import test_rl_reference as ref
except ImportError:  # tests/ imported as a package
    from tests import test_rl_reference as ref

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NUM_GROUPS = 6
BUCKETS = (8, 16)  # batch sizes; every jitted function compiles at most once per bucket
REWARD_VALUES = np.array([0.0, 0.0, 1.0, 1.0, 0.5, 0.25, 2.0])
TOL = dict(rtol=1e-6, atol=1e-6)


@functools.cache
def _adv_fn(std_normalize: bool, std_ddof: int, scale: str, eps: float = 1e-6):
    fn = functools.partial(group_advantages, num_groups=NUM_GROUPS, eps=eps,
                           std_normalize=std_normalize, std_ddof=std_ddof, scale=scale)
    return ref.jit_traced(fn, len(BUCKETS) + 1, f"adv_{std_normalize}_{std_ddof}_{scale}_{eps}")


def _batch(seed, B, p_valid=0.8, continuous=False):
    rng = np.random.default_rng(seed)
    if continuous:
        # a grid of spacing 1/16 keeps the float32 computation well conditioned (no near-ties)
        r = (rng.integers(-16, 33, B) / 16.0).astype(np.float32)
    else:
        r = rng.choice(REWARD_VALUES, B).astype(np.float32)
    g = rng.integers(0, NUM_GROUPS, B).astype(np.int32)
    m = (rng.uniform(size=B) < p_valid).astype(np.float32)
    return r, g, m


options = st.tuples(st.booleans(), st.sampled_from([0, 1]), st.sampled_from(["group", "batch"]))


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), B=st.sampled_from(BUCKETS), opts=options,
       p_valid=st.sampled_from([0.3, 0.8, 1.0]), continuous=st.booleans())
def test_matches_numpy_reference(seed, B, opts, p_valid, continuous):
    r, g, m = _batch(seed, B, p_valid, continuous)
    got = np.asarray(_adv_fn(*opts)(r, g, m))
    want = ref.group_advantages(r, g, m, NUM_GROUPS, 1e-6, *opts)
    np.testing.assert_allclose(got, want, **TOL)


def test_hand_computed_conventions():
    # group 0: {1, 0, 0, 1} -> +-1/(0.5+eps); group 1: singleton 0.7 -> 0.7; group 2: all equal -> 0;
    # row 7: padding (mask 0) with an id of a real group -> 0 and no influence on group 0.
    r = np.array([1, 0, 0, 1, 0.7, 1, 1, 100], np.float32)
    g = np.array([0, 0, 0, 0, 1, 2, 2, 0], np.int32)
    m = np.array([1, 1, 1, 1, 1, 1, 1, 0], np.float32)
    a = np.asarray(_adv_fn(True, 0, "group")(r, g, m))
    s = 0.5 / (0.5 + 1e-6)  # centred +-0.5, population std 0.5
    np.testing.assert_allclose(a, [s, -s, -s, s, 0.7, 0, 0, 0], rtol=1e-6)
    assert a[5] == 0.0 and a[6] == 0.0 and a[7] == 0.0
    a = np.asarray(_adv_fn(False, 0, "group")(r, g, m))
    np.testing.assert_allclose(a, [0.5, -0.5, -0.5, 0.5, 0.7, 0, 0, 0], rtol=1e-6)
    # unbiased std: var = 1/3 of the sum of squares (n - 1 = 3)
    a = np.asarray(_adv_fn(True, 1, "group")(r, g, m))
    np.testing.assert_allclose(a[0], 0.5 / (np.sqrt(1.0 / 3.0) + 1e-6), rtol=1e-6)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), B=st.sampled_from(BUCKETS), opts=options)
def test_permutation_invariance(seed, B, opts):
    r, g, m = _batch(seed, B)
    perm = np.random.default_rng(seed + 1).permutation(B)
    fn = _adv_fn(*opts)
    a = np.asarray(fn(r, g, m))
    ap = np.asarray(fn(r[perm], g[perm], m[perm]))
    np.testing.assert_allclose(ap, a[perm], rtol=1e-6, atol=1e-6)


def _group_sizes(g, m):
    return {k: int(((g == k) & (m > 0)).sum()) for k in range(NUM_GROUPS)}


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), B=st.sampled_from(BUCKETS), opts=options,
       continuous=st.booleans())
def test_zero_mean_within_groups(seed, B, opts, continuous):
    r, g, m = _batch(seed, B, continuous=continuous)
    a = np.asarray(_adv_fn(*opts)(r, g, m))
    for k, n in _group_sizes(g, m).items():
        rows = (g == k) & (m > 0)
        if n >= 2 and np.ptp(r[rows]) > 0:
            assert abs(a[rows].mean()) < 1e-5


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), B=st.sampled_from(BUCKETS), ddof=st.sampled_from([0, 1]),
       std_normalize=st.booleans())
def test_shift_and_scale_invariance(seed, B, ddof, std_normalize):
    r, g, m = _batch(seed, B, continuous=True)
    rng = np.random.default_rng(seed + 7)
    sizes = _group_sizes(g, m)
    shift = rng.uniform(-3, 3, NUM_GROUPS).astype(np.float32)
    multi = np.array([sizes[int(k)] >= 2 for k in g])  # singletons get A = r: not invariant
    fn = _adv_fn(std_normalize, ddof, "group", 0.0)  # eps = 0: invariances are then exact
    a = np.asarray(fn(r, g, m))
    a_shift = np.asarray(fn(np.where(multi, r + shift[g], r).astype(np.float32), g, m))
    np.testing.assert_allclose(a_shift, a, rtol=1e-5, atol=1e-5)
    if std_normalize:
        scale = rng.uniform(0.2, 5.0, NUM_GROUPS).astype(np.float32)
        a_scale = np.asarray(fn(np.where(multi, r * scale[g], r).astype(np.float32), g, m))
        np.testing.assert_allclose(a_scale, a, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), opts=options)
def test_padding_rows_change_nothing(seed, opts):
    r, g, m = _batch(seed, 8, p_valid=1.0)
    rng = np.random.default_rng(seed + 3)
    pad_r = rng.uniform(-100, 100, 8).astype(np.float32)
    pad_g = rng.integers(0, NUM_GROUPS, 8).astype(np.int32)
    fn = _adv_fn(*opts)
    a = np.asarray(fn(r, g, m))
    a_pad = np.asarray(fn(np.concatenate([r, pad_r]), np.concatenate([g, pad_g]),
                          np.concatenate([m, np.zeros(8, np.float32)])))
    np.testing.assert_array_equal(a_pad[8:], 0.0)
    np.testing.assert_allclose(a_pad[:8], a, rtol=1e-6, atol=1e-6)


def test_padding_nan_rewards_do_not_leak():
    r = np.array([1, 0, 1, np.nan], np.float32)
    g = np.array([0, 0, 0, 0], np.int32)
    m = np.array([1, 1, 1, 0], np.float32)
    for opts in [(True, 0, "group"), (True, 1, "batch"), (False, 0, "group")]:
        a = np.asarray(_adv_fn(*opts)(r, g, m))
        assert np.all(np.isfinite(a)) and a[3] == 0.0


# --------------------------------------------------------------------------------------------
# Group ids and DAE
# --------------------------------------------------------------------------------------------


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), decoupled=st.booleans())
def test_assign_group_ids_matches_reference(seed, decoupled):
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 4, 16).astype(np.int32)
    refl = rng.uniform(size=16) < 0.4
    got = np.asarray(assign_group_ids(q, refl, num_queries=4, decoupled=decoupled))
    np.testing.assert_array_equal(got, ref.assign_group_ids(q, refl, 4, decoupled))
    assert got.dtype == np.int32


NQ = 3  # queries; 6 originals each (18 rows) + up to 4 constructions each (12 rows) = 30 -> 32
_tapo_adv = {
    (dec, inc): ref.jit_traced(functools.partial(
        tapo_advantages, num_queries=NQ, decoupled=dec, ref_group_includes_originals=inc),
        1, f"tapo_adv_{dec}_{inc}")
    for dec in (True, False) for inc in (True, False)
}


def _dae_batch(seed):
    rng = np.random.default_rng(seed)
    q = np.concatenate([np.repeat(np.arange(NQ), 6), np.repeat(np.arange(NQ), 4), [0, 0]])
    refl = np.concatenate([np.zeros(18, bool), np.ones(12, bool), [False, False]])
    r = rng.choice([0.0, 1.0], 32).astype(np.float32)
    m = np.concatenate([np.ones(30), np.zeros(2)]).astype(np.float32)
    return q.astype(np.int32), refl, r, m


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), inc=st.booleans(), keep=st.lists(st.booleans(), min_size=12, max_size=12))
def test_dae_reflection_rows_never_change_originals(seed, inc, keep):
    q, refl, r, m = _dae_batch(seed)
    fn = _tapo_adv[(True, inc)]
    a_all, gid = fn(r, q, refl, m)
    m_sub = m.copy()
    m_sub[18:30] = np.array(keep, np.float32)  # remove a random subset of constructions
    a_sub, _ = fn(r, q, refl, m_sub)
    a_none, _ = fn(r, q, refl, np.where(refl, 0.0, m).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(a_sub)[:18], np.asarray(a_all)[:18])
    np.testing.assert_array_equal(np.asarray(a_none)[:18], np.asarray(a_all)[:18])
    # and the originals' advantages are plain GRPO advantages of the originals alone
    want = ref.group_advantages(r[:18], q[:18], m[:18], NQ)
    np.testing.assert_allclose(np.asarray(a_all)[:18], want, **TOL)
    np.testing.assert_array_equal(np.asarray(gid), ref.assign_group_ids(q, refl, NQ, True))


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1))
def test_reflection_group_statistics(seed):
    q, refl, r, m = _dae_batch(seed)
    a, _ = _tapo_adv[(True, False)](r, q, refl, m)
    # Eq. 5: constructions normalised among the constructions of the same query
    want = ref.group_advantages(r[18:30], q[18:30], m[18:30], NQ)
    np.testing.assert_allclose(np.asarray(a)[18:30], want, **TOL)
    # section 4.5 reading: statistics over originals and constructions of the query
    a_inc, _ = _tapo_adv[(True, True)](r, q, refl, m)
    want_inc = ref.group_advantages(r[:30], q[:30], m[:30], NQ)[18:30]
    np.testing.assert_allclose(np.asarray(a_inc)[18:30], want_inc, **TOL)
    # w/o DAE: one pooled group per query for every row
    a_pool, _ = _tapo_adv[(False, False)](r, q, refl, m)
    np.testing.assert_allclose(np.asarray(a_pool)[:30], ref.group_advantages(r[:30], q[:30], m[:30], NQ), **TOL)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), n_correct=st.integers(1, 4))
def test_advantage_contamination(seed, n_correct):
    """Section 3.4: pooling a correct construction with the originals (decoupled=False) makes the
    incorrect originals' advantages strictly more negative; DAE leaves them unchanged."""
    q, refl, r, m = _dae_batch(seed)
    r[:18:6] = 0.0  # every query has at least one incorrect original
    r[18:30] = 0.0
    for k in range(NQ):
        r[18 + 4 * k: 18 + 4 * k + n_correct] = 1.0  # correct constructions of query k
    without = np.where(refl, 0.0, m).astype(np.float32)
    m = np.where(refl & (r == 0), 0.0, m).astype(np.float32)  # only the correct constructions
    incorrect = (~refl) & (r == 0) & (m > 0)
    pooled_with = np.asarray(_tapo_adv[(False, False)](r, q, refl, m)[0])
    pooled_without = np.asarray(_tapo_adv[(False, False)](r, q, refl, without)[0])
    assert np.all(pooled_with[incorrect] < pooled_without[incorrect])
    dae_with = np.asarray(_tapo_adv[(True, False)](r, q, refl, m)[0])
    dae_without = np.asarray(_tapo_adv[(True, False)](r, q, refl, without)[0])
    np.testing.assert_array_equal(dae_with[incorrect], dae_without[incorrect])
    # the reverse direction: a failed construction pooled in lifts the incorrect originals'
    # advantages (or keeps them) -- never lowers them
    r_fail = r.copy()
    r_fail[18:30] = 0.0
    m_fail = np.where(refl, 1.0, without).astype(np.float32)
    pooled_fail = np.asarray(_tapo_adv[(False, False)](r_fail, q, refl, m_fail)[0])
    assert np.all(pooled_fail[incorrect] >= pooled_without[incorrect] - 1e-6)


def test_group_advantages_jit_has_no_retrace():
    fn = ref.jit_traced(functools.partial(group_advantages, num_groups=NUM_GROUPS), 1, "adv_once")
    for seed in range(5):
        r, g, m = _batch(seed, 8)
        fn(r, g, m)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="std_ddof"):
        group_advantages(jnp.zeros(2), jnp.zeros(2, jnp.int32), jnp.ones(2), num_groups=1, std_ddof=2)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(jnp.zeros(2), jnp.zeros(2, jnp.int32), jnp.ones(2), num_groups=1, scale="x")
