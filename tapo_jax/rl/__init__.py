"""RL objectives: decoupled group advantages (Eq. 4-5), OTS (Eq. 7), the TAPO loss (Eq. 2, 6, 8),
KL estimators, chunked log-probs and entropies, and OPSD.
See docs/design.md, "Method" and "Module contracts".

``advantages.py`` (DAE), ``logprobs.py`` (log-probs and entropies from hidden states),
``objective.py`` (clipped surrogate, OTS, aggregation, the TAPO terms), ``opsd.py`` (the OPSD
divergence) and ``packing.py`` (rows packed end to end). Pure functions of arrays: the jitted
step that uses them is :mod:`tapo_jax.train.step`.
"""

from tapo_jax.rl.advantages import assign_group_ids, group_advantages, tapo_advantages
from tapo_jax.rl.logprobs import chunked_logprobs_and_entropy
from tapo_jax.rl.objective import (
    AGG_MODES,
    aggregate,
    aggregate_terms,
    clip_indicators,
    clipped_surrogate,
    kl_divergence,
    loss_from_terms,
    merge_loss_terms,
    metrics_from_terms,
    ots_weights,
    tapo_loss,
    tapo_loss_denominators,
    tapo_loss_terms,
)
from tapo_jax.rl.opsd import opsd_loss

__all__ = [
    "AGG_MODES",
    "aggregate",
    "aggregate_terms",
    "assign_group_ids",
    "chunked_logprobs_and_entropy",
    "clip_indicators",
    "clipped_surrogate",
    "group_advantages",
    "kl_divergence",
    "loss_from_terms",
    "merge_loss_terms",
    "metrics_from_terms",
    "opsd_loss",
    "ots_weights",
    "tapo_advantages",
    "tapo_loss",
    "tapo_loss_denominators",
    "tapo_loss_terms",
]
