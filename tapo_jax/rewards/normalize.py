"""Answer normalisation, exact fast paths and the pre-sympy complexity guard.

``normalize`` rewrites only notation that never changes a value: math delimiters, ``\\dfrac``,
``\\left``/``\\right``, upright constants (``\\mathrm{e}``, ``\\mathrm{i}`` -> ``e``, ``i``), thin
spaces and thousands separators between digits, degrees, percent and currency signs, ``\\text{}``
wrappers and trailing unit words, a trailing period.

``fast_decide`` settles a pair in the calling process when that is exact: both integers (compared
as Python ints, never through float), equal normalised strings, or two plain rationals
(``\\frac{a}{b}``, ``a/b``, decimals) compared as ``fractions.Fraction``. Everything else goes to
the sympy workers.

``too_complex`` estimates the number of digits of every numeric power tower / factorial in an
answer (``9^{9^{9^9}}``, ``2^{10^{10}}``, ``(10^8)!``) without evaluating it, so that such answers
never reach sympy, which would try to compute them exactly.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

MAX_DIGITS = 100_000  # an answer whose evaluation needs a longer integer is "too_complex"

_DELIMS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
_TEXT_CMD = r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox|textnormal)"
_WHOLE_TEXT = re.compile(_TEXT_CMD + r"\s*\{([^{}]*)\}")
_TRAILING_UNIT = re.compile(r"(.*\d.*?)\s*" + _TEXT_CMD + r"\s*\{\s*[A-Za-z][A-Za-z .]*\}")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree(?![A-Za-z])|\\textdegree(?![A-Za-z])")
_THOUSANDS_MARK = re.compile(r"(?<=\d)(?:\{,\}|,\\!|,\\,)\s*(?=\d{3}(?!\d))")
_THIN_BETWEEN_DIGITS = re.compile(r"(?<=\d)\s*(?:\\[,!;: ]|~)\s*(?=\d)")
_THIN_SPACE = re.compile(r"\\\\|\\[,;: !]|~")  # a LaTeX line break (two backslashes) stays whole
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
# Upright e / i (ISO style for Euler's number and the imaginary unit) read as the plain letters.
_UPRIGHT_CONST = re.compile(
    r"\\(?:mathrm|operatorname)\s*\{\s*([ei])\s*\}|\\(?:mathrm|rm)\s+([ei])(?![A-Za-z])")
_LEFT_RIGHT = re.compile(r"\\(?:left|right)\s*\.|\\(?:left|right)(?![A-Za-z])\s*")
_INT = re.compile(r"[+-]?\d+")
_DECIMAL = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+)")
_FRAC = re.compile(r"([+-]?)\\frac\s*(?:\{\s*([+-]?\d+)\s*\}|(\d))\s*(?:\{\s*(\d+)\s*\}|(\d))")
_SLASH = re.compile(r"([+-]?\d+)\s*/\s*(\d+)")
_SPACES = re.compile(r"\s+")


def _thin_space(m: re.Match) -> str:
    t = m.group(0)
    return t if t == "\\\\" else ("" if t == "\\!" else " ")


def _strip_delims(s: str) -> str:
    changed = True
    while changed:
        changed = False
        for left, right in _DELIMS:
            if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
                s, changed = s[len(left): len(s) - len(right)].strip(), True
                break
    return s


def _strip_outer_braces(s: str) -> str:
    """{x} -> x when the first brace closes at the very end."""
    while s.startswith("{") and s.endswith("}"):
        depth = 0
        for i, c in enumerate(s):
            depth += (c == "{") - (c == "}")
            if depth == 0:
                break
        if i != len(s) - 1:
            break
        s = s[1:-1].strip()
    return s


def normalize(answer: str) -> str:
    """Notation-only normalisation of one extracted answer (see module docstring)."""
    s = _strip_delims(answer.strip())
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\displaystyle", "")
    s = _LEFT_RIGHT.sub("", s)
    s = _UPRIGHT_CONST.sub(lambda m: m.group(1) or m.group(2), s)
    s = _DEGREES.sub("", s)
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "")
    s = _THOUSANDS_MARK.sub("", s)
    s = _THIN_BETWEEN_DIGITS.sub("", s)
    s = _THIN_SPACE.sub(_thin_space, s)
    s = s.strip().rstrip(".").strip()
    m = _TRAILING_UNIT.fullmatch(s)
    if m:
        s = m.group(1).strip()
    m = _WHOLE_TEXT.fullmatch(s)
    if m:
        s = m.group(1).strip()
    s = _strip_outer_braces(_strip_delims(s))
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    return _SPACES.sub(" ", s).strip()


def is_bare_list(s: str) -> bool:
    """True when a normalised answer has a comma outside every bracket (``4, 10, -2``)."""
    depth = 0
    for c in s:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "," and depth == 0:
            return True
    return False


def as_tuple(s: str) -> str:
    """A bare comma list in parentheses (read as an ordered tuple); anything else unchanged."""
    return f"({s})" if is_bare_list(s) else s


def as_int(s: str) -> int | None:
    """The integer a normalised answer spells (signs, leading zeros allowed), else None."""
    return int(s) if _INT.fullmatch(s) else None


def as_rational(s: str) -> tuple[Fraction, bool] | None:
    """(value, is_decimal) for plain integers, decimals, \\frac{a}{b} and a/b; else None."""
    if _INT.fullmatch(s):
        return Fraction(int(s)), False
    if _DECIMAL.fullmatch(s):
        return Fraction(s), True
    m = _FRAC.fullmatch(s)
    if m:
        sign, num_b, num_d, den_b, den_d = m.groups()
        num, den = int(num_b or num_d), int(den_b or den_d)
        if den == 0:
            return None
        return (-1 if sign == "-" else 1) * Fraction(num, den), False
    m = _SLASH.fullmatch(s)
    if m and int(m.group(2)) != 0:
        return Fraction(int(m.group(1)), int(m.group(2))), False
    return None


def fast_decide(gold: str, pred: str) -> str | None:
    """"correct"/"wrong" when exact without sympy (both normalised), else None."""
    gi, pi = as_int(gold), as_int(pred)
    if gi is not None and pi is not None:
        return "correct" if gi == pi else "wrong"
    if _SPACES.sub("", gold) == _SPACES.sub("", pred):
        return "correct"
    gr, pr = as_rational(gold), as_rational(pred)
    if gr is not None and pr is not None:
        if gr[0] == pr[0]:
            return "correct"
        if not gr[1] and not pr[1]:  # decimals may still match within the workers' rounding rule
            return "wrong"
    return None


# --- complexity guard ---------------------------------------------------------------------------
# log10-magnitude estimates over numeric sub-expressions: number, {e}, (e), unary sign, a!, a^b,
# a*b, a+b. Any other token ends the numeric sub-expression (symbols make sympy keep powers lazy).

_TOKENS = re.compile(r"\d+(?:\.\d*)?|\\cdot|\\times|\*\*|\\[A-Za-z]+|\S")
_OPENERS = {"{": "}", "(": ")"}


class _NotNumeric(Exception):
    pass


def _log10_number(tok: str) -> float:
    digits = tok.split(".")[0].lstrip("0")
    if not digits:
        return 0.0
    if len(digits) > 300:
        return float(len(digits))
    return math.log10(int(digits))


def _pow10(x: float) -> float:
    return math.inf if x > 308 else 10.0 ** x


class _Estimator:
    def __init__(self, tokens: list[str], max_digits: float):
        self.t, self.max = tokens, max_digits
        self.i, self.peak = 0, 0.0

    def _peek(self) -> str | None:
        return self.t[self.i] if self.i < len(self.t) else None

    def _note(self, x: float) -> float:
        self.peak = max(self.peak, x)
        if self.peak > self.max:
            raise OverflowError
        return x

    def expr(self) -> float:
        x = self.term()
        while self._peek() in ("+", "-"):
            self.i += 1
            x = self._note(max(x, self.term()) + 0.302)
        return x

    def term(self) -> float:
        x = self.power()
        while self._peek() in ("*", "\\cdot", "\\times"):
            self.i += 1
            x = self._note(x + self.power())
        return x

    def power(self) -> float:
        base = self.postfix()
        if self._peek() in ("^", "**"):
            self.i += 1
            exponent = _pow10(self.power())
            base = 0.0 if base <= 0 else self._note(exponent * base)
        return base

    def postfix(self) -> float:
        x = self.unary()
        while self._peek() == "!":
            self.i += 1
            n = _pow10(x)
            x = self._note(n * max(math.log10(n), 0.0) if n > 1 else 0.0)
        return x

    def unary(self) -> float:
        while self._peek() in ("+", "-"):
            self.i += 1
        tok = self._peek()
        if tok is None:
            raise _NotNumeric
        self.i += 1
        if tok in _OPENERS:
            x = self.expr()
            if self._peek() != _OPENERS[tok]:
                raise _NotNumeric
            self.i += 1
            return x
        if tok[0].isdigit():
            return abs(self._note(_log10_number(tok)))
        raise _NotNumeric


def too_complex(answer: str, *, max_digits: int = MAX_DIGITS) -> bool:
    """True when some numeric power/factorial in ``answer`` has more than ``max_digits`` digits."""
    if "^" not in answer and "!" not in answer and "**" not in answer:
        return False
    tokens = _TOKENS.findall(answer)
    start = 0
    while start < len(tokens):
        tok = tokens[start]
        if not (tok[0].isdigit() or tok in _OPENERS):
            start += 1
            continue
        est = _Estimator(tokens, max_digits)
        est.i = start
        try:
            est.expr()
        except (OverflowError, RecursionError):  # huge value, or absurdly deep nesting
            return True
        except _NotNumeric:
            start += 1
            continue
        start = max(est.i, start + 1)  # sub-expressions of a parsed span were all estimated
    return False
