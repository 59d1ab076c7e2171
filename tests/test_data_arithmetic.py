"""The embedded arithmetic task: generator, oracle (planted errors), slips, tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tapo_jax.config import DataConfig
from tapo_jax.data import arithmetic as A
from tapo_jax.data.sft_examples import build_cold_start
from tapo_jax.data.datasets import format_prompt

SETTINGS = settings(max_examples=40, deadline=None)


def _eval_left_to_right(operands, ops):
    r = operands[0]
    for op, x in zip(ops, operands[1:]):
        r = {"+": r + x, "-": r - x, "*": r * x}[op]
    return r


# --------------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------------


@given(seed=st.integers(0, 2**31 - 1), ops=st.sampled_from(["+-", "+-*", "*", "-"]),
       neg=st.booleans())
@SETTINGS
def test_question_means_what_the_solution_computes(seed, ops, neg):
    rng = np.random.default_rng(seed)
    p = A.generate_problem(rng, min_steps=1, max_steps=4, operand_min=-9 if neg else 1,
                           operand_max=30, operators=ops)
    # Python's own precedence rules on the question text must give the same answer.
    expr = p.question.removeprefix("Compute ").removesuffix(".")
    assert eval(expr) == p.answer  # noqa: S307 - digits, + - * and parentheses only
    assert A.parse_question(p.question) == (p.operands, p.ops)
    assert p.answer == _eval_left_to_right(p.operands, p.ops)
    assert 1 <= len(p.ops) <= 4
    lines = p.solution.split("\n")
    assert lines[-1] == f"\\boxed{{{p.answer}}}"
    assert A.first_error_step(p.question, p.solution) is None


def test_knobs_are_respected_and_no_negative_results_by_default():
    rng = np.random.default_rng(0)
    for _ in range(300):
        p = A.generate_problem(rng, min_steps=2, max_steps=3, operand_min=1, operand_max=50,
                               operators="+-")
        assert 2 <= len(p.ops) <= 3
        assert all(1 <= x <= 50 for x in p.operands)
        assert set(p.ops) <= {"+", "-"}
        assert min(p.results) >= 0


def test_splits_are_deterministic_and_disjoint():
    cfg = DataConfig(num_train=300, num_eval=50)
    tr1, ev1 = A.make_splits(cfg, seed=3)
    tr2, ev2 = A.make_splits(cfg, seed=3)
    tr3, _ = A.make_splits(cfg, seed=4)
    assert [p.question for p in tr1] == [p.question for p in tr2]
    assert [p.question for p in ev1] == [p.question for p in ev2]
    assert [p.question for p in tr1] != [p.question for p in tr3]
    q_tr, q_ev = {p.question for p in tr1}, {p.question for p in ev1}
    assert len(q_tr) == 300 and len(q_ev) == 50 and not q_tr & q_ev


def test_fixed_eval_seed_shares_held_out_problems_across_run_seeds():
    cfg = DataConfig(num_train=300, num_eval=50, eval_seed=11)
    tr3, ev3 = A.make_splits(cfg, seed=3)
    tr4, ev4 = A.make_splits(cfg, seed=4)
    assert [p.question for p in ev3] == [p.question for p in ev4]
    assert ev3 == A.make_splits(DataConfig(num_train=300, num_eval=50), seed=11)[1]
    assert [p.question for p in tr3] != [p.question for p in tr4]  # training stays per seed
    held_out = {p.question for p in ev3}
    for tr in (tr3, tr4, A.cold_start_problems(cfg, 4, 400)):  # never trained on
        assert not {p.question for p in tr} & held_out


def test_cold_start_problems_are_their_own_and_never_evaluation_ones():
    cfg = DataConfig(num_train=300, num_eval=50)
    tr, ev = A.make_splits(cfg, seed=3)
    cold = A.cold_start_problems(cfg, 3, 400)
    q_cold = [p.question for p in cold]
    assert q_cold == [p.question for p in A.cold_start_problems(cfg, 3, 400)]
    assert len(set(q_cold)) == 400
    assert not set(q_cold) & {p.question for p in ev}
    assert q_cold[:300] != [p.question for p in tr]  # another stream than the RL problems
    small = DataConfig(num_train=10, num_eval=50, min_steps=1, max_steps=1, operand_max=12)
    with pytest.raises(ValueError, match="distinct problems"):  # more than the space holds
        A.cold_start_problems(small, 3, 400)


def test_too_small_problem_space_raises():
    with pytest.raises(ValueError, match="distinct problems"):
        A.generate_problems(100, seed=0, min_steps=1, max_steps=1, operand_min=1, operand_max=2,
                            operators="+")


# --------------------------------------------------------------------------------------------
# Oracle
# --------------------------------------------------------------------------------------------

Q = "Compute 23 + 45 - 17."
GOOD = "23 + 45 = 68\n68 - 17 = 51\n\\boxed{51}"


@pytest.mark.parametrize("text, step, kind", [
    (GOOD, None, None),
    ("23+45=68\n\n68-17 = 51\n\\boxed{51}\n", None, None),  # spacing and blank lines are fine
    ("23 + 45 = 69\n69 - 17 = 52\n\\boxed{52}", 0, "arithmetic"),
    ("23 + 45 = 68\n68 - 17 = 85\n\\boxed{85}", 1, "sign"),
    ("23 + 45 = 68\n68 - 17 = -51\n\\boxed{-51}", 1, "sign"),
    ("23 + 45 = 68\n68 - 71 = -3\n\\boxed{-3}", 1, "operand"),
    ("23 - 17 = 6\n\\boxed{6}", 0, "skipped"),
    ("23 + 45 = 68\n68 - 17 = 51\n\\boxed{50}", 2, "answer"),
    ("23 + 45 = 68\n68 - 17 = 51", 2, "missing"),
    ("23 + 45 = 68", 1, "missing"),
    ("", 0, "missing"),
    ("The answer is 51.\n\\boxed{51}", 0, "format"),
    (GOOD + "\nextra", 3, "format"),
])
def test_oracle_finds_planted_errors(text, step, kind):
    assert A.first_error_step(Q, text) == step
    assert A.classify_error(Q, text) == kind


@given(seed=st.integers(0, 2**31 - 1), delta=st.integers(1, 9), data=st.data())
@SETTINGS
def test_oracle_locates_a_random_planted_result_error(seed, delta, data):
    p = A.generate_problem(np.random.default_rng(seed), min_steps=1, max_steps=5,
                           operators="+-*")
    lines = p.solution.split("\n")
    i = data.draw(st.integers(0, len(lines) - 1))
    if i < len(p.ops):  # change the result of step i, keep the rest (later steps now disagree)
        lhs, rhs = lines[i].split(" = ")
        lines[i] = f"{lhs} = {int(rhs) + delta}"
    else:
        lines[i] = f"\\boxed{{{p.answer - delta}}}"
    assert A.first_error_step(p.question, "\n".join(lines)) == i


@pytest.mark.parametrize("kind", A.ALL_SLIP_KINDS)
def test_slips_are_wrong_at_the_stated_step_and_of_the_stated_kind(kind):
    rng = np.random.default_rng(1)
    problems = A.generate_problems(200, seed=1, min_steps=2, max_steps=3, operand_max=50)
    # a text alone can be ambiguous: "20 + 10" for "20 - 10 + 10" skips a step or flips a sign
    expected_kind = {"digit": {"arithmetic", "sign"}, "sign": {"sign"},
                     "skipped": {"skipped", "operand", "sign"},
                     "operand": {"operand", "skipped", "sign"},
                     "carry": {"arithmetic", "sign"}, "tens": {"arithmetic", "sign"}}[kind]
    made = 0
    for p in problems:
        s = A.make_slip(p, rng, kind)
        if s is None:
            continue
        made += 1
        assert s.kind == kind
        assert A.first_error_step(p.question, s.text) == s.step
        assert A.classify_error(p.question, s.text) in expected_kind
        # the slip is carried forward: the final boxed answer is wrong, lines before it are right
        assert not s.text.endswith(f"\\boxed{{{p.answer}}}")
        assert s.text.split("\n")[:s.step] == p.solution.split("\n")[:s.step]
        if kind in ("carry", "tens"):  # the right operands, the result off by exactly 1 or 10
            lhs, value = s.text.split("\n")[s.step].split(" = ")
            true_lhs, true_value = p.solution.split("\n")[s.step].split(" = ")
            assert lhs == true_lhs
            assert abs(int(value) - int(true_value)) == (1 if kind == "carry" else 10)
            assert int(value) >= 0
    assert made >= 150


def test_trace_of_constructions_recovers_and_of_slips_does_not():
    problems = A.generate_problems(60, seed=2)
    data = build_cold_start(problems, seed=2, construction_fraction=0.5)
    by_q = {p.question: p for p in problems}
    for prompt, target in data.constructions:
        q = prompt.split("\n")[1].removeprefix("Q: ")
        recon = target.split("<reconstruction>")[1].removesuffix("</reconstruction>")
        wrong = prompt.split("Wrong:\n")[1].split("\nRef:")[0]
        t = A.trace_response(q, recon)
        assert t.reflected and t.corrected and t.recovered and t.final_correct
        assert t.first_error == A.first_error_step(q, wrong)
        t2 = A.trace_response(q, wrong)
        assert not t2.reflected and not t2.recovered and not t2.final_correct
        assert q in by_q


def test_reflection_phrases():
    assert A.reflection_phrase("85 - 19 = 67", "85 - 19 = 66") == (
        "Wait, 85 - 19 = 66, not 67.", True)
    assert A.reflection_phrase("85 + 3 = 88", "85 - 19 = 66") == (
        "Wait, it should be 85 - 19 = 66.", True)
    assert A.reflection_phrase("\\boxed{1}", "\\boxed{2}") == ("Wait, the answer is 2.", False)


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return A.build_tokenizer()


def test_tokenizer_roundtrips_every_generated_text_within_128_ids(tok):
    assert len(tok) <= 128
    problems = A.generate_problems(150, seed=5, operators="+-*", min_steps=1, max_steps=4)
    data = build_cold_start(problems, seed=5)
    texts = [t for pair in data.solutions + data.constructions for t in pair]
    texts += [format_prompt(p.question, tok) for p in problems]
    texts += [format_prompt(c[0], tok) + c[1] + "<|im_end|>" for c in data.constructions]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert max(ids) < 128 and tok.unk_token_id not in ids
        assert tok.decode(ids) == text


def test_tokenizer_single_token_specials_and_chat_template(tok, tmp_path):
    for t in ("<analysis>", "</analysis>", "<reconstruction>", "</reconstruction>",
              "<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1, t
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    text = format_prompt("Compute 1 + 2.", tok)
    assert text == "<|im_start|>user\nCompute 1 + 2.<|im_end|>\n<|im_start|>assistant\n"

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    A.save_tokenizer(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in cfg["chat_template"]
    for loader in (PreTrainedTokenizerFast, AutoTokenizer):
        t2 = loader.from_pretrained(str(tmp_path))
        sample = text + "<analysis>Step 1: sign error.</analysis>\n<reconstruction>1 + 2 = 3"
        assert t2(sample)["input_ids"] == tok(sample)["input_ids"]
        assert format_prompt("Compute 1 + 2.", t2) == text
        assert t2.eos_token_id == tok.eos_token_id and t2.pad_token_id == tok.pad_token_id


@pytest.mark.parametrize("text, want", [
    ("5 + 14 = 19\n19 + 24 = 43\n\\boxed{43}", None),
    ("5 + 14 = 18\n18 + 24 = 42\n\\boxed{42}", "off_by_1"),
    ("5 + 14 = 19\n19 + 24 = 45\n\\boxed{45}", "off_by_2"),
    ("5 + 14 = 29\n29 + 24 = 53\n\\boxed{53}", "off_by_10"),
    ("5 + 14 = 25\n25 + 24 = 49\n\\boxed{49}", "off_by_more"),
    ("5 + 41 = 46\n46 + 24 = 70\n\\boxed{70}", "operands"),
    ("5 - 14 = -9\n-9 + 24 = 15\n\\boxed{15}", "operands"),
    ("5 + 14 = 19\n19 + 24 = 43\n\\boxed{44}", "other"),
    ("5 + 14 = 19\nthe answer is 43", "other"),
])
def test_error_offset_by_hand(text, want):
    assert A.error_offset("Compute 5 + 14 + 24.", text) == want


def test_error_profile_of_the_cold_start_slips():
    import importlib.util
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("error_profile",
                                                  root / "benchmarks" / "error_profile.py")
    ep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ep)
    from tapo_jax.config import load_config

    cfg = load_config(root / "configs" / "demo.yaml", ["cold_start.slip_kinds=carry,tens"])
    prof = ep.slip_profile(cfg, 400, seed=3)["first_error_offset"]
    assert prof["errors"] == 400  # a carry or tens slip always changes the answer
    assert prof["off_by_1"] + prof["off_by_10"] == 1.0 and 0.3 < prof["off_by_1"] < 0.7
    default = ep.slip_profile(load_config(root / "configs" / "demo.yaml", []), 400, seed=3)
    assert default["first_error_offset"]["operands"] > 0.3  # operand and skipped slips
    json.dumps(default)
