"""The TAPO objective and its parts, paper "Learning from Your Own Mistakes" (arXiv 2606.18844).

A GRPO batch is a TAPO batch without reflection rows (the training step drops them for
``rl.algorithm = grpo``). The per-token log-probs and entropies come from
:mod:`tapo_jax.rl.logprobs`; the OPSD baseline's divergence is in :mod:`tapo_jax.rl.opsd`.

Departures from plain GRPO (Eq. 2), all switchable through :class:`tapo_jax.config.RLConfig`:

- the constructed trajectories y_ref form a second loss term L_ref, aggregated over their own
  sequences and added with weight ``lam`` (Eq. 8: L_TAPO = L_GRPO + lambda * L_ref);
- their advantages come from their own groups (DAE, Eq. 4-5, see :mod:`tapo_jax.rl.advantages`);
- every token of L_ref is weighted by the OOD Token Suppression weight
  w_t = clamp(exp(log p_t + H_t), w_min, w_max) under stop-gradient (OTS, Eq. 6-7);
- ablations: ``ots`` off, ``negatives`` off (failed constructions, reward 0, are masked out),
  ``sft_only`` (L_ref becomes the negative log-likelihood of the successful constructions).

The clipped surrogate is PPO's with clip-higher (``eps_low``/``eps_high``) and optional dual clip.
A KL penalty to a reference policy (k1/k2/k3) and an entropy bonus are optional (coefficients 0 by
default) but KL and entropy are always reported.

Alignment (see :mod:`tapo_jax.types`): per-token arrays are [B, T]; entry [b, t] belongs to the
prediction of ``tokens[b, t]``. Letters: B rows, T length, D model dim, V vocabulary.

Micro-batching. Every loss term is a ratio ``sum / count`` whose count depends only on the masks.
:func:`tapo_loss_terms` returns these sums and counts (plus metric sums, minima and maxima);
terms of disjoint row sets combine with :func:`merge_loss_terms` (add; min/max for extremes), and
:func:`loss_from_terms` / :func:`metrics_from_terms` finish them. To accumulate gradients over
micro-batches, compute the full batch's counts once with :func:`tapo_loss_denominators` and pass
them as ``denominators=`` to :func:`tapo_loss` for every micro-batch: the micro-batch losses and
gradients then *add up* to the full-batch loss and gradient exactly (up to float rounding).

Over 400 lines on purpose: the per-token pieces, the terms in sum-and-count form and the
metrics finished from them share every mask and term name.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import jax
import jax.numpy as jnp

from tapo_jax.config import RLConfig
from tapo_jax.types import TrainBatch

__all__ = [
    "AGG_MODES",
    "ots_weights",
    "clipped_surrogate",
    "clip_indicators",
    "aggregate",
    "aggregate_terms",
    "kl_divergence",
    "tapo_loss_terms",
    "tapo_loss_denominators",
    "merge_loss_terms",
    "loss_from_terms",
    "metrics_from_terms",
    "tapo_loss",
]

AggMode = Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
AGG_MODES = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
LOG_RATIO_CLAMP = 20.0  # |log pi/pi_old| is clamped to this before exp
KL_CLAMP = 10.0  # k3 values are clamped to [-KL_CLAMP, KL_CLAMP]
OTS_LOW_THRESHOLD = 0.1  # metric: share of reflection tokens with w_t below this

# --------------------------------------------------------------------------------------------
# Per-token pieces: OTS weights (Eq. 7), clipped surrogate (Eq. 2, 6), KL
# --------------------------------------------------------------------------------------------


def ots_weights(
    logprobs: jax.Array, entropy: jax.Array, *, w_min: float = 0.01, w_max: float = 10.0
) -> jax.Array:
    """OOD Token Suppression weights, paper Eq. 7, float32[B, T], under stop-gradient.

    s_t = log p(y_t | x, y_<t) + H_t and w_t = clamp(exp(s_t), w_min, w_max). ``s`` is clamped to
    [log w_min, log w_max] *before* exp, so large positive s never overflows; w = 1 exactly when
    logprob = -entropy. No gradient flows into ``logprobs`` or ``entropy``.
    """
    if not 0 < w_min <= w_max:
        raise ValueError(f"ots_weights needs 0 < w_min <= w_max, got w_min={w_min}, "
                         f"w_max={w_max}")
    s = jax.lax.stop_gradient(logprobs.astype(jnp.float32) + entropy.astype(jnp.float32))
    s = jnp.clip(s, math.log(w_min), math.log(w_max))
    return jnp.clip(jnp.exp(s), w_min, w_max)


def _ratio_terms(logprobs, old_logprobs, advantages):
    lp = logprobs.astype(jnp.float32)
    adv = jnp.asarray(advantages, jnp.float32)
    if adv.ndim == lp.ndim - 1:
        adv = adv[..., None]
    log_ratio = jnp.clip(lp - old_logprobs.astype(jnp.float32), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return jnp.exp(log_ratio), jnp.broadcast_to(adv, lp.shape)


def clipped_surrogate(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    advantages: jax.Array,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip_c: Optional[float] = None,
) -> jax.Array:
    """Per-token clipped policy-gradient loss (the summand of Eq. 2 and Eq. 6), float32[B, T].

    loss_t = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A), rho_t = exp(logp - old_logp)
    with the log-ratio clamped to +-20 before exp. With ``dual_clip_c`` (> 1) the loss of tokens
    with A < 0 is further capped at -c A (dual-clip PPO). ``advantages`` is [B] (one per
    sequence) or [B, T]. Masking and aggregation are left to :func:`aggregate`.
    """
    ratio, adv = _ratio_terms(logprobs, old_logprobs, advantages)
    loss = jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high))
    if dual_clip_c is not None:
        loss = jnp.where(adv < 0, jnp.minimum(loss, -adv * dual_clip_c), loss)
    return loss


def clip_indicators(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    advantages: jax.Array,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip_c: Optional[float] = None,
) -> dict[str, jax.Array]:
    """Which tokens :func:`clipped_surrogate` clipped (their gradient is zero), float32[B, T] each.

    ``low``: A < 0 and rho < 1 - eps_low; ``high``: A > 0 and rho > 1 + eps_high; ``dual``:
    A < 0 and rho > dual_clip_c (all zeros without dual clip).
    """
    ratio, adv = _ratio_terms(jax.lax.stop_gradient(logprobs), old_logprobs, advantages)
    low = (adv < 0) & (ratio < 1.0 - eps_low)
    high = (adv > 0) & (ratio > 1.0 + eps_high)
    dual = (adv < 0) & (ratio > dual_clip_c) if dual_clip_c is not None else jnp.zeros_like(low)
    return {k: v.astype(jnp.float32) for k, v in (("low", low), ("high", high), ("dual", dual))}


def kl_divergence(
    logprobs: jax.Array, ref_logprobs: jax.Array, *, kind: Literal["k1", "k2", "k3"] = "k3"
) -> jax.Array:
    """Per-token estimator of KL(pi_theta || pi_ref) on samples of pi_theta, float32[B, T].

    With d = log pi_ref - log pi_theta: k1 = -d, k2 = d^2 / 2, k3 = exp(d) - d - 1 (unbiased,
    low variance, always >= 0; d is clamped to +-20 and k3 to [-10, 10] for stability).
    """
    d = ref_logprobs.astype(jnp.float32) - logprobs.astype(jnp.float32)
    if kind == "k1":
        return -d
    if kind == "k2":
        return 0.5 * d * d
    if kind == "k3":
        d = jnp.clip(d, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return jnp.clip(jnp.exp(d) - d - 1.0, -KL_CLAMP, KL_CLAMP)
    raise ValueError(f"kl kind must be 'k1', 'k2' or 'k3', got {kind!r}")


# --------------------------------------------------------------------------------------------
# Aggregation (the 1/T sum_t of Eq. 2, 6 and the mean over sequences)
# --------------------------------------------------------------------------------------------


def aggregate_terms(
    per_token: jax.Array, mask: jax.Array, *, mode: AggMode = "seq-mean-token-mean",
    max_len: Optional[int] = None,
) -> tuple[jax.Array, jax.Array]:
    """Numerator and denominator of :func:`aggregate`; both add up over disjoint row sets.

    ``token-mean``: (sum of masked values, number of masked tokens). The seq-mean modes:
    (sum over sequences of the sequence value, number of sequences with at least one masked
    token), where the sequence value is the masked token mean (``seq-mean-token-mean``), the
    masked token sum (``seq-mean-token-sum``) or the masked token sum divided by the constant
    ``max_len`` (``seq-mean-token-sum-norm``; ``max_len`` defaults to T of the array).
    """
    x = per_token.astype(jnp.float32)
    m = jnp.asarray(mask, jnp.float32)
    xm = jnp.where(m > 0, x * m, 0.0)  # padding values (even inf/nan) never leak
    if mode == "token-mean":
        return jnp.sum(xm), jnp.sum(m)
    tok = jnp.sum(m, axis=-1)
    seq_sum = jnp.sum(xm, axis=-1)
    valid = tok > 0
    if mode == "seq-mean-token-mean":
        seq = seq_sum / jnp.maximum(tok, 1.0)
    elif mode == "seq-mean-token-sum":
        seq = seq_sum
    elif mode == "seq-mean-token-sum-norm":
        seq = seq_sum / float(max_len if max_len is not None else x.shape[-1])
    else:
        raise ValueError(f"aggregation mode must be one of {AGG_MODES}, got {mode!r}")
    return jnp.sum(jnp.where(valid, seq, 0.0)), jnp.sum(valid.astype(jnp.float32))


def aggregate(
    per_token: jax.Array, mask: jax.Array, *, mode: AggMode = "seq-mean-token-mean",
    max_len: Optional[int] = None,
) -> jax.Array:
    """Masked reduction of a [B, T] per-token loss to a scalar (0 when nothing is masked in).

    - ``seq-mean-token-mean`` (paper, Eq. 2/6: (1/|y|) sum_t per sequence, then mean over
      sequences);
    - ``token-mean`` (DAPO: mean over all masked tokens of the batch);
    - ``seq-mean-token-sum`` (token sum per sequence, mean over sequences);
    - ``seq-mean-token-sum-norm`` (Dr. GRPO: token sum / ``max_len`` per sequence, mean over
      sequences; ``max_len`` is a constant, default T).

    Sequences without any masked token are not counted.
    """
    num, den = aggregate_terms(per_token, mask, mode=mode, max_len=max_len)
    return num / jnp.maximum(den, 1.0)


# --------------------------------------------------------------------------------------------
# The TAPO loss (Eq. 8) in sum + count form
# --------------------------------------------------------------------------------------------


def _row_masks(batch: TrainBatch, cfg: RLConfig):
    """Token masks [B, T] of the GRPO term (originals) and the reflection term."""
    real = jnp.asarray(batch.row_mask, jnp.float32) > 0
    refl = jnp.asarray(batch.is_reflection, bool)
    success = jnp.asarray(batch.rewards, jnp.float32) > 0
    orig_rows = real & ~refl
    if cfg.sft_only or not cfg.negatives:
        ref_rows = real & refl & success
    else:
        ref_rows = real & refl
    tok = jnp.asarray(batch.loss_mask, jnp.float32)
    return orig_rows, ref_rows, tok * orig_rows[:, None], tok * ref_rows[:, None], real & refl


def tapo_loss_terms(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    entropy: jax.Array,
    batch: TrainBatch,
    cfg: RLConfig,
    *,
    max_len: Optional[int] = None,
) -> dict[str, jax.Array]:
    """Sums and counts of every loss term and metric of :func:`tapo_loss`, float32[] each.

    Keys ending in ``/min`` or ``/max`` are extremes; every other key is a sum or a count over the
    rows of ``batch``. Terms of disjoint row sets combine with :func:`merge_loss_terms`.

    Loss terms (numerator ``<name>/sum``, denominator ``<name>/count``, aggregated with
    ``cfg.loss_agg``; for seq-mean modes the count is the number of that term's sequences with at
    least one trained token, for ``token-mean`` the number of its trained tokens):

    - ``pg_orig``: the clipped surrogate of Eq. 2 over original rollouts (``~is_reflection``);
    - ``pg_ref``: Eq. 6 over reflection rows, each token weighted by the OTS weight w_t (Eq. 7)
      when ``cfg.ots``; reflection rows with reward 0 are dropped when ``cfg.negatives`` is False.
      With ``cfg.sft_only`` it is instead the negative log-likelihood -log p_t of the reflection
      rows with reward > 0 (no OTS, no clipping);
    - ``kl`` (k1/k2/k3 to ``batch.ref_logprobs``) and ``entropy``, over the trained tokens of both
      terms.

    Gradients flow only through ``logprobs`` (OTS weights, clip metrics and ``old_logprobs`` are
    constants). ``entropy`` is a constant except in the entropy bonus, which is part of the loss
    only when ``cfg.entropy_coef != 0``. ``max_len`` is the constant of ``seq-mean-token-sum-norm``
    (default: T of the batch).
    """
    mode = cfg.loss_agg
    agg = dict(mode=mode, max_len=max_len)
    orig_rows, ref_rows, m_o, m_r, refl_rows = _row_masks(batch, cfg)
    active = m_o + m_r  # disjoint row sets
    # Values outside the trained tokens (padding) are replaced by 0 before any arithmetic, so
    # even inf/nan there reaches neither the loss nor the gradient.
    on = active > 0
    lp, old, ent, ref_lp = (jnp.where(on, x.astype(jnp.float32), 0.0)
                            for x in (logprobs, old_logprobs, entropy, batch.ref_logprobs))
    adv = jnp.where(orig_rows | ref_rows, jnp.asarray(batch.advantages, jnp.float32), 0.0)
    clip_kw = dict(eps_low=cfg.eps_low, eps_high=cfg.eps_high, dual_clip_c=cfg.dual_clip_c)

    pg = clipped_surrogate(lp, old, adv, **clip_kw)
    w = ots_weights(lp, ent, w_min=cfg.w_min, w_max=cfg.w_max)
    if cfg.sft_only:
        ref_tok = -lp
    else:
        ref_tok = pg * w if cfg.ots else pg
    kl = kl_divergence(lp, ref_lp, kind=cfg.kl_kind)
    if cfg.kl_coef == 0:
        kl = jax.lax.stop_gradient(kl)
    ent_term = ent if cfg.entropy_coef != 0 else jax.lax.stop_gradient(ent)

    t: dict[str, jax.Array] = {}
    for name, x, m in (("pg_orig", pg, m_o), ("pg_ref", ref_tok, m_r), ("kl", kl, active),
                       ("entropy", ent_term, active)):
        t[f"{name}/sum"], t[f"{name}/count"] = aggregate_terms(x, m, **agg)

    # Metrics (constants).
    sg = jax.lax.stop_gradient
    pg_tok = m_o if cfg.sft_only else active
    clips = clip_indicators(lp, old, adv, **clip_kw)
    big = jnp.float32(jnp.finfo(jnp.float32).max)
    fo, fr = orig_rows.astype(jnp.float32), ref_rows.astype(jnp.float32)
    t.update({
        "tokens/orig": jnp.sum(m_o), "tokens/ref": jnp.sum(m_r), "tokens/pg": jnp.sum(pg_tok),
        "tokens/active": jnp.sum(active),
        "clip_low/sum": jnp.sum(clips["low"] * pg_tok),
        "clip_high/sum": jnp.sum(clips["high"] * pg_tok),
        "clip_dual/sum": jnp.sum(clips["dual"] * pg_tok),
        "kl_tok/sum": sg(jnp.sum(jnp.where(active > 0, kl * active, 0.0))),
        "entropy_tok/sum": sg(jnp.sum(jnp.where(active > 0, ent * active, 0.0))),
        "ots/sum": jnp.sum(w * m_r),
        "ots/below": jnp.sum((w < OTS_LOW_THRESHOLD) * m_r),
        "ots/min": jnp.min(jnp.where(m_r > 0, w, big)),
        "ots/max": jnp.max(jnp.where(m_r > 0, w, -big)),
        "rows/orig": jnp.sum(fo), "rows/ref": jnp.sum(fr),
        "adv_orig/sum": jnp.sum(adv * fo), "adv_orig/sumsq": jnp.sum(adv * adv * fo),
        "adv_ref/sum": jnp.sum(adv * fr), "adv_ref/sumsq": jnp.sum(adv * adv * fr),
        "rows/refl_all": jnp.sum(refl_rows.astype(jnp.float32)),
        "reward_refl/pos": jnp.sum((refl_rows & (batch.rewards > 0)).astype(jnp.float32)),
    })
    return t


def tapo_loss_denominators(
    batch: TrainBatch, cfg: RLConfig, *, max_len: Optional[int] = None
) -> dict[str, jax.Array]:
    """The ``<name>/count`` of every loss term of ``batch`` (masks only, no model output needed).

    Compute it on the full batch and pass it to :func:`tapo_loss` for each micro-batch.
    """
    _, _, m_o, m_r, _ = _row_masks(batch, cfg)
    zeros = jnp.zeros(m_o.shape, jnp.float32)
    out = {}
    for name, m in (("pg_orig", m_o), ("pg_ref", m_r), ("kl", m_o + m_r), ("entropy", m_o + m_r)):
        out[f"{name}/count"] = aggregate_terms(zeros, m, mode=cfg.loss_agg, max_len=max_len)[1]
    return out


def merge_loss_terms(a: dict[str, jax.Array], b: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Combine the terms of two disjoint row sets: min/max for extremes, sum for the rest."""
    out = {}
    for k in a:
        if k.endswith("/min"):
            out[k] = jnp.minimum(a[k], b[k])
        elif k.endswith("/max"):
            out[k] = jnp.maximum(a[k], b[k])
        else:
            out[k] = a[k] + b[k]
    return out


