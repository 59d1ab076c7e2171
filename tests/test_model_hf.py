"""HF checkpoint loading / export: byte-identical round trips, transformers reloads our export,
sharded checkpoints, dtype conversion and errors that name the tensor or field."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tapo_jax.models import export_state_to_hf, load_hf, save_hf
from tapo_jax.types import CheckpointError
from tapo_jax.models.hf import config_from_hf, convert_main, hf_config_dict

UNTIED = dict(num_heads=4, num_kv_heads=2, head_dim=24, tie=False, rope_theta=5e6)
TIED = dict(num_heads=4, num_kv_heads=1, tie=True)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory (single file or index)."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            for name in st.keys():
                out[name] = st.get_tensor(name)
    return out


def _assert_bytes_equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert a[name].contiguous().view(torch.uint8).numpy().tobytes() == \
            b[name].contiguous().view(torch.uint8).numpy().tobytes(), name


def _hf_logits(path: Path, tokens: np.ndarray) -> torch.Tensor:
    model = transformers.Qwen3ForCausalLM.from_pretrained(path, dtype="auto",
                                                          attn_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits


TOKENS = np.random.RandomState(0).randint(0, 96, (2, 9))


@pytest.mark.parametrize("dims,dtype", [(UNTIED, "float32"), (TIED, "float32"),
                                        (UNTIED, "bfloat16")])
def test_round_trip_is_byte_identical(hf_checkpoint, tmp_path, dims, dtype):
    src = hf_checkpoint(**dims, dtype=dtype)
    model = load_hf(src, dtype=dtype)
    save_hf(model, tmp_path)
    _assert_bytes_equal(_tensors(src), _tensors(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == dtype
    assert (tmp_path / "generation_config.json").is_file()
    want, got = _hf_logits(src, TOKENS), _hf_logits(tmp_path, TOKENS)
    assert got.dtype == getattr(torch, dtype)
    assert torch.equal(want, got)


def test_sharded_checkpoint_loads_and_exports(hf_checkpoint, tmp_path):
    single = hf_checkpoint(**UNTIED)
    sharded = hf_checkpoint(**UNTIED, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    a = nnx.state(load_hf(single), nnx.Param)
    b = nnx.state(load_hf(sharded), nnx.Param)
    for x, y in zip(nnx.to_flat_state(a), nnx.to_flat_state(b)):
        assert x[0] == y[0]
        np.testing.assert_array_equal(np.asarray(x[1].value), np.asarray(y[1].value))
    # Our own sharded export (tiny shard limit) reloads in transformers with identical logits.
    save_hf(load_hf(sharded), tmp_path, max_shard_bytes=30_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    _assert_bytes_equal(_tensors(single), _tensors(tmp_path))
    assert torch.equal(_hf_logits(single, TOKENS), _hf_logits(tmp_path, TOKENS))


def test_export_state_from_graphdef_or_dict(hf_checkpoint, tmp_path):
    src = hf_checkpoint(**UNTIED)
    model = load_hf(src)
    graphdef, state = nnx.split(model)
    export_state_to_hf(graphdef, state, tmp_path / "a")
    export_state_to_hf(model.cfg, nnx.state(model, nnx.Param).to_pure_dict(), tmp_path / "b")
    _assert_bytes_equal(_tensors(src), _tensors(tmp_path / "a"))
    _assert_bytes_equal(_tensors(src), _tensors(tmp_path / "b"))


def test_config_round_trip(hf_checkpoint):
    cfg = config_from_hf(hf_checkpoint(**UNTIED))
    got = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rope_theta, cfg.tie_word_embeddings)
    assert got == (4, 2, 24, 5e6, False)
    hc = transformers.Qwen3Config(**hf_config_dict(cfg))
    assert hc.rope_parameters["rope_theta"] == 5e6 and hc.head_dim == 24
    assert config_from_hf(hf_config_dict(cfg)) == cfg


def test_convert_casts_to_bfloat16(hf_checkpoint, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(hf_checkpoint(**TIED), src)
    (src / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    out = tmp_path / "out"
    assert convert_main(["--from-hf", str(src), "--to-hf", str(out), "--dtype", "bfloat16"]) == 0
    want = {k: v.to(torch.bfloat16) for k, v in _tensors(src).items()}
    _assert_bytes_equal(want, _tensors(out))
    assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 64}'
    # Without --dtype the stored dtype is kept: bf16 -> bf16 byte-identical.
    again = tmp_path / "again"
    assert convert_main(["--from-hf", str(out), "--to-hf", str(again)]) == 0
    _assert_bytes_equal(_tensors(out), _tensors(again))
    assert convert_main(["--from-hf", str(tmp_path / "nope"), "--to-hf", str(again)]) == 1
    assert "nope" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# Errors name the tensor or the field
# ----------------------------------------------------------------------------------------------


def _edit_copy(src: Path, dst: Path, *, config=None, tensors=None) -> Path:
    shutil.copytree(src, dst)
    if config is not None:
        hc = json.loads((dst / "config.json").read_text())
        config(hc)
        (dst / "config.json").write_text(json.dumps(hc))
    if tensors is not None:
        sd = load_file(dst / "model.safetensors")
        tensors(sd)
        save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _raises(path: Path, *needles: str) -> None:
    with pytest.raises(CheckpointError) as e:
        load_hf(path)
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))


def test_missing_tensor(hf_checkpoint, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    _raises(_edit_copy(hf_checkpoint(**UNTIED), tmp_path / "c", tensors=lambda sd: sd.pop(name)),
            name, "missing")


def test_unexpected_tensor(hf_checkpoint, tmp_path):
    name = "model.layers.0.self_attn.q_proj.bias"

    def add(sd):
        sd[name] = torch.zeros(96)

    _raises(_edit_copy(hf_checkpoint(**UNTIED), tmp_path / "c", tensors=add), name, "unexpected")


def test_shape_mismatch(hf_checkpoint, tmp_path):
    def edit(hc):
        hc["intermediate_size"] = 120

    _raises(_edit_copy(hf_checkpoint(**UNTIED), tmp_path / "c", config=edit),
            "model.layers.0.mlp.down_proj.weight", "[64, 112]", "[64, 120]")


@pytest.mark.parametrize("field,value", [
    ("model_type", "qwen3_moe"), ("num_experts", 8), ("model_type", "llama"),
    ("architectures", ["Qwen3ForSequenceClassification"]), ("use_sliding_window", True),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}),
    ("num_attention_heads", 5),
])
def test_unsupported_config(hf_checkpoint, tmp_path, field, value):
    def edit(hc):
        hc[field] = value

    renamed = {"rope_parameters": "rope_type", "num_attention_heads": "num_kv_heads"}
    expect = renamed.get(field, field)
    _raises(_edit_copy(hf_checkpoint(**UNTIED), tmp_path / "c", config=edit), expect,
            "config.json")


def test_missing_files(hf_checkpoint, tmp_path):
    src = hf_checkpoint(**UNTIED)
    no_cfg = _edit_copy(src, tmp_path / "a")
    (no_cfg / "config.json").unlink()
    _raises(no_cfg, "config.json")
    no_weights = _edit_copy(src, tmp_path / "b")
    (no_weights / "model.safetensors").unlink()
    _raises(no_weights, "model.safetensors")
