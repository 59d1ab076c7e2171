"""Mesh construction, logical-axis rules, and sharded forward == single-device forward
(8 virtual CPU devices)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from tapo_jax.config import ConfigError, MeshConfig, ModelConfig
from tapo_jax.models import Qwen3, init_cache, load_hf
from tapo_jax.models.qwen3 import apply
from tapo_jax.models.sharding import (
    SAMPLE_RULES, TRAIN_RULES, batch_sharding, cache_shardings, create_sharded_model, logical_spec,
    make_mesh, shard_model, state_shardings)

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices")

DIMS = dict(num_heads=4, num_kv_heads=2, head_dim=24, tie=False, rope_theta=5e6)


def test_make_mesh_resolves_minus_one():
    mesh = make_mesh(MeshConfig(data=2, fsdp=-1, tensor=2))
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(make_mesh(MeshConfig(data=1, fsdp=4, tensor=-1)).shape)["tensor"] == 2
    assert make_mesh(MeshConfig(), devices=jax.devices()[:1]).size == 1


@pytest.mark.parametrize("cfg,needle", [
    (MeshConfig(data=-1, fsdp=-1, tensor=1), "-1"),
    (MeshConfig(data=3, fsdp=-1, tensor=1), "mesh.fsdp"),
    (MeshConfig(data=2, fsdp=2, tensor=1), "needs 4 devices"),
    (MeshConfig(data=0, fsdp=-1, tensor=1), "mesh.data"),
])
def test_make_mesh_errors(cfg, needle):
    with pytest.raises(ConfigError, match=needle):
        make_mesh(cfg)


def test_rules_and_divisibility():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    # q_proj [N, H, D]: heads over tensor, model dim over fsdp (training) / whole (sampling).
    assert logical_spec(mesh, ("q_heads", "head_dim", "embed"), TRAIN_RULES, (4, 24, 64)) == \
        P("tensor", None, "fsdp")
    assert logical_spec(mesh, ("q_heads", "head_dim", "embed"), SAMPLE_RULES, (4, 24, 64)) == \
        P("tensor", None, None)
    # A mesh axis that does not divide its dim is dropped (1 kv head, vocab 97).
    assert logical_spec(mesh, ("kv_heads", "head_dim", "embed"), TRAIN_RULES, (1, 24, 64)) == \
        P(None, None, "fsdp")
    assert logical_spec(mesh, ("vocab", "embed"), TRAIN_RULES, (97, 64)) == P(None, "fsdp")
    assert logical_spec(mesh, ("batch", None), TRAIN_RULES, (6, 5)) == P("data", None)
    with pytest.raises(ValueError, match="no_such_axis"):
        logical_spec(mesh, ("no_such_axis",), TRAIN_RULES)
    assert batch_sharding(mesh, 3).spec == P(("data", "fsdp"), None, None)


@pytest.fixture(scope="module")
def checkpoint(hf_checkpoint):
    return hf_checkpoint(**DIMS)


@pytest.fixture(scope="module")
def single(checkpoint):
    """Single-device reference: logits of a full forward and of prefill + one decode step."""
    model = load_hf(checkpoint)
    tokens = np.random.RandomState(0).randint(0, 96, (4, 9))
    mask = np.ones((4, 9), np.int32)
    mask[1, :3] = 0
    mask[3, :6] = 0
    logits = np.asarray(model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))
    return tokens, mask, logits


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 4, 2)])
@pytest.mark.parametrize("rules_name", ["train", "sample"])
def test_sharded_forward_equals_single_device(checkpoint, single, shape, rules_name):
    rules = TRAIN_RULES if rules_name == "train" else SAMPLE_RULES
    mesh = make_mesh(MeshConfig(*shape))
    model = load_hf(checkpoint, mesh=mesh, rules=rules)
    graphdef, state = nnx.split(model)
    shardings = state_shardings(state, mesh, rules)
    for (path, var), (_, want) in zip(nnx.to_flat_state(state), nnx.to_flat_state(shardings)):
        assert var.value.sharding.is_equivalent_to(want.value, var.value.ndim), path
        if rules_name == "sample":
            assert "fsdp" not in str(want.value.spec), path
    q = state["model"]["layers"][0]["self_attn"]["q_proj"]["weight"].value
    assert len(q.sharding.device_set) == 8 and q.addressable_shards[0].data.shape[0] == 2

    tokens, mask, want = single
    bs = batch_sharding(mesh)
    fwd = jax.jit(lambda s, t, m: apply(graphdef, s, t, attention_mask=m))
    got = fwd(state, jax.device_put(jnp.asarray(tokens), bs), jax.device_put(jnp.asarray(mask), bs))
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=0)


def test_sharded_cache_decode_equals_single_device(checkpoint):
    tokens = np.random.RandomState(1).randint(0, 96, (4, 6))
    positions = jnp.full((4, 1), 6, jnp.int32)
    index = jnp.full((4,), 6, jnp.int32)
    step = jnp.asarray(np.random.RandomState(2).randint(0, 96, (4, 1)))

    def run(model, cache, put=lambda x: x):
        graphdef, state = nnx.split(model)
        f = jax.jit(lambda s, t, c, p, i: apply(graphdef, s, t, positions=p, cache=c,
                                                cache_index=i))
        _, cache = f(state, put(jnp.asarray(tokens)), cache, None, jnp.zeros((4,), jnp.int32))
        logits, cache = f(state, put(step), cache, put(positions), index)
        return np.asarray(logits), cache

    cfg_single = load_hf(checkpoint)
    want, _ = run(cfg_single, init_cache(cfg_single.cfg, 4, 8))
    mesh = make_mesh(MeshConfig(2, 2, 2))
    model = shard_model(load_hf(checkpoint), mesh, SAMPLE_RULES)
    cache = init_cache(model.cfg, 4, 8)
    cs = cache_shardings(cache, mesh, SAMPLE_RULES)
    assert all(s.spec == P(("data", "fsdp"), "tensor", None, None) for s in cs.k + cs.v)
    cache = jax.device_put(cache, cs)
    got, new_cache = run(model, cache, lambda x: jax.device_put(x, batch_sharding(mesh)))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


def test_load_reads_only_each_devices_slice(checkpoint, monkeypatch):
    """With a mesh, every tensor is assembled from per-device slices of the file mapping."""
    from tapo_jax.models import hf

    calls = []
    original = hf.put_global

    def spy(shape, sharding, callback):
        def cb(idx):
            out = callback(idx)
            calls.append((shape, out.shape))
            return out
        return original(shape, sharding, cb)

    monkeypatch.setattr(hf, "put_global", spy)
    load_hf(checkpoint, mesh=make_mesh(MeshConfig(2, 2, 2)), rules=TRAIN_RULES)
    q_shape = (4, 24, 64)  # q_proj: heads over tensor (2), model dim over fsdp (2)
    assert {got for shape, got in calls if shape == q_shape} == {(2, 24, 32)}
    assert all(np.prod(got) <= np.prod(shape) for shape, got in calls)


def test_create_sharded_model_equals_plain_init():
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_heads=4,
                      num_kv_heads=2, head_dim=8, tie_word_embeddings=False)
    mesh = make_mesh(MeshConfig(2, 2, 2))
    model = create_sharded_model(cfg, mesh, TRAIN_RULES, seed=3)
    want = nnx.state(Qwen3(cfg, rngs=nnx.Rngs(3)))
    got = nnx.state(model)
    for (path, a), (_, b) in zip(nnx.to_flat_state(got), nnx.to_flat_state(want)):
        # Same random draws; jit may round the normal transform differently in the last ulp.
        np.testing.assert_allclose(np.asarray(a.value), np.asarray(b.value), rtol=1e-6,
                                   atol=1e-9, err_msg=str(path))
    gate = got["model"]["layers"][0]["mlp"]["gate_proj"]["weight"].value
    assert gate.sharding.spec == P("tensor", "fsdp")
