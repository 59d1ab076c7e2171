"""The training loop stage: the train state and optimizer (:mod:`.state`), the jitted step
(:mod:`.step`), batches placed on the mesh (:mod:`.assembly`), an iteration's sampling, rewards
and constructions (:mod:`.rollout`), the RL loop and its hooks (:mod:`.rl_loop`), the cold-start
SFT loop (:mod:`.sft`), the run's policy (:mod:`.policy`), the ``train`` command's stages
(:mod:`.run`), the commands on a trained policy (:mod:`.inference`), checkpoints
(:mod:`.checkpoints`), metrics, progress and logging (:mod:`.metrics`) and multi-process
start-up (:mod:`.distributed`).

Submodules are imported explicitly (``from tapo_jax.train.state import TrainState``) so that
light tools (e.g. ``tapo-jax plot``) do not pull in JAX.
"""
