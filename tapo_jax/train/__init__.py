"""Training machinery: the train state and optimizer (:mod:`.state`), checkpoints
(:mod:`.checkpoints`), metrics, progress and timing (:mod:`.metrics`), training-dynamics plots
(:mod:`.plot`), evaluation, distributed initialisation and the training loops.

Submodules are imported explicitly (``from tapo_jax.train.state import TrainState``) so that
light tools (e.g. ``tapo-jax plot``) do not pull in JAX.
"""
