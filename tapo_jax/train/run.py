"""Entry points behind the CLI: ``train`` (cold start -> eval -> RL -> eval -> export, plot,
summary), ``eval``, ``sample`` and ``filter``.

A run directory (``train.output_dir``) holds: ``config.yaml``, ``metrics.jsonl`` (+ TensorBoard
events when tensorboardX is installed), ``checkpoints/`` (orbax, resumable), ``eval/`` (JSON +
Markdown), ``hf/`` (the final policy as an HF directory), ``training_dynamics.png``,
``summary.md`` and ``examples.jsonl`` (sample constructions).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import yaml

from tapo_jax.config import Config, ConfigError, to_dict

log = logging.getLogger("tapo_jax")


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


class Policy:
    """The run's mesh, tokenizer, graphdef and the sampler bound to them."""

    def __init__(self, cfg: Config, *, rules_train: Any = None):
        from tapo_jax.models import sharding
        from tapo_jax.train import setup

        self.mesh = sharding.make_mesh(cfg.mesh)
        self.tokenizer = setup.load_tokenizer(cfg)
        model, cfg = setup.build_model(cfg, self.mesh, rules_train or sharding.TRAIN_RULES)
        setup.check_vocab(cfg, self.tokenizer)
        from tapo_jax.train.state import split_params

        self.graphdef, self.params = split_params(model)
        self.cfg = cfg
        self.stop_ids = setup.stop_ids(self.tokenizer)
        self._sampler = None

    # prompts ---------------------------------------------------------------------------------
    def encode(self, prompts: list[str]) -> list[list[int]]:
        from tapo_jax.data.datasets import encode_prompts

        return encode_prompts(prompts, self.tokenizer, template=self.cfg.data.prompt_template,
                              chat=self.cfg.data.chat_template)

    # sampling --------------------------------------------------------------------------------
    def sampler(self, params: Any = None) -> Any:
        """The run's sampler, created on first use with ``params`` (default: the initial
        params, while the Policy still holds them)."""
        if self._sampler is None:
            from tapo_jax.sampling import Sampler

            from tapo_jax.config import sampler_max_len

            s = self.cfg.sampling
            max_len = sampler_max_len(self.cfg)
            params = self.params if params is None else params
            if params is None:
                raise ValueError("Policy.sampler: the initial params were handed to the "
                                 "trainer; pass the params to sample with")
            self._sampler = Sampler(self.graphdef, params, mesh=self.mesh,
                                    num_slots=s.num_slots, max_len=max_len,
                                    prefill_buckets=s.prefill_buckets or None)
        return self._sampler

    def sample_fn(self, params: Any, *, temperature: Optional[float] = None,
                  top_p: Optional[float] = None):
        """``(prompt_ids, n, max_new_tokens, seed, *, temperature=None, top_p=None) ->
        list[list[Completion]]`` with ``params``; a call's temperature / top_p override these."""
        from tapo_jax.train.rollout import Completion

        s = self.cfg.sampling
        created = self._sampler is None
        sampler = self.sampler(params)
        if not created:
            sampler.update_params(params)
        temp = s.temperature if temperature is None else temperature
        tp = s.top_p if top_p is None else top_p

        def sample(prompt_ids, n, max_new_tokens, seed, *, temperature=None, top_p=None):
            ro = sampler.generate(prompt_ids, n=n, max_new_tokens=max_new_tokens,
                                  temperature=temp if temperature is None else temperature,
                                  top_p=tp if top_p is None else top_p, top_k=s.top_k,
                                  min_p=s.min_p, stop_ids=self.stop_ids, seed=seed)
            out = [[None] * n for _ in prompt_ids]
            for i in range(len(ro.prompt_index)):
                toks = [int(t) for t in ro.tokens[i][: ro.lengths[i]]]
                lps = [float(x) for x in ro.logprobs[i][: ro.lengths[i]]]
                out[ro.prompt_index[i]][ro.sample_index[i]] = Completion(
                    toks, lps, str(ro.finish_reason[i]))
            return out

        return sample

    def text_sample_fn(self, params: Any, max_new_tokens: int, temperature: float, top_p: float):
        """``(prompts, n, seed) -> list[list[str]]`` for evaluation."""
        from tapo_jax.train.rollout import decode

        sample = self.sample_fn(params, temperature=temperature, top_p=top_p)

        def fn(prompts, n, seed):
            comps = sample(self.encode(list(prompts)), n, max_new_tokens, seed)
            return [[decode(self.tokenizer, c.tokens) for c in group] for group in comps]

        return fn


