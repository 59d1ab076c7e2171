"""KV cache: prefill + token-by-token decode equals one full forward without a cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from tapo_jax.models import init_cache, load_hf
from tapo_jax.models.qwen3 import apply

TOL = 1e-5
B, P, D, S = 3, 8, 4, 16  # rows, prompt bucket, decode steps, cache slots
V = 96


@pytest.fixture(scope="module")
def fns(hf_checkpoint):
    model = load_hf(hf_checkpoint(num_heads=4, num_kv_heads=1, head_dim=24, tie=False,
                                  rope_theta=5e6))
    graphdef, state = nnx.split(model)
    full = jax.jit(lambda t, m: apply(graphdef, state, t, attention_mask=m))
    step = jax.jit(lambda t, p, m, c, i: apply(graphdef, state, t, positions=p, attention_mask=m,
                                                cache=c, cache_index=i))
    return model, full, step


def test_prefill_then_decode_equals_full_forward(fns):
    model, full, step = fns
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, V, (B, P + D)))
    ones = jnp.ones((B, P + D), jnp.int32)
    want = np.asarray(full(tokens, ones))
    cache = init_cache(model.cfg, B, S)
    pos = jnp.broadcast_to(jnp.arange(P + D, dtype=jnp.int32), (B, P + D))
    logits, cache = step(tokens[:, :P], pos[:, :P], ones[:, :P], cache, jnp.zeros(B, jnp.int32))
    got = [logits]
    for i in range(P, P + D):
        logits, cache = step(tokens[:, i:i + 1], pos[:, i:i + 1], ones[:, :1], cache,
                             jnp.full((B,), i, jnp.int32))
        got.append(logits)
    np.testing.assert_allclose(np.concatenate(got, axis=1), want, atol=TOL, rtol=0)
    np.testing.assert_array_equal(cache.pos, np.where(np.arange(S) < P + D, np.arange(S), -1)[None]
                                  .repeat(B, 0))


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_ragged_rows_match_full_forward(fns, data):
    """Rows of different lengths, left-padded in the prompt bucket or placed at different cache
    offsets; every real token's logits equal the full forward of that row alone."""
    model, full, step = fns
    lengths = data.draw(st.lists(st.integers(1, P), min_size=B, max_size=B), label="lengths")
    left_pad = data.draw(st.booleans(), label="left_pad")
    offsets = data.draw(st.lists(st.integers(0, S - P - D), min_size=B, max_size=B),
                        label="offsets")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    seqs = np.random.RandomState(seed).randint(0, V, (B, P + D))

    # Reference: each row's P' + D real tokens at the front, right padding (causal => unaffected).
    ref_mask = np.zeros((B, P + D), np.int32)
    prompt = np.zeros((B, P), np.int64)
    prompt_mask = np.zeros((B, P), np.int32)
    for b, n in enumerate(lengths):
        ref_mask[b, : n + D] = 1
        cols = slice(P - n, P) if left_pad else slice(0, n)
        prompt[b, cols] = seqs[b, :n]
        prompt_mask[b, cols] = 1
    packed = _pack(seqs, lengths)
    want = np.asarray(full(jnp.asarray(packed), jnp.asarray(ref_mask)))

    cache = init_cache(model.cfg, B, S)
    starts = np.asarray(offsets, np.int32)
    logits, cache = step(jnp.asarray(prompt), None, jnp.asarray(prompt_mask), cache,
                         jnp.asarray(starts))
    logits = np.asarray(logits)
    for b, n in enumerate(lengths):
        cols = slice(P - n, P) if left_pad else slice(0, n)
        np.testing.assert_allclose(logits[b, cols], want[b, :n], atol=TOL, rtol=0)
    # Default positions from the mask: each row's prompt sits at positions 0..n-1.
    n_arr = np.asarray(lengths, np.int32)
    index = starts + (P if left_pad else n_arr)
    for i in range(D):
        tok = packed[np.arange(B), n_arr + i][:, None]
        logits, cache = step(jnp.asarray(tok), jnp.asarray((n_arr + i)[:, None]),
                             jnp.ones((B, 1), jnp.int32), cache, jnp.asarray(index + i))
        np.testing.assert_allclose(np.asarray(logits)[:, 0], want[np.arange(B), n_arr + i],
                                   atol=TOL, rtol=0)


def _pack(seqs: np.ndarray, lengths: list[int]) -> np.ndarray:
    """Row b: its n prompt tokens then D continuation tokens (taken from seqs[b, P:])."""
    out = np.zeros_like(seqs)
    for b, n in enumerate(lengths):
        out[b, :n] = seqs[b, :n]
        out[b, n:n + D] = seqs[b, P:P + D]
    return out


def test_fully_masked_rows_are_finite(fns):
    model, full, step = fns
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, V, (B, P)))
    mask = jnp.zeros((B, P), jnp.int32).at[0].set(1)
    assert np.isfinite(np.asarray(full(tokens, mask))).all()
    logits, cache = step(tokens, None, mask, init_cache(model.cfg, B, S), jnp.zeros(B, jnp.int32))
    assert np.isfinite(np.asarray(logits)).all()
    assert (np.asarray(cache.pos)[1:] == -1).all()


def test_attend_len_reads_only_the_cache_head(fns):
    """Decoding with ``attend_len`` covering every filled slot equals reading the whole cache;
    a bound that cuts filled slots off changes the result (so the bound is really applied);
    a bound outside [1, S] is refused."""
    model, _, step = fns
    graphdef, state = nnx.split(model)
    bounded = jax.jit(lambda t, p, m, c, i, n: apply(graphdef, state, t, positions=p,
                                                     attention_mask=m, cache=c, cache_index=i,
                                                     attend_len=n), static_argnums=5)
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, V, (B, P + 1)))
    ones = jnp.ones((B, P + 1), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(P + 1, dtype=jnp.int32), (B, P + 1))
    _, cache = step(tokens[:, :P], pos[:, :P], ones[:, :P], init_cache(model.cfg, B, S),
                    jnp.zeros(B, jnp.int32))
    args = (tokens[:, P:], pos[:, P:], ones[:, :1], cache, jnp.full((B,), P, jnp.int32))
    want, want_cache = step(*args)
    got, got_cache = bounded(*args, P + 1)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=TOL, rtol=0)
    for a, b in zip(jax.tree.leaves(got_cache), jax.tree.leaves(want_cache)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # writes are not bounded
    cut, _ = bounded(*args, P // 2)
    assert np.abs(np.asarray(cut) - np.asarray(want)).max() > 1e-3
    with pytest.raises(ValueError, match="attend_len"):
        bounded(*args, S + 1)
