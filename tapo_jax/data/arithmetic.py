"""The embedded task: multi-step integer arithmetic with step-by-step solutions.

    question:  "Compute 23 + 45 - 17."
    solution:  "23 + 45 = 68\\n68 - 17 = 51\\n\\\\boxed{51}"

Expressions are evaluated left to right; the question adds parentheses where precedence would
say otherwise (``(23 + 45) * 3``). The module also holds

* realistic slips that turn a solution into an erroneous one (wrong digit, flipped sign, skipped
  step, wrong operand copied), each carried forward to a wrong final answer;
* the oracle :func:`first_error_step` (index of the first wrong line) with :func:`parse_steps`,
  :func:`classify_error` and :func:`trace_response` (reflections and recovery, for ERR-style
  scoring of constructions);
* compensated references (:func:`compensated_reference`: right answer, one cancelled wrong
  step) for the cold start's construction examples;
* a character-level tokenizer with a few whole-word tokens (<= 128 ids), in HF ``tokenizers``
  format with a ChatML chat template (:func:`build_tokenizer`, :func:`save_tokenizer`).

Over 400 lines on purpose: the task is one file. Problems, slips, the oracle and the tokenizer all
read and write the same line format (``a op b = c`` lines and a ``\\boxed{}`` line); a change to
that format is one edit here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tapo_jax.data.datasets import Record

__all__ = [
    "ANALYSIS_PHRASES",
    "SLIP_KINDS",
    "ALL_SLIP_KINDS",
    "OFFSET_CLASSES",
    "error_offset",
    "draw_slip",
    "Line",
    "Problem",
    "Slip",
    "Trace",
    "build_tokenizer",
    "classify_error",
    "compensated_reference",
    "first_error_step",
    "generate_problem",
    "generate_problems",
    "make_slip",
    "make_splits",
    "parse_question",
    "parse_steps",
    "reflection_phrase",
    "save_tokenizer",
    "solution_lines",
    "trace_response",
]

SLIP_KINDS = ("digit", "sign", "skipped", "operand")  # make_slip's default draw, uniform
# every kind make_slip can write: also the result off by one (a carry or borrow slip in the ones
# place) and off by ten (in the tens place), the slips a small policy makes most
ALL_SLIP_KINDS = SLIP_KINDS + ("carry", "tens")
# analysis wording per error kind (classify_error's codes)
ANALYSIS_PHRASES = {
    "arithmetic": "arithmetic error",
    "sign": "sign error",
    "operand": "wrong operand",
    "skipped": "skipped step",
    "answer": "wrong answer",
    "missing": "missing step",
    "format": "wrong format",
}


# --------------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------------


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


@dataclass(frozen=True)
class Problem:
    operands: tuple[int, ...]  # n + 1 operands
    ops: tuple[str, ...]  # n operators, applied left to right
    id: str = ""

    @property
    def results(self) -> list[int]:
        """Running results r_1..r_n (r_n is the answer)."""
        out, r = [], self.operands[0]
        for op, x in zip(self.ops, self.operands[1:]):
            r = _apply(r, op, x)
            out.append(r)
        return out

    @property
    def answer(self) -> int:
        return self.results[-1]

    @property
    def question(self) -> str:
        expr, last = _num(self.operands[0]), None
        for op, x in zip(self.ops, self.operands[1:]):
            if op == "*" and last in ("+", "-"):
                expr = f"({expr})"
            expr, last = f"{expr} {op} {_num(x)}", op
        return f"Compute {expr}."

    @property
    def solution(self) -> str:
        return "\n".join(solution_lines(self.operands, self.ops))

    def record(self) -> Record:
        return Record(prompt=self.question, answer=str(self.answer), id=self.id)


def _num(x: int) -> str:
    return f"({x})" if x < 0 else str(x)


def _step(a: int, op: str, b: int, c: int) -> str:
    return f"{a} {op} {b} = {c}"


def solution_lines(operands: Sequence[int], ops: Sequence[str]) -> list[str]:
    """Correct step lines and the final ``\\boxed{}`` line."""
    lines, r = [], operands[0]
    for op, x in zip(ops, operands[1:]):
        c = _apply(r, op, x)
        lines.append(_step(r, op, x, c))
        r = c
    return lines + [f"\\boxed{{{r}}}"]


def generate_problem(
    rng: np.random.Generator,
    *,
    min_steps: int = 2,
    max_steps: int = 3,
    operand_min: int = 1,
    operand_max: int = 50,
    operators: str = "+-",
    allow_negative: bool = False,
    id: str = "",
) -> Problem:
    """One problem with ``min_steps..max_steps`` operations. Unless ``allow_negative``, a
    subtraction draws its operand so that the running result stays >= 0 where possible."""
    if not 1 <= min_steps <= max_steps:
        raise ValueError(f"need 1 <= min_steps <= max_steps, got {min_steps}, {max_steps}")
    if operand_min > operand_max or not operators or set(operators) - set("+-*"):
        raise ValueError(f"bad operand range [{operand_min}, {operand_max}] or operators "
                         f"{operators!r} (a non-empty subset of '+-*')")
    n = int(rng.integers(min_steps, max_steps + 1))
    r = int(rng.integers(operand_min, operand_max + 1))
    operands, ops = [r], []
    for _ in range(n):
        op = operators[int(rng.integers(len(operators)))]
        hi = operand_max
        if op == "-" and not allow_negative:
            if r >= operand_min:
                hi = min(operand_max, r)
            elif "+" in operators:
                op = "+"
        x = int(rng.integers(operand_min, hi + 1))
        operands.append(x)
        ops.append(op)
        r = _apply(r, op, x)
    return Problem(tuple(operands), tuple(ops), id)


def generate_problems(n: int, *, seed: int, stream: int = 0, prefix: str = "arith",
                      exclude: frozenset[str] = frozenset(), **knobs: Any) -> list[Problem]:
    """``n`` distinct problems from ``SeedSequence([seed, stream])``, skipping questions in
    ``exclude``. Raises when the knobs allow too few distinct problems."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, stream]))
    out, seen = [], set(exclude)
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"could only generate {len(out)} of {n} distinct problems: widen "
                             "data.operand_min/operand_max or data.min_steps/max_steps")
        p = generate_problem(rng, id=f"{prefix}-{seed}-{stream}-{len(out)}", **knobs)
        if p.question not in seen:
            seen.add(p.question)
            out.append(p)
    return out


