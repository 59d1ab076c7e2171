"""Micro-reflective trajectory synthesis (paper §3.3, Figure 2): prompts, strict parsing,
prefix checks and the rule constructor.

The policy receives a synthesis prompt holding the question x, an incorrect response y- and a
correct reference y+, and writes

    <analysis>location and type of the first critical mistake</analysis>
    <reconstruction>y- verbatim up to and including the mistake, a reflection ("Wait, ..."),
    then corrected reasoning to \\boxed{}</reconstruction>

The reconstruction becomes y_ref, trained as a response to the original prompt x.

Templates come in three styles: ``natural`` (full instructions, for real models), ``compact``
(a few short tags, for the tiny model of the embedded task, which learns the format during the
cold start) and ``aligned`` (compact, with y- and y+ side by side, line i of each on line i of
the prompt as ``wrong | reference``, so that the first differing line is found by comparing
within a line rather than across two blocks). Mode ``micro`` asks for the prefix-preserving reconstruction; mode ``full`` (ablation)
asks for a complete corrected solution with no prefix. ``construction = rule`` builds y_ref with
no model call (:func:`rule_construct`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = [
    "PARSE_REASONS",
    "ParsedConstruction",
    "PrefixCheck",
    "STYLES",
    "TEMPLATES",
    "align_lines",
    "build_synthesis_prompt",
    "count_reasons",
    "format_construction",
    "generic_reflection",
    "parse_construction",
    "prefix_check",
    "resolve_style",
    "rule_construct",
    "solution_lines",
]

_NATURAL_HEAD = (
    "You are given a math problem, an incorrect solution and a correct reference solution.\n\n"
    "Problem:\n{question}\n\n"
    "Incorrect solution:\n{incorrect}\n\n"
    "Correct reference solution:\n{reference}\n\n"
)
_NATURAL_MICRO = _NATURAL_HEAD + (
    "Task:\n"
    "1. Inside <analysis></analysis>, state where the first critical mistake of the incorrect "
    "solution occurs and what type of mistake it is.\n"
    "2. Inside <reconstruction></reconstruction>, rewrite the solution as follows: copy the "
    "incorrect solution word for word up to and including the step with that mistake; then add "
    "a short, natural reflection that notices the mistake (for example \"Wait, ...\"); then "
    "continue with correct reasoning to the final answer in \\boxed{}. Write as if you noticed "
    "the mistake yourself: do not mention the reference solution.\n\n"
    "Answer with exactly these two blocks and nothing after them:\n"
    "<analysis>...</analysis>\n<reconstruction>...</reconstruction>"
)
_NATURAL_FULL = _NATURAL_HEAD + (
    "Task:\n"
    "1. Inside <analysis></analysis>, state where the first critical mistake of the incorrect "
    "solution occurs and what type of mistake it is.\n"
    "2. Inside <reconstruction></reconstruction>, write a complete, correct solution from the "
    "beginning in your own words, ending with the final answer in \\boxed{}. Do not mention the "
    "reference solution.\n\n"
    "Answer with exactly these two blocks and nothing after them:\n"
    "<analysis>...</analysis>\n<reconstruction>...</reconstruction>"
)
TEMPLATES: dict[tuple[str, str], str] = {
    ("natural", "micro"): _NATURAL_MICRO,
    ("natural", "full"): _NATURAL_FULL,
    ("compact", "micro"): "Fix\nQ: {question}\nWrong:\n{incorrect}\nRef:\n{reference}",
    ("compact", "full"): "Redo\nQ: {question}\nWrong:\n{incorrect}\nRef:\n{reference}",
    ("aligned", "micro"): "Fix\nQ: {question}\n{aligned}",
    ("aligned", "full"): "Redo\nQ: {question}\n{aligned}",
}
STYLES = ("compact", "natural", "aligned")
_SLOT = re.compile(r"\{(question|incorrect|reference|aligned)\}")


def resolve_style(style: str, data_kind: str) -> str:
    """``auto`` -> ``compact`` for the embedded arithmetic task, ``natural`` otherwise."""
    if style == "auto":
        return "compact" if data_kind == "arithmetic" else "natural"
    if style not in STYLES:
        raise ValueError(
            f"synthesis template style must be auto, {', '.join(STYLES)}; got {style!r}")
    return style


def solution_lines(text: str) -> list[str]:
    """The non-blank lines of a solution, stripped."""
    return [ln.strip() for ln in text.strip().split("\n") if ln.strip()]


def align_lines(incorrect: str, reference: str, sep: str = " | ") -> str:
    """The two solutions side by side: line i is ``incorrect line i | reference line i`` (blank
    lines dropped; the shorter side is left empty)."""
    a, b = solution_lines(incorrect), solution_lines(reference)
    rows = [(a[i] if i < len(a) else "", b[i] if i < len(b) else "")
            for i in range(max(len(a), len(b)))]
    return "\n".join(f"{x}{sep}{y}".strip() for x, y in rows)


def build_synthesis_prompt(question: str, incorrect: str, reference: str, *,
                           style: str = "natural", mode: str = "micro",
                           template: str | None = None) -> str:
    """The synthesis prompt text (before the chat template). ``mode``: micro | full (``rule``
    has no prompt). ``template`` overrides the built-in one; it may use the slots
    ``{question}``, ``{incorrect}``, ``{reference}`` and ``{aligned}`` (:func:`align_lines`;
    other braces are kept as written)."""
    if template is None:
        if (style, mode) not in TEMPLATES:
            raise ValueError(f"no synthesis template for style={style!r}, mode={mode!r}; "
                             f"known: {sorted(TEMPLATES)}")
        template = TEMPLATES[(style, mode)]
    values = {"question": question.strip(), "incorrect": incorrect.strip(),
              "reference": reference.strip(), "aligned": align_lines(incorrect, reference)}
    return _SLOT.sub(lambda m: values[m.group(1)], template)


def format_construction(analysis: str, reconstruction: str) -> str:
    """The target text of a construction: ``<analysis>..</analysis>\\n<reconstruction>..``."""
    return (f"<analysis>{analysis}</analysis>\n"
            f"<reconstruction>{reconstruction}</reconstruction>")


# --------------------------------------------------------------------------------------------
# Strict parsing
# --------------------------------------------------------------------------------------------

PARSE_REASONS = (
    "ok", "missing_analysis", "missing_reconstruction", "unclosed_tag", "nested_tags",
    "duplicate_tags", "wrong_order", "empty_analysis", "empty_reconstruction", "text_before",
    "text_between", "text_after",
)
_TAG = re.compile(r"</?(analysis|reconstruction)>")
_TRAILING_EOS = re.compile(r"(?:\s*(?:<\|im_end\|>|<\|endoftext\|>))+\s*$")


@dataclass(frozen=True)
class ParsedConstruction:
    ok: bool
    reason: str  # one of PARSE_REASONS
    analysis: str = ""
    reconstruction: str = ""  # stripped of surrounding whitespace


def _order_reason(names: list[str]) -> str:
    """Why a balanced sequence of the four tags (each once) is not in the expected order."""
    inside = None
    for t in names:
        if t.startswith("</"):
            if inside != t[2:-1]:
                return "unclosed_tag"  # closed before it was opened
            inside = None
        elif inside is not None:
            return "nested_tags"
        else:
            inside = t[1:-1]
    return "wrong_order"


def parse_construction(text: str) -> ParsedConstruction:
    """Strictly parse ``<analysis>A</analysis> <reconstruction>R</reconstruction>``.

    Only whitespace may surround and separate the two blocks (a trailing end-of-turn token is
    ignored); each tag appears once, closed, in this order, not nested; A and R are non-empty.
    A failure returns ``ok=False`` with the first applicable reason code.
    """
    text = _TRAILING_EOS.sub("", text)
    tags = [(m.group(0), m.start(), m.end()) for m in _TAG.finditer(text)]
    names = [t for t, _, _ in tags]
    counts = Counter(names)
    if counts["<analysis>"] == 0 and counts["</analysis>"] == 0:
        return ParsedConstruction(False, "missing_analysis")
    if counts["<reconstruction>"] == 0 and counts["</reconstruction>"] == 0:
        return ParsedConstruction(False, "missing_reconstruction")
    if any(v > 1 for v in counts.values()):
        return ParsedConstruction(False, "duplicate_tags")
    if any(counts[f"<{n}>"] != counts[f"</{n}>"] for n in ("analysis", "reconstruction")):
        return ParsedConstruction(False, "unclosed_tag")
    if names != ["<analysis>", "</analysis>", "<reconstruction>", "</reconstruction>"]:
        return ParsedConstruction(False, _order_reason(names))
    (_, _, a0), (_, a1, a1e), (_, r0s, r0), (_, r1, r1e) = tags
    if text[:tags[0][1]].strip():
        return ParsedConstruction(False, "text_before")
    if text[a1e:r0s].strip():
        return ParsedConstruction(False, "text_between")
    analysis, recon = text[a0:a1].strip(), text[r0:r1].strip()
    if text[r1e:].strip():
        return ParsedConstruction(False, "text_after", analysis, recon)
    if not analysis:
        return ParsedConstruction(False, "empty_analysis", analysis, recon)
    if not recon:
        return ParsedConstruction(False, "empty_reconstruction", analysis, recon)
    return ParsedConstruction(True, "ok", analysis, recon)


def count_reasons(parsed: Sequence[ParsedConstruction]) -> dict[str, int]:
    """Histogram of parse reason codes, every code present (zeros included) for logging."""
    c = Counter(p.reason for p in parsed)
    return {r: c.get(r, 0) for r in PARSE_REASONS}


# --------------------------------------------------------------------------------------------
# Prefix check
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrefixCheck:
    chars: int  # length of the longest common prefix (characters)
    share: float  # chars / len(incorrect), in [0, 1]
    lines: int  # complete lines of the incorrect response reproduced at the start
    kept: bool  # at least one complete line kept (False flags a reconstruction with no prefix)


def prefix_check(incorrect: str, reconstruction: str) -> PrefixCheck:
    """How much of the incorrect response the reconstruction reproduces verbatim at its start."""
    a, b = incorrect.strip(), reconstruction.strip()
    n = 0
    limit = min(len(a), len(b))
    while n < limit and a[n] == b[n]:
        n += 1
    a_lines, b_lines = a.split("\n"), b.split("\n")
    lines = 0
    while lines < min(len(a_lines), len(b_lines)) and a_lines[lines] == b_lines[lines]:
        lines += 1
    share = n / len(a) if a else 0.0
    return PrefixCheck(chars=n, share=share, lines=lines, kept=lines >= 1 and bool(a))


# --------------------------------------------------------------------------------------------
# Rule constructor (ablation construction = rule)
# --------------------------------------------------------------------------------------------


def generic_reflection(wrong_line: str, correct_line: str) -> tuple[str, bool]:
    """A task-agnostic reflection; False: the reference's diverging line follows it."""
    del wrong_line, correct_line
    return "Wait, that step is not right. Let me redo it.", False