def _records(cfg: Config, eval_split: bool):
    from tapo_jax.data.datasets import load_from_config

    return load_from_config(cfg.data, seed=cfg.train.seed, eval_split=eval_split)


def _evaluate(policy: Policy, params: Any, cfg: Config, records: list, out_dir: Path, name: str):
    from tapo_jax.train.evaluate import (arithmetic_oracle, arithmetic_tracer, run_eval,
                                         write_report)

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
    from tapo_jax.train.distributed import is_main_process

    if is_main_process():
        write_report(result, out_dir, name)
    p1 = result.pass_at_k.get("pass@1", {})
    log.info("eval %s: pass@1 %.3f ± %.3f (%.0fs)", name, p1.get("mean") or 0.0,
             p1.get("std") or 0.0, time.time() - t0)
    return result


def _shared_score(lenient: bool):
    """The math reward computed in shares across processes (the same on one process)."""
    import functools

    from tapo_jax.rewards.verifier import score
    from tapo_jax.train.rollout import score_across_processes

    return score_across_processes(functools.partial(score, lenient=lenient))


def _eval_problem(record: Any, cfg: Config):
    from tapo_jax.train.evaluate import EvalProblem

    meta = getattr(record, "meta", None)
    if cfg.data.kind == "arithmetic":
        meta = record.prompt  # the oracle re-parses the question text
    return EvalProblem(record.prompt, str(record.answer), meta)


