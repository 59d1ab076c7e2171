"""A trained policy's commands: ``eval``, ``sample``, ``filter`` and ``export``, and the
evaluation the training run calls before and after RL (:func:`evaluate_policy`).

Params come from a path (:func:`tapo_jax.train.policy.policy_for`: an HF directory, a run
directory or a checkpoints directory) or, without one, from the config's own model.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from tapo_jax.config import Config, ConfigError
from tapo_jax.data.datasets import filter_dataset, load_from_config, write_records
from tapo_jax.evaluation.evaluate import (EvalProblem, arithmetic_oracle, arithmetic_tracer,
                                          run_eval, write_report)
from tapo_jax.models.hf import export_state_to_hf
from tapo_jax.rewards.verifier import score
from tapo_jax.train.distributed import is_main_process
from tapo_jax.train.metrics import setup_logging
from tapo_jax.train.policy import Policy, policy_for
from tapo_jax.train.rollout import score_across_processes

log = logging.getLogger("tapo_jax")


def run_records(cfg: Config, eval_split: bool) -> list:
    """The training records, or the evaluation records (``eval.num_problems`` of them)."""
    records = load_from_config(cfg.data, seed=cfg.train.seed, eval_split=eval_split)
    if eval_split and cfg.eval.num_problems:
        records = records[: cfg.eval.num_problems]
    return records


def evaluate_policy(policy: Policy, params: Any, cfg: Config, records: list, out_dir: Path,
                    name: str) -> Any:
    """Pass@k and DSR / ERR of ``params`` on ``records``; the report goes to ``out_dir``."""
    e = cfg.eval
    fn = policy.text_sample_fn(params, e.max_new_tokens or cfg.sampling.max_new_tokens,
                               e.temperature, e.top_p)
    oracle = arithmetic_oracle if cfg.data.kind == "arithmetic" else None
    t0 = time.time()
    problems = [_eval_problem(r, cfg) for r in records]
    result = run_eval(fn, problems, e, seed=cfg.train.seed + 7919, oracle=oracle,
                      score_fn=_shared_score(False), lenient_score_fn=_shared_score(True),
                      tracer=arithmetic_tracer if oracle is not None else None)
    result.settings["seconds"] = round(time.time() - t0, 1)
    if is_main_process():
        write_report(result, out_dir, name)
    p1 = result.pass_at_k.get("pass@1", {})
    log.info("eval %s: pass@1 %.3f ± %.3f (%.0fs)", name, p1.get("mean") or 0.0,
             p1.get("std") or 0.0, time.time() - t0)
    return result


def sampled_pass1(policy: Policy, params: Any, cfg: Config, records: list, *, num_samples: int,
                  seed: int) -> float:
    """Pass@1 of ``params`` on ``records``: the share of correct answers among ``num_samples``
    per problem, sampled with the evaluation settings (``eval.temperature`` / ``eval.top_p``)."""
    e = cfg.eval
    fn = policy.text_sample_fn(params, e.max_new_tokens or cfg.sampling.max_new_tokens,
                               e.temperature, e.top_p)
    problems = [_eval_problem(r, cfg) for r in records]
    texts = fn([p.prompt for p in problems], num_samples, seed)
    flat = [t for row in texts for t in row]
    rewards, _ = _shared_score(False)(flat, [p.answer for p in problems for _ in range(num_samples)])
    return float(np.mean(np.asarray(rewards, np.float64) > 0))


def _shared_score(lenient: bool):
    """The math reward computed in shares across processes (the same on one process)."""
    return score_across_processes(functools.partial(score, lenient=lenient))


def _eval_problem(record: Any, cfg: Config) -> EvalProblem:
    meta = getattr(record, "meta", None)
    if cfg.data.kind == "arithmetic":
        meta = record.prompt  # the oracle re-parses the question text
    return EvalProblem(record.prompt, str(record.answer), meta)



def export_params(policy: Policy, params: Any, path: Path, cfg: Config) -> None:
    """``params`` and the run's tokenizer as an HF directory at ``path``."""
    export_state_to_hf(cfg.model, params, path)  # every process gathers, process 0 writes
    if is_main_process():
        policy.tokenizer.save_pretrained(str(path))
    log.info("exported HF checkpoint to %s", path)



def run_evaluation(cfg: Config, *, checkpoint: Optional[str] = None,
                   out_dir: Optional[str] = None) -> Any:
    setup_logging()
    policy, params = policy_for(cfg, checkpoint)
    out = Path(out_dir or Path(cfg.train.output_dir) / "eval")
    result = evaluate_policy(policy, params, cfg, run_records(cfg, True), out, "eval")
    if is_main_process():
        print((out / "eval.md").read_text())
    return result


def run_sample(cfg: Config, *, prompts: list[str], n: int = 1,
               checkpoint: Optional[str] = None) -> list[list[str]]:
    setup_logging()
    if not prompts:
        raise ConfigError("sample: give at least one --prompt")
    policy, params = policy_for(cfg, checkpoint)
    s = cfg.sampling
    fn = policy.text_sample_fn(params, s.max_new_tokens, s.temperature, s.top_p)
    texts = fn(prompts, n, cfg.train.seed)
    for p, group in zip(prompts, texts):
        for i, t in enumerate(group):
            print(f"--- prompt: {p!r} sample {i}\n{t}")
    return texts


def run_filter(cfg: Config, *, out_path: str, n: int = 8, lo: float = 0.125,
               hi: float = 0.875, checkpoint: Optional[str] = None) -> list:
    setup_logging()
    policy, params = policy_for(cfg, checkpoint)
    records = run_records(cfg, False)
    s = cfg.sampling
    fn = policy.text_sample_fn(params, s.max_new_tokens, s.temperature, s.top_p)
    kept, rates = filter_dataset(records, lambda prompts, k: fn(prompts, k, cfg.train.seed), n,
                                 lo, hi)
    write_records(out_path, kept)
    rates = np.asarray(rates)
    print(json.dumps(dict(total=len(records), kept=len(kept), lo=lo, hi=hi,
                          mean_pass_rate=float(rates.mean()) if rates.size else None,
                          out=str(out_path))))
    return kept


def export_checkpoint(cfg: Config, checkpoint: str, out: str) -> Path:
    """The newest training checkpoint of ``checkpoint`` as an HF directory at ``out``."""
    policy, params = policy_for(cfg, checkpoint)
    export_params(policy, params, Path(out), policy.cfg)
    return Path(out)
