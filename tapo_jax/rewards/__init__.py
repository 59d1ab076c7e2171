"""Verifiable rewards. ``tapo_jax.rewards.math.score(responses, golds)`` is the math reward."""

from tapo_jax.rewards.extract import extract_boxed
from tapo_jax.rewards.math import (
    Verifier,
    VerifierStats,
    close_default_verifier,
    default_verifier,
    score,
)

__all__ = [
    "Verifier",
    "VerifierStats",
    "close_default_verifier",
    "default_verifier",
    "extract_boxed",
    "score",
]
