"""The run's policy: mesh, tokenizer, model (random init or ``model.hf_path``) and the sampler
bound to them (:class:`Policy`), and the params a path names (:func:`params_from_path`: an HF
directory, a run directory or a checkpoints directory)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import jax

from tapo_jax.config import Config, ConfigError, sampler_max_len, training_kind
from tapo_jax.data import tokenizers
from tapo_jax.data.datasets import encode_prompts
from tapo_jax.models import sharding
from tapo_jax.models.hf import RUNTIME_FIELDS, config_from_hf, load_hf
from tapo_jax.sampling import Sampler
from tapo_jax.train import checkpoints as ckpt_lib
from tapo_jax.train.rollout import Completion, decode
from tapo_jax.train.state import (abstract_train_state, make_optimizer, optim_config_for,
                                  split_params)


def build_model(cfg: Config, mesh: Any, rules: Any) -> tuple[Any, Config]:
    """The policy: loaded from ``model.hf_path`` (dimensions from its config.json) or randomly
    initialised straight into its shardings. Returns the module and the config with the model
    section resolved from the checkpoint."""
    if cfg.model.hf_path is not None:
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


class Policy:
    """The run's mesh, tokenizer, graphdef and the sampler bound to them."""

    def __init__(self, cfg: Config, *, rules_train: Any = None):
        self.mesh = sharding.make_mesh(cfg.mesh)
        self.tokenizer = tokenizers.load_tokenizer(cfg)
        model, cfg = build_model(cfg, self.mesh, rules_train or sharding.TRAIN_RULES)
        tokenizers.check_vocab(cfg, self.tokenizer)
        self.graphdef, self.params = split_params(model)
        self.cfg = cfg
        self.stop_ids = tokenizers.stop_ids(self.tokenizer)
        self._sampler = None

    # prompts ---------------------------------------------------------------------------------
    def encode(self, prompts: list[str]) -> list[list[int]]:
        return encode_prompts(prompts, self.tokenizer, template=self.cfg.data.prompt_template,
                              chat=self.cfg.data.chat_template)

    # sampling --------------------------------------------------------------------------------
    def sampler(self, params: Any = None) -> Any:
        """The run's sampler, created on first use with ``params`` (default: the initial
        params, while the Policy still holds them)."""
        if self._sampler is None:
            s = self.cfg.sampling
            params = self.params if params is None else params
            if params is None:
                raise ValueError("Policy.sampler: the initial params were handed to the "
                                 "trainer; pass the params to sample with")
            self._sampler = Sampler(self.graphdef, params, mesh=self.mesh,
                                    num_slots=s.num_slots, max_len=sampler_max_len(self.cfg),
                                    prefill_buckets=s.prefill_buckets or None)
        return self._sampler

    def sample_fn(self, params: Any, *, temperature: Optional[float] = None,
                  top_p: Optional[float] = None):
        """``(prompt_ids, n, max_new_tokens, seed, *, temperature=None, top_p=None,
        draft_tokens=0) -> list[list[Completion]]`` with ``params``; a call's temperature /
        top_p override these (``draft_tokens``: :meth:`Sampler.generate`)."""
        s = self.cfg.sampling
        created = self._sampler is None
        sampler = self.sampler(params)
        if not created:
            sampler.update_params(params)
        temp = s.temperature if temperature is None else temperature
        tp = s.top_p if top_p is None else top_p

        def sample(prompt_ids, n, max_new_tokens, seed, *, temperature=None, top_p=None,
                   draft_tokens=0):
            # The sampler moves prompt ids and request keys to the devices itself (its own
            # boundary, measured by benchmarks/bench_sampler.py): allowed here by name, so the
            # transfer guard of the training tests covers the training side of the iteration.
            with jax.transfer_guard("allow"):
                ro = sampler.generate(prompt_ids, n=n, max_new_tokens=max_new_tokens,
                                      temperature=temp if temperature is None else temperature,
                                      top_p=tp if top_p is None else top_p, top_k=s.top_k,
                                      min_p=s.min_p, stop_ids=self.stop_ids, seed=seed,
                                      draft_tokens=draft_tokens)
            out = [[None] * n for _ in prompt_ids]
            for i in range(len(ro.prompt_index)):
                toks = [int(t) for t in ro.tokens[i][: ro.lengths[i]]]
                lps = [float(x) for x in ro.logprobs[i][: ro.lengths[i]]]
                out[ro.prompt_index[i]][ro.sample_index[i]] = Completion(
                    toks, lps, str(ro.finish_reason[i]))
            return out

        return sample

    def text_sample_fn(self, params: Any, max_new_tokens: int, temperature: float, top_p: float):
        """``(prompts, n, seed) -> list[list[str]]`` for evaluation."""
        sample = self.sample_fn(params, temperature=temperature, top_p=top_p)

        def fn(prompts, n, seed):
            comps = sample(self.encode(list(prompts)), n, max_new_tokens, seed)
            return [[decode(self.tokenizer, c.tokens) for c in group] for group in comps]

        return fn