def _knobs(data_cfg: Any) -> dict[str, Any]:
    return dict(min_steps=data_cfg.min_steps, max_steps=data_cfg.max_steps,
                operand_min=data_cfg.operand_min, operand_max=data_cfg.operand_max,
                operators=data_cfg.operators)


def _eval_problems(data_cfg: Any, seed: int) -> list[Problem]:
    """The held-out problems: seeded by ``data.eval_seed`` when set, else by the run's seed."""
    eval_seed = data_cfg.eval_seed
    return generate_problems(data_cfg.num_eval, seed=seed if eval_seed is None else eval_seed,
                             stream=1, prefix="eval", **_knobs(data_cfg))


def make_splits(data_cfg: Any, seed: int) -> tuple[list[Problem], list[Problem]]:
    """(train, eval) problems of a ``DataConfig`` with ``kind = arithmetic``; disjoint questions."""
    ev = _eval_problems(data_cfg, seed)
    tr = generate_problems(data_cfg.num_train, seed=seed, stream=0, prefix="train",
                           exclude=frozenset(p.question for p in ev), **_knobs(data_cfg))
    return tr, ev


def cold_start_problems(data_cfg: Any, seed: int, n: int) -> list[Problem]:
    """``n`` problems for the cold start (``cold_start.num_problems``): their own stream of the
    generator, disjoint from the evaluation problems of ``make_splits`` (they may share questions
    with the RL training problems, which are training data as well)."""
    ev = _eval_problems(data_cfg, seed)
    return generate_problems(n, seed=seed, stream=2, prefix="cold",
                             exclude=frozenset(p.question for p in ev), **_knobs(data_cfg))


