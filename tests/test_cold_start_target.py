"""A cold start that stops at a target accuracy (``cold_start.target_pass1``): the check runs
every ``check_every`` steps on the RL training problems (never the evaluation problems) and the
cold start ends at the first check that reaches the target; without one it runs to the cap.
``sampled_pass1`` is checked against a hand count on scripted answers."""

from __future__ import annotations

import json
import logging

import jax
import numpy as np
import pytest

from tapo_jax.config import ConfigError, load_config

pytestmark = pytest.mark.transfer_guard

TINY = [
    "model.preset=tiny", "model.vocab_size=128", "model.num_layers=1",
    "sampling.max_new_tokens=16", "sampling.max_prompt_len=32", "sampling.num_slots=16",
    "data.num_train=64", "data.num_eval=8", "data.max_steps=2",
    "cold_start.enabled=true", "cold_start.batch_size=4", "cold_start.warmup_steps=0",
    "cold_start.num_problems=64", "cold_start.check_every=2", "cold_start.check_problems=5",
    "cold_start.check_samples=3", "cold_start.target_pass1=0.5", "cold_start.check_from=0",
    "train.steps=0", "train.progress=false", "train.export_hf=false",
    "eval.before_and_after=false",
]


def _cold_start(tmp_path, monkeypatch, name, scripted, *extra, seen_params=None):
    """A cold-start-only run whose accuracy checks return ``scripted`` in turn; returns the
    summary, the cold start's metrics and the (step, prompts) of each check."""
    from tapo_jax.train import run as run_mod
    from tapo_jax.train.inference import run_records

    seen_params = [] if seen_params is None else seen_params
    calls = []

    def fake_pass1(policy, params, cfg, records, *, num_samples, seed):
        assert num_samples == cfg.cold_start.check_samples
        calls.append([r.prompt for r in records])
        seen_params.append(jax.device_get(params))
        return scripted[len(calls) - 1]

    monkeypatch.setattr(run_mod, "sampled_pass1", fake_pass1)
    cfg = load_config("configs/demo.yaml", TINY + [f"train.output_dir={tmp_path / name}", *extra])
    summary = run_mod.run_training(cfg)
    metrics = [json.loads(x) for x in
               (tmp_path / name / "cold_start" / "metrics.jsonl").read_text().splitlines()]
    train = [r.prompt for r in run_records(cfg, False)]
    evals = {r.prompt for r in run_records(cfg, True)}
    return summary["cold_start"], metrics, calls, train, evals


def test_stops_at_the_first_check_that_reaches_the_target(tmp_path, monkeypatch):
    cs, metrics, calls, train, evals = _cold_start(tmp_path, monkeypatch, "stop",
                                                   [0.2, 0.5, 0.9], "cold_start.steps=8")
    assert len(calls) == 2  # checks at steps 2 and 4; 0.5 >= 0.5 stops before step 6
    assert cs["steps"] == 4 and cs["max_steps"] == 8 and cs["reached_target"]
    assert [(c["step"], c["pass1"]) for c in cs["checks"]] == [(2, 0.2), (4, 0.5)]
    assert [(r["step"], r["check/pass1"]) for r in metrics if "check/pass1" in r] == [
        (2, 0.2), (4, 0.5)]
    assert max(r["step"] for r in metrics) == 4
    for prompts in calls:  # the first check_problems RL training problems, no held-out one
        assert prompts == train[:5] and not set(prompts) & evals


def test_runs_to_the_cap_when_the_target_is_not_reached(tmp_path, monkeypatch):
    cs, metrics, calls, _, _ = _cold_start(tmp_path, monkeypatch, "cap", [0.1, 0.4],
                                           "cold_start.steps=5")
    # checks at steps 2 and 4 only: the cap (step 5) ends the cold start without one
    assert len(calls) == 2 and cs["steps"] == 5 and not cs["reached_target"]
    assert metrics[-1]["step"] == 5 and "check/pass1" not in metrics[-1]


