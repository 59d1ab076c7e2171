"""Cold-start data: both example kinds, construction targets, tokenised SFT batches."""

from __future__ import annotations

import numpy as np
import pytest

from tapo_jax.data import arithmetic as A
from tapo_jax.construction.diagnostics import analysis_error_step
from tapo_jax.data.sft_examples import (
    analysis_text,
    build_cold_start,
    cold_start_rows,
    cold_start_token_weights,
    construction_example,
    decision_offsets,
    decision_token_indices,
    error_line_span,
    line_results,
    sft_batch,
    token_span,
    weight_tokens,
)
from tapo_jax.construction.synthesis import build_synthesis_prompt, parse_construction, prefix_check


@pytest.fixture(scope="module")
def problems():
    return A.generate_problems(120, seed=11, min_steps=2, max_steps=3)


@pytest.fixture(scope="module")
def tok():
    return A.build_tokenizer()


@pytest.mark.parametrize("fraction, n_con", [(0.5, 120), (0.25, 40), (0.0, 0), (1.0, 120)])
def test_fraction_of_construction_examples(problems, fraction, n_con):
    d = build_cold_start(problems, seed=0, construction_fraction=fraction)
    assert len(d.constructions) == n_con
    assert len(d.solutions) == (0 if fraction == 1.0 else 120)
    if d.solutions:
        assert d.solutions[0] == (problems[0].question, problems[0].solution)


def test_construction_targets_keep_the_wrong_prefix_and_recover(problems):
    d = build_cold_start(problems, seed=1, construction_fraction=0.5)
    assert d.constructions == build_cold_start(problems, seed=1).constructions  # seeded
    for prompt, target in d.constructions:
        q = prompt.split("\n")[1].removeprefix("Q: ")
        wrong = prompt.split("Wrong:\n")[1].split("\nRef:")[0]
        ref = prompt.split("Ref:\n")[1]
        assert A.first_error_step(q, ref) is None
        assert prompt == build_synthesis_prompt(q, wrong, ref, style="compact")
        p = parse_construction(target)
        assert p.ok, (target, p.reason)
        k = A.first_error_step(q, wrong)
        assert p.analysis.startswith(f"Step {k + 1}: ")
        # verbatim prefix up to and including the wrong step, then a reflection
        chk = prefix_check(wrong, p.reconstruction)
        assert chk.lines == k + 1
        assert p.reconstruction.split("\n")[k + 1].startswith("Wait, ")
        assert A.trace_response(q, p.reconstruction).recovered


def _against_step(problems, analysis):
    """(question, wrong, shown reference, step analysis, other analysis) per construction
    example of the same seed built in both styles, after checking that only the analysis
    text differs between them."""
    step = build_cold_start(problems, seed=4, construction_fraction=0.5,
                            reference_slip_fraction=0.25)
    other = build_cold_start(problems, seed=4, construction_fraction=0.5,
                             reference_slip_fraction=0.25, analysis=analysis)
    assert len(other.constructions) == len(step.constructions) > 0
    assert other.solutions == step.solutions
    out = []
    for (p0, t0), (p1, t1) in zip(step.constructions, other.constructions):
        assert p1 == p0  # same prompts (question, wrong response, shown reference)
        a0, a1 = parse_construction(t0), parse_construction(t1)
        assert a1.ok and a1.reconstruction == a0.reconstruction  # only the analysis differs
        q = p0.split("\n")[1].removeprefix("Q: ")
        wrong = p0.split("Wrong:\n")[1].split("\nRef:")[0]
        out.append((q, wrong, p0.split("Ref:\n")[1], a0.analysis, a1.analysis))
    return out


def test_walk_analysis_checks_each_step_before_the_error(problems):
    depths = set()
    for q, wrong, _, a0, a1 in _against_step(problems, "walk"):
        k = A.first_error_step(q, wrong)
        oks = "".join(f"Step {i + 1} ok. " for i in range(k))
        assert a1 == oks + a0  # "Step 1 ok. ... Step k+1: kind."
        assert analysis_error_step(a1) == analysis_error_step(a0) == k + 1
        depths.add(k)
    assert len(depths) >= 2  # errors at several depths were walked to