# --------------------------------------------------------------------------------------------
# Parsing and the oracle
# --------------------------------------------------------------------------------------------

_EQ = r"(-?\d+)\s*([+\-*])\s*(-?\d+)\s*=\s*(-?\d+)"
_STEP = re.compile(rf"^{_EQ}$")
_EQ_ANY = re.compile(_EQ)
_BOX = re.compile(r"^\\boxed\{\s*(-?\d+)\s*\}$")
_Q_OPERAND = re.compile(r"\s*([+\-*])\s*(-?\d+)")


@dataclass(frozen=True)
class Line:
    """One non-empty line of a response. kind: step | box | reflection | other."""

    kind: str
    text: str
    a: int | None = None
    op: str | None = None
    b: int | None = None
    result: int | None = None  # the step's result, or the boxed value

    @property
    def equation(self) -> tuple | None:
        return None if self.a is None else (self.a, self.op, self.b, self.result)


def parse_question(question: str) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """(operands, ops) of a question written by :class:`Problem`. Raises ValueError otherwise."""
    m = re.fullmatch(r"\s*Compute\s+(.+?)\.?\s*", question)
    if m is None:
        raise ValueError(f"not an arithmetic question: {question!r}")
    expr = m.group(1).replace("(", "").replace(")", "")
    head = re.match(r"\s*(-?\d+)", expr)
    if head is None:
        raise ValueError(f"not an arithmetic question: {question!r}")
    operands, ops, pos = [int(head.group(1))], [], head.end()
    while pos < len(expr):
        t = _Q_OPERAND.match(expr, pos)
        if t is None:
            raise ValueError(f"not an arithmetic question: {question!r}")
        ops.append(t.group(1))
        operands.append(int(t.group(2)))
        pos = t.end()
    if not ops:
        raise ValueError(f"question has no operation: {question!r}")
    return tuple(operands), tuple(ops)


def parse_steps(text: str) -> list[Line]:
    """Classify each non-empty line of a response (steps, box, reflections, other text)."""
    out = []
    for raw in text.splitlines():
        s = raw.strip()
        if not s:
            continue
        if m := _STEP.match(s):
            out.append(Line("step", s, int(m[1]), m[2], int(m[3]), int(m[4])))
        elif m := _BOX.match(s):
            out.append(Line("box", s, result=int(m[1])))
        elif s.startswith("Wait"):
            e = _EQ_ANY.search(s)
            eq = (int(e[1]), e[2], int(e[3]), int(e[4])) if e else (None,) * 4
            out.append(Line("reflection", s, *eq))
        else:
            out.append(Line("other", s))
    return out


def _expected(question: str) -> tuple[list[tuple], int]:
    operands, ops = parse_question(question)
    steps, r = [], operands[0]
    for op, x in zip(ops, operands[1:]):
        c = _apply(r, op, x)
        steps.append((r, op, x, c))
        r = c
    return steps, r


def first_error_step(question: str, response_text: str) -> int | None:
    """Index (0-based, over non-empty lines) of the first wrong line of a step-by-step answer,
    or None when every step and the boxed answer are right. Index ``n`` (number of operations)
    is the ``\\boxed{}`` line; a missing line counts as wrong at its index."""
    expected, answer = _expected(question)
    lines = parse_steps(response_text)
    for i, eq in enumerate(expected):
        if i >= len(lines) or lines[i].kind != "step" or lines[i].equation != eq:
            return i
    n = len(expected)
    if len(lines) <= n or lines[n].kind != "box" or lines[n].result != answer:
        return n
    return n + 1 if len(lines) > n + 1 else None


