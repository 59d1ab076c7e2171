"""One iteration's data collection (paper Algorithm 1, steps 1-3), on the host.

    sample K per query -> rewards -> [TAPO] DCS -> synthesis prompts through the same sampler
    -> parse + reward the reconstructions -> rows of a TrainBatch

Everything here is plain Python/NumPy around two injected callables, so the same code serves
every algorithm and is testable without a model:

- ``sample(prompt_ids, n, max_new_tokens, seed) -> list[list[Completion]]`` (per prompt, n
  completions; the RL loop binds it to :class:`tapo_jax.sampling.Sampler` with the current params);
- ``score(texts, golds) -> (rewards, reasons)`` (default :func:`tapo_jax.rewards.verifier.score`).

Constructed trajectories y_ref are trained as responses to the *original* prompt x (never to the
synthesis prompt); their old log-probs are recomputed later by a teacher-forced forward on (x, y_ref).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from tapo_jax.config import Config, construction_budget
from tapo_jax.construction import diagnostics
from tapo_jax.construction import selection as dcs
from tapo_jax.construction import synthesis
from tapo_jax.data.arithmetic import reflection_phrase
from tapo_jax.data.batching import Row
from tapo_jax.data.datasets import format_prompt
from tapo_jax.data.tokenizers import end_of_turn_id
from tapo_jax.train.distributed import map_across_processes


@dataclass(frozen=True)
class Completion:
    tokens: list[int]  # completion token ids (the stop token included when it stopped)
    logprobs: list[float]  # rollout-time log-prob of each token
    finish_reason: str  # "stop" | "length"


SampleFn = Callable[[list[list[int]], int, int, int], list[list[Completion]]]
ScoreFn = Callable[[list[str], list[str]], tuple[np.ndarray, list[str]]]


@dataclass
class Collected:
    """The rows of one iteration plus what the metrics need."""

    rows: list[Row]
    num_queries: int
    rewards: np.ndarray  # float32[Q, K] original rewards
    response_lengths: np.ndarray  # int[Q*K]
    truncated: np.ndarray  # bool[Q*K]   finished by the length limit
    overlong_masked: list[int] = field(default_factory=list)  # row indices to exclude from loss
    stats: dict[str, float] = field(default_factory=dict)
    examples: list[dict] = field(default_factory=list)
    query_records: list[Any] = field(default_factory=list)
    reference_texts: list[Optional[str]] = field(default_factory=list)  # per query (OPSD)
    # wall seconds inside ``sample`` calls: "sampling" (rollouts, resampling rounds included)
    # and "construction" (synthesis prompts)
    sample_seconds: dict[str, float] = field(
        default_factory=lambda: {"sampling": 0.0, "construction": 0.0})


def score_across_processes(score: ScoreFn) -> ScoreFn:
    """``score`` in shares: each process scores its share of the responses (with its own
    worker pool) and every process gets all rewards and reasons, in order."""
    def shared(texts: list[str], golds: list[str]) -> tuple[np.ndarray, list[str]]:
        rewards, reasons = map_across_processes(score, texts, golds)
        return np.asarray(rewards, np.float32), [str(r) for r in reasons]

    return shared


def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def _original_rows(prompt_ids, comps, rewards, K) -> list[Row]:
    rows = []
    for q, group in enumerate(comps):
        for k, c in enumerate(group):
            rows.append(Row(prompt_ids[q], c.tokens, query_index=q, is_reflection=False,
                            reward=float(rewards[q, k]), logprobs=c.logprobs))
    return rows


def collect(
    records: Sequence[Any],
    *,
    cfg: Config,
    tokenizer: Any,
    step: int,
    sample: SampleFn,
    score: ScoreFn,
    encode: Callable[[list[str]], list[list[int]]],
    more_records: Optional[Callable[[], list[Any]]] = None,
) -> Collected:
    """Roll out ``records`` (objects with ``prompt`` and ``answer``) and build the training rows.

    ``encode(prompts) -> token ids`` applies the prompt and chat templates. ``more_records`` feeds
    dynamic sampling: queries with zero reward spread are dropped and replaced from it, for at
    most ``rl.max_resample_rounds`` extra rounds.
    """
    rl, sc = cfg.rl, cfg.sampling
    K = rl.num_samples
    seed = cfg.train.seed
    stats: Counter = Counter()
    seconds = {"sampling": 0.0, "construction": 0.0}

    def roll(recs, round_):
        ids = encode([r.prompt for r in recs])
        t0 = time.perf_counter()
        comps = sample(ids, K, sc.max_new_tokens, _seed(seed, step, round_))
        seconds["sampling"] += time.perf_counter() - t0
        texts = [decode(tokenizer, c.tokens) for g in comps for c in g]
        golds = [str(r.answer) for r in recs for _ in range(K)]
        rew, reasons = score(texts, golds)
        stats.update(f"reward_reason/{x}" for x in reasons)
        return ids, comps, np.asarray(rew, np.float32).reshape(len(recs), K), texts

    recs = list(records)
    ids, comps, rewards, texts = roll(recs, 0)
    if rl.dynamic_sampling and more_records is not None:
        keep = rewards.std(1) > 0
        stats["dynamic_dropped"] += int((~keep).sum())
        rounds = 0
        while keep.sum() < len(records) and rounds < rl.max_resample_rounds:
            rounds += 1
            extra = more_records()
            e_ids, e_comps, e_rew, e_texts = roll(extra, rounds)
            e_keep = e_rew.std(1) > 0
            stats["dynamic_dropped"] += int((~e_keep).sum())
            recs += extra
            ids += e_ids
            comps += e_comps
            rewards = np.concatenate([rewards, e_rew])
            texts += e_texts
            keep = np.concatenate([keep, e_keep])
        sel = np.flatnonzero(keep)[: len(records)]
        if len(sel) == 0:  # nothing informative: train on the first batch (zero advantages)
            sel = np.arange(len(records))
        recs = [recs[i] for i in sel]
        ids = [ids[i] for i in sel]
        comps = [comps[i] for i in sel]
        rewards = rewards[sel]
        texts = [texts[i * K + k] for i in sel for k in range(K)]
        stats["dynamic_rounds"] = rounds

    Q = len(recs)
    rows = _original_rows(ids, comps, rewards, K)
    lengths = np.array([len(c.tokens) for g in comps for c in g])
    truncated = np.array([c.finish_reason == "length" for g in comps for c in g])
    overlong = list(np.flatnonzero(truncated)) if rl.overlong_filter else []
    stats["rollouts"] = Q * K
    refs: list[Optional[str]] = []
    for q in range(Q):
        good = np.flatnonzero(rewards[q] > 0)
        refs.append(texts[q * K + int(good[0])] if len(good) else None)

    out = Collected(rows=rows, num_queries=Q, rewards=rewards, response_lengths=lengths,
                    truncated=truncated, overlong_masked=overlong, query_records=recs,
                    reference_texts=refs, sample_seconds=seconds)
    if rl.algorithm == "tapo":
        _construct(out, ids, texts, rewards, recs, cfg=cfg, tokenizer=tokenizer, step=step,
                   sample=sample, score=score, stats=stats)
    out.stats = {k: float(v) for k, v in stats.items()}
    return out


def _seed(seed: int, step: int, round_: int) -> int:
    return int(np.random.SeedSequence([seed, step, round_, 0x5A3]).generate_state(1)[0] >> 1)


def _construct(out: Collected, ids, texts, rewards, recs, *, cfg, tokenizer, step, sample,
               score, stats) -> None:
    """DCS + synthesis (micro / full / rule) + parsing + rewards; appends reflection rows."""
    rl = cfg.rl
    K = rl.num_samples
    sel = dcs.select_candidates(rewards, n_pos=rl.n_pos, n_neg=rl.n_neg, m_max=rl.m_max,
                                rng=dcs.selection_rng(cfg.train.seed, step))
    stats["zpd_eligible_share"] = sel.eligible_share
    stats["constructions_attempted"] = len(sel.pairs)
    if not sel.pairs:
        stats["constructions_parsed"] = 0
        stats["constructions_correct"] = 0
        return
    style = synthesis.resolve_style(rl.synthesis_template, cfg.data.kind)
    questions = [recs[p.query].prompt for p in sel.pairs]
    wrongs = [texts[p.query * K + p.wrong] for p in sel.pairs]
    refs = [texts[p.query * K + p.ref] for p in sel.pairs]

    if rl.construction == "rule":
        reflect = reflection_phrase if cfg.data.kind == "arithmetic" else None
        recons = [synthesis.rule_construct(w, r, **({"reflect": reflect} if reflect else {}))
                  for w, r in zip(wrongs, refs)]
        parsed_ok = [x is not None for x in recons]
        reasons = ["ok" if ok else "no_divergence" for ok in parsed_ok]
        analyses = [None] * len(recons)  # the rule constructor writes no analysis
    else:
        prompts = [synthesis.build_synthesis_prompt(q, w, r, style=style, mode=rl.construction)
                   for q, w, r in zip(questions, wrongs, refs)]
        s_ids = [tokenizer(format_prompt(p, tokenizer), add_special_tokens=False)["input_ids"]
                 for p in prompts]
        budget = construction_budget(cfg)
        t0 = time.perf_counter()
        gens = sample(s_ids, 1, budget, _seed(cfg.train.seed, step, 1000),
                      temperature=cfg.sampling.construction_temperature,
                      top_p=cfg.sampling.construction_top_p,
                      draft_tokens=cfg.sampling.construction_draft_tokens)
        out.sample_seconds["construction"] += time.perf_counter() - t0
        outs = [decode(tokenizer, g[0].tokens) for g in gens]
        parsed = [synthesis.parse_construction(o) for o in outs]
        recons = [p.reconstruction if p.ok else None for p in parsed]
        analyses = [p.analysis if p.ok else None for p in parsed]
        parsed_ok = [p.ok for p in parsed]
        reasons = [p.reason for p in parsed]
        if outs:
            out.examples.append(dict(kind="construction", prompt=prompts[0], output=outs[0][:1500]))
    stats.update(f"construction_parse/{r}" for r in reasons)
    stats["constructions_parsed"] = sum(parsed_ok)

    keep = [i for i, r in enumerate(recons) if r]
    if not keep:
        stats["constructions_correct"] = 0
        stats["diag/parse_rate"] = 0.0
        return
    r_texts = [recons[i] for i in keep]
    golds = [str(recs[sel.pairs[i].query].answer) for i in keep]
    r_rew, _ = score(r_texts, golds)
    r_rew = np.asarray(r_rew, np.float32)
    stats["constructions_correct"] = int((r_rew > 0).sum())
    ratios, kept = [], 0
    for i, rw in zip(keep, r_rew):
        chk = synthesis.prefix_check(wrongs[i], recons[i])
        ratios.append(chk.share)
        kept += int(chk.kept)
    stats["prefix_preservation"] = float(np.mean(ratios))
    stats["prefix_kept_share"] = kept / len(keep)
    checks = []
    if cfg.data.kind == "arithmetic":  # the task's oracle judges each reconstruction
        checks = [diagnostics.check_construction(recs[sel.pairs[i].query].prompt, wrongs[i],
                                                 recons[i], float(rw), analyses[i])
                  for i, rw in zip(keep, r_rew)]
    report = diagnostics.construction_report(len(sel.pairs), len(keep), checks)
    if not checks:
        report["success_rate"] = float((r_rew > 0).mean())
    stats.update({f"diag/{k}": v for k, v in report.items()})
    end = end_of_turn_id(tokenizer)  # ends like a sampled response to the same prompt

    def enc(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    no_span = 0
    for i, rw in zip(keep, r_rew):
        q = sel.pairs[i].query
        y = enc(recons[i])
        span = diagnostics.reflection_regions(recons[i], enc)
        no_span += span is None
        start = span[0] if (span is not None and rl.ref_loss_from_reflection) else 0
        y = y + [end] if end is not None else y
        out.rows.append(Row(ids[q], y, query_index=q, is_reflection=True, reward=float(rw),
                            loss_start=start, reflection_span=span))
    stats["diag/no_reflection_span"] = no_span
    out.examples.append(dict(kind="reconstruction", question=questions[keep[0]],
                             wrong=wrongs[keep[0]], reconstruction=recons[keep[0]],
                             reward=float(r_rew[0])))


def opsd_teacher_rows(out: Collected, encode: Callable) -> list[Optional[list[int]]]:
    """Teacher prompts for OPSD: the question followed by a correct solution (the first correct
    rollout of the group). Queries without a correct rollout get None (no distillation signal)."""
    result = []
    for rec, ref in zip(out.query_records, out.reference_texts):
        if ref is None:
            result.append(None)
            continue
        text = f"{rec.prompt}\n\nA correct solution:\n{ref}\n\nNow solve it yourself."
        result.append(encode([text])[0])
    return result
