"""The study runner on a 2-seed, 2-arm, few-step tiny config: paired arms start from the
seed's cold-start params (byte-identical), and the table, paired differences, diagnostics and
JSON are written."""

from __future__ import annotations

import json

import jax
import pytest
import yaml

from tapo_jax.study import load_study, run_study, t_interval

TINY = [
    "model.preset=tiny", "model.vocab_size=128", "model.num_layers=1",
    "sampling.max_new_tokens=16", "sampling.max_prompt_len=32", "sampling.num_slots=16",
    "sampling.construction_max_new_tokens=16", "rl.num_samples=4", "rl.n_pos=1", "rl.n_neg=1",
    "rl.m_max=2", "data.num_train=64", "data.num_eval=8", "data.max_steps=2",
    "cold_start.steps=2", "cold_start.batch_size=4", "cold_start.warmup_steps=0",
    "train.batch_size=2", "train.steps=2", "train.checkpoint_every=10",
    "optim.warmup_steps=0", "eval.num_samples=5", "eval.num_problems=2", "eval.runs=1",
]


def test_t_interval_by_hand():
    iv = t_interval([0.1, 0.3])
    # mean 0.2, sd 0.1414, n 2: t(1) = 12.706 -> 12.706 * 0.1414 / sqrt(2) = 1.2706
    assert iv["mean"] == pytest.approx(0.2)
    assert iv["half_width"] == pytest.approx(1.2706, rel=1e-4)
    assert t_interval([0.5])["half_width"] is None


@pytest.mark.slow
def test_study_two_seeds_two_arms(tmp_path):
    spec_path = tmp_path / "study.yaml"
    spec_path.write_text(yaml.safe_dump({
        "base_config": "configs/demo.yaml", "overrides": TINY, "seeds": [0, 1],
        "arms": {"grpo": ["rl.algorithm=grpo"], "tapo": [], "unused": ["rl.ots=false"]},
        "reference": "grpo", "figure_arms": ["grpo", "tapo"], "metric": "pass@1",
        "quick": {"arms": ["grpo", "tapo"]}, "output_dir": str(tmp_path / "full")}))
    spec = load_study(spec_path, quick=True, output_dir=str(tmp_path / "out"))
    assert list(spec.arms) == ["grpo", "tapo"] and spec.seeds == [0, 1]
    report = run_study(spec)
    out = tmp_path / "out"
    md = (out / "study.md").read_text()
    assert "| grpo |" in md and "| tapo |" in md and "| cold_start |" in md
    saved = json.loads((out / "study.json").read_text())
    assert set(saved["table"]) == {"cold_start", "grpo", "tapo"}
    assert saved["paired"]["grpo"]["per_seed"] == [0.0, 0.0]
    assert len(saved["paired"]["tapo"]["per_seed"]) == 2
    assert (out / "figure3.png").is_file()
    # paired: both arms of a seed start from the bytes of that seed's cold start
    for s in ("0", "1"):
        cs = saved["runs"]["cold_start"][s]["init_params_sha256"]
        assert saved["runs"]["arms"]["grpo"][s]["init_params_sha256"] == cs
        assert saved["runs"]["arms"]["tapo"][s]["init_params_sha256"] == cs
    assert (saved["runs"]["cold_start"]["0"]["init_params_sha256"]
            != saved["runs"]["cold_start"]["1"]["init_params_sha256"])
    assert "zpd_share" in saved["diagnostics"]["tapo"]
    m = saved["machine"]
    assert m["backend"] == "cpu" and m["cpu_count"] >= 1 and m["jax"] == jax.__version__
    assert f"jax {jax.__version__}" in md and saved["seconds"] > 0
    assert report["table"]["tapo"]["pass@1"]["n"] == 2
    cold = [saved["per_seed"]["cold_start"][s]["pass@1"] for s in ("0", "1")]
    assert saved["cold_start_spread"] == pytest.approx(max(cold) - min(cold))

    # the cold starts alone (CLI): finished seeds are reused, the study's report is kept
    from tapo_jax.cli import main

    before = (out / "study.json").read_text()
    assert main(["study", "--config", str(spec_path), "--quick", "--out", str(out),
                 "--cold-start-only"]) == 0
    assert (out / "study.json").read_text() == before
    cs = json.loads((out / "cold_starts.json").read_text())
    assert set(cs["table"]) == {"cold_start"} and cs["paired"] == {}
    assert cs["cold_start_spread"] == pytest.approx(saved["cold_start_spread"])
    assert cs["runs"]["cold_start"]["1"]["init_params_sha256"] == (
        saved["runs"]["cold_start"]["1"]["init_params_sha256"])
    assert "spread (max - min)" in (out / "cold_starts.md").read_text()
