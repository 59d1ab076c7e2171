"""The ``train`` command: cold start -> eval -> RL -> eval -> export, plot, summary (the other
commands, on a trained policy, are in :mod:`tapo_jax.train.inference`).

``run_training`` is a sequence of stages: :func:`open_run` (run directory, policy, data,
checkpointer, metrics), :func:`resume` or :func:`initial_state` (``train.init_from`` or the cold
start, then the evaluation before), :func:`rl_stage` (the loop of :mod:`tapo_jax.train.rl_loop`
with its periodic work as hooks) and :func:`finish` (evaluation after, export, plot, summary).

A run directory (``train.output_dir``) holds: ``config.yaml``, ``metrics.jsonl`` (+ TensorBoard
events when tensorboardX is installed), ``checkpoints/`` (orbax, resumable), ``eval/`` (JSON +
Markdown), ``hf/`` (the final policy as an HF directory), ``training_dynamics.png``,
``summary.md`` and ``examples.jsonl`` (sample constructions).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np
import yaml

from tapo_jax.config import Config, ConfigError, to_dict, training_kind
from tapo_jax.data.arithmetic import cold_start_problems, make_splits
from tapo_jax.data.datasets import DataIterator
from tapo_jax.evaluation.evaluate import format_table
from tapo_jax.evaluation.plot import plot_runs
from tapo_jax.rewards.verifier import Verifier
from tapo_jax.train import rl_loop
from tapo_jax.train.checkpoints import Checkpointer
from tapo_jax.train.distributed import (barrier, host_array, is_main_process,
                                        sum_across_processes)
from tapo_jax.train.inference import (evaluate_policy, export_params, run_records,
                                      sampled_pass1)
from tapo_jax.train.metrics import MetricsWriter, progress_bar, setup_logging
from tapo_jax.train.policy import Policy, hf_params, params_from_path
from tapo_jax.train.rollout import score_across_processes
from tapo_jax.train.sft import run_cold_start
from tapo_jax.train.state import (abstract_train_state, make_optimizer, optim_config_for,
                                  train_state_from_params)

log = logging.getLogger("tapo_jax")


# --------------------------------------------------------------------------------------------
# train: the stages
# --------------------------------------------------------------------------------------------


@dataclass
class Run:
    """What the stages of one training run share (built by :func:`open_run`)."""

    cfg: Config  # with the model section resolved (``model.hf_path``)
    out: Path
    policy: Policy
    main: bool  # process 0: writes the run's files
    manager: Checkpointer
    writer: MetricsWriter
    data_iter: DataIterator
    run_key: jax.Array
    tx: Any  # the RL stage's optimizer
    resume_step: Optional[int]
    summary: dict


def run_training(cfg: Config) -> dict:
    """Cold start (optional) -> eval before -> RL -> eval after -> HF export, plot, summary."""
    setup_logging()
    t_start = time.time()
    run = open_run(cfg)
    eval_records = run_records(run.cfg, True) if run.cfg.eval.before_and_after else []
    if run.resume_step is not None:
        state, ref_params = resume(run)
    else:
        state, ref_params = initial_state(run)
        if eval_records:
            before = evaluate_policy(run.policy, state.params, run.cfg, eval_records,
                                     run.out / "eval", "before")
            run.summary["eval_before"] = before.pass_at_k
    state = rl_stage(run, state, ref_params)
    finish(run, state, eval_records, t_start)
    return run.summary


def open_run(cfg: Config) -> Run:
    """The run directory (checked, ``config.yaml`` written), the policy, the data iterator,
    the checkpointer, the metrics writer and the step a resume continues from."""
    out = Path(cfg.train.output_dir)
    _prepare_run_dir(cfg, out)
    policy = Policy(cfg)
    cfg = policy.cfg
    main = is_main_process()
    if main:  # files of the run are written once, by process 0
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    manager = Checkpointer(out / "checkpoints", save_every=cfg.train.checkpoint_every,
                           keep=cfg.train.keep_checkpoints)
    resume_step = manager.latest_step() if cfg.train.resume else None
    if cfg.train.resume and resume_step is None:
        log.info("train.resume: no checkpoint in %s yet, starting from step 0", manager.directory)
    writer = MetricsWriter(out, config=cfg, resume_step=resume_step if resume_step else 0,
                           enabled=main, wandb_project=cfg.train.wandb_project or None)
    # The seed as a key, stored in checkpoints so a resume refuses another seed. The random
    # streams (JAX keys for sampling, NumPy SeedSequence streams with per-site salts on the host)
    # all derive from train.seed: docs/design.md, "Randomness".
    return Run(cfg=cfg, out=out, policy=policy, main=main, manager=manager, writer=writer,
               data_iter=DataIterator(run_records(cfg, False), cfg.train.batch_size,
                                      seed=cfg.train.seed, shuffle=cfg.data.shuffle),
               run_key=_run_key(cfg.train.seed),
               tx=make_optimizer(*optim_config_for(cfg, training_kind(cfg))),
               resume_step=resume_step,
               summary={"name": cfg.name, "algorithm": cfg.rl.algorithm})


def resume(run: Run) -> tuple[Any, Any]:
    """The state, data position and summary of the newest checkpoint, and the reference
    params; refuses a checkpoint written with another seed."""
    cfg = run.cfg
    abstract = abstract_train_state(cfg.model, run.tx, run.policy.mesh)[1]
    restored = run.manager.restore(abstract, run.resume_step)
    if restored.rng is not None and not np.array_equal(_key_bits(restored.rng),
                                                       _key_bits(run.run_key)):
        raise ConfigError(f"train.seed = {cfg.train.seed} differs from the seed of the run "
                          f"checkpointed in {run.manager.directory}; a resumed run must keep it")
    run.data_iter.load_state_dict(restored.data_state["data"])
    run.summary.update(restored.data_state.get("summary", {}))
    ref_params = rl_loop.copy_params(_reference_params(cfg, run.policy))
    log.info("resumed from step %d", run.resume_step)
    return restored.state, ref_params


def initial_state(run: Run) -> tuple[Any, Any]:
    """The RL stage's first state and its reference params: from ``train.init_from``, else
    after the cold start (when enabled), else the policy's initial params."""
    cfg, policy = run.cfg, run.policy
    # The run takes over the initial weights: each state below donates the buffers of the
    # one before, so no stale copy (nor the cold start's optimizer moments) stays alive.
    params, policy.params = policy.params, None
    if cfg.train.init_from:
        params = params_from_path(cfg, _existing(cfg.train.init_from), policy.mesh, params)
        log.info("RL starts from %s (no cold start)", cfg.train.init_from)
    elif cfg.cold_start.enabled and cfg.cold_start.steps > 0:
        params = cold_start(run, params)
    run.summary["init_params_sha256"] = params_digest(params)
    state, _ = train_state_from_params(params, run.tx, policy.mesh, donate=True)
    del params
    return state, rl_loop.copy_params(state.params)