def rule_construct(
    incorrect: str,
    reference: str,
    *,
    reflect: Callable[[str, str], tuple[str, bool]] = generic_reflection,
) -> str | None:
    """y_ref with no model call: the incorrect response's lines up to and including the first line
    that differs from the reference, a reflection, then the reference from that line on.

    ``reflect(wrong_line, reference_line) -> (phrase, states_reference_line)``; when the phrase
    already states the reference's line, the continuation starts after it. Lines are compared
    after stripping spaces; blank lines are ignored. Returns None when the two responses do not
    diverge (the incorrect response is the reference, or a prefix of it with nothing to fix).
    """
    inc = [ln.rstrip() for ln in incorrect.strip().split("\n") if ln.strip()]
    ref = [ln.rstrip() for ln in reference.strip().split("\n") if ln.strip()]
    i = 0
    while i < min(len(inc), len(ref)) and inc[i].strip() == ref[i].strip():
        i += 1
    if i >= len(ref):
        return None
    if i >= len(inc):  # the incorrect response stopped early: continue from the reference
        phrase, skip = reflect("", ref[i])
        return "\n".join(inc + [phrase] + ref[i + int(skip):])
    phrase, skip = reflect(inc[i], ref[i])
    return "\n".join(inc[:i + 1] + [phrase] + ref[i + int(skip):])
