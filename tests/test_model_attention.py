"""Every attention implementation equals the ``xla`` reference (outputs and gradients with
respect to q, k and v, float32) under causal, left- and right-padded and segment-id masks,
grouped-query ratios 1, 2 and 4, odd lengths and lengths that are not a multiple of the block."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tapo_jax.models import attention as attn
from tapo_jax.models.qwen3 import segment_positions

OUT_TOL = 1e-5
GRAD_TOL = 1e-5


def _segments(kind: str, b: int, t: int, rng) -> np.ndarray:
    seg = np.ones((b, t), np.int32)
    if kind == "left":
        for row in range(b):
            seg[row, : rng.integers(0, t - 1)] = 0
    elif kind == "right":
        for row in range(b):
            seg[row, rng.integers(1, t):] = 0
    elif kind == "packed":  # 1-3 segments per row then padding
        for row in range(b):
            cuts = np.sort(rng.choice(np.arange(1, t), size=3, replace=False))
            seg[row, : cuts[0]] = 1
            seg[row, cuts[0]: cuts[1]] = 2
            seg[row, cuts[1]: cuts[2]] = 3
            seg[row, cuts[2]:] = 0
    return seg


def _inputs(b, t, n, kv, h, kind, seed):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, t, kv, h)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, t, kv, h)), jnp.float32)
    cot = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)
    return q, k, v, jnp.asarray(_segments(kind, b, t, rng)), cot


def _value_and_grads(impl, q, k, v, seg, cot, block=16):
    def loss(q, k, v):
        out = attn.dot_product_attention(q, k, v, seg, implementation=impl, block_size=block,
                                         packed=True)
        return jnp.sum(out * cot), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def _assert_equal_to_xla(impl, args, block=16):
    seg = np.asarray(args[3])
    ref_out, ref_grads = _value_and_grads("xla", *args)
    out, grads = _value_and_grads(impl, *args, block=block)
    np.testing.assert_allclose(out, ref_out, atol=OUT_TOL, rtol=0)
    assert np.all(np.asarray(out)[seg == 0] == 0)  # padding queries give 0
    for name, g, r in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=GRAD_TOL, rtol=0, err_msg=f"d{name}")


@pytest.mark.parametrize("kind", ["causal", "left", "right", "packed"])
@pytest.mark.parametrize("kv", [4, 2, 1])  # GQA ratios 1, 2, 4
def test_blockwise_equals_xla(kind, kv):
    _assert_equal_to_xla("blockwise", _inputs(3, 37, 4, kv, 8, kind, seed=kv))


@settings(max_examples=8, deadline=None)
@given(t=st.integers(2, 70), block=st.sampled_from([8, 16, 24, 64]),
       kind=st.sampled_from(["causal", "left", "right", "packed"]), seed=st.integers(0, 99))
def test_blockwise_equals_xla_any_length_and_block(t, block, kind, seed):
    if kind == "packed" and t < 4:
        kind = "causal"
    _assert_equal_to_xla("blockwise", _inputs(2, t, 4, 2, 8, kind, seed), block=block)


@pytest.mark.parametrize("kind,kv", [("left", 2), ("packed", 1)])
def test_splash_equals_xla_in_interpret_mode(kind, kv):
    """The Pallas TPU kernel, run by the Pallas interpreter on CPU."""
    pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")
    _assert_equal_to_xla("splash", _inputs(2, 37, 4, kv, 8, kind, seed=7))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["left", "right", "packed"])
def test_cudnn_equals_xla(kind):  # bfloat16 only: compare at bf16 precision
    q, k, v, seg, cot = _inputs(2, 64, 4, 2, 64, kind, seed=3)
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    ref = attn.dot_product_attention(*[x.astype(jnp.float32) for x in bf], seg,
                                     implementation="xla")
    got = attn.dot_product_attention(*bf, seg, implementation="cudnn", packed=kind == "packed")
    np.testing.assert_allclose(np.asarray(got, np.float32), ref, atol=2e-2, rtol=0)


def test_auto_resolution():
    r = attn.resolve_implementation
    assert r("auto", 4096, backend="tpu") == "splash"
    assert r("auto", 4096, jnp.bfloat16, backend="gpu") == "cudnn"
    assert r("auto", 4096, jnp.float32, backend="gpu") == "blockwise"
    assert r("auto", attn.AUTO_XLA_MAX_LEN, backend="cpu") == "xla"
    assert r("auto", attn.AUTO_XLA_MAX_LEN + 1, backend="cpu") == "blockwise"
    assert r("blockwise", 8, backend="tpu") == "blockwise"
    with pytest.raises(ValueError, match="flash"):
        r("flash", 8)


def test_segment_positions_restart_per_segment():
    seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(segment_positions(seg),
                                  [[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 0, 1, 2, 3, 4, 5]])


def test_splash_in_the_sharded_forward_equals_single_device_xla():
    """Pallas calls are not partitioned by XLA: on a mesh, the splash path maps itself over the
    batch shards (shard_map); the log-prob forward must equal a single-device xla forward."""
    pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")
    import dataclasses
    from types import SimpleNamespace

    from flax import nnx

    from tapo_jax.config import MeshConfig, ModelConfig
    from tapo_jax.models import sharding as sh
    from tapo_jax.models.qwen3 import Qwen3
    from tapo_jax.train.step import make_logprob_fn
    from tapo_jax.train.state import split_params

    cfg = ModelConfig(num_layers=2, attention="xla")
    r = np.random.default_rng(0)
    am = np.ones((8, 40), np.int32)
    am[:, 30:] = 0
    am[3, :5] = 0
    batch = SimpleNamespace(tokens=r.integers(0, 512, (8, 40)).astype(np.int32),
                            attention_mask=am,
                            positions=np.maximum(np.cumsum(am, 1) - 1, 0).astype(np.int32))
    one = sh.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    gd, params = split_params(Qwen3(cfg, rngs=nnx.Rngs(0)))
    ref = make_logprob_fn(gd, one)(params, batch)[0]
    mesh = sh.make_mesh(MeshConfig(data=2, fsdp=4, tensor=1))
    gd2, p2 = split_params(Qwen3(dataclasses.replace(cfg, attention="splash"), rngs=nnx.Rngs(0)))
    got = make_logprob_fn(gd2, mesh)(p2, batch)[0]
    np.testing.assert_allclose(np.where(am > 0, got, 0), np.where(am > 0, ref, 0), atol=OUT_TOL,
                               rtol=0)
