"""Qwen3 model, HF checkpoint conversion and sharding rules."""

from tapo_jax.models.hf import config_from_hf, export_state_to_hf, hf_config_dict, load_hf, save_hf
from tapo_jax.models.qwen3 import KVCache, Qwen3, apply, init_cache

__all__ = ["KVCache", "Qwen3", "apply", "config_from_hf", "export_state_to_hf", "hf_config_dict",
           "init_cache", "load_hf", "save_hf"]
