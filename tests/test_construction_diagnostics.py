"""Mechanism diagnostics against hand-computed values: the oracle's verdict on hand-written
reconstructions, the rates of a scripted iteration (known rollouts, constructions, rewards),
the reflection-row advantages and the OTS weight per token region."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tapo_jax.config import Config, DataConfig, RLConfig, TrainConfig
from tapo_jax.data import arithmetic as A
from tapo_jax.data.sft_examples import construction_example
from tapo_jax.data.datasets import encode_prompts
from tapo_jax.rewards.verifier import score
from tapo_jax.rl.advantages import tapo_advantages
from tapo_jax.construction import diagnostics as D
from tapo_jax.data.batching import Row, build_batch_arrays
from tapo_jax.train import rollout

Q = "Compute 10 + 5 - 3."
WRONG = "10 + 5 = 16\n16 - 3 = 13\n\\boxed{13}"


@pytest.mark.parametrize("recon, reflects, verbatim, recovered, placement", [
    # micro-reflective: the wrong line kept, a reflection, the correct rest
    ("10 + 5 = 16\nWait, 10 + 5 = 15, not 16.\n15 - 3 = 12\n\\boxed{12}", True, True, True,
     "at_error"),
    # the wrong step rewritten before the reflection: not verbatim (still recovers)
    ("10 + 5 = 17\nWait, 10 + 5 = 15, not 17.\n15 - 3 = 12\n\\boxed{12}", True, False, True,
     "at_error"),
    # copies past the first error: not the prefix up to and including it
    ("10 + 5 = 16\n16 - 3 = 13\nWait, 10 + 5 = 15.\n15 - 3 = 12\n\\boxed{12}", True, False,
     True, "late"),
    # no prefix, the answer copied after a vague reflection: neither
    ("Wait, the answer is 12.\n\\boxed{12}", True, False, False, "early"),
    # verbatim prefix, but the reflection restates the wrong step: no recovery
    ("10 + 5 = 16\nWait, 10 + 5 = 16.\n16 - 3 = 13\n\\boxed{13}", True, True, False,
     "at_error"),
    # no reflection at all
    ("10 + 5 = 15\n15 - 3 = 12\n\\boxed{12}", False, False, False, "none"),
])
def test_oracle_on_hand_written_reconstructions(recon, reflects, verbatim, recovered, placement):
    c = D.check_construction(Q, WRONG, recon, 1.0)
    assert (c.reflects, c.verbatim_prefix, c.recovered, c.placement) == (
        reflects, verbatim, recovered, placement)


@pytest.mark.parametrize("reference, clean", [
    ("10 + 5 = 15\n15 - 3 = 12\n\\boxed{12}", True),  # first difference = y-'s error line
    ("10 + 5 = 14\n14 - 2 = 12\n\\boxed{12}", True),  # differs there too (slip of its own later)
    ("10 + 5 = 16\n16 - 4 = 12\n\\boxed{12}", False),  # agrees on y-'s error, differs after
    ("10 + 5 = 16\n16 - 3 = 13\n\\boxed{13}", False),  # never differs
])
def test_reference_clean_to_error(reference, clean):
    assert D.reference_clean_to_error(Q, WRONG, reference) is clean
    # a "wrong" response the oracle finds no error in has no error to be clean up to
    assert not D.reference_clean_to_error(Q, "10 + 5 = 15\n15 - 3 = 12\n\\boxed{12}",
                                          reference)


@pytest.mark.parametrize("analysis, step", [
    ("Step 2: arithmetic error.", 2),
    ("Step 1 ok. Step 2 ok. Step 3: sign error.", 3),  # the walk: the last named step
    ("Step 1 ok. Step 2 ok.", None),  # checks steps but names no error
    ("1. 19 | 19\n2. 27 | 14\nStep 2: sign error.", 2),  # the compare analysis
    ("the second line", None),
    ("Step 12: wrong answer.", 12),
])
def test_analysis_error_step(analysis, step):
    assert D.analysis_error_step(analysis) == step


@pytest.mark.parametrize("analysis, named", [
    ("Step 1: arithmetic error.", True),  # WRONG's first error is its line 1 (10 + 5 = 16)
    ("Step 1: sign error.", True),  # the kind is not judged, only the step
    ("Step 2: arithmetic error.", False),
    ("Step 1 ok. Step 2: arithmetic error.", False),
    ("no step named", False),
    (None, None),  # no analysis given
])
def test_oracle_judges_the_analysis(analysis, named):
    recon = "10 + 5 = 16\nWait, 10 + 5 = 15, not 16.\n15 - 3 = 12\n\\boxed{12}"
    assert D.check_construction(Q, WRONG, recon, 1.0, analysis).analysis_at_error is named
    # a wrong response without an error the oracle can locate: nothing to name
    right = "10 + 5 = 15\n15 - 3 = 12\n\\boxed{12}"
    assert D.check_construction(Q, right, recon, 1.0, analysis).analysis_at_error is None


def test_construction_report_rates():
    C = D.ConstructionCheck
    checks = [C(True, True, True, True, "at_error"), C(True, False, True, True, "late"),
              C(True, True, False, False, "at_error"), C(False, False, False, False, "none")]
    r = D.construction_report(8, 4, checks)
    assert r == {"parse_rate": 0.5, "success_rate": 0.5, "verbatim_prefix_rate": 0.5,
                 "recovery_rate": 0.5, "reflect_rate": 0.75, "reflect_early_rate": 0.0,
                 "reflect_late_rate": 0.25}
    assert D.construction_report(0, 0, []) == {}
    judged = [C(True, True, True, True, "at_error", True), C(True, True, True, True, "at_error"),
              C(False, False, False, False, "none", False),
              C(False, False, False, False, "none", False)]
    assert D.construction_report(4, 4, judged)["analysis_at_error_rate"] == pytest.approx(1 / 3)


def test_reflection_regions_split_tokens():
    tok = A.build_tokenizer()

    def enc(t):
        return tok(t, add_special_tokens=False)["input_ids"]

    text = "10 + 5 = 16\nWait, 10 + 5 = 15, not 16.\n15 - 3 = 12\n\\boxed{12}"
    s, e = D.reflection_regions(text, enc)
    ids = enc(text)
    assert tok.decode(ids[:s]) == "10 + 5 = 16\n"
    assert tok.decode(ids[s:e]) == "Wait, 10 + 5 = 15, not 16.\n"
    assert tok.decode(ids[e:]) == "15 - 3 = 12\n\\boxed{12}"
    assert D.reflection_regions("10 + 5 = 15\n\\boxed{15}", enc) is None


def test_advantage_report():
    adv = np.array([0.5, -0.5, 0.0, 1.0, 0.0, 0.0, 2.0], np.float32)
    refl = np.array([0, 0, 1, 1, 1, 1, 1], bool)
    mask = np.array([1, 1, 1, 1, 1, 1, 0], np.float32)  # the last row is padding
    r = D.advantage_report(adv, refl, mask)
    assert r == {"ref_rows": 4.0, "ref_nonzero_adv_share": 0.25, "ref_adv_mean": 0.25}
    assert D.advantage_report(adv, np.zeros(7, bool), mask) == {}


def test_ots_by_region():
    # row 0: prompt 2 tokens, completion 6: prefix 2, reflection 2, continuation 2
    lp = np.zeros((2, 8))
    ent = np.zeros((2, 8))
    lp[0, 2:8] = [-1.0, -0.5, -5.0, -4.0, -0.2, -0.1]
    ent[0, 2:8] = [1.0, 0.5, 1.0, 0.5, 0.0, 0.3]
    masks = D.region_masks((2, 8), [(2, 2, 4, 6), None])
    assert masks["prefix"][0].tolist() == [0, 0, 1, 1, 0, 0, 0, 0]
    assert masks["reflection"][0].tolist() == [0, 0, 0, 0, 1, 1, 0, 0]
    assert masks["continuation"][0].tolist() == [0, 0, 0, 0, 0, 0, 1, 1]
    assert masks["prefix"][1].sum() == 0
    r = D.ots_region_report(lp, ent, masks, w_min=0.01, w_max=10.0)
    assert r["ots_prefix_mean"] == pytest.approx(1.0)
    assert r["ots_prefix_low_share"] == 0.0
    assert r["ots_reflection_mean"] == pytest.approx((math.exp(-4) + math.exp(-3.5)) / 2)
    assert r["ots_reflection_low_share"] == 1.0
    assert r["ots_continuation_mean"] == pytest.approx((math.exp(-0.2) + math.exp(0.2)) / 2)
    assert r["ots_continuation_tokens"] == 2.0


# ------------------------------------------------------------------------------------------
# A scripted iteration
# ------------------------------------------------------------------------------------------

K = 8
# correct answers per question: eligible (n_c >= 2, n_i >= 4) are questions 0, 1 and 4
N_CORRECT = [3, 3, 0, 8, 4, 1]
# what the synthesis call returns for the 9 pairs (3 per eligible query, in pair order)
KINDS = ["good", "garbage", "bad", "good", "good", "good", "good", "garbage", "garbage"]


def _scripted(tok, problems):
    by_q = {p.question: p for p in problems}
    rng = np.random.default_rng(0)
    slips: dict[str, list[str]] = {}

    def enc(text):
        return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    def sample(prompt_ids, n, max_new_tokens, seed, **decoding):
        texts = [tok.decode(ids, skip_special_tokens=True) for ids in prompt_ids]
        if "Wrong:" in texts[0]:  # the synthesis call: one output per pair, in pair order
            assert len(texts) == len(KINDS)
            out = []
            for text, kind in zip(texts, KINDS):
                q = next(q for q in by_q if q in text)
                wrong = next(w for w in slips[q] if w.strip() in text)
                if kind == "good":
                    target = construction_example(by_q[q], wrong)[1]
                elif kind == "bad":
                    target = ("<analysis>Step 9: sign error.</analysis>\n<reconstruction>"
                              "1 + 1 = 2\nWait, the answer is -999.\n\\boxed{-999}"
                              "</reconstruction>")
                else:
                    target = "<analysis>Step 1"
                out.append([rollout.Completion(enc(target), [0.0], "stop")])
            return out
        out = []
        for text in texts:
            qi = next(i for i, p in enumerate(problems) if p.question in text)
            p = problems[qi]
            group = []
            for k in range(n):
                if k < N_CORRECT[qi]:
                    t = p.solution
                else:
                    slip = None
                    while slip is None:
                        slip = A.make_slip(p, rng)
                    t = slip.text
                    slips.setdefault(p.question, []).append(t)
                ids = enc(t)
                group.append(rollout.Completion(ids, [-0.5] * len(ids), "stop"))
            out.append(group)
        return out

    return sample


def _collect(**rl):
    tok = A.build_tokenizer()
    problems = A.generate_problems(6, seed=3, min_steps=2, max_steps=2)
    cfg = Config(rl=RLConfig(algorithm="tapo", num_samples=K, n_pos=2, n_neg=4, m_max=3, **rl),
                 data=DataConfig(kind="arithmetic"), train=TrainConfig(seed=1))
    col = rollout.collect([p.record() for p in problems], cfg=cfg, tokenizer=tok, step=0,
                          sample=_scripted(tok, problems), score=score,
                          encode=lambda ps: encode_prompts(ps, tok))
    return tok, problems, col


def test_scripted_iteration_diagnostics():
    _, _, col = _collect()
    s = col.stats
    assert s["zpd_eligible_share"] == 0.5  # 3 of 6 queries
    assert s["constructions_attempted"] == 9
    assert s["diag/parse_rate"] == pytest.approx(6 / 9)
    # parsed: 5 good (correct, verbatim, recovered) and 1 bad (none of these)
    assert s["diag/success_rate"] == pytest.approx(5 / 6)
    assert s["diag/verbatim_prefix_rate"] == pytest.approx(5 / 6)
    assert s["diag/recovery_rate"] == pytest.approx(5 / 6)
    assert s["diag/reflect_rate"] == 1.0
    # the good analyses name the first error (the oracle's, from construction_example); the bad
    # one names step 9 of a two-step problem
    assert s["diag/analysis_at_error_rate"] == pytest.approx(5 / 6)
    # Eq. 5 groups: query 0 {good 1, bad 0} -> 2 non-zero; query 1 {1, 1, 1} -> 0;
    # query 4 {good 1} alone -> A = r = 1: 3 of 6 reflection rows
    arrays, _ = build_batch_arrays(col.rows, num_queries=col.num_queries, pad_id=0,
                                   max_len=512)
    adv, _ = tapo_advantages(arrays["rewards"], arrays["query_index"], arrays["is_reflection"],
                             arrays["row_mask"], num_queries=col.num_queries)
    r = D.advantage_report(np.asarray(adv), arrays["is_reflection"], arrays["row_mask"])
    assert r["ref_rows"] == 6 and r["ref_nonzero_adv_share"] == 0.5


def test_loss_from_reflection_masks_the_prefix():
    tok, problems, col = _collect(ref_loss_from_reflection=True)
    refl = [r for r in col.rows if r.is_reflection]
    good = [r for r in refl if r.reward > 0]
    for r in good:
        assert r.reflection_span is not None and r.loss_start == r.reflection_span[0] > 0
        prefix = tok.decode(list(r.completion_ids[:r.loss_start]))
        assert not prefix.strip().startswith("Wait") and prefix.endswith("\n")
        assert tok.decode(list(r.completion_ids[r.loss_start:])).startswith("Wait")
    arrays, _ = build_batch_arrays(col.rows, num_queries=col.num_queries, pad_id=0,
                                   max_len=512)
    b = next(i for i, r in enumerate(col.rows) if r.is_reflection and r.reward > 0)
    r = col.rows[b]
    P = len(r.prompt_ids)
    assert arrays["loss_mask"][b, P:P + r.loss_start].sum() == 0
    assert arrays["loss_mask"][b].sum() == len(r.completion_ids) - r.loss_start
    # the default trains the whole reconstruction
    _, _, col0 = _collect()
    assert all(x.loss_start == 0 for x in col0.rows)


def test_row_loss_start_in_batch():
    rows = [Row([1, 2], [3, 4, 5, 6], 0, loss_start=2), Row([1], [7, 8], 0)]
    arrays, _ = build_batch_arrays(rows, num_queries=1, pad_id=0, length_buckets=(8,))
    assert arrays["loss_mask"][0].tolist() == [0, 0, 0, 0, 1, 1, 0, 0]
    assert arrays["loss_mask"][1].tolist() == [0, 1, 1, 0, 0, 0, 0, 0]
