"""Config loading: each class of bad value raises ConfigError naming the key and the file;
presets fill dimensions and explicit keys override them; ``base:`` chains inherit, resolved
relative to the naming file, and a cycle or a missing base is an error naming the files."""

from __future__ import annotations

import pytest

from tapo_jax.config import ConfigError, load_config
from tapo_jax.models.presets import PRESETS


@pytest.fixture
def write(tmp_path):
    def make(text: str, name: str = "run.yaml"):
        path = tmp_path / name
        path.write_text(text)
        return path

    return make


@pytest.mark.parametrize("text,key", [
    ("model:\n  num_layer: 2\n", "model.num_layer"),  # unknown key
    ("rl:\n  n_poss: 2\n", "rl.n_poss"),
    ("colour: red\n", "colour"),
    ("model:\n  num_layers: two\n", "model.num_layers"),  # wrong types
    ("model:\n  num_layers: 2.5\n", "model.num_layers"),
    ("model:\n  tie_word_embeddings: 1\n", "model.tie_word_embeddings"),
    ("model:\n  dtype: float16\n", "model.dtype"),
    ("sampling:\n  temperature: hot\n", "sampling.temperature"),
    ("sampling:\n  prefill_buckets: 64\n", "sampling.prefill_buckets"),
    ("model: 3\n", "model"),
    ("model:\n  hidden_size: 64\n  num_heads: 5\n", "model.num_heads"),  # impossible values
    ("model:\n  num_heads: 4\n  num_kv_heads: 3\n", "model.num_kv_heads"),
    ("rl:\n  num_samples: 4\n  n_pos: 5\n", "rl.n_pos"),
    ("rl:\n  num_samples: 8\n  n_pos: 5\n  n_neg: 4\n", "rl.n_neg"),
    ("model:\n  preset: qwen9-1t\n", "model.preset"),
    ("mesh:\n  data: -1\n  fsdp: -1\n", "mesh"),
    ("model:\n  head_dim: 15\n", "model.head_dim"),
    ("eval:\n  num_samples: 2\n  k_max: 5\n", "eval.num_samples"),
    ("cold_start:\n  num_problems: -1\n", "cold_start.num_problems"),
    ("cold_start:\n  target_pass1: 0\n", "cold_start.target_pass1"),
    ("cold_start:\n  target_pass1: 1.5\n", "cold_start.target_pass1"),
    ("cold_start:\n  check_every: 0\n", "cold_start.check_every"),
    ("cold_start:\n  check_samples: 0\n", "cold_start.check_samples"),
    ("cold_start:\n  check_from: -1\n", "cold_start.check_from"),
    ("cold_start:\n  analysis: quote\n", "cold_start.analysis"),
    ("data:\n  kind: file\n  path: x.jsonl\ncold_start:\n  analysis: walk\n", "cold_start.analysis"),
    ("cold_start:\n  analysis: compare\n  data_path: x.jsonl\n", "cold_start.analysis"),
    ("cold_start:\n  length_quantum: 0\n", "cold_start.length_quantum"),
    ("cold_start:\n  decision_weight: 0\n", "cold_start.decision_weight"),
    ("cold_start:\n  decision_weight: 4\n  data_path: x.jsonl\n", "cold_start.decision_weight"),
    ("cold_start:\n  slip_kinds: carry,typo\n", "cold_start.slip_kinds"),
    ("cold_start:\n  slip_kinds: ' , '\n", "cold_start.slip_kinds"),
    ("cold_start:\n  slip_kinds: carry\n  data_path: x.jsonl\n", "cold_start.slip_kinds"),
    ("cold_start:\n  error_line_weight: -1\n", "cold_start.error_line_weight"),
    ("cold_start:\n  error_line_weight: 2\n  data_path: x.jsonl\n", "cold_start.error_line_weight"),
    ("sampling:\n  construction_draft_tokens: -2\n", "sampling.construction_draft_tokens"),
])
def test_bad_value_names_key_and_file(write, text, key):
    path = write(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert f"'{key}" in msg and str(path) in msg, msg


def test_heads_need_not_divide_hidden_with_explicit_head_dim(write):
    cfg = load_config(write("model:\n  hidden_size: 64\n  num_heads: 5\n  num_kv_heads: 1\n"
                            "  head_dim: 16\n"))
    assert cfg.model.resolved_head_dim == 16


@pytest.mark.parametrize("override,key", [
    ("model.num_layer=2", "model.num_layer"),
    ("model.num_layers=abc", "model.num_layers"),
    ("rl.n_pos=9", "rl.n_pos"),
    ("model.num_kv_heads=3", "model.num_kv_heads"),
    ("model.preset=nope", "model.preset"),
    ("data.eval_seed=-1", "data.eval_seed"),
])
def test_bad_override_names_key(write, override, key):
    path = write("model:\n  preset: tiny\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, [override])
    assert f"'{key}" in str(e.value) and override in str(e.value), str(e.value)


def test_override_without_equals():
    with pytest.raises(ConfigError, match="model.num_layers"):
        load_config(None, ["model.num_layers"])


def test_missing_file_and_bad_yaml(tmp_path, write):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(missing)
    bad = write("model:\n  num_layers: [1, 2\n", name="broken.yaml")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert str(bad) in str(e.value) and "YAML" in str(e.value)


def test_presets_and_explicit_keys(write):
    cfg = load_config(write("model:\n  preset: qwen3-8b\n  num_layers: 2\n"
                            "  tie_word_embeddings: true\n"))
    want = PRESETS["qwen3-8b"]
    assert (cfg.model.hidden_size, cfg.model.head_dim) == (want["hidden_size"], want["head_dim"])
    # Explicit keys win even when they equal the dataclass defaults.
    assert cfg.model.num_layers == 2 and cfg.model.tie_word_embeddings is True
    # Switching preset on the command line replaces every dimension of the file's preset.
    cfg = load_config(write("model:\n  preset: tiny\n"), ["model.preset=qwen3-0.6b"])
    assert {k: getattr(cfg.model, k) for k in PRESETS["qwen3-0.6b"]} == PRESETS["qwen3-0.6b"]
    # A dimension override keeps the rest of the preset.
    cfg = load_config(write("model:\n  preset: tiny-untied\n"), ["model.num_layers=3"])
    assert cfg.model.num_layers == 3 and cfg.model.head_dim == 24 and cfg.model.rope_theta == 5e6


def test_base_chain_inherits_relative_to_each_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "root.yaml").write_text(
        "name: root\nrl:\n  n_pos: 1\n  n_neg: 2\ntrain:\n  steps: 7\n")
    (tmp_path / "sub" / "mid.yaml").write_text(  # relative to sub/, not to the working directory
        "base: ../root.yaml\nname: mid\nrl:\n  n_neg: 3\n  ots: false\n")
    (tmp_path / "sub" / "leaf.yaml").write_text("base: mid.yaml\nrl: {lam: 0.5}\n")
    cfg = load_config(tmp_path / "sub" / "leaf.yaml")
    # Nested mappings merge key by key down the chain; the nearest file wins.
    assert (cfg.rl.n_pos, cfg.rl.n_neg, cfg.rl.ots, cfg.rl.lam) == (1, 3, False, 0.5)
    assert cfg.name == "mid" and cfg.train.steps == 7
    # Overrides still apply last.
    assert load_config(tmp_path / "sub" / "leaf.yaml", ["rl.n_neg=1"]).rl.n_neg == 1


def test_base_values_are_validated_after_the_merge(tmp_path):
    (tmp_path / "a.yaml").write_text("rl:\n  num_samples: 4\n  n_pos: 1\n  n_neg: 3\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nrl:\n  n_pos: 2\n")
    with pytest.raises(ConfigError, match=r"b\.yaml.*rl\.n_neg"):
        load_config(tmp_path / "b.yaml")
    (tmp_path / "c.yaml").write_text("base: a.yaml\nrl:\n  n_poss: 2\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*unknown key 'rl\.n_poss'"):
        load_config(tmp_path / "c.yaml")


@pytest.mark.parametrize("files, start", [
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: c.yaml\n", "c.yaml": "base: a.yaml\n"},
     "a.yaml"),
    ({"self.yaml": "base: self.yaml\nname: x\n"}, "self.yaml"),
    ({"top.yaml": "base: a.yaml\n", "a.yaml": "base: b.yaml\n", "b.yaml": "base: ./a.yaml\n"},
     "top.yaml"),
])
def test_base_cycle_is_an_error_naming_its_files(tmp_path, files, start):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match="cycle") as e:
        load_config(tmp_path / start)
    cycle = str(e.value).split("cycle:", 1)[1]
    for name in files:
        if name != "top.yaml":
            assert name in cycle, str(e.value)
    assert "top.yaml" not in cycle  # the file that led into the cycle is not part of it


