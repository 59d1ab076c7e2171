"""Sequence packing: a packed batch gives the per-token log-probs, losses and gradients of the
same batch unpacked (float32 rounding), for the RL, SFT and OPSD losses, with rows of very
different lengths, whole and in micro-batches; and the packing layout itself."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from tapo_jax.config import Config, MeshConfig, ModelConfig, OptimConfig, RLConfig, TrainConfig
from tapo_jax.models import sharding as sh
from tapo_jax.models.presets import PRESETS
from tapo_jax.rl import packing
from tapo_jax.train.step import (OPSDBatch, _accumulate, _opsd_loss_fn, _rl_loss_fn,
                                 _rl_prepare, _sft_loss_fn, make_logprob_fn, rows_logprobs)
from tapo_jax.train.state import create_train_state, make_optimizer, optim_config_for
from tapo_jax.types import TrainBatch

B, T, CHUNK = 8, 48, 128
LENGTHS = [3, 45, 7, 30, 48, 12, 20, 5]  # real tokens per row (prompt + response)


def make_batch(lengths=LENGTHS, t=T, seed=0, vocab=512):
    r = np.random.default_rng(seed)
    n = np.asarray(lengths)
    plen = np.minimum(2 + r.integers(0, 3, len(n)), n - 1)
    col = np.arange(t)
    am = (col[None] < n[:, None]).astype(np.int32)
    lm = ((col[None] >= plen[:, None]) & (am > 0)).astype(np.float32)
    rows = np.ones(len(n), np.float32)
    rows[-1] = 0.0  # a padding row
    return TrainBatch(
        tokens=(r.integers(1, vocab, (len(n), t)) * am).astype(np.int32),
        positions=np.maximum(np.cumsum(am, 1) - 1, 0).astype(np.int32), attention_mask=am,
        loss_mask=lm, query_index=(np.arange(len(n)) // 4).astype(np.int32),
        is_reflection=np.arange(len(n)) % 4 == 3,
        rewards=r.integers(0, 2, len(n)).astype(np.float32), row_mask=rows,
        group_ids=np.zeros(len(n), np.int32), advantages=r.normal(size=len(n)).astype(np.float32),
        old_logprobs=(-6.2 + 0.3 * r.normal(size=(len(n), t))).astype(np.float32),
        ref_logprobs=(-6.2 + 0.3 * r.normal(size=(len(n), t))).astype(np.float32))


def packed(batch, groups=1):
    p, stats = packing.pack(batch.tokens, batch.attention_mask, length=T, groups=groups)
    return batch.replace(packing=p), stats


@pytest.fixture(scope="module")
def setup():
    mc = ModelConfig(**PRESETS["tiny"])
    cfg = Config(model=mc, rl=RLConfig(kl_coef=0.1, entropy_coef=0.01),
                 optim=OptimConfig(learning_rate=1e-3, warmup_steps=0), train=TrainConfig())
    mesh = sh.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    tx = make_optimizer(*optim_config_for(cfg, "rl"))
    graphdef, state, _ = create_train_state(cfg.model, tx, mesh, seed=0)
    return cfg, mesh, graphdef, state.params


def grads_and_loss(build, graphdef, cfg, batch, params, mesh, m):
    loss_fn, finish = build(graphdef, cfg, batch, CHUNK, 1.0, mesh)
    grads, terms = jax.jit(lambda p, b: _accumulate(loss_fn, p, b, m, mesh))(params, batch)
    return jax.device_get(grads), {k: float(v) for k, v in finish(terms).items()}


def assert_same(a, b):
    (ga, ma), (gb, mb) = a, b
    for k in ma:
        np.testing.assert_allclose(mb[k], ma[k], rtol=2e-5, atol=1e-6, err_msg=k)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        scale = np.abs(x).max()
        np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-5 * scale)
    assert max(np.abs(x).max() for x in jax.tree.leaves(ga)) > 0  # (NaN fails too)


def test_layout_keeps_rows_apart_and_saves_padding():
    batch = make_batch()
    for groups in (1, 2):
        p, stats = packing.pack(batch.tokens, batch.attention_mask, length=T, groups=groups)
        R = p.tokens.shape[0]
        assert stats.real_tokens == sum(LENGTHS) and stats.unpacked_tokens == B * T
        assert stats.packed_tokens == R * T < B * T
        assert stats.padded_share_packed < stats.padded_share_unpacked
        local = R // groups
        for b, n in enumerate(LENGTHS):
            g = b % groups
            flat = p.index[b, :n]
            rows, cols = flat // T, flat % T
            assert len(set(rows)) == 1 and np.all(np.diff(cols) == 1)  # one contiguous run
            r = rows[0] * groups + g  # its micro-batch's packed row, in the global layout
            assert rows[0] < local
            np.testing.assert_array_equal(p.tokens[r, cols], batch.tokens[b, :n])
            np.testing.assert_array_equal(p.positions[r, cols], np.arange(n))
            seg = p.segment_ids[r, cols]
            assert np.all(seg == seg[0]) and seg[0] > 0
            others = np.delete(np.arange(T), cols)
            assert not np.any(p.segment_ids[r, others] == seg[0])  # no other row shares the id
    with pytest.raises(ValueError, match="packed rows hold"):
        packing.pack(batch.tokens, batch.attention_mask, length=40)


def test_packed_logprobs_equal_unpacked(setup):
    cfg, mesh, graphdef, params = setup
    batch = make_batch(seed=1)
    pb, _ = packed(batch)
    fn = jax.jit(lambda p, b: rows_logprobs(graphdef, p, b.tokens, b.positions,
                                            b.attention_mask, b.packing, chunk_size=CHUNK))
    lp, ent = fn(params, batch)
    lp_p, ent_p = fn(params, pb)
    valid = (batch.attention_mask > 0) & (np.arange(T) > 0)[None]
    np.testing.assert_allclose(np.asarray(lp_p)[valid], np.asarray(lp)[valid], atol=2e-5)
    np.testing.assert_allclose(np.asarray(ent_p)[valid], np.asarray(ent)[valid], atol=2e-5)
    assert np.all(np.asarray(lp_p)[~valid] == 0)
    # the loop's log-prob forward, micro-batched over 2 x 4 rows
    fwd = make_logprob_fn(graphdef, mesh, chunk_size=CHUNK, micro_batch_size=4)
    lp_m, _ = fwd(params, packed(batch, groups=2)[0])
    np.testing.assert_allclose(np.asarray(lp_m)[valid], np.asarray(lp)[valid], atol=2e-5)


@pytest.mark.parametrize("m", [1, 2])
def test_rl_and_sft_losses_and_gradients_equal_unpacked(setup, m):
    cfg, mesh, graphdef, params = setup
    batch = _rl_prepare(make_batch(seed=2), cfg)
    for build in (_rl_loss_fn, _sft_loss_fn):
        ref = grads_and_loss(build, graphdef, cfg, batch, params, mesh, 1)
        assert_same(ref, grads_and_loss(build, graphdef, cfg, packed(batch, m)[0], params,
                                        mesh, m))


def test_opsd_loss_and_gradients_equal_unpacked(setup):
    """Student and teacher rows (teacher prompt 3 tokens longer) packed separately."""
    cfg, mesh, graphdef, params = setup
    s = make_batch(lengths=[n - 3 if n > 40 else n for n in LENGTHS], seed=3)
    shift = lambda x: np.pad(x, ((0, 0), (3, 0)))[:, :T]  # noqa: E731
    t_tokens = np.where(np.arange(T)[None] < 3, 7, shift(s.tokens))  # another prompt before
    t_am = np.where(np.arange(T)[None] < s.attention_mask.sum(1, keepdims=True) + 3, 1, 0)
    batch = OPSDBatch(student=s, teacher_tokens=(t_tokens * t_am).astype(np.int32),
                      teacher_positions=np.maximum(np.cumsum(t_am, 1) - 1, 0).astype(np.int32),
                      teacher_attention_mask=t_am.astype(np.int32),
                      teacher_loss_mask=shift(s.loss_mask * s.row_mask[:, None]))
    ref = grads_and_loss(_opsd_loss_fn, graphdef, cfg, batch, params, mesh, 1)
    assert ref[1]["opsd_tokens"] > 0
    t_pack, _ = packing.pack(batch.teacher_tokens, batch.teacher_attention_mask, length=T)
    pb = batch.replace(student=packed(s)[0], teacher_packing=t_pack)
    assert_same(ref, grads_and_loss(_opsd_loss_fn, graphdef, cfg, pb, params, mesh, 1))
