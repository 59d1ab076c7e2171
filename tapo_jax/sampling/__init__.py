"""Sampling: a JetStream-style engine (prefill / insert / generate over decode slots) and offline
continuous batching over it (:class:`Sampler`, :func:`generate`)."""

from tapo_jax.sampling.engine import DecodeState, Engine, Prefix, ResultTokens
from tapo_jax.sampling.sampler import Rollouts, Sampler, generate, request_keys

__all__ = ["DecodeState", "Engine", "Prefix", "ResultTokens", "Rollouts", "Sampler",
           "generate", "request_keys"]
