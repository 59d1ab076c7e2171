"""The RL loop: GRPO, TAPO and OPSD in one loop; the algorithm is config (``rl.algorithm``).

Per iteration (paper Algorithm 1):

    sample K per query -> rewards -> [TAPO] DCS -> construction prompts through the same engine
    -> parse + reward constructions -> old log-probs by a teacher-forced forward of every sequence
    (constructions are scored on (x, y_ref), never on the synthesis prompt) -> reference log-probs
    -> advantages (DAE) -> update -> hand new params to the engine.

Forwards skipped when they cannot change the update:

- old log-probs: with one update per rollout batch (``train.ppo_epochs = train.mini_batches =
  1``) the old policy is the state's params, so the update uses its own forward, stop-gradient,
  as the old log-probs (``make_train_step(on_policy=True)``: the same values, one forward less);
- reference log-probs: with ``rl.kl_coef = 0`` the KL term is only measured, so the reference
  forward runs on every ``rl.kl_every``-th step only, and the ``kl`` metric is logged on those
  steps only (``kl_measured`` says which).

Host work (sampling orchestration, rewards, parsing) lives in :mod:`tapo_jax.train.rollout`,
batch assembly and placement in :mod:`tapo_jax.train.assembly`; device work is four jitted functions built once: the teacher-forced
log-prob forward, the advantage computation, the train step and the engine's decode loop.

Several processes: the sampler and the reward function return the same (gathered) results on
every process, so every process builds the same host batch; :func:`~tapo_jax.train.assembly.place_batch` turns it into
global arrays sharded over the mesh (each process supplies its devices' rows), and every
advantage group is complete before normalising.

Around the iterations, :func:`train_loop` runs the periodic work of a run (metrics, progress,
examples, checkpoints) as :class:`Hooks`, each every N steps.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp

from tapo_jax.config import Config, training_kind
from tapo_jax.construction import diagnostics
from tapo_jax.data.tokenizers import pad_id
from tapo_jax.models import sharding as sharding_lib
from tapo_jax.rl.advantages import tapo_advantages
from tapo_jax.train import rollout
from tapo_jax.train.assembly import assemble_batch, assemble_opsd_batch
from tapo_jax.train.distributed import host_array
from tapo_jax.train.step import (average_metrics, make_logprob_fn, make_train_step,
                                 update_on_batch)
from tapo_jax.types import TrainBatch

log = logging.getLogger("tapo_jax")


@dataclass
class LoopContext:
    """What the loop needs besides the config (all built once by :mod:`tapo_jax.train.run`)."""

    graphdef: Any
    mesh: Any
    tokenizer: Any
    sample_fn: Callable[[Any], rollout.SampleFn]  # params -> SampleFn with those params
    encode: Callable[[list[str]], list[list[int]]]
    score: rollout.ScoreFn
    reward_stats: Callable[[], dict]


def make_advantage_fn(cfg: Config, mesh: Any = None
                      ) -> Callable[[TrainBatch], tuple[jax.Array, jax.Array]]:
    """Jitted ``batch -> (advantages, group_ids)`` (Eq. 4-5, DAE per ``rl.decoupled``); with
    ``mesh``, both come back sharded like the batch rows."""
    rl = cfg.rl

    def adv_static(batch: TrainBatch) -> tuple[jax.Array, jax.Array]:
        num_queries = batch.rewards.shape[0]  # an upper bound on query ids (static)
        return tapo_advantages(
            batch.rewards, batch.query_index, batch.is_reflection, batch.row_mask,
            num_queries=num_queries, decoupled=rl.decoupled,
            ref_group_includes_originals=rl.ref_group_includes_originals, eps=rl.adv_eps,
            std_normalize=rl.std_normalize, std_ddof=rl.std_ddof)

    if mesh is None:
        return jax.jit(adv_static)
    rows = sharding_lib.batch_sharding(mesh, 1)
    return jax.jit(adv_static, out_shardings=(rows, rows))

# float32 zeros like a batch's [B, T] arrays, made on their devices (an eager jnp.zeros would
# copy its fill value from the host)
_zeros_like = jax.jit(jnp.zeros_like)


def rl_iteration(cfg: Config, ctx: LoopContext, *, state: Any, ref_params: Any, step: int,
                 records: list[Any], more_records: Callable[[], list[Any]], fns: DeviceFns,
                 sampler_params: Any) -> tuple[Any, dict, list[dict]]:
    """One iteration; returns (new state, metrics, examples)."""
    rl = cfg.rl
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    sample = ctx.sample_fn(sampler_params)
    col = rollout.collect(records, cfg=cfg, tokenizer=ctx.tokenizer, step=step, sample=sample,
                          score=ctx.score, encode=ctx.encode, more_records=more_records)
    timings["time/sampling"] = col.sample_seconds["sampling"]
    timings["time/construction"] = col.sample_seconds["construction"]
    timings["time/reward"] = time.perf_counter() - t0 - timings["time/sampling"] - timings[
        "time/construction"]
    pad = pad_id(ctx.tokenizer)

    t1 = time.perf_counter()
    if rl.algorithm == "opsd":
        batch, bstats, skipped, pad_metrics = assemble_opsd_batch(col, cfg, ctx.mesh, pad,
                                                                  ctx.encode)
        student = batch.student
        lp, _ = fns.logprob(state.params, student)
        ref_lp, _ = fns.logprob(ref_params, student)
        batch = batch.replace(student=student.replace(old_logprobs=lp, ref_logprobs=ref_lp))
        extra = {"opsd/skipped_rows": float(skipped)}
    else:
        batch, bstats, pad_metrics = assemble_batch(col, cfg, ctx.mesh, pad)
        unused = _zeros_like(batch.loss_mask)  # a forward the update does not read
        kl_measured = measures_kl(cfg, step)
        # The forward at the rollout params: the old log-probs, unless the update computes them
        # itself; TAPO's OTS diagnostics read its entropies on the steps that measure the KL.
        diag_forward = rl.algorithm == "tapo" and kl_measured
        old_lp, rollout_lp_ent = unused, None
        if not fns.on_policy or diag_forward:
            lp, ent = jax.block_until_ready(fns.logprob(state.params, batch))
            old_lp = unused if fns.on_policy else lp
            rollout_lp_ent = (lp, ent) if diag_forward else None
        timings["time/logprobs_old"] = time.perf_counter() - t1
        t_ref = time.perf_counter()
        ref_lp = jax.block_until_ready(
            fns.logprob(ref_params, batch)[0]) if kl_measured else unused
        timings["time/logprobs_ref"] = time.perf_counter() - t_ref
        adv, gids = fns.advantages(batch)
        batch = batch.replace(old_logprobs=old_lp, ref_logprobs=ref_lp, advantages=adv,
                              group_ids=gids)
        extra = {"kl_measured": float(kl_measured)}
        if rl.algorithm == "tapo":
            extra.update(_diagnostics(col, batch, rollout_lp_ent, cfg))
    jax.block_until_ready(batch)
    timings["time/logprobs"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    state, history = update_on_batch(fns.step, state, batch, ctx.mesh,
                                     ppo_epochs=cfg.train.ppo_epochs,
                                     mini_batches=cfg.train.mini_batches)
    metrics = {k: float(v) for k, v in jax.device_get(average_metrics(history)).items()}
    if extra.get("kl_measured") == 0.0:
        metrics.pop("kl", None)  # measured against no reference this step
    if metrics.get("num_ref_tokens", 0.0) == 0.0:
        # no reflection token in this batch: the OTS statistics and the reflection loss are
        # undefined (the step reports them as 0); leave them out rather than log a fake 0
        for k in ("ots_weight_mean", "ots_weight_min", "ots_weight_max", "ots_weight_frac_low",
                  "pg_loss_ref"):
            metrics.pop(k, None)
    timings["time/update"] = time.perf_counter() - t2
    timings["time/total"] = time.perf_counter() - t0

    K = rl.num_samples
    lengths = col.response_lengths
    metrics.update(timings)
    metrics.update(extra)
    metrics.update(pad_metrics)
    metrics.update({
        "accuracy": float(col.rewards.mean()),
        "response_length_mean": float(lengths.mean()),
        "response_length_max": float(lengths.max()),
        "response_length_clipped_share": float(col.truncated.mean()),
        "batch/rows": float(bstats.num_rows),
        "batch/padded_rows": float(bstats.rows),
        "batch/length": float(bstats.length),
        "batch/truncated_rows": float(bstats.truncated_rows),
        "tokens/trained": float(bstats.response_tokens),
        "tokens/sampled": float(lengths.sum()),
        "tokens_per_s/sampling": float(lengths.sum() / max(timings["time/sampling"], 1e-9)),
        "tokens_per_s/total": float(lengths.sum() / max(timings["time/total"], 1e-9)),
        "queries": float(col.num_queries),
        "samples_per_query": float(K),
    })
    for k, v in col.stats.items():
        metrics[k if "/" in k else f"tapo/{k}"] = v
    for k, v in ctx.reward_stats().items():
        if isinstance(v, (int, float)):
            metrics[f"reward_pool/{k}"] = float(v)
    return state, metrics, col.examples


def _diagnostics(col: rollout.Collected, batch: TrainBatch, lp_ent: Any,
                 cfg: Config) -> dict[str, float]:
    """Reflection-row advantages (every step) and, when ``lp_ent`` holds the log-probs and
    entropies at the rollout params, OTS weights by region (prefix / reflection phrase /
    continuation) of this iteration (``diag/*``). Arrays are gathered from every process."""
    adv, refl, mask = (host_array(x) for x in (batch.advantages, batch.is_reflection,
                                               batch.row_mask))
    out = diagnostics.advantage_report(adv, refl, mask)
    if lp_ent is None:
        return {f"diag/{k}": v for k, v in out.items()}
    lp, ent = (host_array(x) for x in lp_ent)
    loss_mask = host_array(batch.loss_mask)
    spans = []
    for b, r in enumerate(col.rows):
        if not r.is_reflection or r.reflection_span is None:
            spans.append(None)
            continue
        P = len(r.prompt_ids)
        kept = min(len(r.completion_ids), lp.shape[1] - P)
        spans.append((P, r.reflection_span[0], r.reflection_span[1], kept))
    masks = diagnostics.region_masks(lp.shape, spans)
    out.update(diagnostics.ots_region_report(lp, ent, masks, w_min=cfg.rl.w_min,
                                             w_max=cfg.rl.w_max))
    trained = {k: float((m * loss_mask).sum()) for k, m in masks.items()}
    out.update({f"trained_{k}_tokens": v for k, v in trained.items()})
    return {f"diag/{k}": v for k, v in out.items()}


def on_policy(cfg: Config) -> bool:
    """One update per rollout batch: the old log-probs are the update's own forward."""
    return cfg.rl.algorithm != "opsd" and cfg.train.ppo_epochs == 1 and (
        cfg.train.mini_batches == 1)


def measures_kl(cfg: Config, step: int) -> bool:
    """Whether step ``step`` runs the reference forward (always when the KL is optimised)."""
    return cfg.rl.kl_coef != 0 or step % cfg.rl.kl_every == 0


@dataclass(frozen=True)
class DeviceFns:
    """The jitted functions of the loop, built once (:func:`build_device_fns`)."""

    step: Callable  # (state, batch) -> (state, metrics): the update
    logprob: Callable  # (params, batch) -> (log-probs, entropies), teacher-forced
    advantages: Callable  # batch -> (advantages, group ids)
    on_policy: bool  # the update computes the old log-probs itself


def build_device_fns(cfg: Config, graphdef: Any, mesh: Any, *,
                     old_from_update: bool | None = None) -> DeviceFns:
    """Jitted step, log-prob forward and advantages. ``old_from_update``: the update computes
    the old log-probs itself (default :func:`on_policy`; False forces the separate forward)."""
    kind = training_kind(cfg)
    # log-probs (old, reference, current) at the rollout temperature: the ratio and the policy
    # gradient are then those of the distribution the rollouts were drawn from
    t_roll = cfg.sampling.temperature if cfg.sampling.temperature > 0 else 1.0
    t_step = cfg.rl.opsd_temperature if kind == "opsd" else t_roll
    own = on_policy(cfg) if old_from_update is None else old_from_update
    return DeviceFns(
        on_policy=own,
        step=make_train_step(graphdef, cfg, mesh, kind=kind, temperature=t_step, on_policy=own),
        logprob=make_logprob_fn(graphdef, mesh, micro_batch_size=cfg.train.micro_batch_size,
                                temperature=t_roll),
        advantages=make_advantage_fn(cfg, mesh),
    )


def copy_params(params: Any) -> Any:
    """A real copy (the train step donates its state, so references must not alias it)."""
    return jax.jit(sharding_lib.fresh_copy)(params)


# --------------------------------------------------------------------------------------------
# The loop and its hooks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepInfo:
    """What a hook sees after step ``step`` (1-based: the number of updates done)."""

    step: int
    state: Any
    metrics: dict
    examples: list
    last: bool  # the run's final step


@dataclass
class Hooks:
    """Periodic work around the loop: ``add(fn, every=N)`` runs ``fn(info)`` after every N-th
    step, and also after the last one when ``at_end``."""

    _hooks: list = field(default_factory=list)

    def add(self, fn: Callable[[StepInfo], None], *, every: int = 1,
            at_end: bool = False) -> None:
        if every < 1:
            raise ValueError(f"hook every={every}: must be >= 1")
        self._hooks.append((fn, every, at_end))

    def run(self, info: StepInfo) -> None:
        for fn, every, at_end in self._hooks:
            if info.step % every == 0 or (at_end and info.last):
                fn(info)


def train_loop(cfg: Config, ctx: LoopContext, *, state: Any, ref_params: Any, start: int,
               data_iter: Any, fns: DeviceFns, hooks: Hooks) -> Any:
    """Iterations ``start .. train.steps - 1``, the hooks after each; returns the final state."""
    for step in range(start, cfg.train.steps):
        state, metrics, examples = rl_iteration(
            cfg, ctx, state=state, ref_params=ref_params, step=step, records=next(data_iter),
            more_records=lambda: next(data_iter), fns=fns, sampler_params=state.params)
        hooks.run(StepInfo(step + 1, state, metrics, examples, step + 1 == cfg.train.steps))
    return state
