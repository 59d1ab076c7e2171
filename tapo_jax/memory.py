"""Per-device memory of the compiled training functions, from XLA's own analysis.

Everything here compiles without running: params, optimizer state and batches are abstract
(``jax.ShapeDtypeStruct`` with their shardings), so the figures for a Qwen3-8B step on a
virtual CPU mesh come from ``compiled.memory_analysis()`` of the same program a TPU or GPU run
would build, partitioned over the same mesh (``benchmarks/bench_memory.py`` prints them).
Figures are per device: XLA analyses one SPMD partition.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from tapo_jax.config import Config
from tapo_jax.models import sharding as sharding_lib
from tapo_jax.train.state import abstract_train_state, make_optimizer, optim_config_for
from tapo_jax.types import TrainBatch

GB = 1e9


def _spec(shape, dtype, mesh: Mesh) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype,
                                sharding=sharding_lib.batch_sharding(mesh, len(shape)))


def abstract_batch(rows: int, length: int, mesh: Mesh) -> TrainBatch:
    """A TrainBatch of ``rows`` x ``length`` as abstract arrays with the batch sharding."""
    def s(*shape, dtype=jnp.float32):
        return _spec(shape, dtype, mesh)

    i32 = jnp.int32
    return TrainBatch(
        tokens=s(rows, length, dtype=i32), positions=s(rows, length, dtype=i32),
        attention_mask=s(rows, length, dtype=i32), loss_mask=s(rows, length),
        query_index=s(rows, dtype=i32), is_reflection=s(rows, dtype=jnp.bool_),
        rewards=s(rows), row_mask=s(rows), group_ids=s(rows, dtype=i32), advantages=s(rows),
        old_logprobs=s(rows, length), ref_logprobs=s(rows, length))


def memory_stats(lower: Callable[[], Any]) -> dict[str, Any]:
    """Compile ``lower()`` (a ``jax.stages.Lowered``) and report XLA's per-device bytes."""
    t0 = time.perf_counter()
    compiled = lower().compile()
    seconds = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    arg, out = ma.argument_size_in_bytes, ma.output_size_in_bytes
    temp, alias = ma.temp_size_in_bytes, ma.alias_size_in_bytes
    # Donated inputs alias outputs: live memory is arguments + temporaries + non-aliased outputs.
    total = arg + temp + out - alias
    return {"argument_gb": arg / GB, "output_gb": out / GB, "alias_gb": alias / GB,
            "temp_gb": temp / GB, "total_gb": total / GB, "compile_s": round(seconds, 2)}


def train_step_memory(cfg: Config, mesh: Mesh, *, kind: str = "rl", rows: int, length: int
                      ) -> dict[str, Any]:
    """Memory of one ``kind`` train step (``rl`` or ``sft``) on ``rows`` x ``length`` rows."""
    from tapo_jax.train.step import make_train_step

    tx = make_optimizer(*optim_config_for(cfg, kind))
    graphdef, state, _ = abstract_train_state(cfg.model, tx, mesh)
    step = make_train_step(graphdef, cfg, mesh, kind=kind)
    return memory_stats(lambda: step.lower(state, abstract_batch(rows, length, mesh)))


def logprob_memory(cfg: Config, mesh: Mesh, *, rows: int, length: int,
                   micro_batch_size: int = 0) -> dict[str, Any]:
    """Memory of the teacher-forced log-prob forward (old / reference log-probs)."""
    from tapo_jax.train.step import make_logprob_fn

    tx = make_optimizer(*optim_config_for(cfg, "rl"))
    graphdef, state, _ = abstract_train_state(cfg.model, tx, mesh)
    fn = make_logprob_fn(graphdef, mesh, micro_batch_size=micro_batch_size)
    batch = abstract_batch(rows, length, mesh)
    return memory_stats(lambda: fn.lower(state.params, batch))


def param_count(cfg: Config) -> int:
    from tapo_jax.train.state import abstract_params

    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract_params(cfg.model)[1])))


def decode_memory(cfg: Config, mesh: Mesh, *, steps: int = 16) -> dict[str, Any]:
    """Memory of the engine's decode call: ``sampling.num_slots`` slots over the run sampler's
    cache (:func:`tapo_jax.config.sampler_max_len`), ``steps`` tokens per call, whole cache
    attended, weights in the sampling layout (per layer, compute dtype, ``SAMPLE_RULES``).

    XLA:CPU has no bfloat16 matmul: it converts bf16 operands to float32, and hoists the
    converted weights and cache out of the decode loop, so a bf16 program's CPU temporaries
    include float32 copies that a TPU or GPU program does not make. ``temp_gb_native`` is
    the temporaries of the same call compiled in float32, where nothing is converted: an upper
    bound for the bf16 call's temporaries on hardware with bf16 matmuls."""
    import dataclasses

    stats = _decode_memory(cfg, mesh, steps)
    if jnp.dtype(cfg.model.dtype) != jnp.float32:
        f32 = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype="float32"))
        stats["temp_gb_native"] = _decode_memory(f32, mesh, steps)["temp_gb"]
    else:
        stats["temp_gb_native"] = stats["temp_gb"]
    return stats


def _decode_memory(cfg: Config, mesh: Mesh, steps: int) -> dict[str, Any]:
    from tapo_jax.config import sampler_max_len
    from tapo_jax.sampling.engine import Engine
    from tapo_jax.train.state import abstract_params

    s = cfg.sampling
    graphdef, params = abstract_params(cfg.model)
    engine = Engine(graphdef, params, num_slots=s.num_slots, max_len=sampler_max_len(cfg),
                    mesh=mesh)
    abstract = jax.eval_shape(engine.init_decode_state)
    state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                         abstract, engine._state_shardings(abstract))
    v = cfg.model.vocab_size
    k_bound = v if s.top_k == 0 else min(s.top_k, v)
    filtered = bool(s.top_k > 0 or s.top_p < 1.0 or s.min_p > 0.0) and s.temperature > 0
    return memory_stats(lambda: engine._generate.lower(
        engine.params, state, steps=steps, k_bound=k_bound, filtered=filtered, attend_len=None))
