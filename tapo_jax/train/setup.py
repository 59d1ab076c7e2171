"""Building the pieces of a run from its config: mesh, tokenizer, model, data.

Each function is small and explicit; :mod:`tapo_jax.train.run` composes them.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Optional

from tapo_jax.config import Config, ConfigError

log = logging.getLogger("tapo_jax")


def load_tokenizer(cfg: Config) -> Any:
    """The arithmetic task's own tokenizer, or an HF tokenizer from a local directory."""
    if cfg.data.kind == "arithmetic" and cfg.data.tokenizer_path is None:
        from tapo_jax.data.arithmetic import build_tokenizer

        return build_tokenizer()
    path = cfg.data.tokenizer_path or cfg.model.hf_path
    if path is None:
        raise ConfigError(
            "data.tokenizer_path (or model.hf_path) is required when data.kind is not arithmetic")
    if not Path(path).exists():
        raise ConfigError(f"tokenizer directory not found: {path} (data.tokenizer_path)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def check_vocab(cfg: Config, tokenizer: Any) -> None:
    if len(tokenizer) > cfg.model.vocab_size:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but model.vocab_size = "
            f"{cfg.model.vocab_size}; raise model.vocab_size or use a matching tokenizer")


def _vocab_id(tokenizer: Any, token: str) -> Optional[int]:
    """The id of ``token`` when the vocabulary has it (not mapped to unk), else None."""
    i = tokenizer.convert_tokens_to_ids(token)
    return i if isinstance(i, int) and i >= 0 and i != tokenizer.unk_token_id else None


def stop_ids(tokenizer: Any) -> tuple[int, ...]:
    """End-of-turn and end-of-text ids (a response stops at either)."""
    ids = [_vocab_id(tokenizer, t) for t in ("<|im_end|>", "<|endoftext|>")]
    ids.append(tokenizer.eos_token_id)
    return tuple(sorted({i for i in ids if i is not None}))


def end_of_turn_id(tokenizer: Any) -> Optional[int]:
    """The token a finished response ends with: ``<|im_end|>`` when the vocabulary has it (the
    chat models' end of turn, where sampled responses stop), else the eos token, else None."""
    i = _vocab_id(tokenizer, "<|im_end|>")
    return i if i is not None else tokenizer.eos_token_id


def build_model(cfg: Config, mesh: Any, rules: Any) -> tuple[Any, Config]:
    """The policy: loaded from ``model.hf_path`` (dimensions from its config.json) or randomly
    initialised straight into its shardings. Returns the module and the config with the model
    section resolved from the checkpoint."""
    from tapo_jax.models import sharding

    if cfg.model.hf_path is not None:
        from tapo_jax.models.hf import RUNTIME_FIELDS, config_from_hf, load_hf

        path = Path(cfg.model.hf_path)
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.hf_path: no config.json in {path}")
        runtime = {k: getattr(cfg.model, k) for k in RUNTIME_FIELDS}
        model = load_hf(path, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                        mesh=mesh, rules=rules, **runtime)
        resolved = dataclasses.replace(
            config_from_hf(path), hf_path=str(path), dtype=cfg.model.dtype,
            param_dtype=cfg.model.param_dtype, **runtime)
        return model, dataclasses.replace(cfg, model=resolved)
    model = sharding.create_sharded_model(cfg.model, mesh, rules, seed=cfg.train.seed)
    return model, cfg