def test_missing_or_bad_base_names_the_file(tmp_path):
    (tmp_path / "child.yaml").write_text("base: nowhere.yaml\nname: child\n")
    with pytest.raises(ConfigError, match=r"child\.yaml.*does not exist.*nowhere\.yaml"):
        load_config(tmp_path / "child.yaml")
    (tmp_path / "num.yaml").write_text("base: 3\n")
    with pytest.raises(ConfigError, match=r"num\.yaml.*'base' must be a file name"):
        load_config(tmp_path / "num.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"list\.yaml.*mapping"):
        load_config(tmp_path / "list.yaml")


def test_mesh_is_checked_by_the_same_function_in_config_and_sharding():
    from tapo_jax.config import MeshConfig, validate_mesh
    from tapo_jax.models.sharding import make_mesh

    bad = MeshConfig(data=-1, fsdp=-1, tensor=1)
    with pytest.raises(ConfigError) as from_config:
        validate_mesh(bad)
    with pytest.raises(ConfigError) as from_sharding:
        make_mesh(bad)
    assert str(from_config.value) == str(from_sharding.value)


def test_cli_takes_the_config_a_run_directory_recorded(tmp_path):
    """eval / sample / filter without --config use DIR/config.yaml of the checkpoint's run."""
    import argparse

    import yaml

    from tapo_jax.cli import _config_for
    from tapo_jax.config import load_config, to_dict

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    cfg = load_config("configs/demo.yaml", ["model.num_layers=1", "rl.num_samples=4",
                                            "rl.n_neg=2"])
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    for ckpt in (run, run / "checkpoints"):
        got = _config_for(argparse.Namespace(config=None, checkpoint=str(ckpt),
                                             overrides=["eval.runs=1"]))
        assert got.model.num_layers == 1 and got.rl.num_samples == 4 and got.eval.runs == 1
    explicit = _config_for(argparse.Namespace(config="configs/demo.yaml", checkpoint=str(run),
                                              overrides=[]))
    assert explicit.model.num_layers != 1