def test_compare_analysis_by_hand():
    q = "Compute 20 - 1 - 8."
    wrong = "20 - 1 = 19\n19 - 8 = 27\n\\boxed{27}"
    clean = "20 - 1 = 19\n19 - 8 = 11\n\\boxed{11}"
    slipped = "20 - 1 = 18\n18 - 8 = 11\n\\boxed{11}"  # a cancelled slip at line 1
    assert line_results(wrong) == ["19", "27"]
    assert line_results("a\n\n3 + 4 = 7\n\\boxed{7}") == ["-", "7"]
    assert A.first_error_step(q, wrong) == 1
    assert analysis_text(q, wrong, 1, "compare", reference=clean) == (
        "1. 19 | 19\n2. 27 | 11\nStep 2: sign error.")
    # the verdict stays the oracle's: the reference's own slip makes line 1 differ too
    assert analysis_text(q, wrong, 1, "compare", reference=slipped) == (
        "1. 19 | 18\n2. 27 | 11\nStep 2: sign error.")
    # a reference with fewer lines than the wrong response
    assert analysis_text(q, wrong, 1, "compare", reference="20 - 1 = 19") == (
        "1. 19 | 19\n2. 27 | -\nStep 2: sign error.")
    with pytest.raises(ValueError, match="reference"):
        analysis_text(q, wrong, 1, "compare")


def test_compare_analysis_writes_both_values_before_the_verdict(problems):
    first_diff_is_error = slipped_refs = 0
    for q, wrong, ref, a0, a1 in _against_step(problems, "compare"):
        k = A.first_error_step(q, wrong)
        rows = a1.split("\n")
        assert rows[-1] == a0 and len(rows) == k + 2
        w, r = line_results(wrong), line_results(ref)
        for i, row in enumerate(rows[:-1]):
            assert row == f"{i + 1}. {w[i]} | {r[i]}"
        assert analysis_error_step(a1) == k + 1
        differ = [i for i in range(k + 1) if w[i] != r[i]]
        if A.first_error_step(q, ref) is None:  # a clean reference: first difference = error
            assert differ[0] == k
            first_diff_is_error += 1
        else:
            slipped_refs += 1
    assert first_diff_is_error > 0 and slipped_refs > 0


def test_analysis_style_is_checked(problems):
    with pytest.raises(ValueError, match="analysis style"):
        build_cold_start(problems, seed=0, analysis="steps")
    p = problems[0]
    slip = A.make_slip(p, np.random.default_rng(0), "digit")
    with pytest.raises(ValueError, match="analysis style"):
        analysis_text(p.question, slip.text, 0, "quote")


def test_full_mode_targets_the_correct_solution(problems):
    p = problems[0]
    slip = A.make_slip(p, np.random.default_rng(0), "digit")
    prompt, target = construction_example(p, slip.text, mode="full")
    assert prompt.startswith("Redo\n")
    assert parse_construction(target).reconstruction == p.solution
    with pytest.raises(ValueError, match="no error"):
        construction_example(p, p.solution)


def test_sft_batch_trains_exactly_the_response_and_end_of_turn(problems, tok):
    d = build_cold_start(problems[:8], seed=2, construction_fraction=0.5)
    examples = cold_start_rows(d, tok)
    assert len(examples) == 16
    batch, stats = sft_batch(examples, pad_id=tok.pad_token_id, length_buckets=(64, 128, 256))
    assert stats.truncated_rows == 0 and stats.rows == 16
    tokens, lm = np.asarray(batch.tokens), np.asarray(batch.loss_mask)
    for b, (pair, (p_ids, r_ids)) in enumerate(zip(d.solutions + d.constructions, examples)):
        trained = tokens[b][lm[b] > 0].tolist()
        assert trained == r_ids and trained[-1] == tok.eos_token_id
        assert tok.decode(trained[:-1]) == pair[1]
        # the prompt is the chat-formatted user turn, untrained
        prompt_text = tok.decode(tokens[b][:len(p_ids)].tolist())
        assert prompt_text == f"<|im_start|>user\n{pair[0]}<|im_end|>\n<|im_start|>assistant\n"
        assert lm[b, :len(p_ids)].sum() == 0
    assert np.asarray(batch.row_mask).sum() == 16
    assert len(set(np.asarray(batch.query_index).tolist())) == 16


