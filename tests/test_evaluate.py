"""Evaluation: Pass@k against brute-force enumeration, reflection detection, DSR / ERR, reports."""

from __future__ import annotations

import itertools
import json
import math
import time
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tapo_jax.config import EvalConfig
from tapo_jax.evaluation.evaluate import (
    EvalProblem,
    evaluate_samples,
    format_table,
    pass_at_k,
    run_eval,
    run_seed,
    write_report,
)
from tapo_jax.evaluation.reflection import capability_metrics, detect_reflection


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Share of k-subsets of n samples (the first c correct) holding at least one correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


# --------------------------------------------------------------------------------------------
# Pass@k
# --------------------------------------------------------------------------------------------


def test_pass_at_k_matches_enumeration_for_small_n():
    for n in range(1, 9):
        for k in range(1, n + 1):
            c = np.arange(n + 1)
            got = pass_at_k(n, c, k)  # vectorised over c
            want = [brute_pass_at_k(n, ci, k) for ci in range(n + 1)]
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_pass_at_k_vectorised_over_problems_with_different_n():
    n = np.array([5, 7, 3, 8, 6])
    c = np.array([2, 0, 3, 5, 1])
    got = pass_at_k(n, c, 3)
    want = [brute_pass_at_k(int(a), int(b), 3) for a, b in zip(n, c)]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert got.shape == (5,)


def test_pass_at_k_large_n_is_stable():
    # Binomials of this size overflow float64; compare with exact rational arithmetic.
    n, c, k = 2000, 7, 5
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert abs(float(pass_at_k(n, c, k)) - float(exact)) < 1e-12
    assert pass_at_k(1200, 0, 5) == 0.0 and pass_at_k(1200, 1200, 5) == 1.0


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 12), data=st.data())
def test_pass_at_k_properties(n, data):
    c = data.draw(st.integers(0, n))
    ks = np.array([float(pass_at_k(n, c, k)) for k in range(1, n + 1)])
    assert np.all((ks >= 0) & (ks <= 1))
    assert np.all(np.diff(ks) >= -1e-12)  # more tries never hurt
    np.testing.assert_allclose(ks[0], c / n, atol=1e-12)  # Pass@1 is the plain accuracy
    if c < n:
        assert pass_at_k(n, c + 1, 1) > pass_at_k(n, c, 1)