# --------------------------------------------------------------------------------------------
# Params named by a path
# --------------------------------------------------------------------------------------------


def resolve_weights(path: Path) -> tuple[str, Path]:
    """``("hf", dir)`` for an HF directory (or a run directory with an ``hf/`` export), else
    ``("checkpoints", dir)`` for a run directory or a checkpoints directory (checked)."""
    if (path / "hf" / "config.json").is_file():
        path = path / "hf"
    if (path / "config.json").is_file():
        return "hf", path
    ck_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    return "checkpoints", ckpt_lib.check_checkpoint_dir(ck_dir)


def hf_params(cfg: Config, path: Path, mesh: Any) -> Any:
    """The params of the HF directory ``path``, in the run's dtypes and shardings."""
    model = load_hf(path, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype, mesh=mesh,
                    **{k: getattr(cfg.model, k) for k in RUNTIME_FIELDS})
    return split_params(model)[1]


def checkpoint_params(cfg: Config, ck_dir: Path, mesh: Any) -> Any:
    """The params of the newest training checkpoint in ``ck_dir``."""
    tx = make_optimizer(*optim_config_for(cfg, training_kind(cfg)))
    with ckpt_lib.Checkpointer(ck_dir, keep=cfg.train.keep_checkpoints) as manager:
        return manager.restore(abstract_train_state(cfg.model, tx, mesh)[1]).state.params


def params_from_path(cfg: Config, path: Path, mesh: Any, like: Any) -> Any:
    """The params in ``path`` (HF, run or checkpoints directory), checked against the shapes
    and dtypes of ``like`` (the policy's params)."""
    kind, path = resolve_weights(path)
    params = hf_params(cfg, path, mesh) if kind == "hf" else checkpoint_params(cfg, path, mesh)
    shapes = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), params)
    want = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), like)
    if jax.tree.structure(shapes) != jax.tree.structure(want) or shapes != want:
        raise ConfigError(f"train.init_from: the weights in {path} do not match the model of "
                          "this config (model.* dimensions or dtypes)")
    return params


def policy_for(cfg: Config, checkpoint: Optional[str]) -> tuple[Policy, Any]:
    """A policy and its params from ``checkpoint``: an HF directory, a run directory (its
    ``hf/`` export or latest checkpoint) or a checkpoints directory; without one, the config's
    own model."""
    if checkpoint is None:
        policy = Policy(cfg)
        return policy, policy.params
    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    kind, path = resolve_weights(path)
    if kind == "hf":
        policy = Policy(dataclasses.replace(
            cfg, model=dataclasses.replace(cfg.model, hf_path=str(path))))
        return policy, policy.params
    policy = Policy(cfg)
    return policy, checkpoint_params(cfg, path, policy.mesh)
