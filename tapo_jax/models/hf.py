"""HF checkpoints (config.json + safetensors) <-> :class:`~tapo_jax.models.qwen3.Qwen3`.

Loading never builds a full host copy of the model: the module is created abstractly
(``nnx.eval_shape``), every safetensors file is memory-mapped, and each tensor becomes a device
array through :func:`tapo_jax.models.sharding.put_global`, which reads only the slice each
device holds, straight into its target sharding. Our weights are HF's tensors reshaped per head (see qwen3.py),
so a tensor maps by a reshape and the round trip HF -> ours -> HF is byte-identical.

Saving writes ``config.json``, ``generation_config.json`` and safetensors (split into several
files with ``model.safetensors.index.json`` above ``max_shard_bytes``), one tensor at a time.

Over 400 lines on purpose: loading and saving share the tensor-name and shape tables above them;
apart, a renamed tensor would be changed on one side only.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import shutil
import struct
from pathlib import Path
from typing import Any, Mapping, Optional

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from tapo_jax.config import ConfigError, ModelConfig, validate_model
from tapo_jax.models.qwen3 import Qwen3
from tapo_jax.models.sharding import TRAIN_RULES, Rules, put_global, variable_sharding
from tapo_jax.types import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_ST_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
              "BF16": np.dtype(ml_dtypes.bfloat16), "F64": np.dtype(np.float64)}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
# Files of an HF directory copied along on conversion (tokenizer and chat template).
_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
               "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")



# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


def config_from_hf(path_or_dict: str | Path | Mapping[str, Any]) -> ModelConfig:
    """ModelConfig from an HF ``config.json`` (a directory, the file, or its parsed dict)."""
    if isinstance(path_or_dict, Mapping):
        hc, source = dict(path_or_dict), "<config dict>"
    else:
        p = Path(path_or_dict)
        p = p / "config.json" if p.is_dir() else p
        if not p.is_file():
            raise CheckpointError(f"{p}: config.json not found")
        hc, source = json.loads(p.read_text()), str(p)

    def need(cond: bool, field: str, msg: str) -> None:
        if not cond:
            raise CheckpointError(f"{source}: '{field}' = {hc.get(field)!r} {msg}")

    need(hc.get("model_type") == "qwen3", "model_type",
         "is not supported: only the dense Qwen3 architecture ('qwen3') loads")
    archs = hc.get("architectures") or ["Qwen3ForCausalLM"]
    need("Qwen3ForCausalLM" in archs, "architectures", "must include 'Qwen3ForCausalLM'")
    need(not hc.get("num_experts"), "num_experts", "is not supported (mixture of experts)")
    need(hc.get("hidden_act", "silu") == "silu", "hidden_act", "is not supported (only 'silu')")
    need(not hc.get("attention_bias", False), "attention_bias", "is not supported (only false)")
    need(not hc.get("use_sliding_window", False), "use_sliding_window",
         "is not supported (only full attention)")
    rope = hc.get("rope_parameters") or hc.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise CheckpointError(f"{source}: 'rope_parameters.rope_type' = {rope_type!r} is not "
                              "supported (only 'default')")
    theta = rope.get("rope_theta", hc.get("rope_theta", 10000.0))
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads"):
        need(isinstance(hc.get(field), int), field, "must be an integer")
    cfg = ModelConfig(
        vocab_size=hc["vocab_size"],
        hidden_size=hc["hidden_size"],
        intermediate_size=hc["intermediate_size"],
        num_layers=hc["num_hidden_layers"],
        num_heads=hc["num_attention_heads"],
        num_kv_heads=hc.get("num_key_value_heads") or hc["num_attention_heads"],
        head_dim=hc.get("head_dim"),
        rope_theta=float(theta),
        rms_norm_eps=float(hc.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hc.get("tie_word_embeddings", False)),
        max_position_embeddings=int(hc.get("max_position_embeddings", 32768)),
    )
    try:
        validate_model(cfg, source)
    except ConfigError as e:
        raise CheckpointError(str(e)) from e
    return cfg


def hf_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The HF ``config.json`` dict of a ``Qwen3ForCausalLM`` with ``cfg``'s dimensions."""
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.resolved_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_theta": cfg.rope_theta,  # read by transformers 4.x
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "initializer_range": cfg.init_std,
        "use_cache": True,
        "dtype": cfg.param_dtype,
        "torch_dtype": cfg.param_dtype,  # read by transformers 4.x
    }