@pytest.mark.parametrize("n, c, k", [(3, 4, 1), (3, -1, 1), (3, 1, 4), (3, 1, 0)])
def test_pass_at_k_rejects_impossible_inputs(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_evaluate_samples_mean_and_std_over_runs():
    rng = np.random.default_rng(0)
    correct = rng.random((3, 6, 5)) < 0.4  # [R, P, n]
    out = evaluate_samples(correct, k_max=5)
    assert sorted(out) == [f"pass@{k}" for k in range(1, 6)]
    for k in range(1, 6):
        per_run = [np.mean([brute_pass_at_k(5, int(row.sum()), k) for row in run])
                   for run in correct]
        np.testing.assert_allclose(out[f"pass@{k}"]["runs"], per_run, atol=1e-12)
        np.testing.assert_allclose(out[f"pass@{k}"]["mean"], np.mean(per_run), atol=1e-12)
        np.testing.assert_allclose(out[f"pass@{k}"]["std"], np.std(per_run), atol=1e-12)
    one = evaluate_samples(correct[0], k_max=2)  # bool[P, n] = one run
    assert one["pass@2"]["std"] == 0.0 and one["pass@2"]["runs"] == out["pass@2"]["runs"][:1]
    with pytest.raises(ValueError, match="k_max"):
        evaluate_samples(correct, k_max=6)


# --------------------------------------------------------------------------------------------
# Reflection detector
# --------------------------------------------------------------------------------------------

FIXED = ("Step 1: 48 + 37 = 85\nStep 2: 85 - 19 = 67\nWait, 85 - 19 = 66, not 67.\n"
         "Step 3: 66 + 4 = 70\n\\boxed{70}")
CHECK_ONLY = "Step 1: 12 + 7 = 19\nWait, let me re-check: 12 + 7 = 19. Yes.\n\\boxed{19}"
DIRECT = "Step 1: 12 + 7 = 19\nStep 2: 19 - 5 = 14\n\\boxed{14}"
FLIP = "Step 1: 12 + 7 = 19\nHmm, 12 + 7 = 20.\nStep 2: 20 - 5 = 15\n\\boxed{15}"
BOX_CHANGE = "So the answer is \\boxed{5}.\n\nActually, I dropped a sign: it is \\boxed{-5}."


def test_detect_reflection_cases():
    r = detect_reflection(FIXED)
    assert r.has_marker and r.reflects and r.evidence_of_error
    assert r.marker == "Wait" and FIXED[r.position:].startswith("Wait, 85 - 19 = 66")
    r = detect_reflection(CHECK_ONLY)
    assert r.has_marker and not r.reflects
    r = detect_reflection(DIRECT)
    assert not r.has_marker and not r.reflects and r.position == -1
    r = detect_reflection(FLIP)  # revised a correct value: reflection, but no error before it
    assert r.reflects and not r.evidence_of_error
    r = detect_reflection(BOX_CHANGE)
    assert r.reflects and r.evidence_of_error and r.marker == "Actually,"
    # Lower-case marker and LaTeX operators.
    r = detect_reflection("$6 \\times 7 = 40$, wait, $6 \\times 7 = 42$. \\boxed{42}")
    assert r.reflects and r.evidence_of_error
    # The same value restated after a marker is a check; a longer number is a different value.
    assert not detect_reflection("3 + 4 = 7. Hmm. 3 + 4 = 7. \\boxed{7}").reflects
    assert detect_reflection("3 + 4 = 7. Hmm. 3 + 4 = 70. \\boxed{70}").reflects


def test_equations_are_plain_arithmetic_left_sides():
    from tapo_jax.evaluation.reflection import _equations

    text = ("Step 1. 48 + 37 = 85, 2^3 + 1 = 9, x + 1 = 5, -3 - 5 = -8, $(2 + 3) * 4 = 20$, "
            "6 \\times 7 = 42, 7 = 7, 1.5 * 2 = 3.0 and 12 + 7 = 190")
    got = [(e.lhs, e.value) for e in _equations(text)]
    assert got == [("48+37", 85), ("-3-5", -8), ("(2+3)*4", 20), ("6*7", 42), ("1.5*2", 3),
                   ("12+7", 190)]
    assert [text[e.start:e.start + 2] for e in _equations(text)][:2] == ["48", "-3"]
    r = detect_reflection("(2 + 3) * 4 = 21. Wait, (2 + 3) * 4 = 20. \\boxed{20}")
    assert r.reflects and r.evidence_of_error


@pytest.mark.parametrize("text", [
    "1 + " * 10000 + "x",
    "1     +     " * 3000 + "= 4 Wait, 1 + 1 = 3",
    "\\boxed{" * 5000 + "1 Hmm",
    "Wait, 2 + 2 = 5. Hmm. " * 2000 + "\\boxed{4}",
    "(" * 3000 + "1 + 1" + ")" * 3000 + " = 2 Wait, " + "(" * 3000 + "1 + 1" + ")" * 3000 + " = 3",
], ids=["plus", "spaces", "boxes", "markers", "parens"])
def test_detector_is_fast_on_degenerate_outputs(text):
    start = time.perf_counter()
    detect_reflection(text)
    assert time.perf_counter() - start < 2.0


# --------------------------------------------------------------------------------------------
# DSR / ERR
# --------------------------------------------------------------------------------------------


def test_capability_metrics_by_hand():
    # Problem 0: all correct (excluded); problem 2: all wrong (excluded); problem 1 and 3 count.
    correct = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]], bool)
    reflects = np.array([[1, 1, 1, 1], [1, 0, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0]], bool)
    recovered = np.array([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 0, 0]], bool)
    out = capability_metrics(correct, reflects, recovered)
    # Counted responses: problem 1 and 3. Correct: (1,0) R, (1,1) direct, (3,0) R -> DSR = 1/3.
    # Reflecting: (1,0) correct+recovered, (1,2) wrong, (3,0) correct but not recovered,
    # (3,1) recovered but wrong -> ERR = 1/4.
    assert out["counts"] == dict(zpd_problems=2, zpd_responses=8, correct=3, correct_direct=1,
                                 reflecting=4, reflecting_recovered=1)
    assert out["dsr"] == pytest.approx(1 / 3) and out["err"] == pytest.approx(1 / 4)
    none = capability_metrics(np.ones((2, 3), bool), np.zeros((2, 3), bool), np.zeros((2, 3), bool))
    assert none["dsr"] is None and none["err"] is None and none["counts"]["zpd_problems"] == 0


# --------------------------------------------------------------------------------------------
# run_eval and the report
# --------------------------------------------------------------------------------------------

PROBLEMS = [EvalProblem("p0", "70"), EvalProblem("p1", "19"), EvalProblem("p2", "14"),
            {"prompt": "p3", "answer": "8"}]