def cold_start(run: Run, params: Any) -> Any:
    """SFT from ``params`` (donated); its summary, metrics and HF export go in the run."""
    cfg, policy = run.cfg, run.policy
    sft_tx = make_optimizer(*optim_config_for(cfg, "sft"))
    sft_state, _ = train_state_from_params(params, sft_tx, policy.mesh, donate=True)
    del params
    problems: list = []
    if cfg.data.kind == "arithmetic":
        n = cfg.cold_start.num_problems
        problems = (cold_start_problems(cfg.data, cfg.train.seed, n) if n > 0
                    else make_splits(cfg.data, cfg.train.seed)[0])
    with MetricsWriter(run.out / "cold_start", enabled=run.main) as cs_writer:
        sft_state, run.summary["cold_start"] = run_cold_start(
            cfg, graphdef=policy.graphdef, state=sft_state, mesh=policy.mesh,
            tokenizer=policy.tokenizer, problems=problems, log_fn=cs_writer.write,
            progress=cfg.train.progress, check_fn=_accuracy_check(run))
    params = sft_state.params
    del sft_state
    export_params(policy, params, run.out / "hf_cold_start", cfg)
    return params


def _accuracy_check(run: Run) -> Optional[Any]:
    """``(params, step) -> Pass@1`` on the first ``cold_start.check_problems`` RL training
    problems (``cold_start.target_pass1``; never the evaluation problems), or None."""
    cfg = run.cfg
    cs = cfg.cold_start
    if cs.target_pass1 is None:
        return None
    records = run_records(cfg, False)[: cs.check_problems]
    if not records:
        raise ConfigError("cold_start.target_pass1: there are no training problems to check on")

    def check(params: Any, step: int) -> float:
        seed = int(np.random.SeedSequence([cfg.train.seed, 0xC6, step]).generate_state(1)[0] >> 1)
        return sampled_pass1(run.policy, params, cfg, records, num_samples=cs.check_samples,
                             seed=seed)

    return check