# ----------------------------------------------------------------------------------------------
# Tensor names and shapes
# ----------------------------------------------------------------------------------------------


def _hf_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """HF's shape of our tensor ``name``: head axes merged back into (out, in)."""
    if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
        return (shape[0] * shape[1], shape[2])
    if name.endswith("o_proj.weight"):
        return (shape[0], shape[1] * shape[2])
    return shape


def _flat_params(state: Any) -> dict[str, Any]:
    """HF name -> value (array or nnx Variable) of an nnx.State or nested dict of params."""
    if isinstance(state, nnx.State):
        return {".".join(str(k) for k in path): v for path, v in nnx.to_flat_state(state)}
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    walk(state, "")
    return out


def _split_layers(name: str, shape: tuple[int, ...], cfg: ModelConfig
                  ) -> list[tuple[str, Optional[int], tuple[int, ...]]]:
    """(HF name, layer index or None, our per-tensor shape) of each HF tensor behind our param
    ``name``: one, or with ``cfg.scan_layers`` one per layer of a stacked ``model.layers.*``."""
    prefix = "model.layers."
    if not (cfg.scan_layers and name.startswith(prefix)):
        return [(name, None, shape)]
    rest = name[len(prefix):]
    return [(f"{prefix}{i}.{rest}", i, shape[1:]) for i in range(shape[0])]


RUNTIME_FIELDS = ("attention", "attention_block", "remat", "scan_layers")


class _SafetensorsDir:
    """Memory-mapped tensors of an HF directory (one file, or several with an index)."""

    def __init__(self, path: Path):
        self.path = path
        index = path / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (path / SINGLE_FILE).is_file():
            files = [SINGLE_FILE]
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no safetensors weights ({SINGLE_FILE} or {INDEX_FILE})")
        self.entries: dict[str, tuple[str, dict]] = {}
        for fname in files:
            fpath = path / fname
            if not fpath.is_file():
                raise CheckpointError(f"{index}: lists {fname}, which does not exist")
            with open(fpath, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            for name, info in header.items():
                self.entries[name] = (fname, dict(info, base=8 + n))
        self._maps: dict[str, np.memmap] = {}

    def array(self, name: str) -> np.ndarray:
        """A read-only memory-mapped view of tensor ``name`` in its stored dtype and shape."""
        fname, info = self.entries[name]
        if info["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"{self.path / fname}: tensor '{name}' has unsupported dtype "
                                  f"{info['dtype']}")
        if fname not in self._maps:
            self._maps[fname] = np.memmap(self.path / fname, dtype=np.uint8, mode="r")
        start, end = info["data_offsets"]
        raw = self._maps[fname][info["base"] + start: info["base"] + end]
        return raw.view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])


# ----------------------------------------------------------------------------------------------
# Load
# ----------------------------------------------------------------------------------------------