# Responses per prompt (n = 4): p0 has a recovered reflection and a wrong one; p1 all correct;
# p2 one flip to a wrong answer and one direct; p3 none correct.
TABLE = {
    "p0": [FIXED, FIXED.replace("\\boxed{70}", "\\boxed{71}"), DIRECT.replace("14}", "70}"),
           "So the answer is 70."],  # no box: wrong, except for the lenient reading
    "p1": [CHECK_ONLY] * 4,
    "p2": [DIRECT, FLIP, DIRECT.replace("14}", "13}"), "\\boxed{14}"],
    "p3": ["\\boxed{9}"] * 4,
}


def fake_sampler(calls):
    def sample(prompts, n, seed):
        calls.append((tuple(prompts), n, seed))
        return [TABLE[p][:n] for p in prompts]
    return sample


def test_run_eval_end_to_end_and_report(tmp_path):
    calls = []
    cfg = EvalConfig(num_samples=4, k_max=3, runs=2)
    res = run_eval(fake_sampler(calls), PROBLEMS, cfg, seed=5)
    assert len(calls) == 2 and calls[0][1] == 4
    assert calls[0][2] != calls[1][2] and calls[0][2] == run_seed(5, 0)
    assert run_seed(5, 1) != run_seed(6, 0)
    correct = np.array([[1, 0, 1, 0], [1, 1, 1, 1], [1, 0, 0, 1], [0, 0, 0, 0]], bool)
    want = evaluate_samples(np.stack([correct, correct]), k_max=3)
    for k in (1, 2, 3):
        assert res.pass_at_k[f"pass@{k}"]["mean"] == pytest.approx(want[f"pass@{k}"]["mean"])
    assert res.pass_at_k["pass@1"]["mean"] == pytest.approx(np.mean([2, 4, 2, 0]) / 4)
    # Problems 0 and 2 are in (0, 1). Correct: FIXED (reflect, recovered), DIRECT-70 (direct),
    # DIRECT (direct), box 14 (direct) -> DSR 3/4. Reflecting: FIXED (ok), FIXED-71 (wrong),
    # FLIP (wrong, no error before it) -> ERR 1/3.
    assert res.dsr == {"mean": pytest.approx(0.75), "std": 0.0}
    assert res.err == {"mean": pytest.approx(1 / 3), "std": 0.0}
    assert res.counts["reflecting"] == 6 and res.counts["zpd_problems"] == 4
    assert res.counts["markers_without_change"] == 2 * 4  # CHECK_ONLY x 4 per run
    assert res.problem_pass_rate == [0.5, 1.0, 0.5, 0.0]
    assert res.reasons["no_box"] == 2 and res.examples and res.examples[0]["response"] == FIXED
    # lenient: "the answer is 70" also counts, reported on its own
    assert res.lenient_pass_at_1 == {"mean": pytest.approx(9 / 16), "std": 0.0}

    # An oracle that finds no error before any reflection makes ERR zero.
    seen = []

    def oracle(problem, prefix):
        seen.append((problem.prompt, prefix))
        return False

    res0 = run_eval(fake_sampler([]), PROBLEMS, EvalConfig(num_samples=4, k_max=3), seed=0,
                    oracle=oracle)
    assert res0.err["mean"] == 0.0 and res0.dsr["mean"] == pytest.approx(0.75)
    assert ("p0", FIXED[: FIXED.index("Wait")]) in seen
    assert all(p != "p3" for p, _ in seen)

    json_path, md_path = write_report(res, tmp_path, "before")
    write_report(res0, tmp_path, "after")
    data = json.loads(json_path.read_text())
    assert list(data) == ["before", "after"]
    assert data["before"]["pass_at_k"]["pass@1"]["mean"] == pytest.approx(0.5)
    md = md_path.read_text()
    assert "| model | Pass@1 | Pass@2 | Pass@3 | DSR | ERR |" in md
    assert "| before | 50.0 ± 0.0 |" in md and "| after | 50.0 ± 0.0 |" in md
    assert "75.0 ± 0.0 | 33.3 ± 0.0 |" in md and "| 0.0 ± 0.0 |" in md
    assert md.count("\n| before |") == 2 and format_table(data) in md
    assert "| Pass@1 lenient |" in md


def test_run_eval_limits_problems_and_checks_sampler_output():
    cfg = EvalConfig(num_samples=4, k_max=2, num_problems=2)
    calls = []
    res = run_eval(fake_sampler(calls), PROBLEMS, cfg, seed=0)
    assert calls[0][0] == ("p0", "p1") and res.counts["problems"] == 2
    with pytest.raises(ValueError, match="lists of 4 completions"):
        run_eval(lambda p, n, s: [["x"]] * len(p), PROBLEMS, cfg, seed=0)
    with pytest.raises(TypeError, match="prompt"):
        run_eval(fake_sampler([]), [42], cfg, seed=0)