def _setup_logging() -> None:
    """INFO lines of the ``tapo_jax`` logger on stderr (whatever other libraries configured)."""
    if not any(getattr(h, "_tapo", False) for h in log.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        handler._tapo = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    logging.getLogger("absl").setLevel(logging.WARNING)


# --------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------


def run_training(cfg: Config) -> dict:
    """Cold start (optional) -> eval before -> RL -> eval after -> HF export, plot, summary."""
    import jax

    from tapo_jax.data.datasets import DataIterator
    from tapo_jax.rewards.verifier import Verifier
    from tapo_jax.train import checkpoints as ckpt_lib
    from tapo_jax.train import rl_loop
    from tapo_jax.train.distributed import is_main_process
    from tapo_jax.train.metrics import MetricsWriter, progress_bar
    from tapo_jax.train.state import make_optimizer, optim_config_for, train_state_from_params

    _setup_logging()
    t_start = time.time()
    out = Path(cfg.train.output_dir)
    _prepare_run_dir(cfg, out)
    policy = Policy(cfg)
    cfg = policy.cfg
    main = is_main_process()
    if main:  # files of the run are written once, by process 0
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    train_records, eval_records = _records(cfg, False), _records(cfg, True)
    if cfg.eval.num_problems:
        eval_records = eval_records[: cfg.eval.num_problems]
    manager = ckpt_lib.Checkpointer(out / "checkpoints", save_every=cfg.train.checkpoint_every,
                                    keep=cfg.train.keep_checkpoints)
    verifier = Verifier()
    summary: dict[str, Any] = {"name": cfg.name, "algorithm": cfg.rl.algorithm}
    examples_path = out / "examples.jsonl"

    kind = "opsd" if cfg.rl.algorithm == "opsd" else "rl"
    tx = make_optimizer(*optim_config_for(cfg, kind))
    resume_step = manager.latest_step() if cfg.train.resume else None
    if cfg.train.resume and resume_step is None:
        log.info("train.resume: no checkpoint in %s yet, starting from step 0", manager.directory)
    writer = MetricsWriter(out, config=cfg, resume_step=resume_step if resume_step else 0,
                           enabled=main, wandb_project=cfg.train.wandb_project or None)
    # The seed as a key, stored in checkpoints so a resume refuses another seed. The random
    # streams (JAX keys for sampling, NumPy SeedSequence streams with per-site salts on the host)
    # all derive from train.seed: docs/design.md, "Randomness".
    run_key = jax.random.PRNGKey(cfg.train.seed)
    data_iter = DataIterator(train_records, cfg.train.batch_size, seed=cfg.train.seed,
                             shuffle=cfg.data.shuffle)

    if resume_step is not None:
        from tapo_jax.train.state import abstract_train_state

        abstract = abstract_train_state(cfg.model, tx, policy.mesh)[1]
        restored = manager.restore(abstract, resume_step)
        if restored.rng is not None and not np.array_equal(_key_bits(restored.rng),
                                                           _key_bits(run_key)):
            raise ConfigError(f"train.seed = {cfg.train.seed} differs from the seed of the run "
                              f"checkpointed in {manager.directory}; a resumed run must keep it")
        state = restored.state
        data_iter.load_state_dict(restored.data_state["data"])
        summary.update(restored.data_state.get("summary", {}))
        ref_params = rl_loop.copy_params(_reference_params(cfg, policy))
        log.info("resumed from step %d", resume_step)
        start = resume_step
    else:
        # The run takes over the initial weights: each state below donates the buffers of the
        # one before, so no stale copy (nor the cold start's optimizer moments) stays alive.
        params, policy.params = policy.params, None
        if cfg.train.init_from:
            params = _init_params(cfg, policy, params)
            log.info("RL starts from %s (no cold start)", cfg.train.init_from)
        elif cfg.cold_start.enabled and cfg.cold_start.steps > 0:
            from tapo_jax.train.cold_start import run_cold_start

            sft_tx = make_optimizer(*optim_config_for(cfg, "sft"))
            sft_state, _ = train_state_from_params(params, sft_tx, policy.mesh, donate=True)
            del params
            problems = []
            if cfg.data.kind == "arithmetic":
                from tapo_jax.data.arithmetic import make_splits

                problems = make_splits(cfg.data, cfg.train.seed)[0]
            with MetricsWriter(out / "cold_start", enabled=main) as cs_writer:
                sft_state, cs_summary = run_cold_start(
                    cfg, graphdef=policy.graphdef, state=sft_state, mesh=policy.mesh,
                    tokenizer=policy.tokenizer, problems=problems, log_fn=cs_writer.write,
                    progress=cfg.train.progress)
            params = sft_state.params
            del sft_state
            summary["cold_start"] = cs_summary
            _export(policy, params, out / "hf_cold_start", cfg)
        summary["init_params_sha256"] = params_digest(params)
        state, _ = train_state_from_params(params, tx, policy.mesh, donate=True)
        del params
        ref_params = rl_loop.copy_params(state.params)
        start = 0
        if cfg.eval.before_and_after and eval_records:
            before = _evaluate(policy, state.params, cfg, eval_records, out / "eval", "before")
            summary["eval_before"] = before.pass_at_k

    fns = rl_loop.build_device_fns(cfg, policy.graphdef, policy.mesh)
    from tapo_jax.train.distributed import sum_across_processes
    from tapo_jax.train.rollout import score_across_processes

    ctx = rl_loop.LoopContext(  # rewards in shares, reward-pool counters summed: all processes
        graphdef=policy.graphdef, mesh=policy.mesh, tokenizer=policy.tokenizer,
        sample_fn=policy.sample_fn, encode=policy.encode,
        score=score_across_processes(lambda texts, golds: verifier.score(texts, golds)),
        reward_stats=lambda: sum_across_processes(verifier.stats.as_dict()))

    bar = progress_bar(cfg.train.steps, initial=start, desc=cfg.rl.algorithm,
                       enabled=cfg.train.progress)
    t_rl = time.time()
    try:  # a pending asynchronous save reaches the disk even when the loop is stopped
        for step in range(start, cfg.train.steps):
            records = next(data_iter)
            state, metrics, examples = rl_loop.rl_iteration(
                cfg, ctx, state=state, ref_params=ref_params, step=step, records=records,
                more_records=lambda: next(data_iter), fns=fns, sampler_params=state.params)
            writer.write(step + 1, metrics)
            if examples and main:
                with examples_path.open("a") as f:
                    for ex in examples:
                        f.write(json.dumps(dict(step=step + 1, **ex)) + "\n")
            if bar is not None:
                bar.set_postfix(acc=f"{metrics['accuracy']:.2f}",
                                ots=f"{metrics.get('ots_weight_mean', float('nan')):.2f}",
                                cons=f"{metrics.get('tapo/constructions_correct', 0):.0f}/"
                                     f"{metrics.get('tapo/constructions_attempted', 0):.0f}",
                                refresh=False)  # drawn by update(), at the bar's own pace
                bar.update(1)
            manager.save(step + 1, state, data_state={"data": data_iter.state_dict(),
                                                      "summary": _jsonable(summary)},
                         rng=run_key, config=cfg, force=step + 1 == cfg.train.steps)
    finally:
        manager.close()
    if bar is not None:
        bar.close()
    summary["rl_seconds"] = round(time.time() - t_rl, 1)

    if cfg.eval.before_and_after and eval_records:
        after = _evaluate(policy, state.params, cfg, eval_records, out / "eval", "after")
        summary["eval_after"] = after.pass_at_k
    if cfg.train.export_hf:
        _export(policy, state.params, out / "hf", cfg)
    writer.close()
    summary["total_seconds"] = round(time.time() - t_start, 1)
    if main:
        _plot(out)
        _write_summary(out, summary)
    return summary


def _key_bits(key: Any) -> np.ndarray:
    """The uint32 words of a PRNG key, typed or raw."""
    import jax

    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.asarray(key)


# What an earlier run leaves in its directory (all of it is replaced by train.overwrite=true).
_RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "tb", "examples.jsonl", "cold_start", "eval",
                "hf", "hf_cold_start", "training_dynamics.png", "summary.md", "summary.json")