def _first_error(question: str, response_text: str, step: int | None
                 ) -> tuple[int, list[tuple], list[Line]] | None:
    """(first error step, the expected steps, the response's lines); None for a correct answer."""
    if step is None:
        step = first_error_step(question, response_text)
        if step is None:
            return None
    return step, _expected(question)[0], parse_steps(response_text)


def classify_error(question: str, response_text: str, step: int | None = None) -> str | None:
    """Kind of the first error: arithmetic | sign | operand | skipped | answer | missing | format
    (None for a correct answer)."""
    found = _first_error(question, response_text, step)
    if found is None:
        return None
    step, expected, lines = found
    if step >= len(lines):
        return "missing"
    line = lines[step]
    if step >= len(expected):
        return "answer" if line.kind == "box" else "format"
    if line.kind != "step":
        return "format"
    a, op, b, c = expected[step]
    if (line.a, line.op, line.b) == (a, op, b):
        flipped = {"+": "-", "-": "+"}.get(op)
        if line.result == -c or (flipped and line.result == _apply(a, flipped, b)):
            return "sign"
        return "arithmetic"
    if line.a == a and line.op in "+-" and op in "+-" and line.op != op and line.b == b:
        return "sign"
    later = [(o, x) for (_, o, x, _) in expected[step + 1:]]
    if line.a == a and (line.op, line.b) in later:
        return "skipped"
    return "operand"


OFFSET_CLASSES = ("off_by_1", "off_by_2", "off_by_10", "off_by_more", "operands", "other")


def error_offset(question: str, response_text: str, step: int | None = None) -> str | None:
    """How far the first wrong step line's result is from the right one, given its (right)
    operands: ``off_by_1`` (a carry or borrow slip), ``off_by_2``, ``off_by_10``, ``off_by_more``;
    ``operands`` when the line computes with wrong operands or operator; ``other`` when the first
    error is not a step line (the boxed answer, a missing or malformed line). None for a
    correct answer."""
    found = _first_error(question, response_text, step)
    if found is None:
        return None
    step, expected, lines = found
    if step >= len(expected) or step >= len(lines) or lines[step].kind != "step":
        return "other"
    a, op, b, c = expected[step]
    line = lines[step]
    if (line.a, line.op, line.b) != (a, op, b):
        return "operands"
    d = abs(line.result - c)
    return {1: "off_by_1", 2: "off_by_2", 10: "off_by_10"}.get(d, "off_by_more")


def reflection_phrase(wrong_line: str, correct_line: str) -> tuple[str, bool]:
    """A reflection sentence for a wrong line, and whether it states the correct line itself
    (then the continuation starts after it)."""
    w, c = parse_steps(wrong_line), parse_steps(correct_line)
    w = w[0] if w else Line("other", "")
    c = c[0] if c else Line("other", "")
    if c.kind == "step":
        if w.kind == "step" and (w.a, w.op, w.b) == (c.a, c.op, c.b):
            return f"Wait, {c.a} {c.op} {c.b} = {c.result}, not {w.result}.", True
        return f"Wait, it should be {c.text}.", True
    if c.kind == "box":
        return f"Wait, the answer is {c.result}.", False
    return "Wait, let me check this step again.", False


@dataclass(frozen=True)
class Trace:
    first_error: int | None  # first wrong line (before any reflection), None if none
    reflected: bool  # a "Wait, ..." line is present
    corrected: bool  # a reflection restated the expected step after an error
    final_correct: bool  # the last boxed value is the answer
    recovered: bool  # corrected, and every later step and the box are right


