"""Math reward: a hand-written table of (gold, response, expected reward, expected reason)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from tapo_jax.rewards import extract_boxed
from tapo_jax.rewards.extract import extract_answer
from tapo_jax.rewards.verifier import Verifier
from tapo_jax.rewards.normalize import (
    as_tuple, fast_decide, is_bare_list, normalize, too_complex,
)
from tapo_jax.rewards.worker import Checker

MATRIX = "\\begin{pmatrix} -2 \\\\ -14 \\end{pmatrix}"
FILLER = " and so on" * 500  # 5,000 characters: pushes earlier text out of the search window

# (gold, response, reward, reason)
TABLE = [
    # integers (settled without sympy)
    ("5", "So $x = 5$, hence \\boxed{5}.", 1, "correct"),
    ("5", "\\boxed{6}", 0, "wrong"),
    ("7", "\\boxed{007}", 1, "correct"),
    ("3", "\\boxed{+3}", 1, "correct"),
    ("-3", "\\boxed{3}", 0, "wrong"),
    ("123456789012345678901", "\\boxed{123456789012345678902}", 0, "wrong"),
    ("123456789012345678901", "\\boxed{123456789012345678901}", 1, "correct"),
    ("10000000000000000000000000001", "\\boxed{10000000000000000000000000000}", 0, "wrong"),
    # thousands separators and thin spaces
    ("1000", "\\boxed{1,000}", 1, "correct"),
    ("1000", "\\boxed{1\\,000}", 1, "correct"),
    ("1,000", "\\boxed{1000}", 1, "correct"),
    ("1000000", "\\boxed{1{,}000{,}000}", 1, "correct"),
    ("11,\\! 111,\\! 111,\\! 100", "\\boxed{11111111100}", 1, "correct"),
    ("\\$32,\\!348", "\\boxed{\\$32,348}", 1, "correct"),
    # fractions vs decimals
    ("\\frac{1}{2}", "\\boxed{0.5}", 1, "correct"),
    ("0.5", "\\boxed{\\frac12}", 1, "correct"),
    ("\\frac{1}{2}", "\\boxed{\\dfrac{2}{4}}", 1, "correct"),
    ("\\frac{1}{3}", "\\boxed{\\tfrac{2}{6}}", 1, "correct"),
    ("\\frac{1}{3}", "\\boxed{0.3333}", 0, "wrong"),
    ("1.5", "\\boxed{3/2}", 1, "correct"),
    ("0.15", "\\boxed{.15}", 1, "correct"),
    ("-\\frac{3}{8}", "\\boxed{-0.375}", 1, "correct"),
    ("\\frac{9}{19}", "\\boxed{\\frac{9}{20}}", 0, "wrong"),
    ("\\frac{1}{2004!}", "\\boxed{\\frac{1}{2006!}}", 0, "wrong"),
    ("\\frac{1}{2004!}", "\\boxed{\\frac{1}{2004!}}", 1, "correct"),
    ("\\frac{1}{2004!}", "\\boxed{\\frac{1}{2004 \\cdot 2003!}}", 1, "correct"),
    # radicals, pi, polynomials, complex numbers (sympy)
    ("\\frac{\\sqrt{3}}{3}", "\\boxed{\\frac{1}{\\sqrt{3}}}", 1, "correct"),
    ("2\\sqrt{5}", "\\boxed{\\sqrt{20}}", 1, "correct"),
    ("\\sqrt{2}", "\\boxed{1.41}", 0, "wrong"),
    ("\\pi", "\\boxed{3.14}", 0, "wrong"),
    ("8n^2 + 4n + 1", "\\boxed{1 + 4n + 8n^2}", 1, "correct"),
    ("p - q", "\\boxed{-q + p}", 1, "correct"),
    ("6+9i", "\\boxed{9i + 6}", 1, "correct"),
    ("6+9i", "\\boxed{6 - 9i}", 0, "wrong"),
    # upright e and i (ISO style) are Euler's number and the imaginary unit
    ("1 - \\frac{1}{\\mathrm{e}}", "\\boxed{1-\\frac{1}{e}}", 1, "correct"),
    ("1-\\frac{1}{e}", "\\boxed{1 - \\frac{1}{\\mathrm{e}}}", 1, "correct"),
    ("\\mathrm{e}^{2}", "\\boxed{e^2}", 1, "correct"),
    ("1 - \\frac{1}{\\mathrm{e}}", "\\boxed{1-\\frac{1}{\\pi}}", 0, "wrong"),
    ("1+\\mathrm{i}", "\\boxed{i+1}", 1, "correct"),
    # intervals, sets, tuples, matrices
    ("[1,3)", "\\boxed{[1, 3)}", 1, "correct"),
    ("[1,3)", "\\boxed{(1,3]}", 0, "wrong"),
    ("(-\\infty, 0]", "\\boxed{(-\\infty,0]}", 1, "correct"),
    ("(2,12) \\cup (12,102)", "\\boxed{(12,102) \\cup (2,12)}", 1, "correct"),
    ("x \\in [-2,7]", "\\boxed{[-2,7]}", 1, "correct"),
    ("\\{1,2,3\\}", "\\boxed{\\{3,2,1\\}}", 1, "correct"),
    ("\\{1,2\\}", "\\boxed{\\{1,2,4\\}}", 0, "wrong"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\boxed{(3, \\frac{\\pi}{2})}", 1, "correct"),
    ("(6,31,-1)", "\\boxed{(6,-1,31)}", 0, "wrong"),
    (MATRIX, "\\boxed{\\begin{pmatrix}-2\\\\-14\\end{pmatrix}}", 1, "correct"),
    (MATRIX, "\\boxed{\\begin{pmatrix}-2\\\\14\\end{pmatrix}}", 0, "wrong"),
    # degrees, percent, units
    ("30^\\circ", "\\boxed{30}", 1, "correct"),
    ("30", "\\boxed{30^{\\circ}}", 1, "correct"),
    ("120^\\circ", "\\boxed{120°}", 1, "correct"),
    ("\\frac{270}7\\text{ degrees}", "\\boxed{\\frac{270}{7}}", 1, "correct"),
    ("50\\%", "\\boxed{50}", 1, "correct"),
    ("50", "\\boxed{50\\%}", 1, "correct"),
    ("12", "\\boxed{12 \\text{ cm}}", 1, "correct"),
    # text answers
    ("\\text{Evelyn}", "\\boxed{\\text{Evelyn}}", 1, "correct"),
    ("\\text{Evelyn}", "\\boxed{Evelyn}", 1, "correct"),
    ("\\text{(C)}", "\\boxed{(C)}", 1, "correct"),
    ("\\text{(C)}", "\\boxed{\\text{(D)}}", 0, "wrong"),
    # extraction: delimiters, several boxes, nesting, unclosed boxes, </think>, the window
    ("5", "Thus $\\boxed{5}$.", 1, "correct"),
    ("5", "\\boxed{5.}", 1, "correct"),
    ("x = 5", "\\boxed{5}", 1, "correct"),
    ("3", "First \\boxed{2}, but wait: \\boxed{3}", 1, "correct"),
    ("2", "First \\boxed{2}, but wait: \\boxed{3}", 0, "wrong"),
    ("7", "\\boxed{\\boxed{7}}", 1, "correct"),
    ("7", "\\boxed{7} and then \\boxed{8", 1, "correct"),
    ("8", "the answer is \\boxed{8", 0, "no_box"),
    ("\\frac{1}{2}", "\\fbox{1/2}", 1, "correct"),
    ("4", "\\boxed 4", 1, "correct"),
    ("5", "<think>maybe \\boxed{4}</think> so \\boxed{5}", 1, "correct"),
    ("4", "<think>maybe \\boxed{4}</think> so \\boxed{5}", 0, "wrong"),
    ("4", "<think>maybe \\boxed{4} hmm", 0, "no_box"),
    ("4", "\\boxed{4}" + FILLER, 0, "no_box"),
    ("4", FILLER + "\\boxed{4}", 1, "correct"),
    ("5", "The answer is 5.", 0, "no_box"),
    ("2", "\\boxed{}", 0, "empty"),
    ("2", "", 0, "empty"),
    ("2", "\\boxed{" + "1" * 1500 + "}", 0, "too_long"),
    ("5", "\\boxed{9^{9^{9^9}}}", 0, "too_complex"),
    ("5", "\\boxed{\\frac{}{(}}", 0, "parse_error"),
]


@pytest.fixture(scope="module")
def verifier():
    with Verifier(num_workers=2, timeout_s=10.0) as v:
        yield v


def test_table_size():
    assert len(TABLE) >= 40


def test_table(verifier):
    golds = [row[0] for row in TABLE]
    responses = [row[1] for row in TABLE]
    rewards, reasons = verifier.score(responses, golds)
    assert rewards.dtype == np.float32 and rewards.shape == (len(TABLE),)
    got = [(g, r, float(w), c) for (g, r, *_), w, c in zip(TABLE, rewards, reasons)]
    mismatches = [(row, out) for row, out in zip(TABLE, got) if tuple(row) != out]
    assert not mismatches, "\n".join(f"want {w}\n got {o}" for w, o in mismatches)


def test_table_one_by_one_matches_batch(verifier):
    """Batching, deduplication and caching do not change any verdict."""
    batch, reasons = verifier.score([r[1] for r in TABLE[:20]], [r[0] for r in TABLE[:20]])
    for (gold, response, reward, reason), b in zip(TABLE[:20], batch):
        single, (code,) = verifier.score([response], [gold])
        assert (single[0], code) == (b, reason)


def test_integer_batch_never_starts_a_worker():
    v = Verifier(num_workers=2)
    try:
        golds = ["12", "-7", "1,000", "123456789012345678901", "0"]
        responses = ["\\boxed{12}", "\\boxed{-7}", "\\boxed{1\\,000}",
                     "\\boxed{123456789012345678902}", "no box here"]
        rewards, reasons = v.score(responses, golds)
        assert rewards.tolist() == [1, 1, 1, 0, 0]
        assert reasons == ["correct", "correct", "correct", "wrong", "no_box"]
        assert not v.pool.started
        assert v.stats.worker_items == 0 and v.stats.fast_path == 5 and v.stats.items == 5
    finally:
        v.close()


def test_lenient_mode_is_reported_separately(verifier):
    responses = [
        "The answer is $\\frac{1}{2}$.", "Final answer: 12", "The answer is 13.", "\\boxed{4}",
    ]
    golds = ["0.5", "12", "12", "4"]
    strict, strict_reasons = verifier.score(responses, golds)
    lenient, lenient_reasons = verifier.score(responses, golds, lenient=True)
    assert strict.tolist() == [0, 0, 0, 1]
    assert strict_reasons == ["no_box", "no_box", "no_box", "correct"]
    assert lenient.tolist() == [1, 1, 0, 1]
    assert lenient_reasons == ["lenient_correct", "lenient_correct", "wrong", "correct"]


def test_result_cache_and_stats(verifier):
    pair = (["\\boxed{\\sqrt{8}}"], ["2\\sqrt{2}"])
    verifier.score(*pair)
    hits = verifier.stats.cache_hits
    rewards, reasons = verifier.score(*pair)
    assert (rewards[0], reasons[0]) == (1.0, "correct")
    assert verifier.stats.cache_hits == hits + 1
    assert verifier.stats.reasons["correct"] >= 1


def test_length_mismatch_is_an_error(verifier):
    with pytest.raises(ValueError, match="2 responses but 1 golds"):
        verifier.score(["a", "b"], ["1"])


@pytest.mark.parametrize(
    "text, expected",
    [
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\left\\{1,2\\right\\}}", "\\left\\{1,2\\right\\}"),
        ("a \\boxed{1} b \\fbox{2} c", "2"),
        ("\\boxed{\\boxed{x}}", "x"),
        ("\\boxed{ 3 }", " 3 "),
        ("\\boxed{3} \\boxed{4", "3"),
        ("\\boxed{4", None),
        ("} } \\boxed{x}", "x"),
        ("\\boxedx{3}", None),
        ("no box", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_answer_codes():
    assert extract_answer(None) == (None, "empty")
    assert extract_answer("   ") == (None, "empty")
    assert extract_answer("\\boxed{ }") == (None, "empty")
    assert extract_answer("\\boxed{12345}", max_chars=4) == (None, "too_long")
    assert extract_answer("x \\boxed{ 12 }") == ("12", "boxed")


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("$\\dfrac{1}{2}$.", "\\frac{1}{2}"),
        ("1\\,000\\,000", "1000000"),
        ("1{,}5", "1{,}5"),  # a decimal comma is not a thousands separator
        ("(1,234)", "(1,234)"),  # commas inside a tuple stay
        ("30^{\\circ}", "30"),
        ("\\text{(C)}", "(C)"),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "( 3, \\frac{\\pi}{2} )"),
        ("{{5}}", "5"),
        ("1 - \\frac{1}{\\mathrm{e}}", "1 - \\frac{1}{e}"),
        ("\\mathrm e^{x}", "e^{x}"),
        ("\\operatorname{e}", "e"),
        ("x + \\mathrm{ie}", "x + \\mathrm{ie}"),  # only the single letters e and i
    ],
)
def test_normalize(raw, expected):
    assert normalize(raw) == expected


# (gold, response, reward with ordered_lists=False, reward with ordered_lists=True)
LISTS = [
    ("4, 10, -2", "\\boxed{10, 4, -2}", 1, 0),  # a bare list: a set, or a sequence
    ("4, 10, -2", "\\boxed{4, 10, -2}", 1, 1),
    ("4, 10, -2", "\\boxed{4,10,-2.0}", 1, 1),
    ("4, 10, -2", "\\boxed{4, 10}", 0, 0),
    ("\\frac{1}{2}, 3", "\\boxed{3, 0.5}", 1, 0),
    ("\\{4, 10, -2\\}", "\\boxed{10, 4, -2}", 1, 1),  # written as a set: always a set
    ("(4, 10, -2)", "\\boxed{(10, 4, -2)}", 0, 0),  # written as a tuple: always ordered
    ("5", "\\boxed{5}", 1, 1),
]


@pytest.mark.parametrize("ordered", [False, True])
def test_ordered_lists_policy(ordered):
    with Verifier(num_workers=1, timeout_s=10.0, ordered_lists=ordered) as v:
        rewards, reasons = v.score([r[1] for r in LISTS], [r[0] for r in LISTS])
    want = [r[3 if ordered else 2] for r in LISTS]
    assert rewards.tolist() == want, list(zip(LISTS, reasons))


def test_bare_list_detection():
    assert is_bare_list("4, 10, -2") and is_bare_list("x = 1, y = 2")
    assert not is_bare_list("(4, 10)") and not is_bare_list("\\{1, 2\\}")
    assert not is_bare_list("[1, 3) \\cup (4, 5]") and not is_bare_list("5")
    assert as_tuple("4, 10") == "(4, 10)" and as_tuple("(4, 10)") == "(4, 10)"


def test_fast_decide_is_exact():
    assert fast_decide("123456789012345678901", "123456789012345678902") == "wrong"
    assert fast_decide("10" * 300, "10" * 299 + "11") == "wrong"  # 600 digits, beyond float range
    assert fast_decide("\\frac{1}{3}", "0.3333333333") is None  # left to sympy's rounding rule
    assert fast_decide("\\frac{1}{3}", "\\frac{2}{6}") == "correct"
    assert fast_decide("\\frac{1}{3}", "\\frac{1}{4}") == "wrong"
    assert fast_decide("\\sqrt{2}", "\\sqrt{2}") == "correct"
    assert fast_decide("\\sqrt{2}", "\\sqrt{3}") is None


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("9^{9^{9^9}}", True),
        ("2^{10^{10}}", True),
        ("2^{2^{2^{2^{2^{2}}}}}", True),
        ("x^{9^{9^9}}", True),
        ("(10^{8})!", True),
        ("2^{-10^{10}}", True),
        ("e^{-x^2}", False),
        ("2^{2^{2^2}}", False),
        ("10^{100}", False),
        ("\\frac{1}{2004!}", False),
        ("2^{10^{10} x}", False),
    ],
)
def test_too_complex(answer, expected):
    assert too_complex(answer) is expected


def test_checker_works_off_the_main_thread():
    """math-verify's SIGALRM timeouts are off in the checker: it must work in any thread."""
    out = []
    pair = ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}")
    t = threading.Thread(target=lambda: out.append(Checker().check(*pair)))
    t.start()
    t.join(60)
    assert out == ["correct"]


def test_numeric_golds_score_like_their_text(verifier):
    """Golds given as numbers (Python or NumPy, e.g. from a Parquet column) mean their value."""
    responses = ["\\boxed{5}", "\\boxed{0.5}", "\\boxed{6}", "\\boxed{\\frac{1}{2}}"]
    rewards, _ = verifier.score(responses, [np.int64(5), np.float64(0.5), 5, 0.5])
    assert rewards.tolist() == [1.0, 1.0, 0.0, 1.0]