def test_compensated_reference_is_right_in_the_end_and_wrong_at_one_step():
    rng = np.random.default_rng(0)
    for seed in range(60):
        p = A.generate_problem(np.random.default_rng(seed), min_steps=1, max_steps=4,
                               operand_max=40)
        ref = A.compensated_reference(p, rng)
        lines = ref.split("\n")
        assert lines[-1] == f"\\boxed{{{p.answer}}}"
        assert len(lines) == len(p.solution.split("\n"))
        wrong = [a != b for a, b in zip(lines, p.solution.split("\n"))]
        step = A.first_error_step(p.question, ref)
        assert step is not None and step < len(p.ops) and wrong[step]
        assert 1 <= sum(wrong) <= 2  # the wrong step and, unless it is the last, the next one


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_reference_slips_change_the_shown_reference_only(problems, fraction):
    plain = build_cold_start(problems, seed=3, construction_fraction=0.5)
    d = build_cold_start(problems, seed=3, construction_fraction=0.5,
                         reference_slip_fraction=fraction)
    assert len(d.constructions) == len(plain.constructions)
    changed = 0
    for (p0, t0), (p1, t1) in zip(plain.constructions, d.constructions):
        assert t1 == t0  # same wrong responses, same targets (continuing correctly)
        q0, q1 = p0.split("Ref:\n"), p1.split("Ref:\n")
        assert q1[0] == q0[0]  # question and wrong response unchanged
        if q1[1] != q0[1]:
            changed += 1
            question = q1[0].split("\n")[1][len("Q: "):]
            assert A.first_error_step(question, q1[1]) is not None
            assert q1[1].split("\n")[-1] == q0[1].split("\n")[-1]  # same boxed answer
    n = len(d.constructions)
    if fraction == 0.0:
        assert changed == 0
    elif fraction == 1.0:
        assert changed == n
    else:
        assert 0.3 * n < changed < 0.7 * n


_TARGET = {  # one problem's construction target in each analysis style (error at line 2)
    "step": "<analysis>Step 2: skipped step.</analysis>\n<reconstruction>16 - 1 = 15\n"
            "15 + 18 = 33\nWait, it should be 15 - 3 = 12.\n12 + 18 = 30\n\\boxed{30}"
            "</reconstruction>",
    "walk": "<analysis>Step 1 ok. Step 2: skipped step.</analysis>\n<reconstruction>16 - 1 = 15"
            "\n15 + 18 = 33\nWait, it should be 15 - 3 = 12.\n12 + 18 = 30\n\\boxed{30}"
            "</reconstruction>",
    "compare": "<analysis>1. 15 | 15\n2. 33 | 12\nStep 2: skipped step.</analysis>\n"
               "<reconstruction>16 - 1 = 15\n15 + 18 = 33\nWait, it should be 15 - 3 = 12.\n"
               "12 + 18 = 30\n\\boxed{30}</reconstruction>",
}


@pytest.mark.parametrize("style, heads", [
    ("step", ["2: skipped", "15 + 18", "Wait, it"]),
    ("walk", [" ok. Step 2", ": skipped", "15 + 18", "Wait, it"]),
    ("compare", ["2. 33 | 12", "Step 2:", "15 + 18", "Wait, it"]),
])
def test_decision_offsets_by_hand(style, heads):
    t = _TARGET[style]
    offs = decision_offsets(t, style)
    assert [t[o:o + len(h)] for o, h in zip(offs, heads)] == heads and len(offs) == len(heads)
    # no reflection (a full reconstruction): the analysis's decisions only
    full = t.split("<reconstruction>")[0] + "<reconstruction>16 - 1 = 15\n</reconstruction>"
    assert decision_offsets(full, style) == offs[:len(heads) - 2]
    with pytest.raises(ValueError, match="analysis style"):
        decision_offsets(t, "guess")


def test_decision_tokens_are_the_tokens_at_the_offsets(tok):
    t = _TARGET["step"]
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    idx, dropped = decision_token_indices(t, enc, "step")
    assert dropped == 0
    ids = enc(t)
    assert [tok.decode([ids[i]]) for i in idx] == ["2", "1", "Wait, "]  # "Wait, " is one token

    # a tokenizer that merges across a decision offset: that decision is dropped, not misplaced
    def merging(s):
        out, i = [], 0
        while i < len(s):
            n = 2 if s.startswith("\n1", i) else 1
            out.append(hash(s[i:i + n]) % 1000)
            i += n
        return out

    idx2, dropped2 = decision_token_indices(t, merging, "step")
    assert dropped2 == 1 and len(idx2) == 2


