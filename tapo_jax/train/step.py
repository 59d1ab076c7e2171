"""The jit-compiled training step: ``(state, batch) -> (state, metrics)``.

One pure function per training kind, jitted once per batch shape with explicit in/out shardings
on the mesh (params by ``TRAIN_RULES``, the batch's leading dim over ``("data", "fsdp")``) and
the state donated:

- ``rl``: the TAPO objective (Eq. 8; GRPO when ``rl.algorithm == "grpo"``, where reflection rows
  are dropped) from :mod:`tapo_jax.rl.objective`, on per-token log-probs and entropies of the
  current policy.
- ``sft``: maximum likelihood (token-mean negative log-likelihood) on the ``loss_mask`` tokens of
  real rows (cold start).
- ``opsd``: on-policy self-distillation; the same model, fed the teacher prompt, is the teacher
  (under stop-gradient) on the student's own response tokens (:class:`OPSDBatch`).

Inside the step the model runs in functional form (``nnx.merge(graphdef, params)``) and returns
its final hidden states; log-probs of ``tokens[:, t]`` come from position ``t - 1`` through the
lm head one vocabulary chunk at a time, so no float32 [B, T, V] copy is built (OPSD needs full
distributions and builds [b, T, V] logits per micro-batch b). Column 0 of every per-token output
is 0 (nothing predicts the first token), matching :mod:`tapo_jax.types`.

Micro-batches (``train.micro_batch_size``) accumulate gradients and the loss's sums and counts in
a ``lax.scan``; each micro-batch loss is divided by the *full* batch's denominators, so the
accumulated gradient equals the full-batch gradient. Micro-batch ``m`` takes rows
``m, m + M, m + 2M, ...`` so every micro-batch stays spread over the batch-sharded devices.

Metrics come back as one pytree of float32 scalars (no host sync inside the step), including
``grad_norm`` (before clipping), ``learning_rate`` (of this update) and ``step`` (after it).
Letters: B rows, T length, D model dim, V vocabulary, M micro-batches.

Over 400 lines on purpose: the three training kinds share the forward, the micro-batch
accumulation and the jitted step's shardings; one file keeps the step one pure function.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Literal, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tapo_jax.config import Config
from tapo_jax.models import sharding as sharding_lib
from tapo_jax.rl import logprobs, objective, opsd, packing as packing_lib
from tapo_jax.train.state import (TrainState, abstract_params, lr_schedule, make_optimizer,
                                  optim_config_for, train_state_shardings)
from tapo_jax.types import TrainBatch

__all__ = [
    "DEFAULT_VOCAB_CHUNK",
    "OPSDBatch",
    "average_metrics",
    "make_logprob_fn",
    "make_train_step",
    "split_minibatches",
    "token_logprobs",
    "update_on_batch",
]

DEFAULT_VOCAB_CHUNK = 8192  # vocabulary columns per lm-head chunk
_BIG = float(jnp.finfo(jnp.float32).max)


@flax.struct.dataclass
class OPSDBatch:
    """Student rollouts plus the teacher's view of the same responses.

    The teacher row holds the teacher prompt (question plus a correct solution) followed by the
    student's response. ``teacher_loss_mask`` marks the response tokens in the teacher row: its
    k-th marked token is the student's k-th trained token (``student.loss_mask``), so both rows
    must mark the same number of tokens (extra student tokens are not distilled).
    """

    student: TrainBatch
    teacher_tokens: jax.Array  # int32[B, T2]
    teacher_positions: jax.Array  # int32[B, T2]
    teacher_attention_mask: jax.Array  # int32[B, T2]
    teacher_loss_mask: jax.Array  # float32[B, T2]
    teacher_packing: Any = None  # tapo_jax.rl.packing.Packing of the teacher rows, or None


# --------------------------------------------------------------------------------------------
# Forward: per-token log-probs and entropy
# --------------------------------------------------------------------------------------------


def _mesh_context(mesh: Mesh | None):
    """The mesh as the trace's abstract mesh: kernels XLA cannot partition (the Pallas splash
    attention) map themselves over its batch shards (``models/attention.py``)."""
    if mesh is None:
        return contextlib.nullcontext()
    return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def _shift_right(x: jax.Array) -> jax.Array:
    """[B, T-1] -> [B, T] with a zero column 0."""
    return jnp.pad(x, ((0, 0), (1, 0)))


def token_logprobs(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array,
                   positions: jax.Array, attention_mask: jax.Array, *,
                   chunk_size: int = DEFAULT_VOCAB_CHUNK, temperature: float = 1.0,
                   mesh: Mesh | None = None, segment_ids: jax.Array | None = None
                   ) -> tuple[jax.Array, jax.Array]:
    """Teacher-forced log p(tokens[:, t] | tokens[:, :t]) and the entropy of that distribution,
    float32[B, T] each (column 0 is 0). Differentiable in ``params``; chunked over V.

    ``segment_ids`` int32[B, T] (packed rows, 0 = padding): tokens attend only within their
    segment; ``positions`` must then restart per segment. The value at the first token of a
    segment predicts it from the previous segment's last hidden state: mask it out.

    With ``mesh``, the hidden states keep their batch sharding and the lm head is gathered over
    the model dim (its vocabulary dim stays split over ``tensor``), as FSDP does for every weight.
    """
    model = nnx.merge(graphdef, params)
    with _mesh_context(mesh):
        hidden = model(tokens, positions, attention_mask, segment_ids=segment_ids,
                       return_hidden=True)  # [B, T, D]
    weight = model.head_weight().astype(hidden.dtype)
    if mesh is not None:
        hidden = jax.lax.with_sharding_constraint(
            hidden, NamedSharding(mesh, PartitionSpec(sharding_lib.BATCH_AXES)))
        weight = jax.lax.with_sharding_constraint(weight, sharding_lib.logical_sharding(
            mesh, ("vocab", None), sharding_lib.TRAIN_RULES, weight.shape))
    lp, ent = logprobs.chunked_logprobs_and_entropy(
        hidden[:, :-1], weight, tokens[:, 1:], chunk_size=chunk_size, weight_layout="VD",
        temperature=temperature)
    return _shift_right(lp), _shift_right(ent)


def rows_logprobs(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array,
                  positions: jax.Array, attention_mask: jax.Array, packing: Any = None,
                  **kw) -> tuple[jax.Array, jax.Array]:
    """:func:`token_logprobs` of [B, T] rows, run on their packed rows when ``packing``
    (:class:`tapo_jax.rl.packing.Packing`) is given and mapped back to [B, T]: then 0 at
    column 0 and at padding."""
    if packing is None:
        return token_logprobs(graphdef, params, tokens, positions, attention_mask, **kw)
    p = packing
    lp, ent = token_logprobs(graphdef, params, p.tokens, p.positions, p.segment_ids > 0,
                             segment_ids=p.segment_ids, **kw)
    valid = (jnp.asarray(attention_mask) > 0) & (jnp.arange(tokens.shape[1]) > 0)[None, :]
    return packing_lib.unpack(lp, p.index, valid), packing_lib.unpack(ent, p.index, valid)


def rows_hidden(model: nnx.Module, tokens: jax.Array, positions: jax.Array,
                attention_mask: jax.Array, packing: Any = None) -> jax.Array:
    """Final hidden states [B, T, D] of [B, T] rows (run packed when ``packing`` is given)."""
    if packing is None:
        return model(tokens, positions, attention_mask, return_hidden=True)
    p = packing
    hidden = model(p.tokens, p.positions, p.segment_ids > 0, segment_ids=p.segment_ids,
                   return_hidden=True)
    return packing_lib.unpack(hidden, p.index, jnp.asarray(attention_mask) > 0)


# --------------------------------------------------------------------------------------------
# Micro-batching
# --------------------------------------------------------------------------------------------


def _num_micro(rows: int, micro_batch_size: int) -> int:
    if micro_batch_size <= 0 or micro_batch_size >= rows:
        return 1
    if rows % micro_batch_size:
        raise ValueError(f"train.micro_batch_size = {micro_batch_size} must divide the batch's "
                         f"{rows} rows")
    return rows // micro_batch_size


def _split_micro(tree: Any, m: int, mesh: Mesh) -> Any:
    """[B, ...] -> [M, B/M, ...]; micro-batch i holds rows i, i + M, ... (strided)."""
    spec = NamedSharding(mesh, PartitionSpec(None, sharding_lib.BATCH_AXES))

    def split(x):
        y = x.reshape(x.shape[0] // m, m, *x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(y, spec)

    return jax.tree.map(split, tree)


def _merge_micro(x: jax.Array) -> jax.Array:
    """Inverse of :func:`_split_micro` for one [M, B/M, ...] array."""
    return x.swapaxes(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _merge_terms(a: dict, b: dict) -> dict:
    return objective.merge_loss_terms(a, b)


def _identity_terms(abstract: dict) -> dict:
    """Neutral elements of :func:`_merge_terms` (0 for sums, +-max for min/max)."""
    def init(k, a):
        v = _BIG if k.endswith("/min") else -_BIG if k.endswith("/max") else 0.0
        return jnp.full(a.shape, v, a.dtype)

    return {k: init(k, a) for k, a in abstract.items()}


def _accumulate(loss_fn: Callable, params: nnx.State, batch: Any, m: int, mesh: Mesh
                ) -> tuple[nnx.State, dict]:
    """Sum of ``grad(loss_fn)`` and merged terms over M micro-batches (lax.scan).

    ``loss_fn(params, micro_batch) -> (loss, terms)`` with losses already divided by the full
    batch's denominators, so their sum is the full-batch loss.
    """
    grad_fn = jax.grad(loss_fn, has_aux=True)
    if m == 1:
        return grad_fn(params, batch)
    micro = _split_micro(batch, m, mesh)
    first = jax.tree.map(lambda x: x[0], micro)
    abstract_terms = jax.eval_shape(lambda p, b: loss_fn(p, b)[1], params, first)
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

    def body(carry, mb):
        g_acc, t_acc = carry
        g, t = grad_fn(params, mb)
        g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
        return (g_acc, _merge_terms(t_acc, t)), None

    (grads, terms), _ = jax.lax.scan(body, (zeros, _identity_terms(abstract_terms)), micro)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    return grads, terms


# --------------------------------------------------------------------------------------------
# Loss functions of the three kinds: (params, micro_batch) -> (loss, terms)
# --------------------------------------------------------------------------------------------


def _rl_prepare(batch: TrainBatch, cfg: Config) -> TrainBatch:
    if cfg.rl.algorithm == "grpo":  # GRPO: reflection rows are padding
        keep = jnp.asarray(batch.row_mask, jnp.float32) * (~jnp.asarray(batch.is_reflection, bool))
        batch = batch.replace(row_mask=keep)
    return batch


def _rl_loss_fn(graphdef, cfg: Config, full: TrainBatch, chunk: int, temperature: float, mesh,
                on_policy: bool = False):
    denominators = objective.tapo_loss_denominators(full, cfg.rl)

    def loss_fn(params, mb: TrainBatch):
        lp, ent = rows_logprobs(graphdef, params, mb.tokens, mb.positions, mb.attention_mask,
                                mb.packing, chunk_size=chunk, temperature=temperature, mesh=mesh)
        old = jax.lax.stop_gradient(lp) if on_policy else mb.old_logprobs
        terms = objective.tapo_loss_terms(lp, old, ent, mb, cfg.rl)
        return objective.loss_from_terms(terms, cfg.rl, denominators), terms

    def finish(terms):
        return objective.metrics_from_terms(terms, cfg.rl)

    return loss_fn, finish


def _sft_mask(b: TrainBatch) -> jax.Array:
    return jnp.asarray(b.loss_mask, jnp.float32) * jnp.asarray(b.row_mask, jnp.float32)[:, None]


def _sft_loss_fn(graphdef, cfg: Config, full: TrainBatch, chunk: int, temperature: float, mesh):
    # loss_mask may weight tokens (cold_start.decision_weight); the loss is the weighted NLL
    # divided by the number of trained tokens, so weights > 1 add to those tokens' gradient
    # without scaling down every other token's
    total = jnp.maximum(jnp.sum((_sft_mask(full) > 0).astype(jnp.float32)), 1.0)

    def loss_fn(params, mb: TrainBatch):
        lp, ent = rows_logprobs(graphdef, params, mb.tokens, mb.positions, mb.attention_mask,
                                mb.packing, chunk_size=chunk, temperature=temperature, mesh=mesh)
        mask = _sft_mask(mb)
        on = mask > 0
        nll = -jnp.sum(jnp.where(on, lp, 0.0) * mask)
        terms = {"nll/sum": jax.lax.stop_gradient(nll),
                 "tokens": jnp.sum(on.astype(jnp.float32)),
                 "entropy/sum": jax.lax.stop_gradient(jnp.sum(jnp.where(on, ent, 0.0)))}
        return nll / total, terms

    def finish(t):
        n = jnp.maximum(t["tokens"], 1.0)
        return {"loss": t["nll/sum"] / n, "entropy": t["entropy/sum"] / n,
                "num_tokens": t["tokens"]}

    return loss_fn, finish


def _opsd_loss_fn(graphdef, cfg: Config, full: OPSDBatch, chunk: int, temperature: float, mesh):
    del chunk  # the divergence needs whole distributions
    agg = "token-mean"
    mask_full = _sft_mask(full.student)
    total = jnp.maximum(
        objective.aggregate_terms(jnp.zeros_like(mask_full), mask_full, mode=agg)[1], 1.0)

    def loss_fn(params, mb: OPSDBatch):
        s = mb.student
        model = nnx.merge(graphdef, params)
        teacher = nnx.merge(graphdef, jax.lax.stop_gradient(params))
        with _mesh_context(mesh):
            s_hidden = rows_hidden(model, s.tokens, s.positions, s.attention_mask, s.packing)
            t_hidden = rows_hidden(teacher, mb.teacher_tokens, mb.teacher_positions,
                                   mb.teacher_attention_mask, mb.teacher_packing)
        # k-th trained student token <-> k-th marked teacher token.
        mask = _sft_mask(s)
        t_mask = jnp.asarray(mb.teacher_loss_mask, jnp.float32) > 0
        rank = jnp.cumsum(mask > 0, axis=1) - 1  # [B, T]
        mask = mask * (rank < jnp.sum(t_mask, axis=1, keepdims=True))
        order = jnp.argsort(~t_mask, axis=1, stable=True)  # marked teacher positions first
        t_idx = jnp.take_along_axis(order, jnp.clip(rank, 0, order.shape[1] - 1), axis=1)
        t_src = jnp.maximum(t_idx - 1, 0)  # hidden state that predicts the teacher token
        t_h = jnp.take_along_axis(t_hidden, t_src[..., None], axis=1)  # [B, T, D]
        s_h = jnp.pad(s_hidden[:, :-1], ((0, 0), (1, 0), (0, 0)))  # position t-1 predicts t
        s_logits = model.logits_from_hidden(s_h)
        t_logits = teacher.logits_from_hidden(t_h)
        loss, m = opsd.opsd_loss(
            s_logits, t_logits, mask, beta=cfg.rl.opsd_beta, temperature=temperature,
            top_k=cfg.rl.opsd_top_k, loss_agg=agg)
        count = objective.aggregate_terms(jnp.zeros_like(mask), mask, mode=agg)[1]
        num = loss * jnp.maximum(count, 1.0)
        terms = {"opsd/sum": jax.lax.stop_gradient(num), "opsd/count": count,
                 "opsd/tokens": m["opsd_tokens"], "opsd_div/max": m["opsd_div_max"]}
        return num / total, terms

    def finish(t):
        loss = t["opsd/sum"] / jnp.maximum(t["opsd/count"], 1.0)
        return {"loss": loss, "opsd_loss": loss, "opsd_tokens": t["opsd/tokens"],
                "opsd_div_max": t["opsd_div/max"]}

    return loss_fn, finish


_KINDS = {"rl": _rl_loss_fn, "sft": _sft_loss_fn, "opsd": _opsd_loss_fn}


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------


def make_train_step(graphdef: nnx.GraphDef, cfg: Config, mesh: Mesh, *,
                    kind: Literal["rl", "sft", "opsd"] = "rl", rules: Any = None,
                    chunk_size: int = DEFAULT_VOCAB_CHUNK, temperature: float = 1.0,
                    donate: bool = True, on_policy: bool = False
                    ) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
    """The jitted step ``(state, batch) -> (new_state, metrics)``.

    Args:
      graphdef: the model's graph (``tapo_jax.train.state.split_params``).
      cfg: the run config: ``cfg.model`` must describe the params of ``graphdef``; the objective
        comes from ``cfg.rl`` (``rl``), ``cfg.train.micro_batch_size`` sets micro-batching, and
        the optimizer from :func:`tapo_jax.train.state.optim_config_for` (``cfg.optim``; for
        ``sft`` with the cold-start learning rate and warmup). Build the state with the same
        ``(cfg, kind)`` (``make_optimizer(*optim_config_for(cfg, kind))``).
      mesh: the (data, fsdp, tensor) mesh; ``rules`` default ``TRAIN_RULES``.
      kind: ``"rl"`` (batch: TrainBatch with advantages, old and ref log-probs), ``"sft"``
        (TrainBatch; only tokens, positions, masks are read) or ``"opsd"`` (:class:`OPSDBatch`).
      chunk_size: vocabulary columns per lm-head chunk.
      temperature: logits are divided by it before log-probs and entropies (use the same value
        in :func:`make_logprob_fn` for the old log-probs).
      donate: donate the input state's buffers to the output.
      on_policy: (``rl``) the old log-probs are the step's own forward, stop-gradient, and
        ``batch.old_logprobs`` is not read. Exact when the batch was sampled with the state's
        params and gets a single update (``ppo_epochs = mini_batches = 1``): the old policy is
        then the current one, and this saves the separate teacher-forced forward.

    Batch rows must be divisible by ``data * fsdp`` mesh devices and by the micro-batch size.
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {sorted(_KINDS)}, got {kind!r}")
    optim, total_steps = optim_config_for(cfg, kind)
    tx = make_optimizer(optim, total_steps)
    schedule = lr_schedule(optim, total_steps)
    state_sh = train_state_shardings(abstract_params(cfg.model)[1], tx, mesh, rules)
    batch_sh = NamedSharding(mesh, PartitionSpec(sharding_lib.BATCH_AXES))
    replicated = NamedSharding(mesh, PartitionSpec())
    build_loss = _KINDS[kind]
    if on_policy:
        if kind != "rl":
            raise ValueError(f"on_policy applies to kind 'rl', got {kind!r}")
        build_loss = functools.partial(_rl_loss_fn, on_policy=True)
    micro_batch_size = cfg.train.micro_batch_size

    def step(state: TrainState, batch: Any) -> tuple[TrainState, dict]:
        if kind == "rl":
            batch = _rl_prepare(batch, cfg)
        rows = jax.tree.leaves(batch)[0].shape[0]
        m = _num_micro(rows, micro_batch_size)
        loss_fn, finish = build_loss(graphdef, cfg, batch, chunk_size, temperature, mesh)
        grads, terms = _accumulate(loss_fn, state.params, batch, m, mesh)
        metrics = finish(terms)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics.update(grad_norm=grad_norm, learning_rate=schedule(state.step),
                       step=(state.step + 1))
        metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return jax.jit(step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated),
                   donate_argnums=(0,) if donate else ())


