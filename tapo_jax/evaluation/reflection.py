"""The reflection detector and the capability analysis of an evaluation run.

Capability analysis (paper section 5, on problems whose pass rate within a run is in (0, 1)):

- A response *reflects* when a reflection marker ("Wait", "Hmm", "Let me re-check", "Actually,",
  ...) is followed by an answer change: a value stated before the marker is revised after it
  (the same equation ``a - b = v`` restated with another value; the last step before the marker
  redone from the same first operand with another result; or a boxed answer before the marker
  that differs from the final one). A marker with no change is a check, not a reflection.
- DSR (direct solve rate) = correct responses with no reflection / correct responses.
- ERR (error recovery rate) = reflecting responses that end correct with an error confirmed before
  the reflection / reflecting responses. The error is confirmed by ``oracle(problem, prefix)``
  when given (:func:`tapo_jax.evaluation.evaluate.arithmetic_oracle` for the embedded task);
  otherwise by the revision itself: a restated equation whose left side evaluates exactly must
  have had a wrong value (a correct value revised is a flip, not a fix); a redone step or a
  revised boxed answer counts as fixing.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Optional

import numpy as np

from tapo_jax.rewards.normalize import normalize

# --------------------------------------------------------------------------------------------
# Reflection detector
# --------------------------------------------------------------------------------------------

MARKERS = re.compile(
    r"\bwait\b|\bhmm+\b|\bactually,|\bon second thought\b|\bi made a mistake\b"
    r"|\bthat(?:'s| is) (?:not right|wrong|incorrect)\b|\bcorrection\b"
    r"|\blet me (?:re-?check|double[- ]check|re-?verify|verify|re-?examine|re-?calculate"
    r"|recompute|reconsider|check again)",
    re.IGNORECASE,
)
MAX_MARKERS = 256  # markers examined per response (bounds the work on degenerate outputs)
_SAME_LENGTH_OPS = ((r"\times", "*     "), (r"\cdot", "*    "), (r"\div", "/   "),
                    ("×", "*"), ("÷", "/"))
_ARITH_CHARS = frozenset("0123456789.+-*/() \t")
_VALUE = re.compile(r"=[ \t]*(-?\d+(?:\.\d+)?)(?![\d.]*\d)")
_TOKEN = re.compile(r"\d+(?:\.\d+)?|[-+*/()]|\S")
_CONTINUES = re.compile(r"[\w^\\}!%']")  # adjacent to a left side: the expression goes on
_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")


@dataclass(frozen=True)
class Reflection:
    """Reflection analysis of one response."""

    has_marker: bool  # some marker occurs
    reflects: bool  # a marker followed by an answer change
    position: int = -1  # character offset of the reflecting marker (-1: none)
    marker: str = ""
    evidence_of_error: bool = False  # a revised value is verifiably wrong (see module docstring)


@dataclass(frozen=True)
class _Eq:
    start: int  # character offset of the left side
    lhs: str  # canonical left side: numbers, + - * / and parentheses, no spaces
    value: Fraction


def _left_side(text: str, end: int) -> tuple[int, str] | None:
    """The arithmetic expression ending at ``end`` (just before an ``=``), or None.

    Scans back over arithmetic characters only, so the work is linear in the text. Rejects
    expressions that continue to the left (``2^3 + 1``, ``x + 1``) and single numbers.
    """
    start = end
    while start > 0 and text[start - 1] in _ARITH_CHARS:
        start -= 1
    tokens = [(t.group(), t.start()) for t in _TOKEN.finditer(text, start, end)]
    keep = len(tokens)
    while keep > 0 and (tokens[keep - 1][0][0].isdigit() or tokens[keep - 1][0] in "+-*/()"):
        keep -= 1
    tokens = tokens[keep:]
    if not tokens:
        return None
    first, pos = tokens[0]
    before = text[:pos].rstrip()
    if first in "+*/)" or (first == "-" and before[-1:] and _CONTINUES.match(before[-1])):
        return None  # a binary operator: the expression starts further left
    if keep == 0 and pos > 0 and _CONTINUES.match(text[pos - 1]):
        return None  # glued to a letter, ^, \ or }: not a plain arithmetic expression
    lhs = "".join(t for t, _ in tokens)
    depth = 0
    for c in lhs:
        depth += (c == "(") - (c == ")")
        if depth < 0:
            return None
    if depth or sum(t[0].isdigit() for t, _ in tokens) < 2:
        return None
    return pos, lhs


def _equations(text: str) -> list[_Eq]:
    """Every ``a op b ... = v`` with a numeric left side in ``text``, in order."""
    for src, dst in _SAME_LENGTH_OPS:  # keeps character offsets
        text = text.replace(src, dst)
    out = []
    for m in _VALUE.finditer(text):
        found = _left_side(text, m.start())
        if found is not None:
            out.append(_Eq(found[0], found[1], Fraction(m.group(1))))
    return out


def _first_operand(lhs: str) -> Fraction:
    return Fraction(re.match(r"\(*(-?\d+(?:\.\d+)?)", lhs).group(1))


def _redoes(last: _Eq, first: _Eq) -> bool:
    """The first equation after a marker redoes the last one before it: the same first operand,
    another left side and another value (``68 - 71 = -3`` then ``Wait, it should be
    68 - 17 = 51``)."""
    return (_first_operand(last.lhs) == _first_operand(first.lhs) and last.lhs != first.lhs
            and last.value != first.value)


def _exact(lhs: str) -> Optional[Fraction]:
    """Exact value of a canonical left side (numbers, + - * /, parentheses), or None."""
    tokens = re.findall(r"\d+(?:\.\d+)?|[-+*/()]", lhs)
    pos = 0

    def expr() -> Fraction:
        nonlocal pos
        v = term()
        while pos < len(tokens) and tokens[pos] in "+-":
            op, pos = tokens[pos], pos + 1
            v = v + term() if op == "+" else v - term()
        return v

    def term() -> Fraction:
        nonlocal pos
        v = atom()
        while pos < len(tokens) and tokens[pos] in "*/":
            op, pos = tokens[pos], pos + 1
            rhs = atom()
            v = v * rhs if op == "*" else v / rhs
        return v

    def atom() -> Fraction:
        nonlocal pos
        t, pos = tokens[pos], pos + 1
        if t == "-":
            return -atom()
        if t == "(":
            v = expr()
            pos += 1  # ")"
            return v
        return Fraction(t)

    try:
        value = expr()
    except (IndexError, ValueError, ZeroDivisionError, RecursionError):
        return None
    return value if pos == len(tokens) else None


def _boxes(text: str) -> list[tuple[int, str]]:
    """(offset, content) of every closed ``\\boxed{...}``, in order of opening (one pass)."""
    opens = {m.end() - 1 for m in _BOX_OPEN.finditer(text)}  # offsets of the boxes' "{"
    stack, found = [], []
    for m in re.finditer(r"[{}]", text):
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            o = stack.pop()
            if o in opens:
                found.append((o, text[o + 1: m.start()].strip()))
    return sorted(found)


def _norm_answer(s: str) -> str:
    return normalize(s)


def detect_reflection(text: str) -> Reflection:
    """Find the first marker after which a value stated before it is revised."""
    markers = list(itertools.islice(MARKERS.finditer(text), MAX_MARKERS))
    if not markers:
        return Reflection(False, False)
    eqs, boxes = _equations(text), _boxes(text)
    final = _norm_answer(boxes[-1][1]) if boxes else None
    before: dict[str, Fraction] = {}  # left side -> last value stated before the marker
    i = 0
    for m in markers:
        while i < len(eqs) and eqs[i].start < m.start():
            before[eqs[i].lhs] = eqs[i].value
            i += 1
        for eq in eqs[i:]:
            old = before.get(eq.lhs)
            if old is not None and old != eq.value:
                exact = _exact(eq.lhs)
                wrong = exact is None or old != exact
                return Reflection(True, True, m.start(), m.group(0), wrong)
        if 0 < i < len(eqs) and _redoes(eqs[i - 1], eqs[i]):
            return Reflection(True, True, m.start(), m.group(0), True)
        pre_boxes = [c for o, c in boxes if o < m.start()]
        if pre_boxes and final is not None and _norm_answer(pre_boxes[-1]) != final:
            return Reflection(True, True, m.start(), m.group(0), True)
    return Reflection(True, False)


# --------------------------------------------------------------------------------------------
# DSR / ERR
# --------------------------------------------------------------------------------------------


def capability_metrics(correct: Any, reflects: Any, recovered: Any) -> dict[str, Any]:
    """DSR and ERR of one run from bool[P, n] arrays, on problems with pass rate in (0, 1).

    ``recovered[p, i]``: response i reflected on an error confirmed before its reflection.
    DSR / ERR are None when their denominators are empty.
    """
    correct, reflects, recovered = (np.asarray(a, bool) for a in (correct, reflects, recovered))
    rate = correct.mean(-1)
    zpd = (rate > 0) & (rate < 1)  # [P]
    c, r, f = correct[zpd], reflects[zpd], recovered[zpd]
    counts = dict(
        zpd_problems=int(zpd.sum()),
        zpd_responses=int(c.size),
        correct=int(c.sum()),
        correct_direct=int((c & ~r).sum()),
        reflecting=int(r.sum()),
        reflecting_recovered=int((r & f & c).sum()),
    )
    dsr = counts["correct_direct"] / counts["correct"] if counts["correct"] else None
    err = counts["reflecting_recovered"] / counts["reflecting"] if counts["reflecting"] else None
    return dict(dsr=dsr, err=err, counts=counts)
