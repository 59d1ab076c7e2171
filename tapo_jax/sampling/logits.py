"""Token selection from logits: temperature, top-k, top-p (nucleus), min-p; and the log-prob
that RL needs.

The returned log-probability of a sampled token is always under the *unmodified* policy at the
sampling temperature, ``log_softmax(logits / temperature)[token]`` (``log_softmax(logits)`` for
temperature 0, i.e. greedy), taken *before* any top-k / top-p / min-p truncation. This is the
rollout-time log-prob that the RL objective compares against (a truncated distribution would make
every excluded token's probability 0 and bias the importance ratio).

Top-p never sorts the full vocabulary when top-k bounds it: candidates come from
``lax.top_k(logits, k_bound)`` (sorted), where ``k_bound`` is a static bound on the per-row top-k;
only with top-k off and top-p or min-p on is the whole vocabulary sorted.
Letters: S rows (decode slots), V vocabulary, C candidates (k_bound).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def sampled_logprob(logits: jax.Array, tokens: jax.Array, temperature: jax.Array) -> jax.Array:
    """log_softmax(logits / T)[token] per row (T = 0 -> T = 1). logits f32[S, V], tokens i32[S]."""
    t = jnp.where(temperature > 0, temperature, 1.0)[:, None]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32) / t, axis=-1)
    return jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


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


def sample_tokens(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array,
                  top_p: jax.Array, min_p: jax.Array, *, k_bound: int, filtered: bool
                  ) -> tuple[jax.Array, jax.Array]:
    """One token per row and its log-prob (see module doc).

    logits f32[S, V]; keys: raw PRNG keys uint32[S, 2] (one per row); per-row params [S].
    ``k_bound`` (static) bounds every row's top-k (V when some row has top-k off);
    ``filtered`` (static) is False when no row uses top-k, top-p or min-p (plain categorical).
    Rows with temperature 0 take the argmax.
    """
    logits = logits.astype(jnp.float32)
    t = jnp.where(temperature > 0, temperature, 1.0)[:, None]
    scaled = logits / t
    draw = jax.vmap(lambda key, row: jax.random.categorical(key, row))
    if filtered:
        cand, ids = filter_candidates(scaled, top_k, top_p, min_p, k_bound)
        choice = draw(keys, cand)
        sampled = jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0]
    else:
        sampled = draw(keys, scaled)
    greedy = jnp.argmax(logits, axis=-1)
    tokens = jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)
    return tokens, sampled_logprob(logits, tokens, temperature)