def _prepare_run_dir(cfg: Config, out: Path) -> None:
    """Create ``out``; refuse to mix a new run into the outputs of an earlier one (its
    checkpoints would stand in for the new run's and block them) unless told how."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    if cfg.train.resume:
        return
    earlier = [name for name in _RUN_OUTPUTS if (out / name).exists()]
    if earlier and not cfg.train.overwrite:
        raise ConfigError(
            f"train.output_dir {out} holds an earlier run ({', '.join(earlier)}); continue it "
            "with train.resume=true, replace it with train.overwrite=true, or choose another "
            "train.output_dir")
    from tapo_jax.train.distributed import barrier, is_main_process

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
    import hashlib

    import jax

    from tapo_jax.train.distributed import host_array

    h = hashlib.sha256()
    for leaf in jax.tree.leaves(params):  # every process gathers each leaf: call it on all
        a = host_array(leaf)
        h.update(str((a.shape, a.dtype)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _init_params(cfg: Config, policy: "Policy", like: Any) -> Any:
    """The params named by ``train.init_from`` (HF directory, run directory or checkpoints
    directory), checked against the policy's shapes (``like``)."""
    import jax

    path = Path(cfg.train.init_from)
    if not path.exists():
        raise ConfigError(f"train.init_from: {path} does not exist")
    if (path / "hf" / "config.json").is_file():
        path = path / "hf"
    if (path / "config.json").is_file():
        from tapo_jax.models.hf import RUNTIME_FIELDS, load_hf
        from tapo_jax.train.state import split_params

        model = load_hf(path, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                        mesh=policy.mesh, **{k: getattr(cfg.model, k) for k in RUNTIME_FIELDS})
        params = split_params(model)[1]
    else:
        from tapo_jax.train import checkpoints as ckpt_lib
        from tapo_jax.train.state import abstract_train_state, make_optimizer, optim_config_for

        ck_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        ckpt_lib.check_checkpoint_dir(ck_dir)
        kind = "opsd" if cfg.rl.algorithm == "opsd" else "rl"
        tx = make_optimizer(*optim_config_for(cfg, kind))
        with ckpt_lib.Checkpointer(ck_dir, keep=cfg.train.keep_checkpoints) as manager:
            params = manager.restore(abstract_train_state(cfg.model, tx, policy.mesh)[1]
                                     ).state.params
    shapes = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), params)
    want = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), like)
    if jax.tree.structure(shapes) != jax.tree.structure(want) or shapes != want:
        raise ConfigError(f"train.init_from: the weights in {path} do not match the model of "
                          "this config (model.* dimensions or dtypes)")
    return params


def _reference_params(cfg: Config, policy: "Policy") -> Any:
    """Reference params of a resumed run: the cold-start export when there is one, else
    ``train.init_from``, else the initial policy (the run's random init or ``model.hf_path``)."""
    out = Path(cfg.train.output_dir)
    if cfg.train.init_from and not (out / "hf_cold_start").is_dir():
        return _init_params(cfg, policy, policy.params)
    hf_dir = out / "hf_cold_start"
    if hf_dir.is_dir():
        from tapo_jax.models.hf import RUNTIME_FIELDS, load_hf
        from tapo_jax.train.state import split_params

        model = load_hf(hf_dir, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                        mesh=policy.mesh, **{k: getattr(cfg.model, k) for k in RUNTIME_FIELDS})
        return split_params(model)[1]
    return policy.params


def _export(policy: Policy, params: Any, path: Path, cfg: Config) -> None:
    from tapo_jax.models.hf import export_state_to_hf

    from tapo_jax.train.distributed import is_main_process

    export_state_to_hf(cfg.model, params, path)  # every process gathers, process 0 writes
    if is_main_process():
        policy.tokenizer.save_pretrained(str(path))
    log.info("exported HF checkpoint to %s", path)


