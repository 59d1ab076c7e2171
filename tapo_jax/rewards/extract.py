"""Final-answer extraction from model responses.

The answer is the content of the last *closed* ``\\boxed{...}`` / ``\\fbox{...}`` in the search
window: the text after the last ``</think>`` when present, then only its last ``tail_chars``
characters. Braces are matched (nested groups, escaped ``\\{`` ``\\}`` skipped) in one linear
pass, so ``\\boxed{\\frac{1}{2}}`` yields ``\\frac{1}{2}``; among several closed boxes the one
opened last wins (``\\boxed{\\boxed{x}}`` yields ``x``); an unclosed box is ignored.

A lenient fallback ("the answer is ...", "final answer: ...") exists for evaluation only; callers
report answers found that way separately.
"""

from __future__ import annotations

import re

TAIL_CHARS = 4000  # search window: the last characters of the response (after </think>)
MAX_ANSWER_CHARS = 1000  # longer box contents score 0 with reason "too_long"

_BOX_CMD = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])\s*")
_BARE_TOKEN = re.compile(r"[0-9A-Za-z.+\-]+")  # \boxed 5 (single-token argument, no braces)
_BRACE = re.compile(r"\\[\\{}]|[{}]")  # escaped backslash/brace pairs are skipped as a unit
_LENIENT = re.compile(
    r"(?:final answer|the answer)\s*(?:is|:|=)?\s*[:=]?\s*(.+?)(?=\s*(?:\n|\.\s|\.$|$))",
    re.IGNORECASE,
)


def search_window(text: str, tail_chars: int = TAIL_CHARS) -> str | None:
    """The part of ``text`` that may hold the final answer, or None for unfinished thinking.

    After the last ``</think>`` when present; a ``<think>`` with no closing tag means the response
    was cut off while thinking and holds no final answer.
    """
    end_think = text.rfind("</think>")
    if end_think >= 0:
        text = text[end_think + len("</think>"):]
    elif "<think>" in text:
        return None
    return text[-tail_chars:] if tail_chars > 0 else text


def _last_closed_box(window: str) -> str | None:
    """Content of the closed box opened last in ``window`` (linear in len(window))."""
    opens: dict[int, int] = {}  # index of a box's "{" -> index of its command
    best_start, best = -1, None
    for m in _BOX_CMD.finditer(window):
        j = m.end()
        if j < len(window) and window[j] == "{":
            opens[j] = m.start()
        else:
            tok = _BARE_TOKEN.match(window, j)
            if tok and m.start() > best_start:
                best_start, best = m.start(), tok.group(0)
    if not opens:
        return best
    stack: list[int] = []
    for m in _BRACE.finditer(window, min(opens)):
        c = m.group(0)
        if c == "{":
            stack.append(m.start())
        elif c == "}" and stack:
            o = stack.pop()
            start = opens.get(o)
            if start is not None and start > best_start:
                best_start, best = start, window[o + 1: m.start()]
    return best


def extract_boxed(text: str, *, tail_chars: int = TAIL_CHARS) -> str | None:
    """Content of the last closed ``\\boxed{}``/``\\fbox{}`` of a response, or None.

    Searches only the text after ``</think>`` (when present) and within it the last ``tail_chars``
    characters. The content is returned verbatim (not stripped, no size limit applied).
    """
    window = search_window(text, tail_chars)
    return None if window is None else _last_closed_box(window)


def extract_lenient(text: str, *, tail_chars: int = TAIL_CHARS) -> str | None:
    """Evaluation-only fallback: the phrase after the last "the answer is" / "final answer:"."""
    window = search_window(text, tail_chars)
    if window is None:
        return None
    found = None
    for m in _LENIENT.finditer(window):
        found = m.group(1)
    if found is None:
        return None
    found = found.strip().strip("*").strip()
    return found or None


def extract_answer(
    text: str | None,
    *,
    tail_chars: int = TAIL_CHARS,
    max_chars: int = MAX_ANSWER_CHARS,
    lenient: bool = False,
) -> tuple[str | None, str]:
    """(answer, code): code is "boxed", "lenient", "no_box", "too_long" or "empty"."""
    if not text or not text.strip():
        return None, "empty"
    answer = extract_boxed(text, tail_chars=tail_chars)
    code = "boxed"
    if answer is None and lenient:
        answer, code = extract_lenient(text, tail_chars=tail_chars), "lenient"
    if answer is None:
        return None, "no_box"
    if len(answer) > max_chars:
        return None, "too_long"
    answer = answer.strip()
    if not answer:
        return None, "empty"
    return answer, code