def trace_response(question: str, response_text: str) -> Trace:
    """Follow a response that may reflect ("Wait, ...") and recover from a wrong step."""
    expected, answer = _expected(question)
    lines = parse_steps(response_text)
    idx, first_error, in_error = 0, None, False
    reflected = corrected = False
    clean_after = True  # no error after the last correction
    last_box = None
    for i, line in enumerate(lines):
        if line.kind == "reflection":
            reflected = True
            if in_error and idx < len(expected) and line.equation == expected[idx]:
                idx, in_error, corrected, clean_after = idx + 1, False, True, True
            continue
        if line.kind == "box":
            last_box = line.result
        if in_error:
            continue
        ok = (line.kind == "step" and idx < len(expected) and line.equation == expected[idx]) or (
            line.kind == "box" and idx == len(expected) and line.result == answer)
        if ok:
            idx += 1
        else:
            in_error, clean_after = True, False
            if first_error is None:
                first_error = i
    final_correct = last_box == answer
    recovered = corrected and clean_after and idx == len(expected) + 1 and final_correct
    return Trace(first_error, reflected, corrected, final_correct, recovered)


# --------------------------------------------------------------------------------------------
# Slips: erroneous solutions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slip:
    text: str  # the erroneous solution
    step: int  # index of the wrong line
    kind: str  # one of SLIP_KINDS


def _wrong_digit(x: int, rng: np.random.Generator) -> int:
    s = str(abs(x))
    i = int(rng.integers(len(s)))
    choices = [d for d in "0123456789" if d != s[i] and not (i == 0 and d == "0" and len(s) > 1)]
    y = int(s[:i] + choices[int(rng.integers(len(choices)))] + s[i + 1:])
    return -y if x < 0 else y


def _wrong_operand(x: int, others: list[int], rng: np.random.Generator) -> int:
    cands = {o for o in others if o != x}
    s = str(abs(x))
    if len(s) == 2 and s[0] != s[1] and s[1] != "0":
        cands.add(int(s[::-1]) * (1 if x >= 0 else -1))
    cands.add(_wrong_digit(x, rng))
    cands.discard(x)
    c = sorted(cands)
    return c[int(rng.integers(len(c)))]


def make_slip(problem: Problem, rng: np.random.Generator, kind: str | None = None) -> Slip | None:
    """An erroneous solution with one slip at a random step, carried forward to the end (later
    steps are computed correctly from the wrong value). None when the slip would leave the final
    answer right or the kind does not apply (e.g. ``skipped`` with one operation). ``kind`` is
    one of ``ALL_SLIP_KINDS``; without it, one of ``SLIP_KINDS`` is drawn uniformly."""
    kind = kind or SLIP_KINDS[int(rng.integers(len(SLIP_KINDS)))]
    xs, ops = list(problem.operands), list(problem.ops)
    n = len(ops)
    if kind == "skipped" and n < 2:
        return None
    k = int(rng.integers(n - 1 if kind == "skipped" else n))
    rs = [xs[0]] + problem.results
    lines = [ln for ln in solution_lines(xs, ops)[:k]]
    r = rs[k]
    if kind == "digit":
        c = _wrong_digit(_apply(r, ops[k], xs[k + 1]), rng)
        lines.append(_step(r, ops[k], xs[k + 1], c))
        rest = list(zip(ops[k + 1:], xs[k + 2:]))
    elif kind in ("carry", "tens"):
        true = _apply(r, ops[k], xs[k + 1])
        d = (1 if kind == "carry" else 10) * (1 if rng.random() < 0.5 else -1)
        c = true + d if true + d >= 0 or true < 0 else true - d
        lines.append(_step(r, ops[k], xs[k + 1], c))
        rest = list(zip(ops[k + 1:], xs[k + 2:]))
    elif kind == "sign":
        true = _apply(r, ops[k], xs[k + 1])
        c = _apply(r, {"+": "-", "-": "+"}[ops[k]], xs[k + 1]) if ops[k] in "+-" else -true
        lines.append(_step(r, ops[k], xs[k + 1], c))
        rest = list(zip(ops[k + 1:], xs[k + 2:]))
    elif kind == "skipped":
        c = _apply(r, ops[k + 1], xs[k + 2])
        lines.append(_step(r, ops[k + 1], xs[k + 2], c))
        rest = list(zip(ops[k + 2:], xs[k + 3:]))
    elif kind == "operand":
        b = _wrong_operand(xs[k + 1], xs[:k + 1] + xs[k + 2:], rng)
        c = _apply(r, ops[k], b)
        lines.append(_step(r, ops[k], b, c))
        rest = list(zip(ops[k + 1:], xs[k + 2:]))
    else:
        raise ValueError(f"unknown slip kind {kind!r}; known: {ALL_SLIP_KINDS}")
    for op, x in rest:
        c2 = _apply(c, op, x)
        lines.append(_step(c, op, x, c2))
        c = c2
    if c == problem.answer or lines[k] == solution_lines(xs, ops)[k]:
        return None
    return Slip("\n".join(lines + [f"\\boxed{{{c}}}"]), k, kind)


