"""Every recipe in configs/ loads and validates, and the recipes say what they claim to: each
baseline and ablation is a few lines on ``base: tapo.yaml`` that change only its switch."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from tapo_jax.config import ConfigError, load_config, to_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STUDY = "study.yaml"  # a study config (tapo_jax.study), not a run config: tested below
ALL = sorted(p for p in CONFIGS.glob("*.yaml") if p.name != STUDY)
# Fields that name a run rather than change it.
LABELS = {"name", "description", "train.output_dir"}

# File -> the only settings (dotted key -> value) in which it differs from tapo.yaml.
SWITCHES = {
    "grpo.yaml": {"rl.algorithm": "grpo"},
    "opsd.yaml": {"rl.algorithm": "opsd"},
    "ablation_no_dae.yaml": {"rl.decoupled": False},
    "ablation_no_ots.yaml": {"rl.ots": False},
    "ablation_no_negatives.yaml": {"rl.negatives": False},
    "ablation_full_reconstruction.yaml": {"rl.construction": "full"},
    "ablation_rule_construction.yaml": {"rl.construction": "rule"},
    "ablation_sft_only.yaml": {"rl.sft_only": True},
}
EXPECTED = {"demo.yaml", "tapo.yaml", "qwen3_0.6b_tapo.yaml", "qwen3_8b_tapo.yaml", *SWITCHES}


def flat(cfg) -> dict:
    out = {}
    for section, value in to_dict(cfg).items():
        if isinstance(value, dict):
            out.update({f"{section}.{k}": v for k, v in value.items()})
        else:
            out[section] = value
    return out


@pytest.fixture(scope="module")
def loaded():
    return {p.name: load_config(p) for p in ALL}


def test_all_expected_recipes_exist():
    assert EXPECTED <= {p.name for p in ALL}


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_recipe_loads_and_explains_itself(path, loaded):
    cfg = loaded[path.name]
    text = path.read_text()
    assert text.startswith("# "), f"{path.name} must open with a comment saying what it is for"
    header = text.split("\n\n", 1)[0]
    assert f"--config configs/{path.name}" in header, f"{path.name}: header lacks its command"
    raw = yaml.safe_load(text)
    assert raw["name"] == cfg.name and cfg.description
    # Unknown keys would have raised in load_config; the YAML keys are all schema keys.
    fields = {f.name for f in dataclasses.fields(cfg)}
    assert set(raw) - {"base"} <= fields
    # Overrides apply on top of the file (as the header comments tell users to do).
    over = load_config(path, ["train.steps=3", "eval.runs=2"])
    assert over.train.steps == 3 and over.eval.runs == 2


def raw_keys(data: dict, prefix: str = "") -> set[str]:
    """Dotted keys a YAML mapping sets (nested mappings flattened)."""
    out = set()
    for k, v in data.items():
        out |= raw_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
    return out


@pytest.mark.parametrize("name, switch", sorted(SWITCHES.items()))
def test_baselines_and_ablations_are_their_switch_on_the_tapo_base(name, switch):
    text = (CONFIGS / name).read_text()
    raw = yaml.safe_load(text)
    assert raw["base"] == "tapo.yaml"
    keys = raw_keys(raw) - {"base"} - LABELS
    allowed = set(switch) | ({"rl.opsd_beta", "rl.opsd_temperature", "rl.opsd_top_k"}
                             if name == "opsd.yaml" else set())
    assert set(switch) <= keys <= allowed, f"{name} sets {sorted(keys)}"
    body = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    assert len(body) <= 10, f"{name}: {len(body)} lines of settings, expected a few"


@pytest.mark.parametrize("name, switch", sorted(SWITCHES.items()))
def test_baselines_and_ablations_differ_from_tapo_only_in_their_switch(name, switch, loaded):
    base, other = flat(loaded["tapo.yaml"]), flat(loaded[name])
    diff = {k for k in base if base[k] != other[k]} - LABELS
    allowed = set(switch) | ({k for k in base if k.startswith("rl.opsd_")}
                             if name == "opsd.yaml" else set())
    assert set(switch) <= diff <= allowed, f"{name} differs from tapo.yaml in {sorted(diff)}"
    for key, value in switch.items():
        assert other[key] == value
    assert other["train.output_dir"] != base["train.output_dir"]


def test_tapo_recipe_uses_the_method_defaults(loaded):
    rl = loaded["tapo.yaml"].rl
    assert (rl.algorithm, rl.num_samples, rl.n_pos, rl.n_neg, rl.m_max) == ("tapo", 8, 2, 4, 4)
    assert rl.decoupled and rl.ots and rl.negatives and not rl.sft_only
    assert rl.construction == "micro" and (rl.w_min, rl.w_max) == (0.01, 10.0)


def test_demo_is_cpu_sized_cold_start_then_tapo(loaded):
    cfg = loaded["demo.yaml"]
    assert cfg.model.preset == "demo" and cfg.data.kind == "arithmetic"
    assert cfg.cold_start.enabled and cfg.cold_start.steps > 0
    assert cfg.rl.algorithm == "tapo" and cfg.eval.before_and_after
    assert cfg.model.hidden_size <= 256 and cfg.model.num_layers <= 4
    assert cfg.train.steps <= loaded["tapo.yaml"].train.steps


@pytest.mark.parametrize("name, preset", [("qwen3_0.6b_tapo.yaml", "qwen3-0.6b"),
                                          ("qwen3_8b_tapo.yaml", "qwen3-8b")])
def test_qwen_recipes_carry_the_paper_hyperparameters(name, preset, loaded):
    cfg = loaded[name]
    assert cfg.model.preset == preset and cfg.model.hf_path is None
    assert cfg.model.dtype == "bfloat16" and cfg.model.param_dtype == "float32"
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (1, -1, 1)
    rl = cfg.rl
    assert (rl.algorithm, rl.num_samples, rl.n_pos, rl.n_neg, rl.m_max) == ("tapo", 8, 2, 4, 4)
    assert (rl.w_min, rl.w_max, rl.lam, rl.kl_coef) == (0.01, 10.0, 1.0, 0.0)
    assert (rl.eps_low, rl.eps_high) == (0.2, 0.28)
    assert cfg.optim.learning_rate == 1e-6 and cfg.train.batch_size == 32
    assert cfg.sampling.temperature == 1.0 and cfg.sampling.top_p == 1.0
    assert (cfg.eval.temperature, cfg.eval.top_p, cfg.eval.k_max) == (0.6, 0.9, 5)
    assert cfg.data.kind == "file" and not cfg.cold_start.enabled
    header = (CONFIGS / name).read_text().split("\n\n", 1)[0]
    assert "model.hf_path=/path/to/" in header and "data.path=" in header
    # The documented overrides produce a runnable configuration.
    ready = load_config(CONFIGS / name, ["model.hf_path=/ckpt/Qwen3", "data.path=/d/train.jsonl"])
    assert ready.model.hf_path == "/ckpt/Qwen3" and ready.data.path == "/d/train.jsonl"


def test_a_broken_recipe_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIGS / "tapo.yaml").read_text().replace("n_neg: 4", "n_neg: 40"))
    with pytest.raises(ConfigError, match=r"bad\.yaml.*rl\.n_neg"):
        load_config(bad)


def test_study_config_arms_are_valid_run_configs():
    from tapo_jax.study import load_study

    for quick in (False, True):
        spec = load_study(CONFIGS / STUDY, quick=quick)
        assert spec.reference in spec.arms and len(spec.seeds) >= 3
        for overrides in spec.arms.values():
            load_config(spec.base_config, spec.overrides + overrides)
