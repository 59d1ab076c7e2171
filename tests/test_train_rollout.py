"""Host-side data collection of one TAPO iteration, with a scripted policy.

The policy is replaced by a deterministic script (correct or slipped step-by-step answers for
questions; an oracle-built ``<analysis>`` + ``<reconstruction>`` for synthesis prompts), so the
real parsing, DCS, reward and batch code paths run on outputs whose right answers are known.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from tapo_jax.config import Config, DataConfig, RLConfig, TrainConfig
from tapo_jax.data import arithmetic as A
from tapo_jax.data.sft_examples import construction_example
from tapo_jax.data.datasets import encode_prompts
from tapo_jax.rewards.verifier import score
from tapo_jax.rl import assign_group_ids
from tapo_jax.data.batching import build_batch_arrays
from tapo_jax.train import rollout

# no implicit host<->device transfer: batches are placed explicitly (conftest.py)
pytestmark = pytest.mark.transfer_guard

K = 8


@pytest.fixture(scope="module")
def setup():
    tok = A.build_tokenizer()
    problems = A.generate_problems(6, seed=3, min_steps=2, max_steps=2)
    return tok, problems


def _script(tok, problems, n_correct):
    """sample_fn: question q gets n_correct[q] correct answers then slips; synthesis prompts get
    the oracle's construction for the wrong answer they quote."""
    by_question = {p.question: p for p in problems}
    rng = np.random.default_rng(0)
    slips = {}
    calls = []

    def encode_text(text):
        return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    def sample(prompt_ids, n, max_new_tokens, seed, **decoding):
        calls.append((len(prompt_ids), n, max_new_tokens, decoding))
        out = []
        for ids in prompt_ids:
            text = tok.decode(ids, skip_special_tokens=True)
            group = []
            if "Wrong:" in text:  # a synthesis prompt (compact style)
                q = next(q for q in by_question if q in text)
                wrong = next(w for w in slips[q] if w.strip() in text)
                _, target = construction_example(by_question[q], wrong)
                group.append(rollout.Completion(encode_text(target), [0.0] * 3, "stop"))
            else:
                q = next(q for q in by_question if q in text)
                p = by_question[q]
                for k in range(n):
                    if k < n_correct[p.question]:
                        t = p.solution
                    else:
                        slip = None
                        while slip is None:
                            slip = A.make_slip(p, rng)
                        t = slip.text
                        slips.setdefault(q, []).append(t)
                    ids_ = encode_text(t)
                    group.append(rollout.Completion(ids_, [-0.5] * len(ids_), "stop"))
            out.append(group)
        return out

    return sample, calls


def _cfg(**rl):
    return Config(rl=RLConfig(algorithm="tapo", num_samples=K, n_pos=2, n_neg=4, m_max=3, **rl),
                  data=DataConfig(kind="arithmetic"), train=TrainConfig(seed=1))


def test_collect_tapo_rows(setup):
    tok, problems = setup
    # correct counts: eligible iff 2 <= c and K - c >= 4  ->  c in {2, 3, 4}
    counts = [0, 1, 2, 4, 5, 8]
    n_correct = {p.question: c for p, c in zip(problems, counts)}
    sample, calls = _script(tok, problems, n_correct)
    cfg = _cfg()
    encode = lambda prompts: encode_prompts(prompts, tok)  # noqa: E731
    recs = [p.record() for p in problems]
    col = rollout.collect(recs, cfg=cfg, tokenizer=tok, step=0, sample=sample, score=score,
                          encode=encode)
    np.testing.assert_array_equal((col.rewards > 0).sum(1), counts)
    assert col.stats["zpd_eligible_share"] == pytest.approx(2 / 6)
    # two eligible queries, m_max = 3 each
    assert col.stats["constructions_attempted"] == 6
    assert col.stats["constructions_parsed"] == 6
    assert col.stats["constructions_correct"] == 6
    assert col.stats["prefix_kept_share"] == 1.0
    refl = [r for r in col.rows if r.is_reflection]
    orig = [r for r in col.rows if not r.is_reflection]
    assert len(orig) == 6 * K and len(refl) == 6
    prompt_ids = encode([p.question for p in problems])
    for r in refl:
        assert counts[r.query_index] in (2, 4)
        # trained as a response to the ORIGINAL prompt, never the synthesis prompt
        assert list(r.prompt_ids) == prompt_ids[r.query_index]
        text = tok.decode(r.completion_ids, skip_special_tokens=True)
        assert "<analysis>" not in text and "Wait" in text
        assert r.reward == 1.0
        assert r.completion_ids[-1] == tok.eos_token_id
    # rollouts n=K for questions, then one batched n=1 call for the 6 synthesis prompts
    assert calls[0][:2] == (6, K) and calls[1][:2] == (6, 1)
    # constructions use the sampler's decoding unless the config sets their own
    assert calls[1][3] == dict(temperature=None, top_p=None, draft_tokens=0)
    arrays, _ = build_batch_arrays(col.rows, num_queries=6, pad_id=tok.pad_token_id)
    n = len(col.rows)
    group_ids = jax.jit(assign_group_ids, static_argnames=("num_queries", "decoupled"))
    gid = np.asarray(group_ids(*jax.device_put((arrays["query_index"][:n],
                                                arrays["is_reflection"][:n])),
                               num_queries=6, decoupled=True))
    isref = arrays["is_reflection"][:n]
    np.testing.assert_array_equal(gid[isref], 6 + arrays["query_index"][:n][isref])


