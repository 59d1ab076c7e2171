"""Device mesh and the logical-axis rules that place params, batches and caches on it.

Mesh axes are ("data", "fsdp", "tensor"). Model code names only logical axes (see
:mod:`tapo_jax.models.qwen3`); the rule tables below map each logical name to mesh axes:

* ``TRAIN_RULES``: params sharded over ``fsdp`` (the model dim) and ``tensor`` (heads, mlp,
  vocab); batches over ``data`` x ``fsdp``.
* ``SAMPLE_RULES``: the same without ``fsdp`` on params (each weight is whole along the model dim,
  so decoding never gathers weights); batches and caches over ``data`` x ``fsdp``.

A mesh axis that does not divide the dimension it would shard is dropped for that dimension
(e.g. 2 kv heads on a tensor axis of 4 stay replicated), so any model fits any mesh.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from tapo_jax.config import ConfigError, MeshConfig, validate_mesh

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

Rules = Mapping[str, Any]  # logical name -> mesh axis name, tuple of names, or None

TRAIN_RULES: dict[str, Any] = {
    "batch": BATCH_AXES,
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "norm": None,
    "layers": None,  # the stacked layer axis of scan_layers: every device holds every layer
}

SAMPLE_RULES: dict[str, Any] = dict(TRAIN_RULES, embed=None)


def make_mesh(cfg: MeshConfig, devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over ``devices`` (default: all); one axis may be -1."""
    validate_mesh(cfg)
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": cfg.data, "fsdp": cfg.fsdp, "tensor": cfg.tensor}
    free = [name for name, size in sizes.items() if size == -1]
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if len(devices) % fixed:
            raise ConfigError(
                f"mesh.{free[0]} = -1: {len(devices)} devices are not divisible by the product "
                f"{fixed} of the other axes {sizes}")
        sizes[free[0]] = len(devices) // fixed
    if math.prod(sizes.values()) != len(devices):
        raise ConfigError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, "
                          f"{len(devices)} are available")
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except (AssertionError, ValueError, NotImplementedError):
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _as_tuple(target: Any) -> tuple[str, ...]:
    if target is None:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)


def logical_spec(mesh: Mesh, logical_axes: Sequence[Optional[str]], rules: Rules,
                 shape: Optional[Sequence[int]] = None) -> PartitionSpec:
    """PartitionSpec for ``logical_axes``. With ``shape``, mesh axes that do not divide their
    dimension are dropped (keeping the longest dividing prefix); no mesh axis is used twice."""
    used: set[str] = set()
    spec = []
    for i, name in enumerate(logical_axes):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise ValueError(f"logical axis {name!r} has no sharding rule; known: {sorted(rules)}")
        axes = [a for a in _as_tuple(rules[name]) if a in mesh.shape and a not in used]
        if shape is not None:
            while axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
                axes.pop()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*spec)


def logical_sharding(mesh: Mesh, logical_axes: Sequence[Optional[str]], rules: Rules,
                     shape: Optional[Sequence[int]] = None) -> NamedSharding:
    """NamedSharding for an array whose dims carry ``logical_axes`` (see :func:`logical_spec`)."""
    return NamedSharding(mesh, logical_spec(mesh, logical_axes, rules, shape))


def variable_sharding(var: nnx.Variable, mesh: Mesh, rules: Rules) -> NamedSharding:
    """The NamedSharding of one (possibly abstract) nnx Variable from its logical axes."""
    shape = tuple(var.value.shape)
    axes = var.get_metadata().get("out_sharding") or (None,) * len(shape)
    return logical_sharding(mesh, axes, rules, shape)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules) -> nnx.State:
    """The pytree of NamedShardings matching ``state`` (concrete or abstract)."""
    return jax.tree.map(lambda v: v.replace(variable_sharding(v, mesh, rules)), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules) -> nnx.Module:
    """A copy of ``model`` whose params are placed by ``rules`` on ``mesh``."""
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, state_shardings(state, mesh, rules))
    return nnx.merge(graphdef, state)


def put_global(shape: tuple[int, ...], sharding: Any, read: Any) -> jax.Array:
    """A global array of ``shape`` with ``sharding`` whose shards this process reads from the
    host (``read(index) -> np.ndarray`` for each of its devices' slices) and puts on their
    devices explicitly (``jax.make_array_from_callback`` with explicit transfers)."""
    shards = [jax.device_put(read(index), device) for device, index
              in sharding.addressable_devices_indices_map(shape).items()]
    return jax.make_array_from_single_device_arrays(shape, sharding, shards)


def fresh_copy(tree: Any) -> Any:
    """The values of ``tree`` in new buffers when traced inside a jit (``x + 0`` is not folded
    into an alias), so a copy survives the donation of the original."""
    return jax.tree.map(lambda x: x + jnp.zeros((), x.dtype), tree)


def data_parallel_size(mesh: Mesh) -> int:
    """Devices a batch's rows are split over (``data`` x ``fsdp``): row counts are multiples."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) dim over data x fsdp, the other ``ndim - 1`` dims replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def cache_shardings(cache: Any, mesh: Mesh, rules: Rules) -> Any:
    """Shardings of a :class:`~tapo_jax.models.qwen3.KVCache`: batch dim by the ``batch`` rule,
    kv heads by the ``kv_heads`` rule, each only where it divides."""
    k_axes = ("batch", "kv_heads", None, None)  # per layer keys [B, K, H, S], values [B, K, S, H]
    return type(cache)(
        k=tuple(logical_sharding(mesh, k_axes, rules, x.shape) for x in cache.k),
        v=tuple(logical_sharding(mesh, k_axes, rules, x.shape) for x in cache.v),
        pos=logical_sharding(mesh, ("batch", None), rules, cache.pos.shape),
    )


def create_sharded_model(cfg: Any, mesh: Mesh, rules: Rules, *, seed: int = 0) -> nnx.Module:
    """A randomly initialised Qwen3 (``cfg``: ModelConfig) whose params are created directly in
    their shardings: abstract init via ``nnx.eval_shape``, then one jitted init with
    ``out_shardings`` (no full host or single-device copy). Same random draws as
    ``Qwen3(cfg, rngs=nnx.Rngs(seed))`` (up to last-ulp rounding under jit)."""
    from tapo_jax.models.qwen3 import Qwen3

    def init() -> nnx.State:
        return nnx.split(Qwen3(cfg, rngs=nnx.Rngs(seed)))[1]

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Qwen3(cfg, rngs=nnx.Rngs(seed))))
    state = jax.jit(init, out_shardings=state_shardings(abstract, mesh, rules))()
    return nnx.merge(graphdef, state)
