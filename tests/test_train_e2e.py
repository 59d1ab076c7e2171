"""End-to-end runs of the training entry point on a tiny config: cold start + TAPO, GRPO, OPSD,
exact resume, and the error messages for bad configs and checkpoints.

A randomly initialised model rarely solves anything, so one test also drives a full TAPO
iteration (batch assembly, teacher-forced log-probs, DAE advantages, the jitted update) with a
scripted policy whose constructions parse and are correct.
"""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from tapo_jax.config import ConfigError, load_config

TINY = [
    "model.preset=tiny", "model.vocab_size=128", "model.num_layers=1",
    "sampling.max_new_tokens=16", "sampling.max_prompt_len=32", "sampling.num_slots=16",
    "sampling.construction_max_new_tokens=16", "sampling.temperature=1.0",
    "rl.num_samples=4", "rl.n_pos=1", "rl.n_neg=1", "rl.m_max=2",
    "data.num_train=64", "data.num_eval=8", "data.max_steps=2",
    "cold_start.steps=2", "cold_start.batch_size=4", "cold_start.warmup_steps=0",
    "train.batch_size=2", "train.steps=2", "train.checkpoint_every=1", "train.progress=false",
    "train.export_hf=false", "optim.learning_rate=1e-3", "optim.warmup_steps=0",
    "eval.num_samples=5", "eval.num_problems=2", "eval.runs=1", "eval.before_and_after=false",
]


@pytest.fixture(scope="module", autouse=True)
def _compile_cache(tmp_path_factory):
    """Runs in this module compile the same programs: share them through a compilation cache."""
    old = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield
    jax.config.update("jax_compilation_cache_dir", old)


def _run(tmp_path, name, *extra):
    from tapo_jax.train.run import run_training

    cfg = load_config("configs/demo.yaml",
                      TINY + [f"train.output_dir={tmp_path / name}", *extra])
    summary = run_training(cfg)
    records = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return summary, records


def test_cold_start_then_tapo(tmp_path):
    summary, records = _run(tmp_path, "tapo", "cold_start.enabled=true",
                            "eval.before_and_after=true", "train.export_hf=true")
    assert [r["step"] for r in records] == [1, 2]
    for key in ("accuracy", "pg_loss_orig", "kl", "grad_norm", "num_ref_tokens",
                "response_length_mean", "tapo/zpd_eligible_share", "time/sampling",
                "time/update", "learning_rate"):
        assert key in records[-1], key
    for r in records:  # OTS statistics are logged exactly when reflection tokens were trained
        assert ("ots_weight_mean" in r) == (r["num_ref_tokens"] > 0), r
    assert np.isfinite(records[-1]["grad_norm"])
    assert summary["cold_start"]["steps"] == 2
    assert "pass@1" in summary["eval_after"]
    run = tmp_path / "tapo"
    for f in ("summary.md", "eval/eval.md", "hf/config.json", "training_dynamics.png",
              "cold_start/metrics.jsonl", "config.yaml"):
        assert (run / f).exists(), f
    from tapo_jax.models import load_hf

    assert load_hf(run / "hf").cfg.vocab_size == 128

    # the other entry points on the finished run: eval from its HF export and its checkpoint,
    # sample, pass-rate filtering, checkpoint -> HF conversion
    from tapo_jax.train.run import export_checkpoint, run_evaluation, run_filter, run_sample

    cfg = load_config("configs/demo.yaml", TINY + [f"train.output_dir={run}"])
    result = run_evaluation(cfg, checkpoint=str(run), out_dir=str(tmp_path / "ev"))
    assert result.counts["problems"] == 2 and (tmp_path / "ev" / "eval.md").is_file()
    texts = run_sample(cfg, prompts=["Compute 1 + 2."], n=2, checkpoint=str(run / "hf"))
    assert len(texts) == 1 and len(texts[0]) == 2
    kept = run_filter(cfg, out_path=str(tmp_path / "kept.jsonl"), n=2, lo=0.0, hi=1.0,
                      checkpoint=str(run / "hf"))
    assert len(kept) == 64 and (tmp_path / "kept.jsonl").is_file()
    out = export_checkpoint(cfg, str(run / "checkpoints"), str(tmp_path / "from_ckpt"))
    a = load_hf(out)
    b = load_hf(run / "hf")
    np.testing.assert_array_equal(np.asarray(a.model.norm.weight[...]),
                                  np.asarray(b.model.norm.weight[...]))


@pytest.mark.parametrize("algorithm", ["grpo", "opsd"])
def test_baselines_run(tmp_path, algorithm):
    _, records = _run(tmp_path, algorithm, f"rl.algorithm={algorithm}")
    assert len(records) == 2
    assert all(np.isfinite(r["loss"]) for r in records)
    if algorithm == "grpo":
        assert "tapo/constructions_attempted" not in records[-1]


def test_resume_reproduces_uninterrupted_run(tmp_path, monkeypatch):
    """A run killed during step 3 (of 3, cosine schedule) and resumed from its step-2
    checkpoint logs the step-3 metrics of the uninterrupted run."""
    from tapo_jax.train import rl_loop

    extra = ("train.steps=3", "optim.schedule=cosine", "optim.learning_rate=3e-3")
    _, straight = _run(tmp_path, "straight", *extra)
    real = rl_loop.rl_iteration

    def dies_at_step_3(*args, **kw):
        if kw["step"] == 2:
            raise KeyboardInterrupt("killed")
        return real(*args, **kw)

    monkeypatch.setattr(rl_loop, "rl_iteration", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "resumed", *extra)
    monkeypatch.setattr(rl_loop, "rl_iteration", real)
    _, resumed = _run(tmp_path, "resumed", *extra, "train.resume=true")
    assert [r["step"] for r in resumed] == [1, 2, 3]
    a, b = straight[-1], resumed[-1]
    assert a["learning_rate"] < 3e-3  # the cosine schedule has moved
    for key in ("loss", "accuracy", "grad_norm", "kl", "learning_rate", "response_length_mean",
                "tokens/sampled"):
        assert a[key] == b[key], key


