"""The run's tokenizer and the ids the loops read from it: the arithmetic task's own tokenizer
(:func:`tapo_jax.data.arithmetic.build_tokenizer`) or an HF tokenizer from a local directory;
stop ids, the end-of-turn id and the pad id."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from tapo_jax.config import Config, ConfigError


def load_tokenizer(cfg: Config) -> Any:
    """The arithmetic task's own tokenizer, or an HF tokenizer from a local directory."""
    if cfg.data.kind == "arithmetic" and cfg.data.tokenizer_path is None:
        from tapo_jax.data.arithmetic import build_tokenizer  # imports `tokenizers` lazily

        return build_tokenizer()
    path = cfg.data.tokenizer_path or cfg.model.hf_path
    if path is None:
        raise ConfigError(
            "data.tokenizer_path (or model.hf_path) is required when data.kind is not arithmetic")
    if not Path(path).exists():
        raise ConfigError(f"tokenizer directory not found: {path} (data.tokenizer_path)")
    from transformers import AutoTokenizer  # heavy: only runs that load an HF tokenizer pay it

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def check_vocab(cfg: Config, tokenizer: Any) -> None:
    if len(tokenizer) > cfg.model.vocab_size:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but model.vocab_size = "
            f"{cfg.model.vocab_size}; raise model.vocab_size or use a matching tokenizer")


def pad_id(tokenizer: Any) -> int:
    """The id padding positions hold (never trained, never attended): the tokenizer's pad
    token, else 0."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


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
