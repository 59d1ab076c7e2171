"""The jitted train step: micro-batch == full batch, sharded == single device, SFT loss against
a NumPy computation, teacher-forced log-probs, OPSD alignment, PPO mini-batch loop."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tapo_jax.config import Config, MeshConfig, ModelConfig, OptimConfig, RLConfig, TrainConfig
from tapo_jax.models import sharding as sh
from tapo_jax.models.presets import PRESETS
from tapo_jax.train.step import (OPSDBatch, average_metrics, make_logprob_fn, make_train_step,
                                 split_minibatches, update_on_batch)
from tapo_jax.train.state import (abstract_params, create_train_state, make_optimizer,
                                  optim_config_for, train_state_shardings)
from tapo_jax.train.assembly import place_batch
from tapo_jax.types import TrainBatch

# no implicit host<->device transfer: batches are placed explicitly (conftest.py)
pytestmark = pytest.mark.transfer_guard

B, T, CHUNK = 8, 16, 128  # vocabulary 512 streams in 4 chunks


def make_batch(seed=0, b=B, t=T, vocab=512, left_pad=0):
    """Right-padded rows with prompt, response, padding; 2 of 8 rows are reflections."""
    r = np.random.default_rng(seed)
    plen = r.integers(2, 5, b)
    rlen = r.integers(3, t - 5 - left_pad, b)
    col = np.arange(t)
    am = (col[None] < (plen + rlen)[:, None]).astype(np.int32)
    lm = ((col[None] >= plen[:, None]) & (am > 0)).astype(np.float32)
    tokens = (r.integers(1, vocab, (b, t)) * am).astype(np.int32)
    rows = np.ones(b, np.float32)
    rows[-1] = 0.0  # one padding row
    return TrainBatch(
        tokens=tokens, positions=np.maximum(np.cumsum(am, 1) - 1, 0).astype(np.int32),
        attention_mask=am, loss_mask=lm, query_index=(np.arange(b) // 4).astype(np.int32),
        is_reflection=np.arange(b) % 4 == 3, rewards=r.integers(0, 2, b).astype(np.float32),
        row_mask=rows, group_ids=np.zeros(b, np.int32),
        advantages=r.normal(size=b).astype(np.float32),
        old_logprobs=(-6.2 + 0.3 * r.normal(size=(b, t))).astype(np.float32),
        ref_logprobs=(-6.2 + 0.3 * r.normal(size=(b, t))).astype(np.float32))


@pytest.fixture(scope="module")
def setup():
    """Config, meshes and one initial state per mesh (built once; steps below do not donate
    except ``full_step``, so the same initial state feeds every test)."""
    mc = ModelConfig(**PRESETS["tiny"])
    cfg = Config(model=mc, rl=RLConfig(kl_coef=0.1, entropy_coef=0.01),
                 optim=OptimConfig(learning_rate=1e-3, warmup_steps=0, weight_decay=0.1,
                                   grad_clip=0.05),
                 train=TrainConfig(steps=10))
    mesh8 = sh.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    mesh1 = sh.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    tx = make_optimizer(*optim_config_for(cfg, "rl"))
    graphdef, state8, _ = create_train_state(cfg.model, tx, mesh8, seed=0)
    sh1 = train_state_shardings(abstract_params(cfg.model)[1], tx, mesh1)
    state1 = jax.device_put(state8, sh1)
    return cfg, mesh8, mesh1, graphdef, state8, state1


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


@pytest.fixture(scope="module")
def full_step(setup):
    """One full-batch RL step on the 8-device mesh, state donated: (step, new state, metrics)."""
    cfg, mesh8, _, graphdef, state8, _ = setup
    step = make_train_step(graphdef, cfg, mesh8, kind="rl", chunk_size=CHUNK)
    batch = split_minibatches(make_batch(), 1, mesh8)[0]  # device arrays, as update_on_batch
    new, metrics = step(jax.tree.map(jnp.copy, state8), batch)
    return step, host(new), host(metrics)


def assert_same_update(a, b, metrics_a, metrics_b):
    """Metrics, the accumulated gradient and the new params agree within float32 rounding.

    Adam's first update is lr * g / (|g| + eps): where |g| is at rounding level its direction is
    noise, so params are compared where |g| > 1e-4 * max|g| of that tensor (>= 95% of entries);
    the gradient itself is compared everywhere through Adam's first moment mu = (1 - b1) g.
    """
    for k in metrics_a:
        np.testing.assert_allclose(metrics_b[k], metrics_a[k], rtol=2e-5, atol=1e-6, err_msg=k)
    mu_a = a.opt_state[1][0].mu
    mu_b = b.opt_state[1][0].mu
    covered = total = 0
    for ga, gb, pa, pb in zip(jax.tree.leaves(mu_a), jax.tree.leaves(mu_b),
                              jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        scale = np.abs(ga).max()
        np.testing.assert_allclose(gb, ga, rtol=1e-4, atol=1e-5 * scale)
        ok = np.abs(ga) > 1e-4 * scale
        np.testing.assert_allclose(pb[ok], pa[ok], rtol=0, atol=1e-6)
        covered += ok.sum()
        total += ok.size
    assert covered >= 0.95 * total
    assert int(b.step) == int(a.step) == 1


def test_rl_step_metrics_sane(full_step):
    _, new, m = full_step
    assert np.isfinite(list(m.values())).all()
    assert m["grad_norm"] > 0 and m["num_ref_rows"] == 1 and m["num_orig_rows"] == 6
    np.testing.assert_allclose(m["learning_rate"], 1e-3)  # no warmup: cosine from lr
    assert m["step"] == 1 and int(new.step) == 1


def test_first_update_is_clipped_adamw(setup, full_step):
    """NumPy reference of the first update: g clipped to global norm 0.05, then AdamW with bias
    correction, p1 = p0 - lr * (g / (|g| + eps) + wd * p0) (weight decay on matrices only)."""
    cfg, *_, state8, _ = setup
    _, new, m = full_step
    o = cfg.optim
    assert m["grad_norm"] > o.grad_clip  # the clip is active in this step
    grads = [np.asarray(mu, np.float64) / (1 - o.b1)
             for mu in jax.tree.leaves(new.opt_state[1][0].mu)]
    clipped_norm = np.sqrt(sum((g ** 2).sum() for g in grads))
    np.testing.assert_allclose(clipped_norm, o.grad_clip, rtol=1e-5)
    p0 = [np.asarray(x, np.float64) for x in jax.tree.leaves(host(state8.params))]
    p1 = jax.tree.leaves(new.params)
    for g, a, b in zip(grads, p0, p1):
        want = a - o.learning_rate * (g / (np.abs(g) + 1e-8) + (o.weight_decay * a
                                                                   if a.ndim >= 2 else 0.0))
        np.testing.assert_allclose(b, want, rtol=0, atol=2e-6)
        assert np.abs(b - a).max() > 0.5 * o.learning_rate  # the params did move


def test_lr_schedule_matches_formula():
    """Linear warmup from 0, then cosine to min_lr_ratio * lr at the last step (NumPy)."""
    from tapo_jax.train.state import lr_schedule

    o = OptimConfig(learning_rate=2e-3, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    sched = lr_schedule(o, 20)
    for t in (0, 1, 3, 4, 5, 12, 19, 20, 25):
        if t < 4:
            want = 2e-3 * t / 4
        else:
            frac = min(t - 4, 16) / 16
            want = 2e-3 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * frac)))
        got = jax.jit(sched)(jax.device_put(np.int32(t)))
        np.testing.assert_allclose(float(got), want, rtol=1e-6, err_msg=str(t))
    const = lr_schedule(OptimConfig(learning_rate=1e-3, schedule="constant"), 20)
    const = jax.jit(const)
    assert float(const(jax.device_put(np.int32(0)))) == float(const(jax.device_put(np.int32(19)))) \
        == np.float32(1e-3)


def test_cold_start_optimizer_has_its_own_lr_warmup_and_schedule():
    from tapo_jax.config import ColdStartConfig

    cfg = Config(optim=OptimConfig(learning_rate=1e-6, warmup_steps=0, schedule="constant"),
                 cold_start=ColdStartConfig(enabled=True, steps=50, learning_rate=2e-3,
                                            warmup_steps=5, schedule="cosine"))
    optim, total = optim_config_for(cfg, "sft")
    assert (optim.learning_rate, optim.warmup_steps, optim.schedule, total) == (
        2e-3, 5, "cosine", 50)
    assert optim_config_for(cfg, "rl")[0].schedule == "constant"


def test_micro_batches_equal_full_batch(setup, full_step):
    cfg, mesh8, _, graphdef, state8, _ = setup
    _, new_full, m_full = full_step
    cfg_mb = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch_size=4))
    step = make_train_step(graphdef, cfg_mb, mesh8, kind="rl", chunk_size=CHUNK, donate=False)
    new, m = step(state8, place_batch(make_batch(), mesh8))
    assert_same_update(new_full, host(new), m_full, host(m))


def test_sharded_equals_single_device(setup, full_step):
    cfg, _, mesh1, graphdef, _, state1 = setup
    _, new8, m8 = full_step
    step = make_train_step(graphdef, cfg, mesh1, kind="rl", chunk_size=CHUNK, donate=False)
    new1, m1 = step(state1, place_batch(make_batch(), mesh1))
    assert_same_update(host(new1), new8, host(m1), m8)


def numpy_logits(graphdef, params, batch):
    from flax import nnx

    forward = jax.jit(lambda p, b: nnx.merge(graphdef, p)(b.tokens, b.positions,
                                                         b.attention_mask))
    mesh = jax.tree.leaves(params)[0].sharding.mesh
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return np.asarray(forward(params, jax.device_put(batch, replicated)), np.float64)


def test_logprob_fn_matches_numpy_softmax(setup):
    _, mesh8, _, graphdef, state8, _ = setup
    batch = make_batch(seed=1)
    fn = make_logprob_fn(graphdef, mesh8, chunk_size=CHUNK, micro_batch_size=4)
    lp, ent = fn(state8.params, place_batch(batch, mesh8))
    logits = numpy_logits(graphdef, state8.params, batch)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    ref_lp = np.take_along_axis(logp[:, :-1], batch.tokens[:, 1:, None], -1)[..., 0]
    ref_ent = -(np.exp(logp) * logp).sum(-1)[:, :-1]
    np.testing.assert_allclose(np.asarray(lp)[:, 1:], ref_lp, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(ent)[:, 1:], ref_ent, rtol=1e-5, atol=2e-5)
    assert (np.asarray(lp)[:, 0] == 0).all() and (np.asarray(ent)[:, 0] == 0).all()
    assert lp.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))


def _weighted_nll(logits, batch, weights):
    """Independent: sum over the real rows' trained tokens (weights > 0) of weight x NLL of token
    t from the logits at t-1, and the number of those tokens."""
    total, count = 0.0, 0
    for b in range(B):
        if batch.row_mask[b] == 0:
            continue
        for t in range(1, T):
            if weights[b, t] > 0:
                z = logits[b, t - 1]
                lse = z.max() + np.log(np.exp(z - z.max()).sum())
                total += weights[b, t] * (lse - z[batch.tokens[b, t]])
                count += 1
    return total, count


def test_sft_loss_is_token_mean_nll(setup):
    cfg, mesh8, _, graphdef, state8, _ = setup
    batch = make_batch(seed=2)
    logits = numpy_logits(graphdef, state8.params, batch)
    step = make_train_step(graphdef, cfg, mesh8, kind="sft", chunk_size=CHUNK, donate=False)
    _, m = step(state8, place_batch(batch, mesh8))
    total, count = _weighted_nll(logits, batch, np.asarray(batch.loss_mask, np.float32))
    np.testing.assert_allclose(float(m["loss"]), total / count, rtol=1e-5)
    assert float(m["num_tokens"]) == count
    # cold-start optimizer: lr from cold_start (warmup 20 steps from 0)
    assert float(m["learning_rate"]) == 0.0 and float(m["grad_norm"]) > 0


def test_sft_loss_weights_tokens_and_divides_by_their_count(setup):
    """A loss_mask with weights (cold_start.decision_weight): the loss is sum(w * nll) over the
    trained tokens divided by their count, not by the sum of weights."""
    cfg, mesh8, _, graphdef, state8, _ = setup
    batch = make_batch(seed=2)
    lm = np.asarray(batch.loss_mask, np.float32).copy()
    rng = np.random.default_rng(0)
    on = lm > 0
    lm[on] = np.where(rng.random(on.sum()) < 0.3, 5.0, 1.0)
    weighted = batch.replace(loss_mask=lm)
    logits = numpy_logits(graphdef, state8.params, batch)
    step = make_train_step(graphdef, cfg, mesh8, kind="sft", chunk_size=CHUNK, donate=False)
    _, m = step(state8, place_batch(weighted, mesh8))
    total, count = _weighted_nll(logits, batch, lm)
    assert (lm[np.asarray(batch.row_mask) > 0] == 5.0).any()
    np.testing.assert_allclose(float(m["loss"]), total / count, rtol=1e-5)
    assert float(m["num_tokens"]) == count


def test_opsd_teacher_equal_to_student_gives_zero(setup):
    """The teacher row is the student row shifted right behind masked padding: with correct
    alignment teacher and student distributions coincide, so loss and gradient are ~0; a
    teacher mask shifted by one token is clearly penalised."""
    cfg, _, mesh1, graphdef, _, state1 = setup
    s = make_batch(seed=3)
    shift = lambda x: np.pad(x, ((0, 0), (3, 0)))  # noqa: E731
    batch = OPSDBatch(student=s, teacher_tokens=shift(s.tokens),
                      teacher_positions=shift(s.positions),
                      teacher_attention_mask=shift(s.attention_mask),
                      teacher_loss_mask=shift(s.loss_mask * s.row_mask[:, None]))
    bad = batch.replace(teacher_loss_mask=np.pad(batch.teacher_loss_mask, ((0, 0), (1, 0)))[:, :-1])
    step = make_train_step(graphdef, cfg, mesh1, kind="opsd", donate=False)
    _, m = step(state1, place_batch(batch, mesh1))
    _, m_bad = step(state1, place_batch(bad, mesh1))
    assert float(m["opsd_tokens"]) == float((s.loss_mask * s.row_mask[:, None]).sum())
    assert float(m["loss"]) < 1e-6 and float(m["grad_norm"]) < 1e-5
    assert float(m_bad["loss"]) > 1e-3


def test_bf16_compute_keeps_f32_master_weights(setup):
    """bfloat16 activations, float32 params: teacher-forced log-probs stay close to float32."""
    cfg, mesh8, _, graphdef, state8, _ = setup
    cfg16 = dataclasses.replace(cfg.model, dtype="bfloat16")
    graphdef16 = abstract_params(cfg16)[0]
    batch = make_batch(seed=2)
    placed = place_batch(batch, mesh8)
    lp32, _ = make_logprob_fn(graphdef, mesh8, chunk_size=CHUNK)(state8.params, placed)
    lp16, _ = make_logprob_fn(graphdef16, mesh8, chunk_size=CHUNK)(state8.params, placed)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state8.params))
    assert lp16.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(lp16), np.asarray(lp32), atol=0.05)


def test_bf16_train_step_updates_f32_master_weights(setup, full_step):
    """A bfloat16-compute step keeps float32 params and optimizer moments, and its gradient
    points where the float32 step's does (cosine > 0.99 per tensor of any size)."""
    cfg, mesh8, _, _, state8, _ = setup
    _, new32, _ = full_step
    cfg16 = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype="bfloat16"))
    graphdef16 = abstract_params(cfg16.model)[0]
    step = make_train_step(graphdef16, cfg16, mesh8, kind="rl", chunk_size=CHUNK, donate=False)
    new16, m16 = step(state8, place_batch(make_batch(), mesh8))
    new16 = host(new16)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(new16.params))
    assert np.isfinite(float(m16["loss"])) and float(m16["grad_norm"]) > 0
    for g16, g32 in zip(jax.tree.leaves(new16.opt_state[1][0].mu),
                        jax.tree.leaves(new32.opt_state[1][0].mu)):
        assert g16.dtype == np.float32
        a, b = g16.ravel().astype(np.float64), g32.ravel().astype(np.float64)
        if np.linalg.norm(b) > 1e-6 * max(1.0, np.abs(b).max()):
            assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.99


def test_ppo_epochs_and_minibatches(setup, full_step):
    """16 rows in 2 strided mini-batches of 8 (the compiled shape), 2 epochs: 4 updates."""
    cfg, mesh8, _, graphdef, state8, _ = setup
    step = full_step[0]
    batch = make_batch(seed=5, b=16)
    parts = split_minibatches(place_batch(batch, mesh8), 2, mesh8)
    np.testing.assert_array_equal(np.asarray(parts[1].tokens), batch.tokens[1::2])
    state, history = update_on_batch(step, jax.tree.map(jnp.copy, state8),
                                     place_batch(batch, mesh8), mesh8,
                                     ppo_epochs=2, mini_batches=2)
    assert int(state.step) == 4 and [int(h["step"]) for h in history] == [1, 2, 3, 4]
    avg = average_metrics(history)
    np.testing.assert_allclose(float(avg["grad_norm"]),
                               np.mean([float(h["grad_norm"]) for h in history]), rtol=1e-6)
