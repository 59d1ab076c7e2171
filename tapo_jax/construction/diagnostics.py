"""Mechanism diagnostics of a TAPO iteration: does each part of the method act at all?

Per iteration (host side, NumPy, no model):

- construction level (:func:`construction_report`): parse rate, success rate, and, with the
  arithmetic task's oracle, the verbatim-prefix rate (the reconstruction's lines before its
  reflection equal the wrong response's lines up to and including its first error) and the
  reflection-then-recovery rate (:func:`tapo_jax.data.arithmetic.trace_response`), where
  the reflection stands against the first error (right after it, early, late), and whether the
  analysis names the erroneous step (:func:`analysis_error_step`);
- token regions of a reconstruction (:func:`reflection_regions`): the completion tokens of the
  prefix, of the reflection line and of the continuation, used to mask the prefix out of the
  loss (``rl.ref_loss_from_reflection``) and to split the OTS statistics;
- batch level (:func:`advantage_report`, :func:`ots_region_report`): the share of reflection rows
  with a non-zero advantage, and the OTS weight (Eq. 7, at the rollout params) by region.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from tapo_jax.construction.synthesis import solution_lines
from tapo_jax.data.arithmetic import first_error_step, trace_response

__all__ = [
    "ConstructionCheck",
    "PLACEMENTS",
    "REGIONS",
    "advantage_report",
    "analysis_error_step",
    "check_construction",
    "construction_report",
    "ots_region_report",
    "reference_clean_to_error",
    "reflection_line_index",
    "reflection_regions",
    "region_masks",
]

REGIONS = ("prefix", "reflection", "continuation")
OTS_LOW = 0.1  # as tapo_jax.rl.objective.OTS_LOW_THRESHOLD


def reflection_line_index(lines: Sequence[str]) -> int | None:
    """Index of the first non-empty line that starts with ``Wait`` (the reflection), or None."""
    for i, ln in enumerate(lines):
        if ln.strip().startswith("Wait"):
            return i
    return None


PLACEMENTS = ("at_error", "early", "late", "none")
_NAMED_STEP = re.compile(r"Step (\d+):")


def analysis_error_step(analysis: str) -> int | None:
    """The step (1-based) an analysis names as the first error: its last ``Step k:`` (the cold
    start's formats: ``Step 3: sign error.``, or ``Step 1 ok. Step 2 ok. Step 3: sign error.``),
    or None when it names none."""
    found = _NAMED_STEP.findall(analysis)
    return int(found[-1]) if found else None


@dataclass(frozen=True)
class ConstructionCheck:
    reflects: bool  # a reflection line is present
    verbatim_prefix: bool  # lines before it == wrong response's lines[: first error + 1]
    recovered: bool  # the oracle's reflection-then-recovery
    correct: bool  # reward > 0
    # where the reflection line stands: right after the wrong response's first error line
    # ("at_error"), before it ("early"), after it ("late"), or "none" (no reflection, or a wrong
    # response without an error the oracle can locate)
    placement: str = "none"
    # the analysis names the wrong response's first error step (None: no analysis given, or no
    # error the oracle can locate)
    analysis_at_error: bool | None = None


def check_construction(question: str, wrong: str, reconstruction: str, reward: float,
                       analysis: str | None = None) -> ConstructionCheck:
    """The oracle's view of one arithmetic reconstruction and, when given, of its analysis
    (see the module docstring)."""
    rec = solution_lines(reconstruction)
    k = reflection_line_index(rec)
    verbatim, placement = False, "none"
    err = first_error_step(question, wrong)
    named = None
    if analysis is not None and err is not None:
        named = analysis_error_step(analysis) == err + 1
    if k is not None:
        w = solution_lines(wrong)
        if err is not None and err < len(w):
            verbatim = rec[:k] == w[:err + 1]
            placement = "at_error" if k == err + 1 else ("early" if k < err + 1 else "late")
    recovered = trace_response(question, reconstruction).recovered
    return ConstructionCheck(k is not None, verbatim, recovered, reward > 0, placement, named)


def reference_clean_to_error(question: str, wrong: str, reference: str) -> bool:
    """Whether the first line where ``wrong`` and ``reference`` differ is ``wrong``'s first error
    (task oracle): then copying y- up to that difference (the ``rule`` constructor) keeps it
    verbatim up to its error. False when the reference differs earlier (a cancelled slip of its
    own) or later, or when the oracle finds no error in ``wrong``."""
    w, r = solution_lines(wrong), solution_lines(reference)
    d = 0
    while d < min(len(w), len(r)) and w[d] == r[d]:
        d += 1
    err = first_error_step(question, wrong)
    return err is not None and d == err


def construction_report(attempted: int, parsed: int, checks: Sequence[ConstructionCheck]
                        ) -> dict[str, float]:
    """Rates of one iteration. ``checks`` holds one entry per parsed construction (an oracle
    check) or is empty when there is no oracle (then only parse / success rates where known).

    - ``parse_rate`` = parsed / attempted;
    - ``success_rate`` = correct / parsed (the reward contrast inside reflection groups);
    - ``verbatim_prefix_rate``, ``recovery_rate``, ``reflect_rate``: over parsed constructions;
    - ``reflect_early_rate``, ``reflect_late_rate``: the reflection line stands before / after
      the line right after the wrong response's first error (over parsed constructions; with
      ``verbatim_prefix_rate`` they tell a misplaced reflection from a corrupted copy);
    - ``analysis_at_error_rate``: over the checks that judged an analysis, the share whose
      analysis names the wrong response's first error step.
    Rates with a zero denominator are left out (undefined, not 0)."""
    out: dict[str, float] = {}
    if attempted:
        out["parse_rate"] = parsed / attempted
    if checks:
        n = len(checks)
        out["success_rate"] = sum(c.correct for c in checks) / n
        out["verbatim_prefix_rate"] = sum(c.verbatim_prefix for c in checks) / n
        out["recovery_rate"] = sum(c.recovered for c in checks) / n
        out["reflect_rate"] = sum(c.reflects for c in checks) / n
        out["reflect_early_rate"] = sum(c.placement == "early" for c in checks) / n
        out["reflect_late_rate"] = sum(c.placement == "late" for c in checks) / n
        judged = [c.analysis_at_error for c in checks if c.analysis_at_error is not None]
        if judged:
            out["analysis_at_error_rate"] = sum(judged) / len(judged)
    return out


def reflection_regions(text: str, encode: Callable[[str], list[int]]
                       ) -> tuple[int, int] | None:
    """Token boundaries ``(start, end)`` of the reflection line in ``encode(text)``: tokens
    ``[0, start)`` are the prefix, ``[start, end)`` the reflection line with its newline, the rest
    the continuation. None when there is no reflection line or when the pieces do not tokenise
    to the same ids as the whole text (then no boundary is trusted)."""
    raw = text.split("\n")
    k = next((i for i, ln in enumerate(raw) if ln.strip().startswith("Wait")), None)
    if k is None:
        return None
    pre = "\n".join(raw[:k]) + ("\n" if k else "")
    mid = raw[k] + ("\n" if k + 1 < len(raw) else "")
    post = "\n".join(raw[k + 1:])
    a, b, c = encode(pre) if pre else [], encode(mid), encode(post) if post else []
    if list(a) + list(b) + list(c) != list(encode(text)):
        return None
    return len(a), len(a) + len(b)


def advantage_report(advantages: np.ndarray, is_reflection: np.ndarray, row_mask: np.ndarray
                     ) -> dict[str, float]:
    """``ref_rows``, ``ref_nonzero_adv_share`` (|A| > 0 among real reflection rows) and the
    mean advantage of reflection rows; empty dict without reflection rows."""
    a = np.asarray(advantages, np.float64)
    r = np.asarray(is_reflection, bool) & (np.asarray(row_mask) > 0)
    n = int(r.sum())
    if n == 0:
        return {}
    return {"ref_rows": float(n), "ref_nonzero_adv_share": float((a[r] != 0).sum() / n),
            "ref_adv_mean": float(a[r].mean())}


def ots_region_report(logprobs: np.ndarray, entropy: np.ndarray,
                      region_masks: dict[str, np.ndarray], *, w_min: float, w_max: float
                      ) -> dict[str, float]:
    """OTS weight w = clamp(exp(logp + H), w_min, w_max) (Eq. 7) per region: ``ots_<r>_mean``
    and ``ots_<r>_low_share`` (share below 0.1); regions with no token are left out."""
    s = np.clip(np.asarray(logprobs, np.float64) + np.asarray(entropy, np.float64),
                math.log(w_min), math.log(w_max))
    w = np.clip(np.exp(s), w_min, w_max)
    out: dict[str, float] = {}
    for name, m in region_masks.items():
        m = np.asarray(m) > 0
        n = int(m.sum())
        if n:
            out[f"ots_{name}_mean"] = float(w[m].mean())
            out[f"ots_{name}_low_share"] = float((w[m] < OTS_LOW).sum() / n)
            out[f"ots_{name}_tokens"] = float(n)
    return out


def region_masks(shape: tuple[int, int], spans: Sequence[tuple[int, int, int, int] | None]
                 ) -> dict[str, np.ndarray]:
    """Masks [B, T] of the three regions from per-row ``(P, start, end, L)`` (prompt length,
    reflection start / end in completion tokens, completion length kept in the batch); rows with
    None (originals, constructions without a reflection) are in no region."""
    masks = {r: np.zeros(shape, np.float32) for r in REGIONS}
    T = shape[1]
    for b, sp in enumerate(spans):
        if sp is None:
            continue
        P, s, e, L = sp
        hi = min(P + L, T)
        masks["prefix"][b, max(P, 1):min(P + s, hi)] = 1
        masks["reflection"][b, max(P + s, 1):min(P + e, hi)] = 1
        masks["continuation"][b, max(P + e, 1):hi] = 1
    return masks