def make_logprob_fn(graphdef: nnx.GraphDef, mesh: Mesh, *,
                    chunk_size: int = DEFAULT_VOCAB_CHUNK, temperature: float = 1.0,
                    micro_batch_size: int = 0
                    ) -> Callable[[nnx.State, Any], tuple[jax.Array, jax.Array]]:
    """Jitted teacher-forced ``(params, batch) -> (logprobs, entropy)``, float32[B, T] each.

    For old (rollout-policy) and reference log-probs. ``batch`` is any pytree with ``tokens``,
    ``positions`` and ``attention_mask`` of shape [B, T] (e.g. a TrainBatch); it is placed with
    its leading dim over ``("data", "fsdp")``; params keep the shardings they arrive with.
    ``micro_batch_size`` > 0 runs the forward over strided micro-batches (``lax.map``) to bound
    activation memory. Column 0 of both outputs is 0. A batch with a ``packing`` runs on its
    packed rows (then padding is 0 too).
    """
    batch_sh = NamedSharding(mesh, PartitionSpec(sharding_lib.BATCH_AXES))

    def run(params, tokens, positions, attention_mask, packing):
        arrays = (tokens, positions, attention_mask, packing)
        m = _num_micro(tokens.shape[0], micro_batch_size)

        def fwd(x):
            return rows_logprobs(graphdef, params, *x, chunk_size=chunk_size,
                                 temperature=temperature, mesh=mesh)

        if m == 1:
            return fwd(arrays)
        lp, ent = jax.lax.map(fwd, _split_micro(arrays, m, mesh))
        return _merge_micro(lp), _merge_micro(ent)

    jitted = jax.jit(run, out_shardings=(batch_sh, batch_sh))

    def logprob_fn(params: nnx.State, batch: Any) -> tuple[jax.Array, jax.Array]:
        arrays = jax.device_put((batch.tokens, batch.positions, batch.attention_mask,
                                 getattr(batch, "packing", None)), batch_sh)
        return jitted(params, *arrays)

    def lower(params: nnx.State, batch: Any) -> jax.stages.Lowered:
        """The compiled program for (possibly abstract) params and batch, for analysis."""
        return jitted.lower(params, batch.tokens, batch.positions, batch.attention_mask,
                            getattr(batch, "packing", None))

    logprob_fn.lower = lower
    return logprob_fn


