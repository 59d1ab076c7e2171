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

# no implicit host<->device transfer: batches are placed explicitly (conftest.py)
pytestmark = pytest.mark.transfer_guard

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


@pytest.mark.slow
def test_cold_start_then_tapo(tmp_path):
    summary, records = _run(tmp_path, "tapo", "cold_start.enabled=true",
                            "eval.before_and_after=true", "train.export_hf=true")
    assert [r["step"] for r in records] == [1, 2]
    # kl_coef 0: the KL is measured on every rl.kl_every-th step (10: on step index 0 only)
    assert [r["kl_measured"] for r in records] == [1.0, 0.0] and "kl" not in records[-1]
    assert np.isfinite(records[0]["kl"])
    for key in ("accuracy", "pg_loss_orig", "grad_norm", "num_ref_tokens",
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
    from tapo_jax.train.inference import export_checkpoint, run_evaluation, run_filter, run_sample

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


@pytest.mark.slow
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
    for key in ("loss", "accuracy", "grad_norm", "learning_rate", "response_length_mean",
                "tokens/sampled"):
        assert a[key] == b[key], key
    for x, y in zip(straight, resumed):  # KL is measured on the rl.kl_every steps, the same ones
        assert x.get("kl") == y.get("kl") and x.get("kl_measured") == y.get("kl_measured")
    # the checkpoint holds the run's PRNG key: resuming under another seed is refused
    with pytest.raises(ConfigError, match="train.seed"):
        _run(tmp_path, "resumed", "train.steps=4", "train.resume=true", "train.seed=1")


@pytest.mark.slow
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
    from tapo_jax.rewards.verifier import score
    from tapo_jax.train import rl_loop
    from tapo_jax.train.policy import Policy
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
    from tapo_jax.types import CheckpointError
    from tapo_jax.train.inference import run_evaluation

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


def _scripted_context(cfg, counts, *, cut_last=False):
    """Policy, a scripted sampler (question q: counts[q] correct answers of K, then slips) and
    the loop context, for driving the device path of an iteration with known rollouts."""
    import dataclasses

    from tapo_jax.data import arithmetic as A
    from tapo_jax.data.datasets import encode_prompts
    from tapo_jax.rewards.verifier import score
    from tapo_jax.train import rl_loop
    from tapo_jax.train.rollout import Completion
    from tapo_jax.train.policy import Policy
    from test_train_rollout import _script

    policy = Policy(cfg)
    problems = A.generate_problems(len(counts), seed=3, min_steps=2, max_steps=2)

    def make_sample():  # a fresh script each time: the same rollouts for every caller
        inner, _ = _script(policy.tokenizer, problems,
                           {p.question: c for p, c in zip(problems, counts)})
        if not cut_last:
            return inner

        def sample(prompt_ids, n, max_new_tokens, seed, **decoding):  # the last of each group was cut
            groups = inner(prompt_ids, n, max_new_tokens, seed)
            return [g[:-1] + [dataclasses.replace(g[-1], finish_reason="length")]
                    for g in groups]
        return sample

    del Completion
    encode = lambda ps: encode_prompts(ps, policy.tokenizer)  # noqa: E731
    ctx = rl_loop.LoopContext(
        graphdef=policy.graphdef, mesh=policy.mesh, tokenizer=policy.tokenizer,
        sample_fn=lambda params: make_sample(), encode=encode, score=score,
        reward_stats=lambda: {})
    return policy, problems, make_sample(), ctx, encode


def test_scripted_opsd_iteration_distills_from_the_solution_prompt(tmp_path):
    """OPSD: teacher rows are the question plus a correct solution of the group, then the same
    response; groups without a correct rollout train nothing; the update moves the params."""
    from tapo_jax.train import assembly, rl_loop, rollout
    from tapo_jax.train.state import make_optimizer, optim_config_for, train_state_from_params

    cfg = load_config("configs/demo.yaml", TINY + [
        "rl.algorithm=opsd", "rl.num_samples=4", "train.batch_size=3",
        "sampling.max_new_tokens=48", "sampling.max_prompt_len=32"])
    policy, problems, sample, ctx, encode = _scripted_context(cfg, [2, 0, 4])
    cfg = policy.cfg
    pad = policy.tokenizer.pad_token_id
    col = rollout.collect([p.record() for p in problems], cfg=cfg, tokenizer=policy.tokenizer,
                          step=0, sample=sample, score=ctx.score, encode=encode)
    batch, _, skipped, _ = assembly.assemble_opsd_batch(col, cfg, policy.mesh, pad, encode)
    assert skipped == 4  # the 4 rollouts of the query with no correct answer
    s_mask, t_mask, s_tokens, t_tokens = jax.device_get((
        batch.student.loss_mask, batch.teacher_loss_mask, batch.student.tokens,
        batch.teacher_tokens))
    for b, row in enumerate(col.rows):
        trained = row.query_index != 1
        assert (s_mask[b].sum() > 0) == trained and s_mask[b].sum() == t_mask[b].sum()
        if trained:  # the teacher sees the group's first correct solution before the response
            teacher = policy.tokenizer.decode(t_tokens[b], skip_special_tokens=True)
            assert "A correct solution:" in teacher
            assert problems[row.query_index].solution.splitlines()[0] in teacher
            t_resp = t_tokens[b][t_mask[b] > 0]
            s_resp = s_tokens[b][s_mask[b] > 0]
            np.testing.assert_array_equal(t_resp, s_resp)

    tx = make_optimizer(*optim_config_for(cfg, "opsd"))
    state, _ = train_state_from_params(policy.params, tx, policy.mesh)
    before = jax.tree.map(np.asarray, jax.device_get(state.params))
    fns = rl_loop.build_device_fns(cfg, policy.graphdef, policy.mesh)
    state, metrics, _ = rl_loop.rl_iteration(
        cfg, ctx, state=state, ref_params=rl_loop.copy_params(state.params), step=0,
        records=[p.record() for p in problems], more_records=lambda: [], fns=fns,
        sampler_params=state.params)
    assert metrics["opsd_tokens"] == s_mask.sum() > 0
    assert np.isfinite(metrics["opsd_loss"]) and metrics["opsd_loss"] > 0
    after = jax.tree.map(np.asarray, jax.device_get(state.params))
    assert any(np.abs(a - b).max() > 0 for a, b in zip(jax.tree.leaves(before),
                                                       jax.tree.leaves(after)))


@pytest.mark.parametrize("overlong_filter", [False, True])
def test_overlong_filter_masks_truncated_rollouts(overlong_filter):
    from tapo_jax.train import assembly, rollout

    cfg = load_config("configs/demo.yaml", TINY + [
        "rl.algorithm=grpo", "rl.num_samples=4", "train.batch_size=2",
        f"rl.overlong_filter={str(overlong_filter).lower()}",
        "sampling.max_new_tokens=48", "sampling.max_prompt_len=32"])
    policy, problems, sample, ctx, encode = _scripted_context(cfg, [2, 1], cut_last=True)
    col = rollout.collect([p.record() for p in problems], cfg=policy.cfg,
                          tokenizer=policy.tokenizer, step=0, sample=sample, score=ctx.score,
                          encode=encode)
    assert col.truncated.tolist() == [False, False, False, True] * 2
    batch, _, _ = assembly.assemble_batch(col, policy.cfg, policy.mesh,
                                      policy.tokenizer.pad_token_id)
    trained = np.asarray(batch.loss_mask).sum(1)[: len(col.rows)] > 0
    assert trained.tolist() == [True, True, True, not overlong_filter] * 2


def test_cheaper_iteration_gives_the_update_of_the_full_one():
    """The update computes its own old log-probs (one update per batch) and, with kl_coef 0, the
    reference forward is skipped off the kl_every steps: the params after one TAPO step equal
    those of the full path (separate old and reference forwards)."""
    import dataclasses

    from tapo_jax.train import rl_loop
    from tapo_jax.train.state import make_optimizer, optim_config_for, train_state_from_params

    cfg = load_config("configs/demo.yaml", TINY + [
        "rl.num_samples=8", "rl.n_pos=2", "rl.n_neg=4", "rl.m_max=3", "train.batch_size=4",
        "sampling.max_new_tokens=48", "sampling.max_prompt_len=32",
        "rl.ref_group_includes_originals=true", "rl.kl_every=2"])
    policy, problems, _, ctx, _ = _scripted_context(cfg, [2, 3, 8, 0])
    cfg = policy.cfg
    init = rl_loop.copy_params(policy.params)
    tx = make_optimizer(*optim_config_for(cfg, "rl"))
    out = {}
    for name, own, every in (("full", False, 1), ("cheap", None, 2)):
        run_cfg = dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, kl_every=every))
        fns = rl_loop.build_device_fns(run_cfg, policy.graphdef, policy.mesh,
                                       old_from_update=own)
        assert fns.on_policy == (name == "cheap")
        state, _ = train_state_from_params(rl_loop.copy_params(init), tx, policy.mesh)
        state, metrics, _ = rl_loop.rl_iteration(
            run_cfg, ctx, state=state, ref_params=rl_loop.copy_params(init), step=1,
            records=[p.record() for p in problems], more_records=lambda: [], fns=fns,
            sampler_params=state.params)
        out[name] = (jax.tree.map(np.asarray, jax.device_get(state)), metrics)
    (full, m_full), (cheap, m_cheap) = out["full"], out["cheap"]
    assert m_full["kl_measured"] == 1.0 and "kl" in m_full
    assert m_cheap["kl_measured"] == 0.0 and "kl" not in m_cheap
    assert m_full["num_ref_tokens"] == m_cheap["num_ref_tokens"] > 0
    np.testing.assert_allclose(m_cheap["loss"], m_full["loss"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m_cheap["grad_norm"], m_full["grad_norm"], rtol=1e-5)
    _assert_same_update(full, cheap, init)


def _assert_same_update(a, b, init):
    """Two train states after one update from ``init`` params agree within float32 rounding:
    the gradient everywhere (through Adam's first moment), the params where the gradient is
    above rounding level (Adam's first step is lr * g / (|g| + eps): elsewhere its direction is
    noise), as in test_train_step; and the step moved the params."""
    covered = total = 0
    moved = 0.0
    for ga, gb, pa, pb, p0 in zip(jax.tree.leaves(a.opt_state[1][0].mu),
                                  jax.tree.leaves(b.opt_state[1][0].mu),
                                  jax.tree.leaves(a.params), jax.tree.leaves(b.params),
                                  jax.tree.leaves(jax.device_get(init))):
        scale = np.abs(ga).max()
        np.testing.assert_allclose(gb, ga, rtol=1e-4, atol=1e-5 * scale)
        ok = np.abs(ga) > 1e-4 * scale
        np.testing.assert_allclose(pb[ok], pa[ok], rtol=0, atol=1e-6)
        covered += ok.sum()
        total += ok.size
        moved = max(moved, float(np.abs(pa - p0).max()))
    assert covered >= 0.95 * total and moved > 1e-4


@pytest.mark.parametrize("algorithm", ["tapo", "opsd"])
def test_packed_iteration_gives_the_unpacked_update(algorithm):
    """train.packing on: the update batch runs on packed rows (fewer padded tokens) and the
    params after one iteration equal those of the unpacked batch."""
    import dataclasses

    from tapo_jax.train import assembly, rl_loop
    from tapo_jax.train.state import make_optimizer, optim_config_for, train_state_from_params

    cfg = load_config("configs/demo.yaml", TINY + [
        f"rl.algorithm={algorithm}", "rl.num_samples=8", "rl.n_pos=2", "rl.n_neg=4",
        "rl.m_max=3", "train.batch_size=4", "sampling.max_new_tokens=48",
        "sampling.max_prompt_len=32", "rl.ref_group_includes_originals=true"])
    policy, problems, _, ctx, _ = _scripted_context(cfg, [2, 3, 8, 0])
    cfg = policy.cfg
    init = rl_loop.copy_params(policy.params)
    tx = make_optimizer(*optim_config_for(cfg, "opsd" if algorithm == "opsd" else "rl"))
    out = {}
    for pack in (False, True):
        run_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, packing=pack))
        fns = rl_loop.build_device_fns(run_cfg, policy.graphdef, policy.mesh)
        state, _ = train_state_from_params(rl_loop.copy_params(init), tx, policy.mesh)
        state, metrics, _ = rl_loop.rl_iteration(
            run_cfg, ctx, state=state, ref_params=rl_loop.copy_params(init), step=0,
            records=[p.record() for p in problems], more_records=lambda: [], fns=fns,
            sampler_params=state.params)
        out[pack] = (jax.tree.map(np.asarray, jax.device_get(state)), metrics)
    (plain, m_plain), (packed, m_packed) = out[False], out[True]
    assert m_packed["batch/packed"] == 1.0 and m_plain["batch/packed"] == 0.0
    # packed: one [B, T] shape, the largest buckets (unpacked: the smallest that fit)
    unpacked_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, packing=False))
    rows_b, len_b = assembly._buckets(unpacked_cfg, policy.mesh, cfg.train.batch_size)
    assert len(len_b) > 1
    assert (m_packed["batch/padded_rows"], m_packed["batch/length"]) == (rows_b[-1], len_b[-1])
    assert m_plain["batch/length"] < len_b[-1]
    for m in (m_plain, m_packed):  # both runs log the share with and without packing
        assert m["tokens/padded_share_packed"] <= m["tokens/padded_share_unpacked"]
    np.testing.assert_allclose(m_packed["loss"], m_plain["loss"], rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(m_packed["grad_norm"], m_plain["grad_norm"], rtol=1e-4)
    _assert_same_update(plain, packed, init)
