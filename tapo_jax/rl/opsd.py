"""The OPSD baseline's objective: on-policy self-distillation.

The same model plays student (the question alone) and teacher (the question plus a correct
solution, under stop-gradient) on the student's own rollout tokens; the loss is a per-token
divergence between the two next-token distributions (docs/design.md, "Method"). The training step
builds the [b, T, V] logits of each micro-batch b for it (:mod:`tapo_jax.train.step`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from tapo_jax.rl.objective import AggMode, aggregate

__all__ = ["opsd_loss"]


def opsd_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    mask: jax.Array,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    top_k: int = 0,
    loss_agg: AggMode = "token-mean",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Generalized JSD between student S and teacher T token distributions, per token.

    beta = 0: forward KL(T || S); beta = 1: reverse KL(S || T); otherwise, with the mixture
    M = beta T + (1 - beta) S, D = beta KL(T || M) + (1 - beta) KL(S || M) (the GKD convention).
    Both logits are divided by ``temperature``; the teacher is under stop-gradient. ``top_k > 0``
    restricts both distributions to the teacher's k most likely tokens (renormalised). Per-token
    divergences are clamped at 0 (they are >= 0 mathematically) and aggregated over ``mask``
    [B, T] with ``loss_agg``. ``beta``, ``temperature`` and ``top_k`` are static Python numbers.

    Args:
      student_logits, teacher_logits: [B, T, V] on the student's own rollout tokens.
      mask: [B, T] tokens to distil.

    Returns:
      ``(loss float32[], {"opsd_loss", "opsd_tokens", "opsd_div_max"})``.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"opsd beta must be in [0, 1], got {beta}")
    s = student_logits.astype(jnp.float32) / temperature
    t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)) / temperature
    if top_k:
        _, idx = jax.lax.top_k(t, top_k)
        t = jnp.take_along_axis(t, idx, axis=-1)
        s = jnp.take_along_axis(s, idx, axis=-1)
    ls = jax.nn.log_softmax(s, axis=-1)
    lt = jax.nn.log_softmax(t, axis=-1)

    def kl(lp, lq):  # KL(p || q) over the last axis
        return jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)

    if beta == 0.0:
        div = kl(lt, ls)
    elif beta == 1.0:
        div = kl(ls, lt)
    else:
        lm = jnp.logaddexp(lt + math.log(beta), ls + math.log(1.0 - beta))
        div = beta * kl(lt, lm) + (1.0 - beta) * kl(ls, lm)
    div = jnp.maximum(div, 0.0)
    m = jnp.asarray(mask, jnp.float32)
    loss = aggregate(div, m, mode=loss_agg)
    metrics = {
        "opsd_loss": jax.lax.stop_gradient(loss),
        "opsd_tokens": jnp.sum(m),
        "opsd_div_max": jax.lax.stop_gradient(jnp.max(jnp.where(m > 0, div, 0.0))),
    }
    return loss, metrics
