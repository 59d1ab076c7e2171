"""tapo-jax: Trajectory-Augmented Policy Optimization (TAPO) and its baselines in JAX."""

__version__ = "0.1.0"