def rl_stage(run: Run, state: Any, ref_params: Any) -> Any:
    """The RL iterations up to ``train.steps``, with metrics, examples, progress and
    checkpoints as hooks; returns the final state."""
    cfg, policy = run.cfg, run.policy
    verifier = Verifier()
    ctx = rl_loop.LoopContext(  # rewards in shares, reward-pool counters summed: all processes
        graphdef=policy.graphdef, mesh=policy.mesh, tokenizer=policy.tokenizer,
        sample_fn=policy.sample_fn, encode=policy.encode,
        score=score_across_processes(lambda texts, golds: verifier.score(texts, golds)),
        reward_stats=lambda: sum_across_processes(verifier.stats.as_dict()))
    fns = rl_loop.build_device_fns(cfg, policy.graphdef, policy.mesh)
    start = run.resume_step or 0
    bar = progress_bar(cfg.train.steps, initial=start, desc=cfg.rl.algorithm,
                       enabled=cfg.train.progress)
    hooks = rl_loop.Hooks()
    hooks.add(lambda info: run.writer.write(info.step, info.metrics))
    if run.main:
        hooks.add(functools.partial(_append_examples, run.out / "examples.jsonl"))
    if bar is not None:
        hooks.add(functools.partial(_update_bar, bar))
    hooks.add(functools.partial(_save_checkpoint, run), every=cfg.train.checkpoint_every,
              at_end=True)
    t_rl = time.time()
    try:  # a pending asynchronous save reaches the disk even when the loop is stopped
        state = rl_loop.train_loop(cfg, ctx, state=state, ref_params=ref_params, start=start,
                                   data_iter=run.data_iter, fns=fns, hooks=hooks)
    finally:
        run.manager.close()
    if bar is not None:
        bar.close()
    run.summary["rl_seconds"] = round(time.time() - t_rl, 1)
    return state


def finish(run: Run, state: Any, eval_records: list, t_start: float) -> None:
    """Evaluation after, HF export, plot and summary."""
    cfg = run.cfg
    if eval_records:
        after = evaluate_policy(run.policy, state.params, cfg, eval_records, run.out / "eval",
                                "after")
        run.summary["eval_after"] = after.pass_at_k
    if cfg.train.export_hf:
        export_params(run.policy, state.params, run.out / "hf", cfg)
    run.writer.close()
    run.summary["total_seconds"] = round(time.time() - t_start, 1)
    if run.main:
        _plot(run.out)
        _write_summary(run.out, run.summary)


# hooks of the RL stage -----------------------------------------------------------------------
def _append_examples(path: Path, info: rl_loop.StepInfo) -> None:
    if info.examples:
        with path.open("a") as f:
            for ex in info.examples:
                f.write(json.dumps(dict(step=info.step, **ex)) + "\n")


def _update_bar(bar: Any, info: rl_loop.StepInfo) -> None:
    m = info.metrics
    bar.set_postfix(acc=f"{m['accuracy']:.2f}",
                    ots=f"{m.get('ots_weight_mean', float('nan')):.2f}",
                    cons=f"{m.get('tapo/constructions_correct', 0):.0f}/"
                         f"{m.get('tapo/constructions_attempted', 0):.0f}",
                    refresh=False)  # drawn by update(), at the bar's own pace
    bar.update(1)


