"""Token selection (tapo_jax.sampling.logits) against an independent NumPy computation.

For fixed random logits: every sampled token lies in the allowed set (top-k, top-p nucleus,
min-p computed in NumPy by sorting in float64), empirical frequencies over many keys match the
renormalised distribution (chi-square), temperature 0 is the argmax, and the returned log-prob is
the untruncated log_softmax(logits / T) of the sampled token.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from tapo_jax.sampling.logits import sample_tokens

V = 40
DRAWS = 6000


def np_softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max())
    return z / z.sum()


def np_allowed(logits, temperature, top_k, top_p, min_p, slack=0.0):
    """(allowed bool[V], ambiguous bool[V]): the kept set by sorting in float64; a token whose
    top-p decision is within ``slack`` of the cut-off is ambiguous (float32 may go either way)."""
    p = np_softmax(np.asarray(logits, np.float64) / temperature)
    order = np.argsort(-p, kind="stable")
    keep = np.ones(V, bool)
    if top_k > 0:
        keep[order[top_k:]] = False
    q = np.where(keep, p, 0.0)
    q = q / q.sum()
    sorted_q = q[order]
    before = np.cumsum(sorted_q) - sorted_q
    in_nucleus = np.empty(V, bool)
    in_nucleus[order] = before < top_p
    near = np.zeros(V, bool)
    near[order] = np.abs(before - top_p) <= slack
    keep &= in_nucleus | (top_p >= 1.0)
    keep &= p >= min_p * p.max()
    keep[order[0]] = True
    return keep, near & (top_p < 1.0)


@functools.lru_cache(maxsize=None)
def sampler_fn(k_bound: int, filtered: bool):
    return jax.jit(functools.partial(sample_tokens, k_bound=k_bound, filtered=filtered))


def draw(logits, n, seed, temperature, top_k, top_p, min_p, k_bound, filtered):
    rows = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, V))
    keys = jax.random.split(jax.random.PRNGKey(seed), n)

    def full(x, dtype):
        return jnp.full((n,), x, dtype)

    toks, lps = sampler_fn(k_bound, filtered)(
        rows, keys, full(temperature, jnp.float32), full(top_k, jnp.int32),
        full(top_p, jnp.float32), full(min_p, jnp.float32))
    return np.asarray(toks), np.asarray(lps)


LOGITS = np.random.default_rng(0).normal(0.0, 1.5, V).astype(np.float32)

CASES = [  # temperature, top_k, top_p, min_p, k_bound, filtered
    pytest.param(1.0, 0, 1.0, 0.0, V, False, id="plain"),
    pytest.param(0.7, 0, 0.8, 0.0, V, True, id="top_p-threshold"),
    pytest.param(1.3, 0, 0.95, 0.05, V, True, id="top_p+min_p"),
    pytest.param(0.9, 0, 1.0, 0.1, V, True, id="min_p"),
    pytest.param(1.0, 7, 1.0, 0.0, 7, True, id="top_k-candidates"),
    pytest.param(0.6, 12, 0.9, 0.0, 12, True, id="top_k+top_p-candidates"),
    pytest.param(1.0, 9, 0.85, 0.0, V, True, id="top_k+top_p-threshold"),
]


@pytest.mark.parametrize("temperature,top_k,top_p,min_p,k_bound,filtered", CASES)
def test_allowed_set_and_frequencies(temperature, top_k, top_p, min_p, k_bound, filtered):
    toks, lps = draw(LOGITS, DRAWS, 1, temperature, top_k, top_p, min_p, k_bound, filtered)
    allowed, ambiguous = np_allowed(LOGITS, temperature, top_k, top_p, min_p, slack=1e-5)
    assert not ambiguous.any(), "fixed logits must not sit on a cut-off"
    outside = sorted(set(toks[~allowed[toks]].tolist()))
    assert not outside, f"sampled tokens {outside} outside the allowed set"
    # Log-prob of every draw: the untruncated policy at the sampling temperature.
    logp = np.log(np_softmax(LOGITS.astype(np.float64) / temperature))
    np.testing.assert_allclose(lps, logp[toks], atol=1e-5)
    # Chi-square goodness of fit against the renormalised distribution over the allowed set.
    p = np.exp(logp) * allowed
    expected = DRAWS * p / p.sum()
    observed = np.bincount(toks, minlength=V)
    idx = np.flatnonzero(allowed)
    chi2 = float(((observed[idx] - expected[idx]) ** 2 / expected[idx]).sum())
    pval = stats.chi2.sf(chi2, df=len(idx) - 1)
    assert pval > 1e-3, f"chi2 {chi2:.1f} over {len(idx)} tokens, p = {pval:.2e}"


def test_every_allowed_token_is_reachable_in_nucleus():
    """The nucleus is not over-truncated: every token of the NumPy nucleus is drawn."""
    toks, _ = draw(LOGITS, DRAWS, 2, 1.0, 0, 0.7, 0.0, V, True)
    allowed, _ = np_allowed(LOGITS, 1.0, 0, 0.7, 0.0)
    assert set(np.flatnonzero(allowed)) == set(toks.tolist())


def test_temperature_zero_is_argmax():
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 1, (16, V)).astype(np.float32)
    keys = jax.random.split(jax.random.PRNGKey(0), 16)
    zeros = jnp.zeros((16,), jnp.float32)
    for k_bound, filtered in ((V, False), (V, True), (5, True)):
        toks, lps = sampler_fn(k_bound, filtered)(
            jnp.asarray(logits), keys, zeros, jnp.full((16,), 5 if k_bound == 5 else 0),
            jnp.full((16,), 0.5), zeros)
        np.testing.assert_array_equal(np.asarray(toks), logits.argmax(-1))
        logp = np.stack([np.log(np_softmax(r.astype(np.float64))) for r in logits])
        np.testing.assert_allclose(np.asarray(lps), logp[np.arange(16), logits.argmax(-1)],
                                   atol=1e-5)


def test_mixed_rows_per_row_parameters():
    """Rows with different top-k / top-p / min-p in one call (threshold path, k_bound = V)."""
    rng = np.random.default_rng(4)
    n = 48
    logits = rng.normal(0, 2, (n, V)).astype(np.float32)
    top_k = rng.integers(0, 10, n).astype(np.int32)
    top_p = rng.uniform(0.3, 1.0, n).astype(np.float32)
    min_p = np.where(rng.uniform(size=n) < 0.5, 0.0, rng.uniform(0, 0.3, n)).astype(np.float32)
    temp = rng.uniform(0.5, 1.5, n).astype(np.float32)
    fn = sampler_fn(V, True)
    for seed in range(20):
        keys = jax.random.split(jax.random.PRNGKey(seed), n)
        toks = np.asarray(fn(jnp.asarray(logits), keys, jnp.asarray(temp), jnp.asarray(top_k),
                             jnp.asarray(top_p), jnp.asarray(min_p))[0])
        for r in range(n):
            allowed, amb = np_allowed(logits[r], temp[r], top_k[r], top_p[r], min_p[r], 1e-5)
            assert allowed[toks[r]] or amb[toks[r]], (seed, r)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), top_k=st.integers(0, 12),
       top_p=st.floats(0.05, 1.0), min_p=st.sampled_from([0.0, 0.02, 0.2]),
       temperature=st.floats(0.3, 2.0), scale=st.floats(0.1, 5.0))
def test_property_sampled_tokens_allowed(seed, top_k, top_p, min_p, temperature, scale):
    logits = (np.random.default_rng(seed).normal(0, scale, V)).astype(np.float32)
    allowed, amb = np_allowed(logits, temperature, top_k, top_p, min_p, slack=1e-5)
    for k_bound in (V, 12):
        if k_bound < V and top_k == 0:
            continue
        toks, _ = draw(logits, 256, seed, temperature, top_k, top_p, min_p, k_bound, True)
        bad = toks[~(allowed[toks] | amb[toks])]
        assert bad.size == 0, f"k_bound {k_bound}: tokens {sorted(set(bad.tolist()))} not allowed"


# ------------------------------------------------------------- two-level inverse-CDF draw
@functools.lru_cache(maxsize=None)
def _jitted_draw(block: int):
    from tapo_jax.sampling.logits import draw_inverse_cdf

    return jax.jit(lambda keys, w: draw_inverse_cdf(keys, w, block=block))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), vocab=st.integers(1, 300), block=st.sampled_from([1, 7, 64]),
       density=st.floats(0.0, 1.0))
def test_inverse_cdf_draw_never_picks_zero_weight(seed, vocab, block, density):
    """Sparse weights (some rows with a single positive entry, possibly the last one; vocab not
    a multiple of the block): every draw lands on a positive weight."""
    rng = np.random.default_rng(seed)
    w = rng.random((16, vocab)) * (rng.random((16, vocab)) < density)
    w[np.arange(16), rng.integers(0, vocab, 16)] += rng.random(16) + 1e-3  # >= 1 positive
    w[0] = 0.0
    w[0, -1] = 1.0
    keys = np.asarray(jax.random.key_data(jax.random.split(jax.random.key(seed), 16)))
    idx = np.asarray(_jitted_draw(block)(keys, jnp.asarray(w, jnp.float32)))
    assert ((idx >= 0) & (idx < vocab)).all()
    assert (w[np.arange(16), idx] > 0).all()
    assert idx[0] == vocab - 1


def test_inverse_cdf_draw_frequencies():
    """Frequencies over many draws match the weights (chi-square), across block boundaries."""
    rng = np.random.default_rng(0)
    vocab, n = 150, 20_000
    w = rng.random(vocab) ** 3
    w[rng.random(vocab) < 0.3] = 0.0
    keys = np.asarray(jax.random.key_data(jax.random.split(jax.random.key(1), n)))
    idx = np.asarray(_jitted_draw(64)(keys, jnp.broadcast_to(jnp.asarray(w, jnp.float32),
                                                               (n, vocab))))
    counts = np.bincount(idx, minlength=vocab)
    assert counts[w == 0].sum() == 0
    pos = w > 0
    expected = n * w[pos] / w[pos].sum()
    assert stats.chisquare(counts[pos], expected).pvalue > 1e-3


# ------------------------------------------------------- truncated draw by rejection
@functools.lru_cache(maxsize=None)
def _jitted_truncated(tries: int):
    from tapo_jax.sampling.logits import draw_truncated, uniforms

    def fn(keys, probs, top_k, top_p, min_p):
        return draw_truncated(probs, top_k, top_p, min_p, uniforms(keys, tries + 1))

    return jax.jit(fn)


@pytest.mark.parametrize("tries,top_p,min_p,scale", [
    pytest.param(1, 0.3, 0.0, 0.3, id="mostly-fallback"),   # P(N) ~ 0.3: 70 % of rows fall back
    pytest.param(2, 0.6, 0.1, 1.0, id="mixed"),
    pytest.param(8, 0.9, 0.0, 1.5, id="mostly-rejection"),
])
def test_truncated_draw_frequencies_with_and_without_fallback(tries, top_p, min_p, scale):
    """Rejection proposals and the masked fallback together give exactly the renormalised
    kept distribution (chi-square against NumPy), whichever share of rows falls back."""
    logits = np.random.default_rng(5).normal(0.0, scale, V).astype(np.float32)
    allowed, amb = np_allowed(logits, 1.0, 0, top_p, min_p, slack=1e-5)
    assert not amb.any()
    p = np_softmax(logits.astype(np.float64))
    n = 20_000
    keys = np.asarray(jax.random.key_data(jax.random.split(jax.random.key(7), n)))
    probs = jnp.broadcast_to(jnp.asarray(np.exp(jax.nn.log_softmax(logits))), (n, V))
    full = lambda x, dt: jnp.full((n,), x, dt)  # noqa: E731
    idx = np.asarray(_jitted_truncated(tries)(keys, probs, full(0, jnp.int32),
                                              full(top_p, jnp.float32),
                                              full(min_p, jnp.float32)))
    counts = np.bincount(idx, minlength=V)
    assert counts[~allowed].sum() == 0
    expected = n * p[allowed] / p[allowed].sum()
    assert stats.chisquare(counts[allowed], expected).pvalue > 1e-3


def test_truncated_draw_keeps_to_the_numpy_kept_set_per_row():
    """Rows with different top-p / min-p, in a call without top-k (rejection) and in one with a
    top-k row (the mask for every row): every drawn token is in the row's kept set computed by
    sorting in NumPy (float64), or within float32 slack of its cut-off."""
    rng = np.random.default_rng(6)
    n = 64
    logits = rng.normal(0, 2, (n, V)).astype(np.float32)
    probs = jnp.exp(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))
    top_p = rng.uniform(0.05, 1.0, n).astype(np.float32)
    min_p = np.where(rng.uniform(size=n) < 0.5, 0.0, rng.uniform(0, 0.3, n)).astype(np.float32)
    for top_k in (np.zeros(n, np.int32), np.where(np.arange(n) == 3, 5, 0).astype(np.int32)):
        kept = [np_allowed(logits[r], 1.0, top_k[r], top_p[r], min_p[r], slack=1e-5)
                for r in range(n)]
        for seed in range(10):
            keys = np.asarray(jax.random.key_data(jax.random.split(jax.random.key(seed), n)))
            idx = np.asarray(_jitted_truncated(2)(keys, probs, jnp.asarray(top_k),
                                                  jnp.asarray(top_p), jnp.asarray(min_p)))
            for r in range(n):
                allowed, amb = kept[r]
                assert allowed[idx[r]] or amb[idx[r]], (seed, r, int(top_k.max()))