def test_check_from_skips_early_checks_and_leaves_training_unchanged(tmp_path, monkeypatch):
    every, late = [], []
    cs_every, _, _, _, _ = _cold_start(tmp_path, monkeypatch, "every", [0.0, 0.1, 0.2],
                                       "cold_start.steps=7", seen_params=every)
    cs_late, metrics, calls, _, _ = _cold_start(tmp_path, monkeypatch, "late", [0.1, 0.2],
                                                "cold_start.steps=7", "cold_start.check_from=3",
                                                seen_params=late)
    # checks at steps 4 and 6 only (multiples of check_every from step 3 on)
    assert [c["step"] for c in cs_every["checks"]] == [2, 4, 6]
    assert [c["step"] for c in cs_late["checks"]] == [4, 6] and len(calls) == 2
    assert [r["step"] for r in metrics if "check/pass1" in r] == [4, 6]
    assert cs_late["steps"] == 7 and not cs_late["reached_target"]
    # skipping the step-2 check changes nothing: the params at steps 4 and 6 are bit-identical
    for a, b in zip(every[1:], late):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(x, y)
    # and training did move the params between the checks (the comparison can fail)
    assert any(not np.array_equal(x, y)
               for x, y in zip(jax.tree.leaves(late[0]), jax.tree.leaves(late[1])))


def test_no_check_before_the_cap_runs_every_step_and_warns(tmp_path, monkeypatch):
    # check_from 5 with check_every 2: the first check would be at step 6, the cap
    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logger = logging.getLogger("tapo_jax")  # the project's logger does not propagate
    logger.addHandler(handler)
    try:
        cs, _, calls, _, _ = _cold_start(tmp_path, monkeypatch, "none", [],
                                         "cold_start.steps=6", "cold_start.check_from=5")
    finally:
        logger.removeHandler(handler)
    assert calls == [] and cs["steps"] == 6 and not cs["reached_target"]
    assert any("no accuracy check runs before the cap" in w for w in warnings)


def test_no_target_no_check(tmp_path, monkeypatch):
    cs, _, calls, _, _ = _cold_start(tmp_path, monkeypatch, "plain", [],
                                     "cold_start.steps=4", "cold_start.target_pass1=null")
    assert calls == [] and cs["steps"] == 4 and "checks" not in cs


def test_target_without_a_check_is_an_error():
    from tapo_jax.train.sft import run_cold_start

    cfg = load_config("configs/demo.yaml", TINY + ["cold_start.steps=4"])
    with pytest.raises(ConfigError, match="target_pass1"):
        run_cold_start(cfg, graphdef=None, state=None, mesh=None, tokenizer=None,
                       problems=[], log_fn=lambda *a: None, check_fn=None)


class _ScriptedPolicy:
    """text_sample_fn returns fixed answers: per prompt, the given list of texts."""

    def __init__(self, texts):
        self.texts = texts
        self.seen = None

    def text_sample_fn(self, params, max_new_tokens, temperature, top_p):
        self.seen = (max_new_tokens, temperature, top_p)

        def fn(prompts, n, seed):
            assert all(len(self.texts[p]) == n for p in prompts)
            return [self.texts[p] for p in prompts]

        return fn


def test_sampled_pass1_is_the_share_of_correct_answers():
    from tapo_jax.data.datasets import Record
    from tapo_jax.train.inference import sampled_pass1

    cfg = load_config("configs/demo.yaml", TINY)
    records = [Record(prompt="Compute 1 + 2.", answer="3", id="a"),
               Record(prompt="Compute 5 - 7.", answer="-2", id="b")]
    policy = _ScriptedPolicy({
        "Compute 1 + 2.": ["1 + 2 = 3\n\\boxed{3}", "\\boxed{4}", "\\boxed{3}"],
        "Compute 5 - 7.": ["\\boxed{2}", "garbage", "5 - 7 = -2\n\\boxed{-2}"]})
    p = sampled_pass1(policy, None, cfg, records, num_samples=3, seed=0)
    assert p == pytest.approx(3 / 6)
    assert policy.seen == (cfg.eval.max_new_tokens or cfg.sampling.max_new_tokens,
                           cfg.eval.temperature, cfg.eval.top_p)
