"""When every rule construction is correct, Eq. 5 gives the reflection groups equal rewards and
advantage 0: a TAPO step then equals a GRPO step exactly. Under the section 4.5 reading
(``rl.ref_group_includes_originals``) the constructions get positive advantages against their
query's originals and the step differs."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tapo_jax.config import (Config, DataConfig, MeshConfig, ModelConfig, OptimConfig, RLConfig,
                             TrainConfig)
from tapo_jax.data import arithmetic as A
from tapo_jax.data.datasets import encode_prompts
from tapo_jax.models import sharding as sh
from tapo_jax.models.presets import PRESETS
from tapo_jax.rewards.verifier import score
from tapo_jax.rl.advantages import tapo_advantages
from tapo_jax.train.step import make_logprob_fn, make_train_step
from tapo_jax.data.batching import build_batch_arrays
from tapo_jax.train import rollout
from tapo_jax.train.state import create_train_state, make_optimizer, optim_config_for
from tapo_jax.types import TrainBatch

K = 8
N_CORRECT = [3, 4, 2, 8]  # queries 0, 1, 2 are eligible (>= 2 correct, >= 4 wrong)


def _sample_fn(tok, problems):
    rng = np.random.default_rng(0)

    def sample(prompt_ids, n, max_new_tokens, seed, **decoding):
        out = []
        for ids in prompt_ids:
            text = tok.decode(ids, skip_special_tokens=True)
            qi = next(i for i, p in enumerate(problems) if p.question in text)
            group = []
            for k in range(n):
                slip = None
                while k >= N_CORRECT[qi] and slip is None:
                    slip = A.make_slip(problems[qi], rng)
                t = problems[qi].solution if k < N_CORRECT[qi] else slip.text
                t_ids = tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                group.append(rollout.Completion(t_ids, [-0.5] * len(t_ids), "stop"))
            out.append(group)
        return out

    return sample


@pytest.fixture(scope="module")
def setup():
    tok = A.build_tokenizer()
    problems = A.generate_problems(4, seed=5, min_steps=2, max_steps=2)
    cfg = Config(model=ModelConfig(**PRESETS["tiny"]),
                 rl=RLConfig(algorithm="tapo", num_samples=K, n_pos=2, n_neg=4, m_max=2,
                             construction="rule", eps_high=0.28),
                 optim=OptimConfig(learning_rate=1e-3, warmup_steps=0),
                 data=DataConfig(kind="arithmetic"), train=TrainConfig(seed=0, steps=10))
    col = rollout.collect([p.record() for p in problems], cfg=cfg, tokenizer=tok, step=0,
                          sample=_sample_fn(tok, problems), score=score,
                          encode=lambda ps: encode_prompts(ps, tok))
    refl = [r for r in col.rows if r.is_reflection]
    assert len(refl) == 6 and all(r.reward == 1.0 for r in refl)  # all constructions correct
    arrays, _ = build_batch_arrays(col.rows, num_queries=col.num_queries, pad_id=0,
                                   length_buckets=(128,), row_buckets=(40,))
    mesh = sh.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    tx = make_optimizer(*optim_config_for(cfg, "rl"))
    graphdef, state, _ = create_train_state(cfg.model, tx, mesh, seed=0)
    batch = TrainBatch(**{k: jnp.asarray(v) for k, v in arrays.items()})
    lp, _ = make_logprob_fn(graphdef, mesh)(state.params, batch)
    batch = batch.replace(old_logprobs=lp, ref_logprobs=lp)
    return cfg, mesh, graphdef, state, batch, col.num_queries


def _step(setup, **rl):
    cfg, mesh, graphdef, state, batch, nq = setup
    cfg = dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, **rl))
    adv, gids = tapo_advantages(batch.rewards, batch.query_index, batch.is_reflection,
                                batch.row_mask, num_queries=nq,
                                ref_group_includes_originals=cfg.rl.ref_group_includes_originals)
    b = batch.replace(advantages=adv, group_ids=gids)
    step = make_train_step(graphdef, cfg, mesh, kind="rl", donate=False)
    new, _ = step(state, b)
    return np.asarray(adv), jax.tree.map(np.asarray, jax.device_get(new.params))


def test_tapo_step_equals_grpo_step_under_eq5(setup):
    batch = setup[4]
    adv_t, p_tapo = _step(setup)
    _, p_grpo = _step(setup, algorithm="grpo")
    refl = np.asarray(batch.is_reflection) & (np.asarray(batch.row_mask) > 0)
    assert np.all(adv_t[refl] == 0.0)
    for a, b in zip(jax.tree.leaves(p_tapo), jax.tree.leaves(p_grpo)):
        np.testing.assert_array_equal(a, b)


def test_section_4_5_reading_differs_from_grpo(setup):
    batch = setup[4]
    adv, p_45 = _step(setup, ref_group_includes_originals=True)
    _, p_grpo = _step(setup, algorithm="grpo")
    refl = np.asarray(batch.is_reflection) & (np.asarray(batch.row_mask) > 0)
    assert refl.sum() == 6 and np.all(adv[refl] > 0)
    diff = max(float(np.abs(a - b).max())
               for a, b in zip(jax.tree.leaves(p_45), jax.tree.leaves(p_grpo)))
    assert diff > 1e-5