def load_hf(path: str | Path, *, dtype: str = "float32", param_dtype: Optional[str] = None,
            mesh: Optional[jax.sharding.Mesh] = None, rules: Optional[Rules] = None,
            **runtime: Any) -> Qwen3:
    """Load a local HF Qwen3 directory into a :class:`Qwen3` whose params are placed on ``mesh``
    by ``rules`` (default TRAIN_RULES), or on the default device without a mesh.

    ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype (default: ``dtype``);
    ``runtime`` sets the :class:`ModelConfig` fields config.json does not hold (``attention``,
    ``attention_block``, ``remat``, ``scan_layers``).
    """
    bad = sorted(set(runtime) - set(RUNTIME_FIELDS))
    if bad:
        raise CheckpointError(f"load_hf: unknown options {bad}; known: {list(RUNTIME_FIELDS)}")
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    param_dtype = param_dtype or dtype
    for field, value in (("dtype", dtype), ("param_dtype", param_dtype)):
        if value not in _DTYPES:
            raise CheckpointError(f"load_hf: {field} = {value!r} is not one of {list(_DTYPES)}")
    cfg = dataclasses.replace(config_from_hf(path), dtype=dtype, param_dtype=param_dtype,
                              **runtime)
    abstract = nnx.eval_shape(lambda: Qwen3(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    wanted = _flat_params(state)
    files = _SafetensorsDir(path)
    hf_names = {n for name, var in wanted.items()
                for n, _, _ in _split_layers(name, tuple(var.value.shape), cfg)}

    missing = sorted(hf_names - set(files.entries))
    ignorable = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    unexpected = sorted(set(files.entries) - hf_names - ignorable)
    if missing:
        raise CheckpointError(f"{path}: missing tensors {missing}")
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensors {unexpected} "
                              "(not part of a dense Qwen3ForCausalLM with this config.json)")

    target = _DTYPES[param_dtype]
    device = jax.local_devices()[0]
    for name, var in wanted.items():
        shape = tuple(var.value.shape)
        views = []
        for hf_name, _, part_shape in _split_layers(name, shape, cfg):
            fname, info = files.entries[hf_name]
            if tuple(info["shape"]) != _hf_shape(hf_name, part_shape):
                raise CheckpointError(
                    f"{path / fname}: tensor '{hf_name}' has shape {info['shape']}, "
                    f"config.json implies {list(_hf_shape(hf_name, part_shape))}")
            views.append(files.array(hf_name).reshape(part_shape))
        sharding = (variable_sharding(var, mesh, rules or TRAIN_RULES) if mesh is not None
                    else jax.sharding.SingleDeviceSharding(device))
        # Each device reads only its slice of the mapping, copied so no buffer aliases the file;
        # a stacked [L, ...] param reads its layers' tensors (the layer axis is never sharded).
        if len(views) == 1 and shape == views[0].shape:
            read = lambda idx, view=views[0]: np.array(view[idx], dtype=target)  # noqa: E731
        else:
            def read(idx, views=views):
                return np.stack([np.asarray(views[i][idx[1:]], dtype=target)
                                 for i in range(len(views))[idx[0]]])
        var.set_value(put_global(shape, sharding, read))
    return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------------------------
# Save
# ----------------------------------------------------------------------------------------------


def _layer_slice(stacked: Any, layer: int) -> Any:
    return stacked[layer]


def _to_host(value: Any) -> np.ndarray:
    if callable(value):  # a deferred slice of a stacked param: fetched one layer at a time
        value = value()
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        from jax.experimental import multihost_utils

        value = multihost_utils.process_allgather(value, tiled=True)
    return np.asarray(jax.device_get(value))


def _write_safetensors(fpath: Path, tensors: list[tuple[str, Any, tuple, np.dtype]]) -> None:
    """Write (name, value, hf shape, dtype) entries, fetching one tensor at a time."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, _, shape, dt in tensors:
        nbytes = math.prod(shape) * dt.itemsize
        header[name] = {"dtype": _ST_NAMES[dt], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(fpath, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, value, shape, dt in tensors:
            f.write(np.ascontiguousarray(_to_host(value).astype(dt).reshape(shape)).tobytes())


def export_state_to_hf(cfg_or_graphdef: Any, params_state: Any, path: str | Path, *,
                       dtype: Optional[str] = None,
                       generation_config: Optional[Mapping[str, Any]] = None,
                       max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write params (an nnx.State of a Qwen3, or its nested dict) as an HF directory.

    ``cfg_or_graphdef``: the ModelConfig, a Qwen3 module, or the graphdef from ``nnx.split``.
    ``dtype``: storage dtype of the export (default: cfg.param_dtype).
    """
    if isinstance(cfg_or_graphdef, ModelConfig):
        cfg = cfg_or_graphdef
    elif isinstance(cfg_or_graphdef, Qwen3):
        cfg = cfg_or_graphdef.cfg
    elif isinstance(params_state, nnx.State):
        cfg = nnx.merge(cfg_or_graphdef, params_state).cfg
    else:
        raise CheckpointError("export: with a graphdef, params_state must be its nnx.State; "
                              "pass the ModelConfig to export a plain dict of params")
    dtype = dtype or cfg.param_dtype
    if dtype not in _DTYPES:
        raise CheckpointError(f"export: dtype = {dtype!r} is not one of {list(_DTYPES)}")
    cfg = dataclasses.replace(cfg, param_dtype=dtype)
    flat = {k: (v.value if isinstance(v, nnx.Variable) else v)
            for k, v in _flat_params(params_state).items()}
    expected = _flat_params(nnx.split(nnx.eval_shape(lambda: Qwen3(cfg, rngs=nnx.Rngs(0))))[1])
    missing, unexpected = sorted(set(expected) - set(flat)), sorted(set(flat) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"export: params do not match the config: missing {missing}, "
                              f"unexpected {unexpected}")
    for name, var in expected.items():
        if tuple(flat[name].shape) != tuple(var.value.shape):
            raise CheckpointError(f"export: tensor '{name}' has shape {tuple(flat[name].shape)}, "
                                  f"the config implies {tuple(var.value.shape)}")

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    dt = _DTYPES[dtype]
    entries = []
    for n in sorted(flat):
        for hf_name, layer, shape in _split_layers(n, tuple(flat[n].shape), cfg):
            value = flat[n] if layer is None else functools.partial(_layer_slice, flat[n], layer)
            entries.append((hf_name, value, _hf_shape(hf_name, shape), dt))
    entries.sort(key=lambda e: e[0])
    shards: list[list] = [[]]
    size = 0
    for entry in entries:
        nbytes = math.prod(entry[2]) * dt.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    # Every process takes part in gathering sharded params; process 0 writes the files.
    write = jax.process_index() == 0
    if write:
        for stale in [*out.glob("*.safetensors"), out / INDEX_FILE]:
            stale.unlink(missing_ok=True)
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for fname, shard in zip(names, shards):
        if write:
            _write_safetensors(out / fname, shard)
        else:
            for entry in shard:
                _to_host(entry[1])
    if write:
        if len(shards) > 1:
            weight_map = {e[0]: f for f, shard in zip(names, shards) for e in shard}
            total = sum(math.prod(e[2]) * dt.itemsize for e in entries)
            (out / INDEX_FILE).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        (out / "config.json").write_text(json.dumps(hf_config_dict(cfg), indent=2))
        gen = dict(generation_config) if generation_config else {"_from_model_config": True}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return out


def save_hf(model: Qwen3, path: str | Path, *, dtype: Optional[str] = None,
            generation_config: Optional[Mapping[str, Any]] = None,
            max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write ``model`` as an HF directory that ``transformers`` loads (Qwen3ForCausalLM);
    weights keep ``model.cfg.param_dtype`` unless ``dtype`` is given."""
    return export_state_to_hf(model.cfg, nnx.state(model, nnx.Param), path, dtype=dtype,
                              generation_config=generation_config,
                              max_shard_bytes=max_shard_bytes)


# ----------------------------------------------------------------------------------------------
# `tapo-jax convert`
# ----------------------------------------------------------------------------------------------


def _stored_dtype(path: Path) -> str:
    """The float dtype of an HF checkpoint's weights, as recorded in config.json."""
    hc = json.loads((path / "config.json").read_text())
    name = str(hc.get("dtype") or hc.get("torch_dtype") or "float32").replace("torch.", "")
    return name if name in _DTYPES else "float32"


def convert_main(argv: list[str]) -> int:
    """``tapo-jax convert --from-hf DIR --to-hf OUT [--dtype bfloat16]``: load an HF Qwen3
    directory through our model and export it again (optionally casting the weights); tokenizer
    files and generation_config.json are copied along."""
    parser = argparse.ArgumentParser(
        prog="tapo-jax convert",
        description="Re-export an HF Qwen3 checkpoint through tapo-jax "
                    "(optionally changing dtype).")
    parser.add_argument("--from-hf", required=True, metavar="DIR", help="local HF directory")
    parser.add_argument("--to-hf", required=True, metavar="OUT", help="output HF directory")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                        help="weight dtype of the export (default: the source's)")
    parser.add_argument("--max-shard-gb", type=float, default=5.0,
                        help="split the safetensors above this size (GiB)")
    args = parser.parse_args(argv)
    src, dst = Path(args.from_hf), Path(args.to_hf)
    try:
        if args.dtype is not None:
            dtype = args.dtype
        else:
            dtype = _stored_dtype(src) if (src / "config.json").is_file() else "float32"
        model = load_hf(src, dtype=dtype)
        gen_path = src / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.is_file() else None
        save_hf(model, dst, dtype=dtype, generation_config=gen,
                max_shard_bytes=int(args.max_shard_gb * 2**30))
    except CheckpointError as e:
        print(f"error: {e}")
        return 1
    for name in _SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    print(f"wrote {dst} ({dtype})")
    return 0