def loss_from_terms(
    terms: dict[str, jax.Array], cfg: RLConfig, denominators: Optional[dict[str, jax.Array]] = None
) -> jax.Array:
    """L_TAPO = L_GRPO + lam * L_ref (Eq. 8) + kl_coef * KL - entropy_coef * H, float32[].

    Each term is ``sum / max(count, 1)``; ``denominators`` overrides the counts (use the full
    batch's counts for micro-batches so their losses add up to the full-batch loss).
    """
    d = terms if denominators is None else denominators

    def term(name):
        return terms[f"{name}/sum"] / jnp.maximum(d[f"{name}/count"], 1.0)

    loss = term("pg_orig") + cfg.lam * term("pg_ref")
    if cfg.kl_coef != 0:
        loss = loss + cfg.kl_coef * term("kl")
    if cfg.entropy_coef != 0:
        loss = loss - cfg.entropy_coef * term("entropy")
    return loss


def metrics_from_terms(terms: dict[str, jax.Array], cfg: RLConfig) -> dict[str, jax.Array]:
    """Finished metrics (float32[] scalars) from (possibly merged) :func:`tapo_loss_terms`."""
    sg = jax.lax.stop_gradient
    t = {k: sg(v) for k, v in terms.items()}

    def ratio(num, den):
        return num / jnp.maximum(den, 1.0)

    def mean_std(name, rows):
        mean = ratio(t[f"{name}/sum"], rows)
        var = jnp.maximum(ratio(t[f"{name}/sumsq"], rows) - mean * mean, 0.0)
        return mean, jnp.sqrt(var)

    has_ref = t["tokens/ref"] > 0
    adv_o, adv_o_std = mean_std("adv_orig", t["rows/orig"])
    adv_r, adv_r_std = mean_std("adv_ref", t["rows/ref"])
    out = {
        "loss": loss_from_terms(t, cfg),
        "pg_loss_orig": ratio(t["pg_orig/sum"], t["pg_orig/count"]),
        "pg_loss_ref": ratio(t["pg_ref/sum"], t["pg_ref/count"]),
        "kl": ratio(t["kl_tok/sum"], t["tokens/active"]),
        "entropy": ratio(t["entropy_tok/sum"], t["tokens/active"]),
        "ots_weight_mean": ratio(t["ots/sum"], t["tokens/ref"]),
        "ots_weight_min": jnp.where(has_ref, t["ots/min"], 0.0),
        "ots_weight_max": jnp.where(has_ref, t["ots/max"], 0.0),
        "ots_weight_frac_low": ratio(t["ots/below"], t["tokens/ref"]),
        "clipfrac_low": ratio(t["clip_low/sum"], t["tokens/pg"]),
        "clipfrac_high": ratio(t["clip_high/sum"], t["tokens/pg"]),
        "clipfrac_dual": ratio(t["clip_dual/sum"], t["tokens/pg"]),
        "adv_orig_mean": adv_o, "adv_orig_std": adv_o_std,
        "adv_ref_mean": adv_r, "adv_ref_std": adv_r_std,
        "num_orig_rows": t["rows/orig"], "num_ref_rows": t["rows/ref"],
        "num_orig_tokens": t["tokens/orig"], "num_ref_tokens": t["tokens/ref"],
        "ref_success_rate": ratio(t["reward_refl/pos"], t["rows/refl_all"]),
    }
    return {k: jnp.asarray(v, jnp.float32) for k, v in out.items()}


