"""Evaluation: unbiased Pass@k over R runs, and the reflection capability analysis (DSR, ERR;
:mod:`tapo_jax.evaluation.reflection`).

    result = run_eval(sample_fn, problems, cfg.eval, seed=0)   # sample_fn(prompts, n, seed)
    write_report(result, out_dir, "after")                      # eval.json + eval.md

Pass@k (Chen et al. 2021) from n samples of which c are correct: 1 - C(n-c, k) / C(n, k),
computed as the product 1 - prod_{i=n-c+1}^{n} (1 - k/i) so no binomial ever overflows. Each run
averages over problems; the report gives mean +- std (population std) over the R runs.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from tapo_jax.data.arithmetic import first_error_step, parse_steps, trace_response
from tapo_jax.evaluation.reflection import capability_metrics, detect_reflection
from tapo_jax.rewards.verifier import score

SampleFn = Callable[[list[str], int, int], list[list[str]]]
Oracle = Callable[["EvalProblem", str], bool]

# --------------------------------------------------------------------------------------------
# Pass@k
# --------------------------------------------------------------------------------------------


def pass_at_k(n: Any, c: Any, k: int) -> np.ndarray:
    """Unbiased Pass@k, float64 with the broadcast shape of ``n`` and ``c`` (e.g. [P])."""
    n, c = np.broadcast_arrays(np.asarray(n, np.int64), np.asarray(c, np.int64))
    if k < 1:
        raise ValueError(f"pass_at_k: k must be >= 1, got {k}")
    if n.size == 0:
        return np.zeros(n.shape, np.float64)
    if np.any(c < 0) or np.any(c > n):
        raise ValueError("pass_at_k: need 0 <= c <= n for every problem")
    if np.any(n < k):
        raise ValueError(f"pass_at_k: every n must be >= k = {k}, got min n = {n.min()}")
    i = np.arange(1, int(n.max()) + 1, dtype=np.float64)  # [M]
    in_range = (i > (n - c)[..., None]) & (i <= n[..., None])  # [..., M]: i in (n-c, n]
    prod = np.prod(np.where(in_range, 1.0 - k / i, 1.0), axis=-1)
    return np.where(n - c < k, 1.0, 1.0 - prod)


def _mean_std(values: Sequence[float]) -> dict[str, Optional[float]]:
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], np.float64)
    if v.size == 0:
        return {"mean": None, "std": None}
    return {"mean": float(v.mean()), "std": float(v.std())}


def evaluate_samples(correct: Any, k_max: int = 5) -> dict[str, dict]:
    """Pass@1..k_max from correctness bool[R, P, n] (or bool[P, n] for one run).

    Returns ``{"pass@k": {"mean", "std", "runs": [per-run value]}}``; each run's value is the mean
    over its P problems.
    """
    correct = np.asarray(correct, bool)
    if correct.ndim == 2:
        correct = correct[None]
    if correct.ndim != 3:
        raise ValueError(f"evaluate_samples: expected bool[R, P, n], got shape {correct.shape}")
    _, _, n = correct.shape
    if k_max > n:
        raise ValueError(f"evaluate_samples: k_max = {k_max} exceeds n = {n} samples per problem")
    c = correct.sum(-1)  # [R, P]
    out = {}
    for k in range(1, k_max + 1):
        runs = [float(pass_at_k(n, c_r, k).mean()) for c_r in c]
        out[f"pass@{k}"] = dict(_mean_std(runs), runs=runs)
    return out


# --------------------------------------------------------------------------------------------
# Running an evaluation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalProblem:
    prompt: str
    answer: str
    meta: Any = None  # the task's own problem object (e.g. for the arithmetic oracle)


@dataclass
class EvalResult:
    pass_at_k: dict[str, dict]  # "pass@k" -> {"mean", "std", "runs"}
    dsr: dict[str, Optional[float]]  # {"mean", "std"} over runs
    err: dict[str, Optional[float]]
    counts: dict[str, int]  # summed over runs
    per_run: list[dict] = field(default_factory=list)
    problem_pass_rate: list[float] = field(default_factory=list)  # [P], mean over runs
    reasons: dict[str, int] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    examples: list[dict] = field(default_factory=list)
    # Pass@1 when the answer may also be stated in words ("the answer is 12"): an evaluation-only
    # reading of the responses, reported beside (never instead of) the strict boxed score
    lenient_pass_at_1: dict[str, Optional[float]] = field(default_factory=dict)
    # DSR / ERR with reflection and recovery read by the task's oracle (``tracer``) instead of
    # marker phrases: a response reflects when it has a "Wait, ..." line, and has recovered when
    # it restated the expected step after an error and ended correct
    dsr_oracle: dict[str, Optional[float]] = field(default_factory=dict)
    err_oracle: dict[str, Optional[float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def arithmetic_tracer(problem: EvalProblem, response: str) -> tuple[bool, bool]:
    """(reflects, recovered) of a response by the arithmetic task's oracle
    (:func:`tapo_jax.data.arithmetic.trace_response`)."""
    question = getattr(problem.meta, "question", None) or problem.prompt
    try:
        t = trace_response(question, response)
    except ValueError:  # not an arithmetic question
        return False, False
    return t.reflected, t.recovered


def arithmetic_oracle(problem: EvalProblem, prefix: str) -> bool:
    """True when a line of ``prefix`` (the response before its reflection) is wrong, by the
    arithmetic task's oracle (:func:`tapo_jax.data.arithmetic.first_error_step`); lines missing
    at the end of the prefix do not count as errors."""
    question = getattr(problem.meta, "question", None) or problem.prompt
    step = first_error_step(question, prefix)
    return step is not None and step < len(parse_steps(prefix))


def as_problem(item: Any) -> EvalProblem:
    """An :class:`EvalProblem` from a dict or an object with ``prompt`` (or ``question``) and
    ``answer`` (e.g. a dataset ``Record`` or an arithmetic ``Problem``, kept as ``meta``)."""
    if isinstance(item, EvalProblem):
        return item
    if isinstance(item, dict) and "prompt" in item and "answer" in item:
        return EvalProblem(str(item["prompt"]), str(item["answer"]), item.get("meta"))
    prompt = getattr(item, "prompt", None) or getattr(item, "question", None)
    answer = getattr(item, "answer", None)
    if prompt is None or answer is None:
        raise TypeError(
            f"evaluation problem needs 'prompt' and 'answer', got {type(item).__name__}"
        )
    return EvalProblem(str(prompt), str(answer), item)


def run_seed(seed: int, run: int) -> int:
    """Independent 31-bit sampling seed of run ``run`` (distinct across seeds and runs)."""
    return int(np.random.SeedSequence([seed, run]).generate_state(1)[0] >> 1)


def run_eval(
    sample_fn: SampleFn,
    problems: Sequence[Any],
    cfg: Any,
    *,
    seed: int,
    oracle: Optional[Oracle] = None,
    score_fn: Optional[Callable] = None,
    lenient_score_fn: Optional[Callable] = None,
    num_examples: int = 3,
    tracer: Optional[Callable[[EvalProblem, str], tuple[bool, bool]]] = None,
) -> EvalResult:
    """Evaluate a policy: R = ``cfg.runs`` runs of ``cfg.num_samples`` completions per problem.

    ``cfg`` is an :class:`tapo_jax.config.EvalConfig`. ``sample_fn(prompts, n, seed)`` returns,
    per prompt, n completion texts; it owns templates, tokenization and the sampling settings
    (``cfg.temperature``, ``cfg.top_p``, ``cfg.max_new_tokens``). Responses are scored by
    ``score_fn`` (default :func:`tapo_jax.rewards.verifier.score`), and for the separately
    reported lenient Pass@1 by ``lenient_score_fn`` (default: the same with ``lenient=True``;
    none when only a custom ``score_fn`` is given). ``oracle(problem, prefix) ->
    bool`` confirms an error before a reflection (default: the evidence in the revision itself).
    """
    if score_fn is None:
        score_fn = score
        if lenient_score_fn is None:
            lenient_score_fn = functools.partial(score, lenient=True)
    items = [as_problem(p) for p in problems]
    if cfg.num_problems > 0:
        items = items[: cfg.num_problems]
    if not items:
        raise ValueError("run_eval: no problems to evaluate")
    n, prompts = cfg.num_samples, [p.prompt for p in items]
    golds = [p.answer for p in items for _ in range(n)]
    corrects, per_run, reasons, examples, lenient = [], [], {}, [], []
    for r in range(cfg.runs):
        texts = sample_fn(prompts, n, run_seed(seed, r))
        if len(texts) != len(items) or any(len(t) != n for t in texts):
            raise ValueError(f"sample_fn must return {len(items)} lists of {n} completions")
        flat = [t for row in texts for t in row]
        rewards, why = score_fn(flat, golds)
        correct = np.asarray(rewards).reshape(len(items), n) > 0
        if lenient_score_fn is not None:
            lenient.append(float(np.mean(np.asarray(lenient_score_fn(flat, golds)[0]) > 0)))
        refl = [detect_reflection(t) for t in flat]
        reflects = np.array([a.reflects for a in refl]).reshape(correct.shape)
        confirmed = []
        for j, a in enumerate(refl):
            if a.reflects and oracle is not None:
                confirmed.append(bool(oracle(items[j // n], flat[j][: a.position])))
            else:
                confirmed.append(a.evidence_of_error)
        cap = capability_metrics(correct, reflects, np.array(confirmed).reshape(correct.shape))
        for w in why:
            reasons[w] = reasons.get(w, 0) + 1
        cap["counts"]["markers_without_change"] = sum(a.has_marker and not a.reflects for a in refl)
        if tracer is not None:
            tr = np.array([tracer(items[j // n], t) for j, t in enumerate(flat)], bool)
            tr = tr.reshape(correct.shape + (2,))
            cap_o = capability_metrics(correct, tr[..., 0], tr[..., 1])
            cap["counts"]["oracle_reflecting"] = int(tr[..., 0].sum())
            cap["counts"]["oracle_recovered"] = int(tr[..., 1].sum())
            cap["dsr_oracle"], cap["err_oracle"] = cap_o["dsr"], cap_o["err"]
        per_run.append(dict(seed=run_seed(seed, r), dsr=cap["dsr"], err=cap["err"],
                            dsr_oracle=cap.get("dsr_oracle"), err_oracle=cap.get("err_oracle"),
                            counts=cap["counts"]))
        corrects.append(correct)
        for j, a in enumerate(refl):
            if len(examples) < num_examples and a.reflects and confirmed[j] and correct.flat[j]:
                examples.append(dict(prompt=prompts[j // n], answer=items[j // n].answer,
                                     response=flat[j][:2000], marker=a.marker))
    stacked = np.stack(corrects)  # [R, P, n]
    counts = {k: sum(run["counts"][k] for run in per_run) for k in per_run[0]["counts"]}
    counts.update(problems=len(items), samples_per_problem=n, runs=cfg.runs,
                  responses=int(stacked.size), correct_total=int(stacked.sum()))
    return EvalResult(
        pass_at_k=evaluate_samples(stacked, cfg.k_max),
        dsr=_mean_std([run["dsr"] for run in per_run]),
        err=_mean_std([run["err"] for run in per_run]),
        counts=counts,
        per_run=per_run,
        problem_pass_rate=stacked.mean(axis=(0, 2)).tolist(),
        reasons=reasons,
        settings=dict(num_samples=n, k_max=cfg.k_max, runs=cfg.runs, seed=seed,
                      temperature=cfg.temperature, top_p=cfg.top_p,
                      oracle=getattr(oracle, "__name__", None) if oracle else None),
        examples=examples,
        lenient_pass_at_1=_mean_std(lenient) if lenient else {},
        dsr_oracle=_mean_std([run["dsr_oracle"] for run in per_run]) if tracer else {},
        err_oracle=_mean_std([run["err_oracle"] for run in per_run]) if tracer else {},
    )


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _pct(ms: dict) -> str:
    if ms.get("mean") is None:
        return "–"
    return f"{100 * ms['mean']:.1f} ± {100 * ms['std']:.1f}"


def format_table(results: dict[str, Any]) -> str:
    """Markdown tables (one row per named result; values are EvalResult or their dicts)."""
    rows = {name: r.to_dict() if isinstance(r, EvalResult) else r for name, r in results.items()}
    k_max = max(len(r["pass_at_k"]) for r in rows.values())
    head = (["model"] + [f"Pass@{k}" for k in range(1, k_max + 1)] + ["DSR", "ERR"]
            + ["Pass@1 lenient"])
    lines = ["Values in %, mean ± std over runs. DSR / ERR on problems with pass rate in (0, 1). "
             "Lenient: the final answer may also be stated in words (evaluation only).",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        cells = [_pct(r["pass_at_k"].get(f"pass@{k}", {})) for k in range(1, k_max + 1)]
        cells += [_pct(r["dsr"]), _pct(r["err"]), _pct(r.get("lenient_pass_at_1") or {})]
        lines.append("| " + " | ".join([name] + cells) + " |")
    keys = ["problems", "samples_per_problem", "runs", "correct_total", "zpd_problems",
            "correct_direct", "reflecting", "reflecting_recovered", "markers_without_change",
            "oracle_reflecting", "oracle_recovered"]
    lines += ["", "| model | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for name, r in rows.items():
        cells = [str(r["counts"].get(k, "–")) for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(result: EvalResult, out_dir: str | Path, name: str = "eval") -> tuple[Path, Path]:
    """Add ``result`` under ``name`` to ``out_dir/eval.json`` and rewrite ``out_dir/eval.md``.

    Earlier entries of other names (e.g. "before" next to "after") are kept, so one table
    compares them. Returns the two paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "eval.json", out / "eval.md"
    entries: dict[str, Any] = {}
    if json_path.is_file():
        try:
            entries = json.loads(json_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{json_path}: existing report is not valid JSON: {e}") from e
    entries[name] = result.to_dict()
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(entries, indent=2, allow_nan=False))
    tmp.replace(json_path)
    md_path.write_text("# Evaluation\n\n" + format_table(entries))
    return json_path, md_path