def test_sample_time_is_split_by_purpose(setup, monkeypatch):
    """Time inside rollout calls and inside synthesis calls is reported separately, whatever the
    calls' n (a synthesis call is recognised by its content here). A fake clock that only the
    sample calls advance makes the split exact."""
    tok, problems = setup
    counts = [0, 1, 2, 4, 5, 8]
    inner, _ = _script(tok, problems, {p.question: c for p, c in zip(problems, counts)})
    clock = [100.0]
    monkeypatch.setattr(rollout.time, "perf_counter", lambda: clock[0])

    def sample(prompt_ids, n, max_new_tokens, seed, **decoding):
        synthesis = "Wrong:" in tok.decode(prompt_ids[0], skip_special_tokens=True)
        clock[0] += 0.4 if synthesis else 0.1
        return inner(prompt_ids, n, max_new_tokens, seed)

    col = rollout.collect([p.record() for p in problems], cfg=_cfg(), tokenizer=tok, step=0,
                          sample=sample, score=score, encode=lambda ps: encode_prompts(ps, tok))
    assert col.sample_seconds["construction"] == pytest.approx(0.4)
    assert col.sample_seconds["sampling"] == pytest.approx(0.1)


def test_collect_grpo_has_no_constructions(setup):
    tok, problems = setup
    n_correct = {p.question: 3 for p in problems}
    sample, calls = _script(tok, problems, n_correct)
    cfg = dataclasses.replace(_cfg(), rl=dataclasses.replace(_cfg().rl, algorithm="grpo"))
    col = rollout.collect([p.record() for p in problems], cfg=cfg, tokenizer=tok, step=0,
                          sample=sample, score=score,
                          encode=lambda ps: encode_prompts(ps, tok))
    assert len(calls) == 1
    assert not any(r.is_reflection for r in col.rows)
    assert float(col.rewards.mean()) == pytest.approx(3 / K)


def test_rule_construction_needs_no_model_call(setup):
    tok, problems = setup
    n_correct = {p.question: 3 for p in problems}
    sample, calls = _script(tok, problems, n_correct)
    cfg = _cfg(construction="rule")
    col = rollout.collect([p.record() for p in problems], cfg=cfg, tokenizer=tok, step=0,
                          sample=sample, score=score,
                          encode=lambda ps: encode_prompts(ps, tok))
    assert len(calls) == 1  # no synthesis generation
    refl = [r for r in col.rows if r.is_reflection]
    assert len(refl) == 6 * 3
    assert all(r.reward == 1.0 for r in refl)


def test_dynamic_sampling_replaces_flat_groups(setup):
    tok, problems = setup
    counts = [0, 8, 3, 3, 8, 0]
    n_correct = {p.question: c for p, c in zip(problems, counts)}
    sample, _ = _script(tok, problems, n_correct)
    cfg = _cfg(dynamic_sampling=True, max_resample_rounds=1)
    first, extra = problems[:3], problems[3:]
    col = rollout.collect([p.record() for p in first], cfg=cfg, tokenizer=tok, step=0,
                          sample=sample, score=score, encode=lambda ps: encode_prompts(ps, tok),
                          more_records=lambda: [p.record() for p in extra])
    # the kept queries all have reward spread: problems 2 and 3 (counts 3, 3)
    assert col.num_queries == 2
    assert set((col.rewards > 0).sum(1)) == {3}
    assert col.stats["dynamic_dropped"] == 4


def test_constructions_are_decoded_with_their_own_settings(setup):
    tok, problems = setup
    counts = [0, 1, 2, 4, 5, 8]
    sample, calls = _script(tok, problems, {p.question: c for p, c in zip(problems, counts)})
    cfg = _cfg()
    cfg.sampling.construction_temperature, cfg.sampling.construction_top_p = 0.6, 0.9
    cfg.sampling.construction_draft_tokens = 6
    encode = lambda prompts: encode_prompts(prompts, tok)  # noqa: E731
    rollout.collect([p.record() for p in problems], cfg=cfg, tokenizer=tok, step=0,
                    sample=sample, score=score, encode=encode)
    assert calls[0][3] == {}  # rollouts: the sampler's own temperature / top_p
    assert calls[1][3] == dict(temperature=0.6, top_p=0.9, draft_tokens=6)