def draw_slip(problem: Problem, rng: np.random.Generator, kinds: Sequence[str] = ()
              ) -> Slip | None:
    """:func:`make_slip` with its kind drawn uniformly from ``kinds`` (a repeat weights its kind);
    empty: ``make_slip``'s own default draw, on the same random stream."""
    kind = kinds[int(rng.integers(len(kinds)))] if kinds else None
    return make_slip(problem, rng, kind)


def compensated_reference(problem: Problem, rng: np.random.Generator) -> str:
    """A solution with the right final answer and one wrong step whose error the next line
    cancels (``8 + 6 = 15`` then ``15 - 10 = 4``; a wrong last step is followed by the right
    ``\\boxed{}``), as a small policy's "correct" responses often are. Cold-start construction
    examples show it as the reference so that the copied prefix can only come from the wrong
    response."""
    xs, ops = list(problem.operands), list(problem.ops)
    rs = [xs[0]] + problem.results
    lines = solution_lines(xs, ops)
    j = int(rng.integers(len(ops)))
    wrong = _wrong_digit(rs[j + 1], rng)
    lines[j] = _step(rs[j], ops[j], xs[j + 1], wrong)
    if j + 1 < len(ops):  # the next step starts from the wrong value and lands on the true one
        lines[j + 1] = _step(wrong, ops[j + 1], xs[j + 2], rs[j + 2])
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>")
TAG_TOKENS = ("<analysis>", "</analysis>", "<reconstruction>", "</reconstruction>")
CHARS = tuple(chr(c) for c in range(32, 127)) + ("\n",)
WORD_TOKENS = (
    " + ", " - ", " * ", " = ", "\\boxed{", "Compute", "Wait, ", "not", "it should be",
    "user", "assistant", "Step", "error", "arithmetic", "sign", "wrong", "operand", "skipped",
    "step", "Fix", "Redo", "Q: ", "Wrong:", "Ref:",
)
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
MAX_VOCAB = 128


def build_tokenizer() -> Any:
    """Character-level tokenizer (printable ASCII + newline) with whole-token specials, the
    ``<analysis>``/``<reconstruction>`` tags and a few frequent words; <= 128 ids.
    Returns a ``transformers.PreTrainedTokenizerFast`` (eos ``<|im_end|>``,
    pad ``<|endoftext|>``)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    entries = SPECIAL_TOKENS + TAG_TOKENS + CHARS + WORD_TOKENS
    assert len(set(entries)) == len(entries) <= MAX_VOCAB, len(entries)
    vocab = {t: i for i, t in enumerate(entries)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t in TAG_TOKENS + WORD_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<unk>", clean_up_tokenization_spaces=False, model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tokenizer(directory: str | Path) -> Path:
    """Write tokenizer.json, tokenizer_config.json (with the chat template) to ``directory``."""
    import json

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save_pretrained(str(d))
    cfg_path = d / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE  # also readable by transformers versions before 5
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return d