def _save_checkpoint(run: Run, info: rl_loop.StepInfo) -> None:
    run.manager.save(info.step, info.state, data_state={"data": run.data_iter.state_dict(),
                                                        "summary": _jsonable(run.summary)},
                     rng=run.run_key, config=run.cfg, force=True)


# helpers of the stages -----------------------------------------------------------------------
def _run_key(seed: int) -> jax.Array:
    """``PRNGKey(seed)``, made from the host seed (a setup-time transfer, allowed by name)."""
    with jax.transfer_guard_host_to_device("allow"):
        return jax.random.PRNGKey(seed)


def _key_bits(key: Any) -> np.ndarray:
    """The uint32 words of a PRNG key, typed or raw."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.asarray(jax.device_get(key))


# What an earlier run leaves in its directory (all of it is replaced by train.overwrite=true).
_RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "tb", "examples.jsonl", "cold_start", "eval",
                "hf", "hf_cold_start", "training_dynamics.png", "summary.md", "summary.json")


def _prepare_run_dir(cfg: Config, out: Path) -> None:
    """Create ``out``; refuse to mix a new run into the outputs of an earlier one (its
    checkpoints would stand in for the new run's and block them) unless told how."""
    out.mkdir(parents=True, exist_ok=True)
    if cfg.train.resume:
        return
    earlier = [name for name in _RUN_OUTPUTS if (out / name).exists()]
    if earlier and not cfg.train.overwrite:
        raise ConfigError(
            f"train.output_dir {out} holds an earlier run ({', '.join(earlier)}); continue it "
            "with train.resume=true, replace it with train.overwrite=true, or choose another "
            "train.output_dir")
    if earlier and is_main_process():
        for name in earlier:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    # every process has looked (and process 0 cleared) before anyone writes the new run
    barrier("tapo_jax.run_dir_checked")
    if earlier:
        log.info("train.overwrite: removed the earlier run in %s", out)


def params_digest(params: Any) -> str:
    """SHA-256 of the params' bytes, leaves in tree order (paired runs start identical)."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(params):  # every process gathers each leaf: call it on all
        a = host_array(leaf)
        h.update(str((a.shape, a.dtype)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _existing(path: str) -> Path:
    if not Path(path).exists():
        raise ConfigError(f"train.init_from: {path} does not exist")
    return Path(path)


def _reference_params(cfg: Config, policy: Policy) -> Any:
    """Reference params of a resumed run: the cold-start export when there is one, else
    ``train.init_from``, else the initial policy (the run's random init or ``model.hf_path``)."""
    hf_dir = Path(cfg.train.output_dir) / "hf_cold_start"
    if hf_dir.is_dir():
        return hf_params(cfg, hf_dir, policy.mesh)
    if cfg.train.init_from:
        return params_from_path(cfg, _existing(cfg.train.init_from), policy.mesh, policy.params)
    return policy.params


def _plot(out: Path) -> None:
    try:
        plot_runs([out], out / "training_dynamics.png")
    except Exception as e:  # a plot must never lose a finished run
        log.warning("plot failed: %s", e)


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=float))


def _write_summary(out: Path, summary: dict) -> None:
    (out / "summary.json").write_text(json.dumps(_jsonable(summary), indent=2))
    lines = [f"# {summary.get('name')} ({summary.get('algorithm')})", ""]
    eval_json = out / "eval" / "eval.json"
    if eval_json.is_file():
        lines.append(format_table(json.loads(eval_json.read_text())))
    cs = summary.get("cold_start")
    if cs:
        lines.append(f"Cold start: {cs['steps']} steps on {cs['examples']} examples, "
                     f"{cs['seconds']:.0f} s, final loss {cs.get('final_loss')}.")
        if cs.get("checks"):
            last = cs["checks"][-1]
            how = (f"stopped at step {cs['steps']} of {cs['max_steps']}"
                   if cs["reached_target"] else f"ran all {cs['steps']} steps")
            lines.append(f"Cold start {how}: Pass@1 {last['pass1']:.3f} on the check problems at "
                         f"step {last['step']} (target {cs['target_pass1']:.3f}).")
    lines.append(f"RL: {summary.get('rl_seconds')} s. Total: {summary.get('total_seconds')} s.")
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    print(text)
