"""Our Qwen3 forward equals HF transformers' Qwen3ForCausalLM (PyTorch, float32, eager
attention)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from tapo_jax.models import load_hf
from tapo_jax.models.qwen3 import apply

TOL = 1e-4

# name -> (checkpoint dims, sequence length). Together: tied and untied heads, GQA ratios 1, 2
# and 4, rope_theta 1e6 and 5e6, head_dim equal to and different from hidden/heads, odd lengths.
CONFIGS = {
    "tied-mha-theta1e6": (dict(num_heads=4, num_kv_heads=4, tie=True, rope_theta=1e6), 13),
    "untied-gqa2-theta5e6-hd24": (
        dict(num_heads=4, num_kv_heads=2, head_dim=24, tie=False, rope_theta=5e6), 11),
    "tied-gqa4-hd12-3layers": (
        dict(hidden_size=48, num_heads=8, num_kv_heads=2, head_dim=12, num_layers=3, tie=True,
             rope_theta=1e6, vocab_size=101), 7),
    "untied-gqa4-theta5e6-hd32": (
        dict(num_heads=4, num_kv_heads=1, head_dim=32, tie=False, rope_theta=5e6), 9),
}

_forward = jax.jit(apply, static_argnums=0,
                   static_argnames=("return_hidden", "output_hidden_states"))


def _ours(model, tokens, **kw):
    graphdef, state = nnx.split(model)
    out = _forward(graphdef, state, jnp.asarray(tokens), **kw)
    return jax.tree.map(np.asarray, out)


def _hf(model, tokens, **kw):
    kw = {k: torch.as_tensor(np.asarray(v)) for k, v in kw.items()}
    with torch.no_grad():
        return model(torch.as_tensor(tokens), **kw).logits.numpy()


def _left_padded(rng, vocab, t):
    """Three rows of lengths t, t - 3, 2, left-padded to t."""
    tokens = rng.randint(0, vocab, (3, t))
    mask = np.ones((3, t), np.int64)
    for row, n in enumerate((t, t - 3, 2)):
        mask[row, : t - n] = 0
    tokens = np.where(mask == 1, tokens, 0)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return tokens, mask, positions


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, hf_checkpoint, hf_torch):
    dims, t = CONFIGS[request.param]
    path = hf_checkpoint(**dims)
    return request.param, load_hf(path), hf_torch(path), dims, t


def test_logits_match_hf(case):
    name, ours, ref, dims, t = case
    tokens = np.random.RandomState(1).randint(0, ours.cfg.vocab_size, (2, t))
    got, want = _ours(ours, tokens), _hf(ref, tokens)
    assert got.shape == want.shape == (2, t, ours.cfg.vocab_size)
    err = np.abs(got - want).max()
    print(f"parity {name}: max|diff| = {err:.2e} (max|logit| = {np.abs(want).max():.2f})")
    assert err < TOL


def test_left_padded_batch_matches_hf(case):
    name, ours, ref, dims, t = case
    tokens, mask, positions = _left_padded(np.random.RandomState(2), ours.cfg.vocab_size, t)
    want = _hf(ref, tokens, attention_mask=mask, position_ids=positions)
    explicit = _ours(ours, tokens, positions=positions, attention_mask=mask)
    default_pos = _ours(ours, tokens, attention_mask=mask)
    real = mask == 1
    err = max(np.abs(explicit - want)[real].max(), np.abs(default_pos - want)[real].max())
    print(f"parity left-padded {name}: max|diff| = {err:.2e}")
    assert err < TOL
    assert np.isfinite(explicit).all()


def test_hidden_states_match_hf(hf_checkpoint, hf_torch):
    dims, t = CONFIGS["tied-gqa4-hd12-3layers"]
    path = hf_checkpoint(**dims)
    ours, ref = load_hf(path), hf_torch(path)
    tokens = np.random.RandomState(3).randint(0, ours.cfg.vocab_size, (2, t))
    logits, hidden = _ours(ours, tokens, output_hidden_states=True)
    with torch.no_grad():
        out = ref(torch.as_tensor(tokens), output_hidden_states=True)
    assert len(hidden) == len(out.hidden_states) == ours.cfg.num_layers + 1
    for i, (h, w) in enumerate(zip(hidden, out.hidden_states)):
        err = np.abs(h - w.numpy()).max()
        print(f"hidden state {i}: max|diff| = {err:.2e}")
        assert err < TOL, f"hidden state {i}"
    final = _ours(ours, tokens, return_hidden=True)
    np.testing.assert_array_equal(final, hidden[-1])
    np.testing.assert_allclose(logits, out.logits.numpy(), atol=TOL, rtol=0)


def test_bfloat16_compute(hf_checkpoint, hf_torch):
    """dtype=bfloat16 computes and returns bf16 (params bf16 or f32) and stays near HF float32."""
    dims, t = CONFIGS["untied-gqa2-theta5e6-hd24"]
    path = hf_checkpoint(**dims)
    tokens = np.random.RandomState(4).randint(0, 96, (2, t))
    want = _hf(hf_torch(path), tokens)
    for param_dtype in ("bfloat16", "float32"):
        model = load_hf(path, dtype="bfloat16", param_dtype=param_dtype)
        leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
        assert {leaf.dtype for leaf in leaves} == {jnp.dtype(param_dtype)}
        got = _ours(model, tokens)
        assert got.dtype == jnp.bfloat16
        err = np.abs(got.astype(np.float32) - want).max()
        # bf16 keeps ~3 significant digits; the logits here are O(10).
        assert err < 0.05 * np.abs(want).max(), (param_dtype, err)


# Memory-efficient variants: blockwise attention with blocks smaller than the sequence, scanned
# layers and rematerialisation change how the forward is computed, not what it computes.
VARIANTS = {
    "blockwise": dict(attention="blockwise", attention_block=8),
    "blockwise-scan-remat": dict(attention="blockwise", attention_block=8, scan_layers=True,
                                 remat="full"),
    "xla-scan-dots": dict(attention="xla", scan_layers=True, remat="dots"),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("config", ["untied-gqa2-theta5e6-hd24", "tied-gqa4-hd12-3layers"])
def test_memory_efficient_variants_match_hf(variant, config, hf_checkpoint, hf_torch):
    dims, t = CONFIGS[config]
    t += 10  # several attention blocks, the last one partial
    path = hf_checkpoint(**dims)
    ours, ref = load_hf(path, **VARIANTS[variant]), hf_torch(path)
    tokens, mask, positions = _left_padded(np.random.RandomState(5), ours.cfg.vocab_size, t)
    want = _hf(ref, tokens, attention_mask=mask, position_ids=positions)
    got = _ours(ours, tokens, attention_mask=mask)
    err = np.abs(got - want)[mask == 1].max()
    print(f"parity {variant} {config}: max|diff| = {err:.2e}")
    assert err < TOL
    assert np.isfinite(got).all()