def tapo_loss(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    entropy: jax.Array,
    batch: TrainBatch,
    cfg: RLConfig,
    *,
    max_len: Optional[int] = None,
    denominators: Optional[dict[str, jax.Array]] = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The TAPO objective, Eq. 8: L_GRPO (Eq. 2) + lam * L_ref (Eq. 6 with OTS, Eq. 7).

    Args:
      logprobs: float[B, T] log pi_theta of the batch tokens (carries the gradient).
      old_logprobs: float[B, T] log pi_theta_old (rollout policy, teacher-forced); a constant.
      entropy: float[B, T] entropy of pi_theta at every position (for OTS, the entropy metric and
        the optional entropy bonus; see :func:`tapo_loss_terms` for where it carries gradient).
      batch: advantages, masks, rewards and reference log-probs (``batch.ref_logprobs``).
      cfg: the objective's switches (``lam``, clipping, ``loss_agg``, ``ots``, ``w_min/w_max``,
        ``negatives``, ``sft_only``, ``kl_coef``, ``kl_kind``, ``entropy_coef``).
      max_len: the constant of ``seq-mean-token-sum-norm`` (default T).
      denominators: full-batch counts from :func:`tapo_loss_denominators` when ``batch`` is a
        micro-batch; the micro-batch losses (and gradients) then sum to the full-batch ones.

    Returns:
      ``(loss float32[], metrics)``: metrics of this batch alone (see :func:`metrics_from_terms`),
      ``metrics["loss"]`` being the returned loss. A batch without reflection rows gives GRPO.
    """
    terms = tapo_loss_terms(logprobs, old_logprobs, entropy, batch, cfg, max_len=max_len)
    loss = loss_from_terms(terms, cfg, denominators)
    metrics = metrics_from_terms(terms, cfg)
    metrics["loss"] = jax.lax.stop_gradient(loss)
    return loss, metrics
