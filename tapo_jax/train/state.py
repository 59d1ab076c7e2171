"""The training state pytree, its optimizer and its shardings.

:class:`TrainState` holds the optimizer step, the model params (an ``nnx.State`` of ``nnx.Param``,
the master weights in ``ModelConfig.param_dtype``) and the optax state. It is created directly in
its shardings: shapes come from ``jax.eval_shape`` and the concrete arrays from one ``jax.jit``
with ``out_shardings``, so no full unsharded copy of the params or optimizer state is ever built.

The optimizer is AdamW after global-norm clipping, with linear warmup followed by a cosine decay
to ``min_lr_ratio * learning_rate`` (or a constant) over the run's optimizer updates
(:class:`tapo_jax.config.OptimConfig`). Weight decay applies to matrices only (ndim >= 2), not to
norm weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tapo_jax.config import Config, ModelConfig, OptimConfig
from tapo_jax.models import sharding as sharding_lib
from tapo_jax.models.qwen3 import Qwen3

Kind = Literal["rl", "sft", "opsd"]

__all__ = [
    "Kind",
    "TrainState",
    "abstract_params",
    "abstract_train_state",
    "create_train_state",
    "lr_schedule",
    "make_optimizer",
    "optim_config_for",
    "split_params",
    "train_state_from_params",
    "train_state_shardings",
]


@flax.struct.dataclass
class TrainState:
    """Everything one optimizer update reads and writes."""

    step: jax.Array  # int32[]  optimizer updates done so far
    params: nnx.State  # nnx.State of nnx.Param (master weights)
    opt_state: optax.OptState  # optax state mirroring ``params``


# --------------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------------


def optim_config_for(cfg: Config, kind: Kind = "rl") -> tuple[OptimConfig, int]:
    """The optimizer settings and the number of optimizer updates of a training stage.

    ``rl`` / ``opsd``: ``cfg.optim`` over ``train.steps * train.ppo_epochs * train.mini_batches``
    updates. ``sft`` (cold start): ``cfg.optim`` with ``cold_start.learning_rate`` and
    ``cold_start.warmup_steps`` over ``cold_start.steps`` updates.
    """
    if kind == "sft":
        cs = cfg.cold_start
        optim = dataclasses.replace(cfg.optim, learning_rate=cs.learning_rate,
                                    warmup_steps=cs.warmup_steps, schedule=cs.schedule)
        return optim, max(cs.steps, 1)
    if kind not in ("rl", "opsd"):
        raise ValueError(f"kind must be 'rl', 'sft' or 'opsd', got {kind!r}")
    t = cfg.train
    return cfg.optim, max(t.steps * t.ppo_epochs * t.mini_batches, 1)


def lr_schedule(optim: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup 0 -> lr over ``warmup_steps``, then cosine down to ``min_lr_ratio * lr`` at
    ``total_steps`` (``schedule="cosine"``) or constant lr (``schedule="constant"``)."""
    lr, warm = optim.learning_rate, optim.warmup_steps
    if optim.schedule == "constant":
        after = optax.constant_schedule(lr)
    else:
        decay = max(total_steps - warm, 1)
        after = optax.cosine_decay_schedule(lr, decay, alpha=optim.min_lr_ratio)
    if warm == 0:
        return after
    warmup = optax.linear_schedule(0.0, lr, warm)
    return optax.join_schedules([warmup, after], [warm])


def _decay_mask(params: Any) -> Any:
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_optimizer(optim: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping at ``grad_clip``, then AdamW with :func:`lr_schedule`."""
    return optax.chain(
        optax.clip_by_global_norm(optim.grad_clip),
        optax.adamw(lr_schedule(optim, total_steps), b1=optim.b1, b2=optim.b2,
                    weight_decay=optim.weight_decay, mask=_decay_mask),
    )


# --------------------------------------------------------------------------------------------
# Shardings and creation
# --------------------------------------------------------------------------------------------


def split_params(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State]:
    """``(graphdef, params)`` of a model whose variables are all ``nnx.Param``."""
    return nnx.split(model, nnx.Param)


def abstract_params(model_cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """``(graphdef, params)`` of ``Qwen3(model_cfg)`` with ``jax.ShapeDtypeStruct`` leaves."""
    return split_params(nnx.eval_shape(lambda: Qwen3(model_cfg, rngs=nnx.Rngs(0))))


def train_state_shardings(aparams: nnx.State, tx: optax.GradientTransformation,
                          mesh: Mesh, rules: Any = None) -> TrainState:
    """NamedShardings of the TrainState: params by their logical axes and ``rules`` (default
    ``TRAIN_RULES``); optimizer moments like their params; counters and scalars replicated."""
    rules = sharding_lib.TRAIN_RULES if rules is None else rules
    params_sh = sharding_lib.state_shardings(aparams, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_opt = jax.eval_shape(tx.init, aparams)
    # optax finds the param-shaped parts by running ``tx.init`` eagerly on a placeholder, which
    # makes its scalar counters on the device: a setup-time transfer, allowed here by name
    with jax.transfer_guard_host_to_device("allow"):
        opt_sh = optax.tree_map_params(
            tx, lambda _, s: s, abstract_opt, params_sh,
            transform_non_params=lambda _: replicated,
            is_leaf=lambda x: isinstance(x, nnx.Variable))
    return TrainState(step=replicated, params=params_sh, opt_state=opt_sh)


def abstract_train_state(model_cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                         rules: Any = None) -> tuple[nnx.GraphDef, TrainState, TrainState]:
    """``(graphdef, abstract_state, shardings)``: the TrainState as ``jax.ShapeDtypeStruct``
    leaves carrying their target shardings (the restore target of checkpoints)."""
    graphdef, aparams = abstract_params(model_cfg)
    shardings = train_state_shardings(aparams, tx, mesh, rules)
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=aparams,
                          opt_state=jax.eval_shape(tx.init, aparams))
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
    return graphdef, abstract, shardings


def create_train_state(model_cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, *,
                       seed: int = 0, rules: Any = None
                       ) -> tuple[nnx.GraphDef, TrainState, TrainState]:
    """A randomly initialised TrainState built inside one jit straight into its shardings.

    Same random draws as ``Qwen3(model_cfg, rngs=nnx.Rngs(seed))``. Returns
    ``(graphdef, state, shardings)``.
    """
    graphdef, aparams = abstract_params(model_cfg)
    shardings = train_state_shardings(aparams, tx, mesh, rules)

    def init() -> TrainState:
        params = split_params(Qwen3(model_cfg, rngs=nnx.Rngs(seed)))[1]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    return graphdef, jax.jit(init, out_shardings=shardings)(), shardings


def train_state_from_params(params: nnx.State, tx: optax.GradientTransformation, mesh: Mesh, *,
                            rules: Any = None, donate: bool = False
                            ) -> tuple[TrainState, TrainState]:
    """A fresh TrainState (step 0, new optimizer state) around existing ``params`` (e.g. from
    :func:`tapo_jax.models.load_hf`), resharded to the training rules inside one jit.
    Returns ``(state, shardings)``. ``donate=True`` lets the new state reuse the params' buffers.
    """
    aparams = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    shardings = train_state_shardings(aparams, tx, mesh, rules)

    def init(p: nnx.State) -> TrainState:
        return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p))

    fn: Callable = jax.jit(init, out_shardings=shardings, donate_argnums=0 if donate else ())
    return fn(params), shardings

