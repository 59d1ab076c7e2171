"""Speculative decoding with prompt-lookup drafts (``Sampler.generate(draft_tokens=N)``).

References: the plain decode loop (greedy: the same tokens), a teacher-forced forward (the
returned log-probs), and the exact next-token distributions from a teacher-forced forward over
every short continuation (sampled tokens: chi-square on the joint distribution of the first
tokens, with and without top-p), on tiny random Qwen3 checkpoints.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from tapo_jax.config import MeshConfig
from tapo_jax.models import load_hf
from tapo_jax.models.sharding import make_mesh
from tapo_jax.sampling import Sampler
from tapo_jax.sampling.engine import _lookup_draft

# repetitive prompts: the lookup finds earlier occurrences of their last tokens
PROMPTS = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [40, 2, 9, 11, 60, 7, 1], [3, 3, 3, 3, 3],
           [9, 1, 4, 9, 1, 4, 9, 1]]
MAX_LEN = 48


TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_layers=2, num_heads=4,
            num_kv_heads=2, seed=5)


@pytest.fixture(scope="module")
def tiny(hf_checkpoint):
    model = load_hf(hf_checkpoint(**TINY))
    graphdef, params = nnx.split(model, nnx.Param)
    return model, graphdef, params


def test_lookup_draft_copies_what_followed_the_latest_match():
    hist = np.zeros((3, 12), np.int32)
    hist[0, :8] = [1, 2, 3, 4, 1, 2, 3, 0]  # cur 6: last 3 tokens "1 2 3" matched at 0..2
    hist[1, :6] = [7, 8, 9, 5, 5, 5]  # cur 5: "5 5 5" nowhere earlier; "5 5" at 3..4
    hist[2, :4] = [1, 2, 3, 4]  # cur 3: "4" never occurred before
    cur = np.array([6, 5, 3], np.int32)
    draft = np.asarray(_lookup_draft(hist, cur, 3, 3))
    assert draft[0].tolist() == [4, 1, 2]  # what followed positions 0..2
    assert draft[1].tolist() == [5, -1, -1]  # after "5 5" (3..4) comes position 5 only
    assert draft[2].tolist() == [-1, -1, -1]


def test_greedy_is_the_plain_greedy_decode_in_fewer_steps(tiny):
    model, graphdef, params = tiny
    plain = Sampler(graphdef, params, num_slots=4, max_len=MAX_LEN, chunk=1)
    spec = Sampler(graphdef, params, num_slots=4, max_len=MAX_LEN, chunk=1)
    a = plain.generate(PROMPTS, max_new_tokens=24, temperature=0.0)
    b = spec.generate(PROMPTS, max_new_tokens=24, temperature=0.0, draft_tokens=4)
    for i in range(len(PROMPTS)):
        assert b.tokens[i].tolist() == a.tokens[i].tolist(), f"prompt {i}"
        np.testing.assert_allclose(b.logprobs[i], a.logprobs[i], atol=2e-5)
    assert b.finish_reason == a.finish_reason and b.lengths.tolist() == a.lengths.tolist()
    # one decode step per call (chunk 1): drafts were accepted, so fewer steps
    assert b.stats["decode_calls"] < a.stats["decode_calls"]


def test_stops_budget_and_logprobs(tiny):
    model, graphdef, params = tiny
    from tests.test_sampling_engine import teacher_forced_logprobs

    sampler = Sampler(graphdef, params, num_slots=4, max_len=MAX_LEN, chunk=3)
    greedy = sampler.generate(PROMPTS, max_new_tokens=20, temperature=0.0)
    stop = int(greedy.tokens[0][5])  # a token the greedy run emits: a stop inside a draft run
    ro = sampler.generate(PROMPTS, n=3, max_new_tokens=20, temperature=0.8, stop_ids=[stop],
                          seed=4, draft_tokens=5)
    for r in range(len(ro)):
        toks = ro.tokens[r].tolist()
        assert 1 <= len(toks) <= 20
        if ro.finish_reason[r] == "stop":
            assert toks[-1] == stop and stop not in toks[:-1]
        else:
            assert len(toks) == 20 and stop not in toks
        prompt = PROMPTS[ro.prompt_index[r]]
        np.testing.assert_allclose(ro.logprobs[r], teacher_forced_logprobs(model, prompt, toks,
                                                                           0.8), atol=2e-4)
    assert "stop" in ro.finish_reason


@pytest.mark.slow
def test_same_samples_for_any_slot_count_and_on_a_sharded_mesh(tiny, hf_checkpoint):
    """Token g of a request draws with fold_in(request key, g) in speculative steps too: the
    samples do not depend on the slot count, the chunk or the mesh."""
    _, graphdef, params = tiny
    kw = dict(n=2, max_new_tokens=16, temperature=0.8, top_p=0.9, seed=9, draft_tokens=3)
    ref = Sampler(graphdef, params, num_slots=4, max_len=MAX_LEN, chunk=2).generate(PROMPTS, **kw)
    runs = [Sampler(graphdef, params, num_slots=8, max_len=MAX_LEN, chunk=5).generate(PROMPTS,
                                                                                     **kw)]
    if len(jax.devices()) >= 8:
        mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), devices=jax.devices()[:8])
        m = load_hf(hf_checkpoint(**TINY), mesh=mesh)
        g, p = nnx.split(m, nnx.Param)
        runs.append(Sampler(g, p, mesh=mesh, num_slots=8, max_len=MAX_LEN, chunk=4).generate(
            PROMPTS, **kw))
    for other in runs:
        for r in range(len(ref)):
            assert other.tokens[r].tolist() == ref.tokens[r].tolist(), f"request {r}"
            np.testing.assert_allclose(other.logprobs[r], ref.logprobs[r], atol=2e-5)


def _exact_joint(model, prompt, temperature, top_p, n_tokens, vocab):
    """P(t1..tn) for every continuation, from teacher-forced next-token distributions
    (temperature, then top-p by sorting in float64)."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda t: nnx.merge(graphdef, state)(t))

    def next_dist(prefixes):
        toks = np.array([prompt + list(p) for p in prefixes], np.int32)
        logits = np.asarray(forward(toks), np.float64)[:, -1] / temperature
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        order = np.argsort(-p, axis=-1, kind="stable")
        sp = np.take_along_axis(p, order, -1)
        keep_sorted = (np.cumsum(sp, -1) - sp) < top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, -1)
        q = np.where(keep, p, 0.0)
        return q / q.sum(-1, keepdims=True)

    joint = {(): 1.0}
    for _ in range(n_tokens):
        prefixes = list(joint)
        dist = next_dist(prefixes)
        joint = {pre + (t,): joint[pre] * dist[i, t] for i, pre in enumerate(prefixes)
                 for t in range(vocab) if dist[i, t] > 0}
    return joint


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.8, 0.7)])
def test_sampled_tokens_follow_the_policy(hf_checkpoint, temperature, top_p):
    """Joint distribution of the first three tokens (the second and third come from
    speculative steps whose drafts are accepted or rejected) against the exact one."""
    V = 6
    model = load_hf(hf_checkpoint(vocab_size=V, hidden_size=32, intermediate_size=48,
                                  num_layers=1, num_heads=2, num_kv_heads=1, seed=7, std=0.6))
    graphdef, params = nnx.split(model, nnx.Param)
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]  # every continuation finds a draft
    sampler = Sampler(graphdef, params, num_slots=64, max_len=16, chunk=2)
    n = 6000
    ro = sampler.generate([prompt], n=n, max_new_tokens=3, temperature=temperature,
                          top_p=top_p, seed=11, draft_tokens=3)
    seen = np.array([t.tolist() for t in ro.tokens])
    joint = _exact_joint(model, prompt, temperature, top_p, 3, V)
    cells = sorted(joint)
    index = {c: i for i, c in enumerate(cells)}
    counts = np.zeros(len(cells))
    for row in seen:
        key = tuple(int(x) for x in row)
        assert key in index, f"{key} has probability 0 under the policy"
        counts[index[key]] += 1
    expected = np.array([joint[c] for c in cells]) * n
    # merge the rare cells into one so the chi-square approximation holds
    rare = expected < 5
    obs = np.append(counts[~rare], counts[rare].sum())
    exp = np.append(expected[~rare], expected[rare].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    p_value = stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue
    assert p_value > 1e-3, p_value