# --------------------------------------------------------------------------------------------
# PPO epochs and mini-batches (host loop over the jitted step)
# --------------------------------------------------------------------------------------------


def split_minibatches(batch: Any, n: int, mesh: Mesh) -> list[Any]:
    """``n`` mini-batches of ``batch`` (rows i, i + n, i + 2n, ... for mini-batch i), each placed
    on the devices with its leading dim over ``("data", "fsdp")`` (also for ``n == 1``, so the
    jitted step always sees device arrays and compiles once per shape)."""
    sh = NamedSharding(mesh, PartitionSpec(sharding_lib.BATCH_AXES))
    if n == 1:
        return [jax.device_put(batch, sh)]
    rows = jax.tree.leaves(batch)[0].shape[0]
    if rows % n:
        raise ValueError(f"train.mini_batches = {n} must divide the batch's {rows} rows")
    return _splitter(n, sh)(batch)


@functools.lru_cache(maxsize=None)
def _splitter(n: int, sharding: NamedSharding) -> Callable:
    """One jitted splitter per (n, sharding): built once, so it compiles once per batch shape."""
    return jax.jit(lambda b: [jax.tree.map(lambda x: x[i::n], b) for i in range(n)],
                   out_shardings=sharding)


def update_on_batch(train_step: Callable, state: TrainState, batch: Any, mesh: Mesh, *,
                    ppo_epochs: int = 1, mini_batches: int = 1
                    ) -> tuple[TrainState, list[dict]]:
    """``ppo_epochs`` passes over ``mini_batches`` strided mini-batches of one rollout batch, one
    optimizer update each (each mini-batch normalises its loss by its own counts). Returns the
    new state and the metrics of every update (device arrays, not synchronised)."""
    parts = split_minibatches(batch, mini_batches, mesh)
    history = []
    for _ in range(ppo_epochs):
        for part in parts:
            state, metrics = train_step(state, part)
            history.append(metrics)
    return state, history


def average_metrics(history: Sequence[dict]) -> dict:
    """Mean of each metric over updates; ``step`` and ``learning_rate`` of the last update."""
    if len(history) == 1:
        return dict(history[0])
    out = {k: jnp.mean(jnp.stack([h[k] for h in history])) for k in history[0]}
    for k in ("step", "learning_rate"):
        if k in history[-1]:
            out[k] = history[-1][k]
    return out

