"""Training checkpoints with orbax: save every N steps and at the end, keep the last M, resume.

One checkpoint (directory ``<dir>/<step>``) holds

- ``state``: the :class:`~tapo_jax.train.state.TrainState` (step, params, optimizer state), each
  array written by its own shards;
- ``meta`` (JSON): the step, the data-iterator position (any JSON dict the data pipeline needs to
  continue where it stopped), the PRNG key data and the run config.

Saves are atomic: orbax writes into a temporary directory and renames it to ``<dir>/<step>`` only
once everything is on disk, so a process killed mid-save leaves the previous checkpoint intact;
leftover temporary directories are ignored and cleaned on the next start. Restore reads straight
into the abstract target's shardings (no unsharded host copy). A missing or unreadable checkpoint
raises :class:`CheckpointError` naming the directory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from tapo_jax.train.state import TrainState
from tapo_jax.types import CheckpointError

log = logging.getLogger("tapo_jax")

__all__ = ["Checkpointer", "Restored", "check_checkpoint_dir"]


@dataclasses.dataclass
class Restored:
    step: int
    state: TrainState
    data_state: dict  # the data-iterator position saved with the checkpoint
    rng: Optional[jax.Array]  # the saved PRNG key (typed if it was saved typed), or None
    config: Optional[dict]  # the run config as saved (a plain dict)


def _key_to_json(key: Optional[jax.Array]) -> Optional[dict]:
    if key is None:
        return None
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    data = jax.random.key_data(key) if typed else key
    out = {"data": np.asarray(jax.device_get(data)).astype(np.uint32).tolist(), "typed": typed}
    if typed:
        out["impl"] = str(jax.random.key_impl(key))
    return out


def _key_from_json(obj: Optional[dict]) -> Optional[jax.Array]:
    if obj is None:
        return None
    data = jax.device_put(np.asarray(obj["data"], np.uint32))
    if obj.get("typed"):
        return jax.random.wrap_key_data(data, impl=obj.get("impl"))
    return data


def _config_dict(config: Any) -> Optional[dict]:
    if config is None:
        return None
    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    return dict(config)


class Checkpointer:
    """Periodic, atomic checkpoints of one run in ``directory``.

    ``save_every``: save when ``step % save_every == 0`` (``force=True`` saves any step, e.g. the
    last); ``keep``: how many of the newest checkpoints to keep. Use as a context manager or call
    :meth:`close` so that a pending asynchronous save completes.
    """

    def __init__(self, directory: str | Path, *, save_every: int = 1, keep: int = 3,
                 async_save: bool = False):
        self.directory = Path(directory).absolute()
        self.save_every = save_every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=1, create=True, cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "meta"))

    # ------------------------------------------------------------------ save
    def should_save(self, step: int) -> bool:
        return step > 0 and step % self.save_every == 0

    def save(self, step: int, state: TrainState, *, data_state: Optional[dict] = None,
             rng: Optional[jax.Array] = None, config: Any = None, force: bool = False) -> bool:
        """Save ``state`` as checkpoint ``step`` when due (or ``force``). Returns whether it did.

        ``data_state`` must be JSON-serialisable; ``rng`` is a PRNG key (typed or raw uint32);
        ``config`` a :class:`~tapo_jax.config.Config` or dict.
        """
        if not (force or self.should_save(step)):
            return False
        if step in self._manager.all_steps():
            return False
        meta = {"step": int(step), "data_state": data_state or {}, "rng": _key_to_json(rng),
                "config": _config_dict(config)}
        json.dumps(meta)  # fail here, before any file is written, on unserialisable input
        saved = self._manager.save(
            int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               meta=ocp.args.JsonSave(meta)), force=True)
        if saved:
            log.info("checkpoint %d -> %s", step, self.directory)
        return bool(saved)

    def wait(self) -> None:
        """Block until an asynchronous save has reached the disk."""
        self._manager.wait_until_finished()

    # ------------------------------------------------------------------ restore
    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def restore(self, abstract_state: TrainState, step: Optional[int] = None) -> Restored:
        """Read checkpoint ``step`` (default: the newest) into the shardings of
        ``abstract_state`` (``jax.ShapeDtypeStruct`` leaves with ``sharding``, see
        :func:`tapo_jax.train.state.abstract_train_state`)."""
        self._manager.reload()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"no checkpoint found in {self.directory}")
        elif step not in self._manager.all_steps():
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory} "
                                  f"(available: {self.all_steps()})")
        try:
            out = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                              meta=ocp.args.JsonRestore()))
            meta = out["meta"]
            state = out["state"]
            if not isinstance(meta, dict) or "step" not in meta:
                raise ValueError("metadata is missing or malformed")
        except CheckpointError:
            raise
        except Exception as e:  # orbax / tensorstore / json raise many types
            raise CheckpointError(
                f"checkpoint {step} in {self.directory} is unreadable or corrupt "
                f"({type(e).__name__}: {e})") from e
        return Restored(step=int(meta["step"]), state=state, data_state=meta["data_state"],
                        rng=_key_from_json(meta["rng"]), config=meta["config"])

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def check_checkpoint_dir(directory: str | Path) -> Path:
    """The directory, or a :class:`CheckpointError` when it does not exist or holds no
    checkpoint (for ``resume`` and ``--checkpoint`` arguments)."""
    path = Path(directory)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    if not any(p.is_dir() and p.name.isdigit() for p in path.iterdir()):
        raise CheckpointError(f"no checkpoint found in {path}")
    return path
