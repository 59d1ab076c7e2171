"""Cold-start SFT data for the embedded task: two kinds of examples trained jointly.

1. Ordinary solutions: question -> step-by-step solution ending in ``\\boxed{}``.
2. Trajectory-construction examples: the synthesis prompt (question, an erroneous solution with
   one realistic slip, the correct solution as reference; built by construction.synthesis,
   exactly as the RL loop builds it) -> ``<analysis>Step k: kind.</analysis>`` (or, with
   ``analysis="walk"``, ``<analysis>Step 1 ok. ... Step k: kind.</analysis>``; with
   ``analysis="compare"``, each line's result in the wrong response and in the reference written
   side by side first, ``1. 17 | 17`` ... ``3. 10 | 9``, then ``Step 3: kind.``) and a
   ``<reconstruction>`` that keeps the erroneous lines verbatim up to and including the wrong
   step, reflects ("Wait, 85 - 19 = 66, not 67.") and continues correctly to the answer. Mode
   ``full`` (ablation) targets the whole correct solution instead.

Examples are (prompt_text, response_text) pairs; the prompt text is formatted with the chat
template at tokenisation, and each response ends with the end-of-turn token, which is trained.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tapo_jax.data.arithmetic import (
    ALL_SLIP_KINDS,
    ANALYSIS_PHRASES,
    Problem,
    classify_error,
    compensated_reference,
    draw_slip,
    first_error_step,
    reflection_phrase,
)
from tapo_jax.construction.diagnostics import reflection_line_index
from tapo_jax.data.datasets import format_prompt
from tapo_jax.data.batching import Row, build_train_batch
from tapo_jax.construction.synthesis import build_synthesis_prompt, format_construction, rule_construct

__all__ = [
    "ANALYSIS_STYLES",
    "ColdStartData",
    "analysis_text",
    "build_cold_start",
    "cold_start_rows",
    "cold_start_token_weights",
    "construction_example",
    "decision_offsets",
    "decision_token_indices",
    "error_line_span",
    "line_results",
    "sft_batch",
    "token_span",
    "tokenize_pairs",
    "weight_tokens",
]


ANALYSIS_STYLES = ("step", "walk", "compare")


def line_results(solution: str) -> list[str]:
    """The value each step line of a solution arrives at (the text after its last `` = ``;
    ``-`` for a line without one), ``\boxed{}`` and blank lines left out."""
    out = []
    for line in solution.split("\n"):
        line = line.strip()
        if not line or line.startswith("\\boxed"):
            continue
        out.append(line.rsplit(" = ", 1)[1].strip() if " = " in line else "-")
    return out


def analysis_text(question: str, wrong: str, step: int, style: str = "step",
                  reference: str | None = None) -> str:
    """The oracle's analysis of ``wrong``'s first error at line ``step`` (0-based).

    - ``step``: ``Step k: kind.`` -- the erroneous step named in one go;
    - ``walk``: ``Step 1 ok. Step 2 ok. ... Step k: kind.`` -- every step before it checked in
      order, so a model that writes it decides one line at a time whether this is the error;
    - ``compare``: one line per step up to the error with the value the wrong response and the
      shown ``reference`` reach there (``2. 24 | 24``; ``-`` where the reference has no such
      line), then ``Step k: kind.``. The verdict is still the oracle's, so after a reference's
      own cancelled slip the two values differ on lines the wrong response has right; with a
      clean reference the first differing line is the error, and the model that writes it
      decides by comparing two numbers next to each other."""
    if style not in ANALYSIS_STYLES:
        raise ValueError(f"analysis style must be one of {ANALYSIS_STYLES}, got {style!r}")
    named = f"Step {step + 1}: {ANALYSIS_PHRASES[classify_error(question, wrong, step)]}."
    if style == "step":
        return named
    if style == "walk":
        return " ".join([f"Step {i + 1} ok." for i in range(step)] + [named])
    if reference is None:
        raise ValueError("the compare analysis needs the reference the prompt shows")
    w, r = line_results(wrong), line_results(reference)
    rows = [f"{i + 1}. {w[i] if i < len(w) else '-'} | {r[i] if i < len(r) else '-'}"
            for i in range(step + 1)]
    return "\n".join(rows + [named])


_ANALYSIS = ("<analysis>", "</analysis>")
_RECON = ("<reconstruction>", "</reconstruction>")
_VERDICT_STEP = re.compile(r"Step (\d+):")
_WALK_STEP = re.compile(r"Step \d+(?=[ :])")


def _between(text: str, tags: tuple[str, str]) -> tuple[int, str] | None:
    start = text.find(tags[0])
    if start < 0:
        return None
    start += len(tags[0])
    end = text.find(tags[1], start)
    return (start, text[start:end]) if end >= 0 else None


def decision_offsets(target: str, analysis: str = "step") -> list[int]:
    """Character offsets in a construction target (:func:`format_construction`) where the
    target decides *where the first error is*, the decision the verbatim-prefix rate scores:

    - in the analysis, ``step``: the number of the verdict ``Step k:``; ``walk``: the character
      after each ``Step i`` (`` ok.`` passes the step, ``:`` names it); ``compare``: the start of
      each line after the first (the next pair, or the verdict after a pair that differs);
    - in the reconstruction: the start of each line after the first up to and including the
      reflection line (copy the wrong response's next line, or reflect here).

    A ``full`` reconstruction (no reflection line) contributes none. Sorted, without repeats."""
    if analysis not in ANALYSIS_STYLES:
        raise ValueError(f"analysis style must be one of {ANALYSIS_STYLES}, got {analysis!r}")
    out: list[int] = []
    part = _between(target, _ANALYSIS)
    if part is not None:
        a0, text = part
        if analysis == "step":
            found = list(_VERDICT_STEP.finditer(text))
            if found:
                out.append(a0 + found[-1].start(1))
        elif analysis == "walk":
            out += [a0 + m.end() for m in _WALK_STEP.finditer(text)]
        else:
            out += [a0 + m.end() for m in re.finditer("\n", text)]
    part = _between(target, _RECON)
    if part is not None:
        r0, text = part
        lines = text.split("\n")
        k = reflection_line_index(lines)
        if k is not None:
            starts = np.cumsum([0] + [len(ln) + 1 for ln in lines[:-1]])
            out += [r0 + int(starts[i]) for i in range(1, k + 1)]
    return sorted(set(out))


def error_line_span(target: str) -> tuple[int, int] | None:
    """Character span ``[start, end)`` of the reconstruction's erroneous line, the line right
    before its reflection, which a micro-reflective target copies verbatim from the wrong
    response (without its newline). None without a reflection line, or with the reflection
    first."""
    part = _between(target, _RECON)
    if part is None:
        return None
    r0, text = part
    lines = text.split("\n")
    k = reflection_line_index(lines)
    if not k:
        return None
    start = r0 + sum(len(ln) + 1 for ln in lines[:k - 1])
    return start, start + len(lines[k - 1])


def _token_index(whole: list[int], target: str, c: int, encode: Any) -> int | None:
    """The index in ``whole = encode(target)`` of the token that starts at character ``c``, or
    None when ``c`` falls inside a token (``encode(target[:c])`` is not a prefix of ``whole``)."""
    head = list(encode(target[:c])) if c else []
    return len(head) if whole[:len(head)] == head else None


def token_span(target: str, span: tuple[int, int], encode: Any) -> tuple[int, int] | None:
    """Token indices ``[a, b)`` of ``encode(target)`` covering the character ``span``, or None
    when a boundary of the span falls inside a token."""
    whole = list(encode(target))
    a, b = (_token_index(whole, target, c, encode) for c in span)
    return (a, b) if a is not None and b is not None and a < b else None


def decision_token_indices(target: str, encode: Any, analysis: str = "step"
                           ) -> tuple[list[int], int]:
    """Token indices in ``encode(target)`` of the :func:`decision_offsets`: the token that starts
    at each offset. An offset inside a token is left out; returns (indices, offsets left out)."""
    whole = list(encode(target))
    out, dropped = [], 0
    for c in decision_offsets(target, analysis):
        i = _token_index(whole, target, c, encode)
        if i is not None and i < len(whole):
            out.append(i)
        else:
            dropped += 1
    return out, dropped


@dataclass
class ColdStartData:
    solutions: list[tuple[str, str]] = field(default_factory=list)  # (question, solution)
    constructions: list[tuple[str, str]] = field(default_factory=list)  # (synthesis prompt, target)


def construction_example(problem: Problem, slip_text: str, *, style: str = "compact",
                         mode: str = "micro", shown_reference: str | None = None,
                         analysis: str = "step") -> tuple[str, str]:
    """(synthesis prompt, ``<analysis>..</analysis>\\n<reconstruction>..</reconstruction>``)
    for an erroneous solution of ``problem``; the oracle locates and names the error (in the
    :func:`analysis_text` style ``analysis``). The prompt shows ``shown_reference`` (default:
    the correct solution) as the reference; the target always continues with the correct
    solution."""
    q, ref = problem.question, problem.solution
    step = first_error_step(q, slip_text)
    if step is None:
        raise ValueError(f"the erroneous solution of {q!r} has no error:\n{slip_text}")
    text = analysis_text(q, slip_text, step, analysis, reference=shown_reference or ref)
    if mode == "micro":
        recon = rule_construct(slip_text, ref, reflect=reflection_phrase)
        if recon is None:
            raise ValueError(f"no divergence between the erroneous and correct solution of {q!r}")
    elif mode == "full":
        recon = ref
    else:
        raise ValueError(f"cold-start construction mode must be micro or full, got {mode!r}")
    prompt = build_synthesis_prompt(q, slip_text, shown_reference or ref, style=style, mode=mode)
    return prompt, format_construction(text, recon)


def build_cold_start(
    problems: Sequence[Problem],
    *,
    seed: int,
    construction_fraction: float = 0.5,
    style: str = "compact",
    mode: str = "micro",
    reference_slip_fraction: float = 0.0,
    analysis: str = "step",
    slip_kinds: Sequence[str] = (),
) -> ColdStartData:
    """Solutions for every problem plus construction examples, so that constructions make up
    ``construction_fraction`` of all examples (1.0: constructions only, one per problem).
    Slip kinds are drawn uniformly; problems for constructions are drawn with replacement.
    A ``reference_slip_fraction`` share of the construction prompts shows a
    :func:`~tapo_jax.data.arithmetic.compensated_reference` (right answer, one cancelled wrong
    step) instead of the correct solution: when the reference is always the clean solution,
    its lines before the error equal the wrong response's, and a model that copies the prefix
    from the reference is never corrected; at RL time the policy's correct responses often
    differ from the wrong one before its error. ``analysis`` is the construction targets'
    analysis style (:func:`analysis_text`). ``slip_kinds`` (kinds of
    :data:`~tapo_jax.data.arithmetic.ALL_SLIP_KINDS`, a repeat weighting its kind) is the mix
    the wrong solutions' slips are drawn from; empty: ``make_slip``'s uniform default."""
    if analysis not in ANALYSIS_STYLES:
        raise ValueError(f"analysis style must be one of {ANALYSIS_STYLES}, got {analysis!r}")
    if not 0.0 <= reference_slip_fraction <= 1.0:
        raise ValueError("reference_slip_fraction must be in [0, 1], "
                         f"got {reference_slip_fraction}")
    if not 0.0 <= construction_fraction <= 1.0:
        raise ValueError(f"construction_fraction must be in [0, 1], got {construction_fraction}")
    if not problems:
        raise ValueError("build_cold_start: no problems")
    unknown = sorted(set(slip_kinds) - set(ALL_SLIP_KINDS))
    if unknown:
        raise ValueError(f"unknown slip kinds {unknown}; known: {ALL_SLIP_KINDS}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xC01D]))
    ref_rng = np.random.default_rng(np.random.SeedSequence([seed, 0xC01D, 1]))
    data = ColdStartData()
    if construction_fraction < 1.0:
        data.solutions = [(p.question, p.solution) for p in problems]
        n_con = round(len(problems) * construction_fraction / (1.0 - construction_fraction))
    else:
        n_con = len(problems)
    failures = 0
    while len(data.constructions) < n_con:
        p = problems[int(rng.integers(len(problems)))]
        slip = draw_slip(p, rng, slip_kinds)
        if slip is None:
            failures += 1
            if failures > 100 * n_con + 100:
                raise ValueError("could not make erroneous solutions for these problems "
                                 "(are all operands 0?)")
            continue
        shown = None
        if reference_slip_fraction > 0 and ref_rng.random() < reference_slip_fraction:
            shown = compensated_reference(p, ref_rng)
        data.constructions.append(construction_example(p, slip.text, style=style, mode=mode,
                                                       shown_reference=shown, analysis=analysis))
    return data


def tokenize_pairs(
    pairs: Sequence[tuple[str, str]], tokenizer: Any, *, template: str = "{prompt}",
    chat: bool = True,
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids + end-of-turn id) per pair."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token (needed to end SFT responses)")
    out = []
    for prompt, response in pairs:
        text = format_prompt(prompt, tokenizer, template=template, chat=chat)
        p_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        out.append((list(p_ids), list(r_ids) + [eos]))
    return out


def cold_start_rows(data: ColdStartData, tokenizer: Any, *, prompt_template: str = "{prompt}",
                    chat: bool = True) -> list[tuple[list[int], list[int]]]:
    """Tokenised examples of both kinds: solutions use the data prompt template, synthesis
    prompts are used as they are (as in the RL loop)."""
    return (tokenize_pairs(data.solutions, tokenizer, template=prompt_template, chat=chat)
            + tokenize_pairs(data.constructions, tokenizer, chat=chat))


def cold_start_token_weights(data: ColdStartData, tokenizer: Any, *, analysis: str = "step",
                             decision_weight: float = 1.0, error_line_weight: float = 1.0
                             ) -> tuple[list[dict[int, float]], dict[str, int]]:
    """Per example of :func:`cold_start_rows` (same order), ``{response-token index: weight}``:
    the tokens of the erroneous line (:func:`error_line_span`) at ``error_line_weight``, then the
    decision tokens (:func:`decision_token_indices`) at ``decision_weight`` over them; a weight
    of 1 adds nothing, and solutions get none. Also returns counts: ``decision`` /
    ``error_line`` tokens weighted, and ``*_dropped`` boundaries that fell inside a token."""
    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    out: list[dict[int, float]] = [{} for _ in data.solutions]
    counts = dict(decision=0, decision_dropped=0, error_line=0, error_line_dropped=0)
    for _, target in data.constructions:
        row: dict[int, float] = {}
        if error_line_weight != 1.0:
            span = error_line_span(target)
            tspan = token_span(target, span, encode) if span else None
            counts["error_line_dropped"] += bool(span) and tspan is None
            if tspan:
                row.update(dict.fromkeys(range(*tspan), error_line_weight))
                counts["error_line"] += tspan[1] - tspan[0]
        if decision_weight != 1.0:
            idx, dropped = decision_token_indices(target, encode, analysis)
            row.update(dict.fromkeys(idx, decision_weight))
            counts["decision"] += len(idx)
            counts["decision_dropped"] += dropped
        out.append(row)
    return out, counts


def weight_tokens(loss_mask: np.ndarray, weights: Sequence[dict[int, float]]) -> np.ndarray:
    """``loss_mask`` [B, T] (of :func:`sft_batch`) with its rows' tokens weighted: row b's k-th
    trained token gets ``weights[b][k]`` (indices past the row's trained tokens, cut by
    truncation, are ignored). Rows past ``weights`` are left."""
    out = np.array(loss_mask, np.float32, copy=True)
    for b, row in enumerate(weights):
        if not row:
            continue
        cols = np.flatnonzero(out[b] > 0)
        for k, w in row.items():
            if k < len(cols):
                out[b, cols[k]] = w
    return out


def sft_batch(examples: Sequence[tuple[Sequence[int], Sequence[int]]], *, pad_id: int,
              length_buckets: Sequence[int] | None = None,
              row_buckets: Sequence[int] | None = None, max_len: int = 4096,
              row_multiple: int = 1):
    """A TrainBatch for maximum-likelihood training: loss_mask on response tokens, reward 1,
    every row its own query. Returns ``(TrainBatch, BatchStats)``."""
    rows = [Row(p, c, query_index=i, is_reflection=False, reward=1.0)
            for i, (p, c) in enumerate(examples)]
    return build_train_batch(rows, num_queries=len(rows), pad_id=pad_id,
                             length_buckets=length_buckets, row_buckets=row_buckets,
                             max_len=max_len, row_multiple=row_multiple)
