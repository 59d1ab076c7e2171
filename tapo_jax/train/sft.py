"""Cold start: supervised fine-tuning on the two data kinds trained jointly (docs/design.md,
"Method").

(1) ordinary (question -> solution) examples and (2) trajectory-construction examples
(synthesis prompt -> ``<analysis>`` + ``<reconstruction>``), so the policy can follow the
synthesis prompt during RL. Loss on response tokens only (token-mean NLL, ``kind="sft"`` step).

Data: the embedded arithmetic task builds both kinds itself (:mod:`tapo_jax.data.sft_examples`);
for other tasks ``cold_start.data_path`` names a JSONL/JSON/Parquet file of ``prompt`` /
``response`` records (e.g. constructions written by a stronger model).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional

import jax
import numpy as np

from tapo_jax.config import Config, ConfigError, slip_kind_list
from tapo_jax.construction.synthesis import resolve_style
from tapo_jax.data import sft_examples
from tapo_jax.data.datasets import read_rows
from tapo_jax.data.tokenizers import pad_id
from tapo_jax.models.sharding import data_parallel_size
from tapo_jax.rl.packing import pack_batch
from tapo_jax.train.assembly import place_batch
from tapo_jax.train.metrics import progress_bar
from tapo_jax.train.step import make_train_step

log = logging.getLogger("tapo_jax")


def cold_start_examples(cfg: Config, tokenizer: Any, problems: list[Any]
                        ) -> list[tuple[list[int], list[int]]]:
    """Tokenised (prompt ids, response ids + eos) pairs of both kinds."""
    return cold_start_data(cfg, tokenizer, problems)[0]


def cold_start_data(cfg: Config, tokenizer: Any, problems: list[Any]
                    ) -> tuple[list[tuple[list[int], list[int]]], Optional[list[dict[int, float]]]]:
    """The examples (:func:`cold_start_examples`) and, with ``cold_start.decision_weight`` or
    ``error_line_weight`` != 1, each example's weighted response tokens ({index: weight},
    ``sft_examples.cold_start_token_weights``); else None."""
    cs = cfg.cold_start
    if cs.data_path is not None:
        rows = read_rows(cs.data_path)
        pairs = []
        for i, r in enumerate(rows):
            if "prompt" not in r or "response" not in r:
                raise ConfigError(f"{cs.data_path}: record {i} needs 'prompt' and 'response' "
                                  f"fields (cold_start.data_path)")
            pairs.append((str(r["prompt"]), str(r["response"])))
        return sft_examples.tokenize_pairs(pairs, tokenizer, chat=cfg.data.chat_template), None
    if cfg.data.kind != "arithmetic":
        raise ConfigError("cold_start.enabled needs cold_start.data_path (prompt/response "
                          "records) unless data.kind = arithmetic")
    mode = "full" if cfg.rl.construction == "full" else "micro"
    data = sft_examples.build_cold_start(
        problems, seed=cfg.train.seed, construction_fraction=cs.construction_fraction,
        style=resolve_style(cfg.rl.synthesis_template, cfg.data.kind), mode=mode,
        reference_slip_fraction=cs.reference_slip_fraction, analysis=cs.analysis,
        slip_kinds=slip_kind_list(cs.slip_kinds))
    rows = sft_examples.cold_start_rows(data, tokenizer, prompt_template=cfg.data.prompt_template,
                                        chat=cfg.data.chat_template)
    if cs.decision_weight == 1.0 and cs.error_line_weight == 1.0:
        return rows, None
    weights, counts = sft_examples.cold_start_token_weights(
        data, tokenizer, analysis=cs.analysis, decision_weight=cs.decision_weight,
        error_line_weight=cs.error_line_weight)
    log.info("cold start: in %d construction examples, %s", len(data.constructions), counts)
    for key in ("decision", "error_line"):
        if getattr(cs, f"{key}_weight") != 1.0 and counts[key] == 0:
            raise ConfigError(f"cold_start.{key}_weight: no such token found in the "
                              "construction examples (the tokenizer splits none at the "
                              "boundaries)")
    return rows, weights


def run_cold_start(cfg: Config, *, graphdef: Any, state: Any, mesh: Any, tokenizer: Any,
                   problems: list[Any], log_fn: Callable[[int, dict], None],
                   progress: bool = True,
                   check_fn: Optional[Callable[[Any, int], float]] = None) -> tuple[Any, dict]:
    """``cold_start.steps`` SFT updates on random mini-batches; returns (state, summary).

    With ``cold_start.target_pass1`` set, ``check_fn(params, step) -> Pass@1`` runs every
    ``cold_start.check_every`` steps from step ``cold_start.check_from`` on, and the cold start
    ends at the first check that reaches the target (the summary's ``steps`` are the steps
    taken, ``checks`` every check)."""
    cs = cfg.cold_start
    target = cs.target_pass1
    if target is not None and check_fn is None:
        raise ConfigError("cold_start.target_pass1 needs a check of the policy's accuracy "
                          "(run_cold_start(check_fn=...))")
    first_check = -(-max(cs.check_from, 1) // cs.check_every) * cs.check_every
    if target is not None and first_check >= cs.steps:
        log.warning("cold start: no accuracy check runs before the cap (cold_start.steps %d, "
                    "check_every %d, check_from %d): it runs all %d steps", cs.steps,
                    cs.check_every, cs.check_from, cs.steps)
    examples, token_weights = cold_start_data(cfg, tokenizer, problems)
    if not examples:
        raise ConfigError("cold start: no examples")
    groups = length_groups(examples, quantum=cs.length_quantum)
    n_dp = data_parallel_size(mesh)
    batch_size = -(-cs.batch_size // n_dp) * n_dp
    step_fn = make_train_step(graphdef, cfg, mesh, kind="sft")
    rng = np.random.default_rng(np.random.SeedSequence([cfg.train.seed, 0xC5]))
    pad = pad_id(tokenizer)
    lengths = sorted(groups)
    weights = np.array([len(groups[L]) for L in lengths], np.float64)
    weights /= weights.sum()
    t0 = time.time()
    bar = progress_bar(cs.steps, desc="cold start", enabled=progress)
    last: dict = {}
    tokens = 0
    checks: list[dict] = []
    steps_done = 0
    for s in range(cs.steps):
        L = lengths[int(rng.choice(len(lengths), p=weights))]
        members = groups[L]
        idx = rng.integers(0, len(members), batch_size)
        batch, stats = sft_examples.sft_batch(
            [examples[members[i]] for i in idx], pad_id=pad, length_buckets=(L,),
            row_buckets=(batch_size,), max_len=L)
        if token_weights is not None:
            batch = batch.replace(loss_mask=sft_examples.weight_tokens(
                batch.loss_mask, [token_weights[members[i]] for i in idx]))
        tokens += stats.response_tokens
        if cs.packing:
            batch, _ = pack_batch(batch, micro_batch_size=cfg.train.micro_batch_size,
                                  row_multiple=n_dp)
        state, metrics = step_fn(state, place_batch(batch, mesh))
        steps_done = s + 1
        check = None
        if (target is not None and steps_done % cs.check_every == 0 and steps_done < cs.steps
                and steps_done >= cs.check_from):
            # the check's clock starts once the steps dispatched so far have run
            jax.block_until_ready(state.params)
            t_check = time.time()
            check = dict(step=steps_done, pass1=check_fn(state.params, steps_done),
                         seconds=round(time.time() - t_check, 2))
            checks.append(check)
            log.info("cold start step %d: Pass@1 %.3f on the check problems (target %.3f)",
                     steps_done, check["pass1"], target)
        if (steps_done % max(cfg.train.log_every, 10) == 0 or steps_done == cs.steps
                or check is not None):
            last = {k: float(v) for k, v in jax.device_get(metrics).items()}
            last.update(tokens=tokens, elapsed_s=time.time() - t0)
            if check is not None:
                last["check/pass1"] = check["pass1"]
            log_fn(steps_done, last)
            if bar is not None:
                bar.set_postfix(loss=f"{last.get('loss', float('nan')):.3f}", refresh=False)
        if bar is not None:
            bar.update(1)
        if check is not None and check["pass1"] >= target:
            log.info("cold start: target Pass@1 %.3f reached at step %d of %d", target,
                     steps_done, cs.steps)
            break
    if bar is not None:
        bar.close()
    summary = dict(steps=steps_done, max_steps=cs.steps, examples=len(examples),
                   seconds=time.time() - t0, final_loss=last.get("loss"), length_buckets=lengths)
    if target is not None:
        summary.update(target_pass1=target, checks=checks,
                       reached_target=bool(checks and checks[-1]["pass1"] >= target))
    log.info("cold start done: %s", summary)
    return state, summary


def length_groups(examples: list[tuple[list[int], list[int]]], *, quantum: int = 32,
                  max_groups: int = 6) -> dict[int, list[int]]:
    """Example indices grouped by padded length (multiples of ``quantum``; powers of two when
    that would give more than ``max_groups`` shapes), so each batch is padded only to its own
    group's length and the step compiles once per group."""
    def key(n: int, powers: bool) -> int:
        if powers:
            return max(quantum, 1 << (n - 1).bit_length())
        return -(-n // quantum) * quantum

    sizes = [len(p) + len(r) for p, r in examples]
    powers = len({key(n, False) for n in sizes}) > max_groups
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(sizes):
        groups.setdefault(key(n, powers), []).append(i)
    return groups