def test_weighted_decisions_land_on_their_tokens(problems, tok):
    d = build_cold_start(problems[:6], seed=4, construction_fraction=0.5)
    examples = cold_start_rows(d, tok)
    weights, counts = cold_start_token_weights(d, tok, decision_weight=7.0)
    decisions = [sorted(w) for w in weights]
    assert counts["decision_dropped"] == 0 and counts["error_line"] == 0
    assert len(decisions) == len(examples) == 12 and set(weights[6]) and all(
        x == 7.0 for w in weights for x in w.values())
    assert all(not x for x in decisions[:6]) and all(len(x) >= 2 for x in decisions[6:])
    batch, _ = sft_batch(examples, pad_id=tok.pad_token_id, length_buckets=(256,))
    lm = weight_tokens(batch.loss_mask, [{i: 7.0 for i in dec} for dec in decisions])
    tokens = np.asarray(batch.tokens)
    for b, ((_, target), dec) in enumerate(zip(d.solutions + d.constructions, decisions)):
        heavy = tokens[b][lm[b] == 7.0].tolist()
        assert len(heavy) == len(dec)
        offs = decision_offsets(target) if dec else []
        assert len(offs) == len(heavy)
        for o, t_id in zip(offs, heavy):  # each weighted token is the one starting there
            assert target[o:].startswith(tok.decode([t_id]))
        # every other trained token keeps weight 1; the mask's support is unchanged
        assert ((lm[b] > 0) == (np.asarray(batch.loss_mask)[b] > 0)).all()
        assert set(np.unique(lm[b][lm[b] > 0])) <= {1.0, 7.0}


def test_error_line_is_the_copied_line_before_the_reflection(tok):
    t = _TARGET["compare"]
    a, b = error_line_span(t)
    assert t[a:b] == "15 + 18 = 33"  # y-'s erroneous line 2, copied
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    ta, tb = token_span(t, (a, b), enc)
    assert tok.decode(enc(t)[ta:tb]) == "15 + 18 = 33"
    # the reflection first (error at line 1 of a one-line prefix): the line is line 1
    one = "<analysis>Step 1: sign error.</analysis>\n<reconstruction>3 - 1 = 4\nWait, 3 - 1 = 2, "\
          "not 4.\n\\boxed{2}</reconstruction>"
    a, b = error_line_span(one)
    assert one[a:b] == "3 - 1 = 4"
    assert error_line_span(one.replace("3 - 1 = 4\nWait", "Wait")) is None
    assert error_line_span("<analysis>Step 1: x.</analysis>\n<reconstruction>1 + 1 = 2"
                           "</reconstruction>") is None


def test_cold_start_token_weights(problems, tok):
    """The config's weights: the erroneous line's tokens, then the decision tokens over them."""
    from tapo_jax.config import load_config
    from tapo_jax.train.sft import cold_start_data

    cfg = load_config("configs/demo.yaml", ["cold_start.decision_weight=5",
                                            "cold_start.error_line_weight=3",
                                            "cold_start.construction_fraction=0.5"])
    rows, weights = cold_start_data(cfg, tok, problems[:10])
    d = build_cold_start(problems[:10], seed=cfg.train.seed, construction_fraction=0.5,
                         reference_slip_fraction=cfg.cold_start.reference_slip_fraction)
    assert len(rows) == len(weights) == 20 and all(not w for w in weights[:10])
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    for (_, target), w in zip(d.constructions, weights[10:]):
        dec, _ = decision_token_indices(target, enc)
        ta, tb = token_span(target, error_line_span(target), enc)
        assert {i for i, x in w.items() if x == 5.0} == set(dec)
        assert {i for i, x in w.items() if x == 3.0} == set(range(ta, tb)) - set(dec)
    base, none = cold_start_data(load_config("configs/demo.yaml", [
        "cold_start.construction_fraction=0.5"]), tok, problems[:10])
    assert none is None and base == rows


def test_slip_kinds_pick_the_wrong_solutions_slips(problems):
    by_q = {p.question: p for p in problems}
    d = build_cold_start(problems, seed=5, construction_fraction=1.0, slip_kinds=("carry", "tens"))
    offs = []
    for prompt, _ in d.constructions:
        q = prompt.split("Q: ")[1].split("\n")[0]
        wrong = prompt.split("Wrong:\n")[1].split("\nRef:")[0]
        p = by_q[q]
        k = A.first_error_step(q, wrong)
        got = int(wrong.split("\n")[k].split(" = ")[1])
        offs.append(abs(got - p.results[k]))
    assert set(offs) == {1, 10}  # only the two kinds, both drawn
    # without a mix, the wrong solutions are make_slip's default draw from the cold start's
    # random stream, as before the option existed (the same examples for the same seed)
    rng = np.random.default_rng(np.random.SeedSequence([5, 0xC01D]))
    expected = []
    while len(expected) < len(problems):
        slip = A.make_slip(problems[int(rng.integers(len(problems)))], rng)
        if slip is not None:
            expected.append(slip.text)
    d = build_cold_start(problems, seed=5, construction_fraction=1.0)
    assert [p.split("Wrong:\n")[1].split("\nRef:")[0] for p, _ in d.constructions] == expected
    with pytest.raises(ValueError, match="unknown slip kinds"):
        build_cold_start(problems, seed=5, slip_kinds=("carry", "typo"))
