"""Token selection from logits: temperature, top-k, top-p (nucleus), min-p; and the log-prob
that RL needs.

The returned log-probability of a sampled token is always under the *unmodified* policy at the
sampling temperature, ``log_softmax(logits / temperature)[token]`` (``log_softmax(logits)`` for
temperature 0, i.e. greedy), taken *before* any top-k / top-p / min-p truncation. This is the
rollout-time log-prob that the RL objective compares against (a truncated distribution would make
every excluded token's probability 0 and bias the importance ratio).

Truncation, in this order: top-k keeps the k most likely tokens; top-p keeps the smallest set of
the most likely remaining tokens whose mass (renormalised after top-k) reaches p, i.e. token i
stays iff the mass of the tokens strictly more likely than i is below p; min-p keeps tokens with
probability >= min_p times the most likely one's. The most likely token always stays.

Nothing sorts the full vocabulary. With top-k on, candidates come from ``lax.top_k(logits,
k_bound)`` (C = k_bound sorted candidates, ``k_bound`` a static bound on every row's top-k).
Otherwise a token is proposed from the untruncated distribution by inversion of the cumulative
distribution and accepted iff the truncation keeps it, a test that takes one pass over the
vocabulary (:func:`draw_truncated`, exact in distribution); rows still rejected after a few
proposals, and calls where some row uses top-k with ``k_bound`` = V, use the kept set itself,
whose cut-offs are probability thresholds found by an exact bisection over the bit patterns of
float32 probabilities (31 vectorised passes over the vocabulary). On exact ties at
a cut-off the threshold keeps every tied token.
Letters: S rows (decode slots), V vocabulary, C candidates (k_bound).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf
_BISECT_STEPS = 31  # covers every non-negative float32 bit pattern


def filter_candidates(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array, min_p: jax.Array,
                      k_bound: int) -> tuple[jax.Array, jax.Array]:
    """Candidate logits and vocabulary ids after top-k, top-p and min-p.

    scaled f32[S, V] (already divided by the temperature); top_k i32[S] (0 = off), top_p f32[S]
    (1 = off), min_p f32[S] (0 = off). Returns (logits f32[S, C] with excluded entries -inf,
    ids i32[S, C]), C = k_bound, sorted by descending logit. The most likely token always stays.
    """
    vals, ids = jax.lax.top_k(scaled, k_bound)  # [S, C] sorted descending
    rank = jnp.arange(k_bound)[None, :]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, k_bound), k_bound)[:, None]
    keep = rank < k
    probs = jax.nn.softmax(jnp.where(keep, vals, NEG_INF), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each candidate
    keep &= before < top_p[:, None]
    keep &= probs >= min_p[:, None] * probs[:, :1]
    keep = keep.at[:, 0].set(True)
    return jnp.where(keep, vals, NEG_INF), ids


def _bisect_bits(pred, hi: jax.Array) -> jax.Array:
    """Bit pattern (int32[S]) of the smallest non-negative float32 t <= ``hi`` with ``pred(t)``
    true, per row, for a predicate that is false below some point and true from it on, and true
    at ``hi`` (f32[S]). Non-negative float32 values order like their bit patterns."""

    def body(_, lohi):
        lo, hi = lohi
        mid = lo + (hi - lo) // 2
        ok = pred(jax.lax.bitcast_convert_type(mid, jnp.float32))
        return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

    hi_bits = jax.lax.bitcast_convert_type(hi, jnp.int32)
    _, hi_bits = jax.lax.fori_loop(0, _BISECT_STEPS, body, (jnp.full_like(hi_bits, -1), hi_bits),
                                   unroll=True)
    return hi_bits


def truncation_mask(probs: jax.Array, top_k: jax.Array, top_p: jax.Array, min_p: jax.Array
                    ) -> jax.Array:
    """bool[S, V]: tokens kept by top-k, top-p and min-p (module doc), without sorting.

    probs f32[S, V] (softmax of the scaled logits); per-row params [S] as in filter_candidates.
    """
    V = probs.shape[-1]
    p_max = jnp.max(probs, axis=-1)
    use_k = (top_k > 0) & (top_k < V)

    def kth_largest(_):
        # Smallest t with fewer than k tokens >= t is the float just above the k-th largest
        # probability; one bit pattern below it is that probability.
        fewer = lambda t: jnp.sum(probs >= t[:, None], axis=-1) < top_k  # noqa: E731
        nxt = jnp.minimum(p_max * 2.0 + 1e-30, jnp.float32(3e38))  # fewer(nxt) is true
        return jax.lax.bitcast_convert_type(_bisect_bits(fewer, nxt) - 1, jnp.float32)

    zero = jnp.zeros_like(p_max)
    t_k = jax.lax.cond(jnp.any(use_k), kth_largest, lambda _: zero, None)
    keep = ~use_k[:, None] | (probs >= t_k[:, None])
    kept = jnp.where(keep, probs, 0.0)
    kept = kept / jnp.sum(kept, axis=-1, keepdims=True)
    # top-p: keep i iff the mass strictly above p_i is below top_p; the smallest such p_i is
    # the threshold (the predicate holds at the largest probability: nothing is above it).
    above = lambda t: jnp.sum(jnp.where(kept > t[:, None], kept, 0.0), axis=-1) < top_p  # noqa
    t_p = jax.lax.bitcast_convert_type(_bisect_bits(above, jnp.max(kept, axis=-1)), jnp.float32)
    keep &= (top_p[:, None] >= 1.0) | (kept >= t_p[:, None])
    keep &= probs >= min_p[:, None] * p_max[:, None]
    return keep | (probs >= p_max[:, None])


def uniforms(keys: jax.Array, n: int = 1) -> jax.Array:
    """The uniform numbers in [0, 1) that the inverse-CDF draws use, per row, from raw PRNG keys
    uint32[..., 2] (precomputed by the engine for a whole decode call): f32[...] for ``n == 1``,
    f32[..., n] otherwise (see :func:`num_uniforms`)."""
    flat = keys.reshape(-1, 2)
    if n == 1:
        u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(flat)
        return u.reshape(keys.shape[:-1])
    u = jax.vmap(lambda k: jax.random.uniform(k, (n,), jnp.float32))(flat)
    return u.reshape(keys.shape[:-1] + (n,))


def _cdf_tables(weights: jax.Array, block: int):
    """What an inverse-CDF draw from ``weights`` f32[S, V] needs, whatever the uniform number:
    the weights in blocks [S, nb, block], the cumulative block masses [S, nb] and the last block
    with positive mass [S]."""
    S, V = weights.shape
    nb = -(-V // block)
    w = jnp.pad(weights, ((0, 0), (0, nb * block - V))).reshape(S, nb, block)
    block_cdf = jnp.cumsum(jnp.sum(w, axis=-1), axis=-1)  # [S, nb]
    # the last block with positive mass, for a draw that rounding put past every block
    last = nb - 1 - jnp.argmax(jnp.flip(block_cdf > jnp.concatenate(
        [jnp.zeros((S, 1), block_cdf.dtype), block_cdf[:, :-1]], axis=-1), -1), axis=-1)
    return w, block_cdf, last


def _invert(tables, u: jax.Array, vocab: int) -> jax.Array:
    """The index (int32[S]) where the cumulative distribution of :func:`_cdf_tables` reaches
    ``u`` f32[S] times the total mass: one block of the vocabulary is scanned, not all of it."""
    w, block_cdf, last = tables
    nb, block = w.shape[1:]
    target = u * block_cdf[:, -1]
    b = jnp.minimum(jnp.sum(block_cdf <= target[:, None], axis=-1), nb - 1)
    b = jnp.minimum(b, last)
    before = jnp.where(b > 0, jnp.take_along_axis(block_cdf, jnp.maximum(b - 1, 0)[:, None],
                                                  axis=-1)[:, 0], 0.0)
    inner = jnp.take_along_axis(w, b[:, None, None], axis=1)[:, 0]  # [S, block]
    cdf = jnp.cumsum(inner, axis=-1)
    i = jnp.sum(cdf <= (target - before)[:, None], axis=-1)
    # clamp to the block's last positive-weight token
    last_i = block - 1 - jnp.argmax(jnp.flip(inner > 0, -1), axis=-1)
    idx = b * block + jnp.minimum(i, last_i)
    return jnp.minimum(idx, vocab - 1).astype(jnp.int32)


def draw_inverse_cdf(keys: jax.Array, weights: jax.Array, block: int = 64,
                      u: jax.Array | None = None) -> jax.Array:
    """One index per row with probability proportional to ``weights`` f32[S, V] (>= 0), by
    inverting the cumulative distribution at one uniform draw per row. keys uint32[S, 2]
    (``u`` f32[S]: the draws, when already computed as ``uniforms(keys)``).

    Two levels, so no scan runs over the whole vocabulary: the cumulative sum of per-block
    masses picks the block holding the draw, then a cumulative sum inside that block picks the
    token. Zero-weight tokens are never picked (the draw is strictly inside a positive mass).
    """
    u = uniforms(keys) if u is None else u
    return _invert(_cdf_tables(weights, block), u, weights.shape[-1])


def draw_truncated(probs: jax.Array, top_k: jax.Array, top_p: jax.Array, min_p: jax.Array,
                   u: jax.Array, block: int = 64) -> jax.Array:
    """One index per row from ``probs`` f32[S, V] restricted to ``truncation_mask`` and
    renormalised; ``u`` f32[S, R] holds R >= 2 uniform numbers per row.

    When no row uses top-k, by rejection: a token is proposed from the untruncated ``probs``
    (inverse CDF at ``u[:, t]``) and accepted iff the mask would keep it, which is one pass over
    the vocabulary (top-p keeps token i iff the mass strictly above p_i is below top_p; min-p
    keeps p_i >= min_p * p_max) instead of the mask's 31 bisection passes. A row still rejected
    after R - 1 proposals draws from the masked distribution with ``u[:, R - 1]``. Both give
    token i in the kept set N with probability p_i / P(N): a proposal is accepted with
    probability P(N), so the rejection stages give i with p_i (1 - (1 - P(N))^(R-1)) / P(N) and
    the final draw with (1 - P(N))^(R-1) p_i / P(N). The nucleus holds at least top_p of the
    mass, so at top-p 0.9 a row is rejected with probability at most 0.1 per proposal. Rows with
    top-k on need the k-th largest probability, so any such row sends the call to the mask.
    """
    S, V = probs.shape
    R = u.shape[-1]

    def masked(_):
        keep = truncation_mask(probs, top_k, top_p, min_p)
        return draw_inverse_cdf(None, jnp.where(keep, probs, 0.0), block, u=u[:, R - 1])

    def by_rejection(_):
        tables = _cdf_tables(probs, block)
        p_max = jnp.max(probs, axis=-1)
        kept = probs / jnp.sum(probs, axis=-1, keepdims=True)  # as in truncation_mask

        def accepted(tok):
            p_tok = jnp.take_along_axis(probs, tok[:, None], axis=-1)[:, 0]
            k_tok = jnp.take_along_axis(kept, tok[:, None], axis=-1)[:, 0]
            above = jnp.sum(jnp.where(kept > k_tok[:, None], kept, 0.0), axis=-1)
            ok = (top_p >= 1.0) | (above < top_p)
            ok &= p_tok >= min_p * p_max
            return ok | (p_tok >= p_max)

        def cond(carry):
            t, _, ok = carry
            return (t < R - 1) & ~jnp.all(ok)

        def body(carry):
            t, tok, ok = carry
            proposal = _invert(tables, jax.lax.dynamic_index_in_dim(u, t, 1, keepdims=False), V)
            take = ~ok & accepted(proposal)
            return t + 1, jnp.where(take, proposal, tok), ok | take

        _, tok, ok = jax.lax.while_loop(
            cond, body, (0, jnp.zeros((S,), jnp.int32), jnp.zeros((S,), bool)))
        return jax.lax.cond(jnp.all(ok), lambda: tok,
                            lambda: jnp.where(ok, tok, masked(None)))

    use_k = (top_k > 0) & (top_k < V)
    return jax.lax.cond(jnp.any(use_k), masked, by_rejection, None)


REJECTION_TRIES = 4  # proposals per row before draw_truncated falls back to the mask


def num_uniforms(vocab_size: int, *, k_bound: int, filtered: bool) -> int:
    """Uniform numbers per row that :func:`sample_tokens` consumes for one token (the last
    dimension of its ``u``): 0 when it draws among top-k candidates (categorical on the keys),
    1 for an untruncated inverse-CDF draw, ``REJECTION_TRIES + 1`` for a truncated one."""
    if filtered and k_bound < vocab_size:
        return 0
    return REJECTION_TRIES + 1 if filtered else 1


def sample_tokens(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array,
                  top_p: jax.Array, min_p: jax.Array, *, k_bound: int, filtered: bool,
                  u: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """One token per row and its log-prob (see module doc).

    logits f32[S, V]; keys: raw PRNG keys uint32[S, 2] (one per row); per-row params [S];
    ``u``: optionally ``uniforms(keys, n)``, precomputed, n = :func:`num_uniforms` (f32[S] for
    n = 1, f32[S, n] otherwise).
    ``k_bound`` (static) bounds every row's top-k (V when some row has top-k off);
    ``filtered`` (static) is False when no row uses top-k, top-p or min-p (plain categorical).
    Rows with temperature 0 take the argmax.
    """
    logits = logits.astype(jnp.float32)
    V = logits.shape[-1]
    t = jnp.where(temperature > 0, temperature, 1.0)[:, None]
    scaled = logits / t
    logp = jax.nn.log_softmax(scaled, axis=-1)  # the policy at the sampling temperature
    n_u = num_uniforms(V, k_bound=k_bound, filtered=filtered)
    if n_u == 0:
        cand, ids = filter_candidates(scaled, top_k, top_p, min_p, k_bound)
        choice = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, cand)
        sampled = jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0]
    else:
        probs = jnp.exp(logp)
        u = uniforms(keys, n_u) if u is None else u
        if filtered:
            sampled = draw_truncated(probs, top_k, top_p, min_p, u)
        else:
            sampled = draw_inverse_cdf(keys, probs, u=u)
    # argmax is a full pass over the vocabulary: only when some row is greedy
    greedy_rows = temperature <= 0
    tokens = jax.lax.cond(
        jnp.any(greedy_rows),
        lambda: jnp.where(greedy_rows, jnp.argmax(logits, axis=-1), sampled),
        lambda: sampled).astype(jnp.int32)
    # log_softmax(logits / T)[token] (T = 0 -> 1): the log-softmax the draw used
    return tokens, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
