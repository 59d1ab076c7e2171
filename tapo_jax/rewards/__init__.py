"""Verifiable rewards. ``Verifier().score(responses, golds)`` is the math reward (``verifier.py``)."""

from tapo_jax.rewards.extract import extract_boxed
from tapo_jax.rewards.verifier import Verifier, VerifierStats, reason_counts, score

__all__ = [
    "Verifier",
    "VerifierStats",
    "extract_boxed",
    "reason_counts",
    "score",
]