# --------------------------------------------------------------------------------------------
# The arithmetic task: detector + oracle against the task's own trace of a response
# --------------------------------------------------------------------------------------------


def arithmetic_responses():
    """Per problem: a correct solution, a slipped one, the slip fixed by a reflection, and a
    correct step 'corrected' into a wrong one (a flip)."""
    from tapo_jax.data.arithmetic import (
        SLIP_KINDS, generate_problems, make_slip, reflection_phrase, solution_lines,
    )

    rng = np.random.default_rng(0)
    problems, table = [], {}
    for i, p in enumerate(generate_problems(40, seed=3, min_steps=2, max_steps=3)):
        slip = make_slip(p, rng, SLIP_KINDS[i % len(SLIP_KINDS)])
        if slip is None:
            continue
        good = solution_lines(p.operands, p.ops)
        bad = slip.text.splitlines()
        phrase, states_line = reflection_phrase(bad[slip.step], good[slip.step])
        fixed = bad[: slip.step + 1] + [phrase] + good[slip.step + (1 if states_line else 0):]
        a, op, b, c = good[0].replace(" = ", " ").split()
        w = int(c) + 1 if int(c) + 1 != p.answer else int(c) + 2  # a wrong final answer
        flip = [good[0], f"Wait, {a} {op} {b} = {w}, not {c}.", f"\\boxed{{{w}}}"]
        table[p.question] = ["\n".join(good), slip.text, "\n".join(fixed), "\n".join(flip)]
        problems.append(p)
    return problems, table


def test_arithmetic_reflections_match_the_task_trace():
    from tapo_jax.data.arithmetic import trace_response
    from tapo_jax.evaluation.evaluate import arithmetic_oracle

    problems, table = arithmetic_responses()
    assert len(problems) >= 20
    for p in problems:
        ev = EvalProblem(p.question, str(p.answer), p)
        for text in table[p.question]:
            r = detect_reflection(text)
            t = trace_response(p.question, text)
            assert r.reflects == t.reflected, text
            if r.reflects:
                prefix_has_error = arithmetic_oracle(ev, text[: r.position])
                assert prefix_has_error == (t.first_error is not None and t.corrected), text
                assert (prefix_has_error and t.final_correct) == t.recovered, text
                assert r.evidence_of_error == t.corrected, text


@pytest.mark.parametrize("use_oracle", [True, False])
def test_run_eval_on_arithmetic_problems(use_oracle):
    from tapo_jax.data.arithmetic import trace_response
    from tapo_jax.evaluation.evaluate import arithmetic_oracle

    problems, table = arithmetic_responses()
    res = run_eval(lambda prompts, n, seed: [table[q][:n] for q in prompts],
                   [p.record() for p in problems], EvalConfig(num_samples=4, k_max=4), seed=0,
                   oracle=arithmetic_oracle if use_oracle else None)
    traces = [trace_response(p.question, t) for p in problems for t in table[p.question]]
    recovered = sum(t.recovered for t in traces)
    reflecting = sum(t.reflected for t in traces)
    assert recovered == len(problems) and reflecting == 2 * len(problems)
    assert res.err["mean"] == pytest.approx(recovered / reflecting)
    assert res.dsr["mean"] == pytest.approx(0.5)  # correct: the solution (direct) and the fix
    assert res.pass_at_k["pass@1"]["mean"] == pytest.approx(0.5)
    assert res.pass_at_k["pass@4"]["mean"] == pytest.approx(1.0)


def test_run_eval_oracle_reflection_counts():
    from tapo_jax.evaluation.evaluate import arithmetic_tracer

    problems, table = arithmetic_responses()
    res = run_eval(lambda prompts, n, seed: [table[q][:n] for q in prompts],
                   [p.record() for p in problems], EvalConfig(num_samples=4, k_max=4), seed=0,
                   tracer=arithmetic_tracer)
    # per problem: 2 of 4 responses reflect ("Wait, ..."), 1 of them recovers and is correct;
    # the other correct response is direct
    P = len(problems)
    assert res.counts["oracle_reflecting"] == 2 * P
    assert res.counts["oracle_recovered"] == P
    assert res.err_oracle["mean"] == pytest.approx(0.5)
    assert res.dsr_oracle["mean"] == pytest.approx(0.5)
    plain = run_eval(lambda prompts, n, seed: [table[q][:n] for q in prompts],
                     [p.record() for p in problems], EvalConfig(num_samples=4, k_max=4), seed=0)
    assert plain.dsr_oracle == {} and "oracle_reflecting" not in plain.counts
