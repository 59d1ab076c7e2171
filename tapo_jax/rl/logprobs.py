"""Log-probs and entropies of the policy's tokens, straight from the final hidden states.

The training step needs, at every position, log p(y_t | x, y_<t) of the token taken and the
entropy H_t of the whole next-token distribution (for OTS, paper Eq. 7, and the entropy metric).
Both come from one online logsumexp over the vocabulary: the lm head is applied one vocabulary
chunk at a time inside a ``lax.scan`` whose body is rematerialised, so neither the forward nor the
backward pass builds the [B, T, V] logits (Qwen3's V is 151,936). This is the only log-prob path
of the training step (docs/design.md, "Decisions"); the sampler computes its own per-token
log-probs during decoding (:mod:`tapo_jax.sampling.logits`).

Letters: B rows, T length, D model dim, V vocabulary.
"""

from __future__ import annotations

from typing import Callable, Literal, Optional

import jax
import jax.numpy as jnp

__all__ = ["chunked_logprobs_and_entropy"]


def _online_logprob_entropy(
    chunk_fn: Callable[[jax.Array], jax.Array],
    vocab: int,
    chunk: int,
    targets: Optional[jax.Array],
    lead_shape: tuple[int, ...],
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Online logsumexp over vocabulary chunks: target log-prob, entropy, logsumexp, float32[...].

    ``chunk_fn(start)`` returns the float32 logits of columns ``start .. start + chunk - 1``.
    Starts are clamped to ``vocab - chunk`` so the last chunk may overlap the previous one; columns
    already seen are masked out. The carry holds, per position, the running max m, the running
    sum s = sum exp(z - m), u = sum exp(z - m) (z - m) and the target logit; entropy is
    H = log s - u / s. The scan body is rematerialised, so the backward pass never stores more
    than one [..., chunk] block of logits.
    """
    num_chunks = -(-vocab // chunk)
    cols = jnp.arange(chunk)

    def stats(i):
        nominal = i * chunk
        start = jnp.minimum(nominal, vocab - chunk)
        col = start + cols
        keep = col >= nominal  # drop overlap with the previous chunk
        z = jnp.where(keep, chunk_fn(start), -jnp.inf)
        cm = jnp.max(z, axis=-1)
        tl = None
        if targets is not None:
            hit = (col == targets[..., None]) & keep
            tl = jnp.sum(jnp.where(hit, z, 0.0), axis=-1)
        return z, cm, tl, keep

    def init():
        z, m, tl, keep = stats(0)
        d = jnp.where(keep, z - m[..., None], 0.0)
        e = jnp.exp(d)
        return m, jnp.sum(e, -1), jnp.sum(e * d, -1), tl if tl is not None else jnp.zeros(lead_shape)

    @jax.checkpoint
    def body(carry, i):
        m, s, u, t = carry
        z, cm, tl, keep = stats(i)
        m_new = jnp.maximum(m, cm)
        delta = m - m_new  # <= 0, finite
        alpha = jnp.exp(delta)
        d = jnp.where(keep, z - m_new[..., None], 0.0)
        e = jnp.where(keep, jnp.exp(d), 0.0)
        s_new = alpha * s + jnp.sum(e, -1)
        u_new = alpha * (u + delta * s) + jnp.sum(e * d, -1)
        t_new = t + tl if tl is not None else t
        return (m_new, s_new, u_new, t_new), None

    carry = init()
    if num_chunks > 1:
        carry, _ = jax.lax.scan(body, carry, jnp.arange(1, num_chunks))
    m, s, u, t = carry
    log_s = jnp.log(s)
    entropy = log_s - u / s
    lse = m + log_s
    return t - lse, entropy, lse



def chunked_logprobs_and_entropy(
    hidden: jax.Array,
    weight: jax.Array,
    targets: jax.Array,
    *,
    chunk_size: int,
    weight_layout: Literal["DV", "VD"] = "DV",
    temperature: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """Target log-prob and entropy straight from the final hidden states, float32[B, T].

    The lm-head projection is applied one vocabulary chunk at a time, so neither the forward nor
    the backward pass materialises the [B, T, V] logits. Differentiable in ``hidden`` and
    ``weight``.

    Args:
      hidden: [B, T, D] final (normed) hidden states.
      weight: the lm-head matrix, [D, V] (``weight_layout="DV"``) or [V, D] (``"VD"``, e.g. a tied
        embedding table).
      targets: int[B, T].
      chunk_size: vocabulary columns per step (clamped to V).
      temperature: logits are divided by it.
    """
    vocab = weight.shape[1] if weight_layout == "DV" else weight.shape[0]
    chunk = min(chunk_size, vocab)
    if chunk <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    axis = 1 if weight_layout == "DV" else 0
    eq = "btd,dc->btc" if weight_layout == "DV" else "btd,cd->btc"

    def chunk_fn(start):
        w = jax.lax.dynamic_slice_in_dim(weight, start, chunk, axis=axis)
        z = jnp.einsum(eq, hidden, w, preferred_element_type=jnp.float32)
        return z.astype(jnp.float32) / temperature

    lp, ent, _ = _online_logprob_entropy(
        chunk_fn, vocab, chunk, targets.astype(jnp.int32), hidden.shape[:-1])
    return lp, ent