def test_fresh_run_refuses_an_earlier_runs_directory(tmp_path):
    """Checkpoints of an earlier run would stand in for the new run's: a clear error, unless
    the run resumes it or overwrites it."""
    _run(tmp_path, "run", "train.steps=1")
    with pytest.raises(ConfigError, match="train.overwrite=true"):
        _run(tmp_path, "run", "train.steps=2")
    _, records = _run(tmp_path, "run", "train.steps=2", "train.overwrite=true")
    assert [r["step"] for r in records] == [1, 2]
    from tapo_jax.train.checkpoints import Checkpointer

    assert Checkpointer(tmp_path / "run" / "checkpoints").all_steps() == [1, 2]


def test_scripted_tapo_iteration_trains_on_parsed_constructions(tmp_path):
    """Full device path of a TAPO iteration with constructions that parse and are correct."""
    import dataclasses

    from tapo_jax.data.datasets import encode_prompts
    from tapo_jax.rewards.math import score
    from tapo_jax.train import rl_loop
    from tapo_jax.train.run import Policy
    from tapo_jax.train.state import make_optimizer, optim_config_for, train_state_from_params
    from test_train_rollout import _script

    cfg = load_config("configs/demo.yaml", TINY + [
        "rl.num_samples=8", "rl.n_pos=2", "rl.n_neg=4", "rl.m_max=3", "train.batch_size=4",
        "sampling.max_new_tokens=48", "sampling.max_prompt_len=32",
        # every scripted construction is correct: with the default DAE group (constructions
        # only) their advantages would all be 0; the section 4.5 reading gives them a signal
        "rl.ref_group_includes_originals=true"])
    policy = Policy(cfg)
    cfg = policy.cfg
    from tapo_jax.data import arithmetic as A

    problems = A.generate_problems(4, seed=3, min_steps=2, max_steps=2)
    counts = {p.question: c for p, c in zip(problems, [2, 3, 8, 0])}
    sample, _ = _script(policy.tokenizer, problems, counts)
    tx = make_optimizer(*optim_config_for(cfg, "rl"))
    state, _ = train_state_from_params(policy.params, tx, policy.mesh)
    ref = rl_loop.copy_params(state.params)
    ctx = rl_loop.LoopContext(
        graphdef=policy.graphdef, mesh=policy.mesh, tokenizer=policy.tokenizer,
        sample_fn=lambda params: sample,
        encode=lambda ps: encode_prompts(ps, policy.tokenizer), score=score,
        reward_stats=lambda: {})
    fns = rl_loop.build_device_fns(cfg, policy.graphdef, policy.mesh)
    state, metrics, examples = rl_loop.rl_iteration(
        cfg, ctx, state=state, ref_params=ref, step=0, records=[p.record() for p in problems],
        more_records=lambda: [], fns=fns, sampler_params=state.params)
    assert metrics["tapo/constructions_parsed"] == 6
    assert metrics["tapo/constructions_correct"] == 6
    assert metrics["batch/rows"] == 4 * 8 + 6
    # OTS weights are measured on the reflection tokens: in (0.01, 10) and not all clamped
    assert metrics["num_ref_tokens"] > 0
    assert 0.01 <= metrics["ots_weight_min"] <= metrics["ots_weight_mean"] <= 10.0
    assert metrics["pg_loss_ref"] < 0.0  # positive advantages on correct constructions
    assert np.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0
    assert any(e["kind"] == "reconstruction" for e in examples)
    del dataclasses


def test_bad_config_exits_with_named_key(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "tapo_jax.cli", "train", "--config", "configs/demo.yaml",
         "rl.n_pos=9"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "rl.n_pos" in proc.stderr and "rl.num_samples" in proc.stderr
    with pytest.raises(ConfigError, match="model.num_layerz"):
        load_config("configs/demo.yaml", ["model.num_layerz=2"])


def test_missing_and_corrupt_checkpoints(tmp_path):
    from tapo_jax.train.checkpoints import CheckpointError
    from tapo_jax.train.run import run_evaluation

    cfg = load_config("configs/demo.yaml", TINY + [f"train.output_dir={tmp_path / 'x'}"])
    with pytest.raises(FileNotFoundError, match="nope"):
        run_evaluation(cfg, checkpoint=str(tmp_path / "nope"))
    bad = tmp_path / "bad" / "checkpoints" / "3"
    bad.mkdir(parents=True)
    (bad / "garbage").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="checkpoints") as err:
        run_evaluation(cfg, checkpoint=str(tmp_path / "bad"))
    assert "no checkpoint" not in str(err.value)  # reported as unreadable, not as missing
    proc = subprocess.run(
        [sys.executable, "-m", "tapo_jax.cli", "eval", "--config", "configs/demo.yaml",
         "--checkpoint", str(tmp_path / "bad"), *TINY], capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 2 and "checkpoint error" in proc.stderr
    assert "Traceback" not in proc.stderr