def _plot(out: Path) -> None:
    try:
        from tapo_jax.train.plot import plot_runs

        plot_runs([out], out / "training_dynamics.png")
    except Exception as e:  # a plot must never lose a finished run
        log.warning("plot failed: %s", e)


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=float))


def _write_summary(out: Path, summary: dict) -> None:
    from tapo_jax.train.evaluate import format_table

    (out / "summary.json").write_text(json.dumps(_jsonable(summary), indent=2))
    lines = [f"# {summary.get('name')} ({summary.get('algorithm')})", ""]
    eval_json = out / "eval" / "eval.json"
    if eval_json.is_file():
        lines.append(format_table(json.loads(eval_json.read_text())))
    cs = summary.get("cold_start")
    if cs:
        lines.append(f"Cold start: {cs['steps']} steps on {cs['examples']} examples, "
                     f"{cs['seconds']:.0f} s, final loss {cs.get('final_loss')}.")
    lines.append(f"RL: {summary.get('rl_seconds')} s. Total: {summary.get('total_seconds')} s.")
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    print(text)


# --------------------------------------------------------------------------------------------
# eval / sample / filter
# --------------------------------------------------------------------------------------------


def _policy_for(cfg: Config, checkpoint: Optional[str]) -> tuple[Policy, Any]:
    """A policy whose params come from ``checkpoint``: an HF directory, a run directory (its
    ``hf/`` export or latest checkpoint) or a checkpoints directory."""
    import dataclasses

    if checkpoint is None:
        return Policy(cfg), None
    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if (path / "hf" / "config.json").is_file():
        path = path / "hf"
    if (path / "config.json").is_file():
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, hf_path=str(path)))
        policy = Policy(cfg)
        return policy, policy.params
    from tapo_jax.train import checkpoints as ckpt_lib
    from tapo_jax.train.state import abstract_train_state, make_optimizer, optim_config_for

    ck_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    ckpt_lib.check_checkpoint_dir(ck_dir)
    policy = Policy(cfg)
    kind = "opsd" if cfg.rl.algorithm == "opsd" else "rl"
    tx = make_optimizer(*optim_config_for(cfg, kind))
    with ckpt_lib.Checkpointer(ck_dir, keep=cfg.train.keep_checkpoints) as manager:
        restored = manager.restore(abstract_train_state(cfg.model, tx, policy.mesh)[1])
    return policy, restored.state.params


def run_evaluation(cfg: Config, *, checkpoint: Optional[str] = None,
                   out_dir: Optional[str] = None) -> Any:
    _setup_logging()
    policy, params = _policy_for(cfg, checkpoint)
    params = policy.params if params is None else params
    records = _records(cfg, True)
    if cfg.eval.num_problems:
        records = records[: cfg.eval.num_problems]
    out = Path(out_dir or Path(cfg.train.output_dir) / "eval")
    result = _evaluate(policy, params, cfg, records, out, "eval")
    from tapo_jax.train.distributed import is_main_process

    if is_main_process():
        print((out / "eval.md").read_text())
    return result


def run_sample(cfg: Config, *, prompts: list[str], n: int = 1,
               checkpoint: Optional[str] = None) -> list[list[str]]:
    _setup_logging()
    if not prompts:
        raise ConfigError("sample: give at least one --prompt")
    policy, params = _policy_for(cfg, checkpoint)
    params = policy.params if params is None else params
    s = cfg.sampling
    fn = policy.text_sample_fn(params, s.max_new_tokens, s.temperature, s.top_p)
    texts = fn(prompts, n, cfg.train.seed)
    for p, group in zip(prompts, texts):
        for i, t in enumerate(group):
            print(f"--- prompt: {p!r} sample {i}\n{t}")
    return texts


def run_filter(cfg: Config, *, out_path: str, n: int = 8, lo: float = 0.125, hi: float = 0.875,
               checkpoint: Optional[str] = None) -> list:
    from tapo_jax.data.datasets import filter_dataset, write_records

    _setup_logging()
    policy, params = _policy_for(cfg, checkpoint)
    params = policy.params if params is None else params
    records = _records(cfg, False)
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
    policy, params = _policy_for(cfg, checkpoint)
    _export(policy, policy.params if params is None else params, Path(out), policy.cfg)
    return Path(out)
