"""Multi-process start-up: one call to ``jax.distributed.initialize`` before any JAX computation.

    info = initialize_distributed()    # first thing in main(), before jax.devices() or any array

Every process of a multi-host run executes the same program (SPMD). This module decides whether
the run is multi-process and, if so, connects the processes; on one process it does nothing.

How the decision is made (first match wins):

1. ``TAPO_DISTRIBUTED=0`` (or ``false``/``off``): never initialise.
2. Explicit coordinates (multi-node CUDA, or anything else):
   ``TAPO_COORDINATOR_ADDRESS`` (``host:port`` of process 0; ``JAX_COORDINATOR_ADDRESS`` is read
   too), ``TAPO_NUM_PROCESSES`` and ``TAPO_PROCESS_ID``. Optional ``TAPO_LOCAL_DEVICE_IDS``
   (comma list, e.g. ``0,1,2,3``) restricts the devices this process drives.
3. A cluster JAX detects by itself, for which ``jax.distributed.initialize()`` takes no arguments:
   Slurm (``SLURM_NTASKS > 1``), Open MPI (``OMPI_COMM_WORLD_SIZE > 1``), a Cloud TPU VM (TPU
   chips under ``/dev/accel*`` or ``/dev/vfio``, or ``TPU_WORKER_HOSTNAMES`` / ``MEGASCALE_*`` in
   the environment), or ``TAPO_DISTRIBUTED=1`` (force; ``launch/tpu.sh`` sets it).
4. Otherwise: single process, no-op.

``TAPO_INIT_TIMEOUT`` (seconds, default 300) bounds the wait for the other processes;
``TAPO_HEARTBEAT_TIMEOUT`` (seconds, default 100) is how long a silent process may go before the
others count it dead and stop.

After initialisation, a normal exit passes JAX's shutdown barrier (so process 0 keeps the
coordination service until every peer has left), and an uncaught exception exits at once with
status 1 (the peers then stop through the runtime's heartbeat, ``TAPO_HEARTBEAT_TIMEOUT``
seconds later).

Host-side collectives of the training loop (every process calls them, in the same order):
:func:`allgather_objects` (JSON values of every process), :func:`map_across_processes` (a
function of per-item lists run on this process's share, results gathered in item order),
:func:`sum_across_processes` (counters) and :func:`barrier`. On one process each is the same code
with a gather over a single process.
"""

from __future__ import annotations

import atexit
import glob
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

logger = logging.getLogger(__name__)

_OFF = ("0", "false", "no", "off")
_ON = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class DistributedInfo:
    """Where this process sits in the run (filled after initialisation, or for one process)."""

    process_index: int
    process_count: int
    local_device_count: int
    device_count: int
    initialized: bool  # True when jax.distributed.initialize was called by this module
    method: str  # "single", "env", "slurm", "ompi", "tpu", "forced" or "already"


@dataclass(frozen=True)
class _Plan:
    method: str
    kwargs: dict


def _int_env(env: Mapping[str, str], name: str) -> Optional[int]:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} must be an integer") from None


def _tpu_vm_present(env: Mapping[str, str]) -> bool:
    if env.get("TPU_SKIP_MDS_QUERY") is not None:
        return False
    if env.get("TPU_WORKER_HOSTNAMES") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return True
    return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def plan_initialization(env: Mapping[str, str] | None = None) -> Optional[_Plan]:
    """Decide how (or whether) to call ``jax.distributed.initialize`` from ``env``.

    Returns None for a single process. Raises ValueError on incomplete or inconsistent variables.
    """
    env = os.environ if env is None else env
    mode = env.get("TAPO_DISTRIBUTED", "auto").strip().lower()
    if mode in _OFF:
        return None
    if mode not in _ON and mode != "auto":
        raise ValueError(f"TAPO_DISTRIBUTED={mode!r} must be auto, 1 or 0")
    timeout = _int_env(env, "TAPO_INIT_TIMEOUT") or 300
    heartbeat = _int_env(env, "TAPO_HEARTBEAT_TIMEOUT") or 100

    address = env.get("TAPO_COORDINATOR_ADDRESS") or env.get("JAX_COORDINATOR_ADDRESS")
    num = _int_env(env, "TAPO_NUM_PROCESSES")
    pid = _int_env(env, "TAPO_PROCESS_ID")
    if address or num is not None or pid is not None:
        given = (("TAPO_COORDINATOR_ADDRESS", address), ("TAPO_NUM_PROCESSES", num),
                 ("TAPO_PROCESS_ID", pid))
        missing = [name for name, v in given if v is None]
        if missing:
            raise ValueError(
                "multi-process run needs TAPO_COORDINATOR_ADDRESS (host:port of process 0), "
                f"TAPO_NUM_PROCESSES and TAPO_PROCESS_ID; missing: {', '.join(missing)}"
            )
        if ":" not in address:
            raise ValueError(f"TAPO_COORDINATOR_ADDRESS={address!r} must look like host:port")
        if num < 1 or not 0 <= pid < num:
            raise ValueError(
                f"need 0 <= TAPO_PROCESS_ID < TAPO_NUM_PROCESSES, got {pid} and {num}"
            )
        if num == 1 and mode not in _ON:
            return None
        kwargs = dict(coordinator_address=address, num_processes=num, process_id=pid,
                      initialization_timeout=timeout, heartbeat_timeout_seconds=heartbeat)
        ids = env.get("TAPO_LOCAL_DEVICE_IDS")
        if ids:
            try:
                kwargs["local_device_ids"] = [int(i) for i in ids.split(",")]
            except ValueError:
                raise ValueError(f"TAPO_LOCAL_DEVICE_IDS={ids!r} must be a comma list") from None
        return _Plan("env", kwargs)

    auto = dict(initialization_timeout=timeout, heartbeat_timeout_seconds=heartbeat)
    if (_int_env(env, "SLURM_NTASKS") or 1) > 1 and "SLURM_JOB_ID" in env:
        return _Plan("slurm", auto)
    if (_int_env(env, "OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return _Plan("ompi", auto)
    if _tpu_vm_present(env):
        return _Plan("tpu", auto)
    if mode in _ON:
        return _Plan("forced", auto)
    return None


def _describe(initialized: bool, method: str) -> DistributedInfo:
    import jax

    info = DistributedInfo(
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        local_device_count=jax.local_device_count(),
        device_count=jax.device_count(),
        initialized=initialized,
        method=method,
    )
    logger.info(
        "process %d of %d (%s): %d local devices, %d global devices, platform %s",
        info.process_index, info.process_count, method, info.local_device_count,
        info.device_count, jax.devices()[0].platform,
    )
    return info


def initialize_distributed(env: Mapping[str, str] | None = None) -> DistributedInfo:
    """Connect the processes of a multi-process run (no-op on one process); see module docstring.

    Must run before anything touches a JAX backend. Safe to call twice: the second call only
    reports. Returns this process's :class:`DistributedInfo`.
    """
    import jax

    if jax.distributed.is_initialized():
        return _describe(False, "already")
    plan = plan_initialization(env)
    if plan is None:
        return _describe(False, "single")
    logger.info("jax.distributed.initialize (%s): %s", plan.method,
                {k: v for k, v in plan.kwargs.items() if k != "initialization_timeout"})
    jax.distributed.initialize(**plan.kwargs)
    _shutdown_at_exit()
    return _describe(True, plan.method)


def _shutdown_at_exit() -> None:
    """Leave through JAX's shutdown barrier on a normal exit; leave at once after a crash.

    Without the barrier, process 0 may tear down the coordination service while its peers are
    still leaving, and they hang or abort at exit. After an uncaught exception the process prints
    the traceback and exits with status 1 without waiting for its peers (the runtime client would
    otherwise wait for them at teardown); the peers then fail through the heartbeat instead of
    waiting forever in a collective. Other exit handlers are skipped in that case.
    """
    import jax

    previous_hook = sys.excepthook

    def exit_on_failure(*exc_info) -> None:
        previous_hook(*exc_info)
        print(f"tapo-jax: process {jax.process_index()} of {jax.process_count()} stops after "
              f"{exc_info[0].__name__}: {exc_info[1]} (a failed collective usually means that "
              "another process died first: see its log)", file=sys.stderr)
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(1)

    def shutdown() -> None:
        if jax.distributed.is_initialized():
            jax.distributed.shutdown()

    sys.excepthook = exit_on_failure
    atexit.register(shutdown)


def is_main_process() -> bool:
    """True on process 0 (the one that writes logs, reports and exported checkpoints)."""
    import jax

    return jax.process_index() == 0


# --------------------------------------------------------------------------------------------
# Host-side collectives (every process calls them with the same arguments' shapes, in order)
# --------------------------------------------------------------------------------------------


def process_share(n: int) -> range:
    """Indices of ``n`` items that this process handles: ``i`` with ``i % P == process``
    (round-robin, so every process gets ``n // P`` or ``n // P + 1`` items)."""
    import jax

    return range(jax.process_index(), n, jax.process_count())


def allgather_objects(obj: Any) -> list[Any]:
    """Every process's JSON-serialisable ``obj``, in process order (on every process).

    Encoded as UTF-8 bytes padded to a power of two (a handful of gather shapes, so a handful of
    compilations) and gathered with ``multihost_utils.process_allgather``.
    """
    import json

    import numpy as np
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int64(data.size))).reshape(-1)
    width = 1 << max(int(sizes.max()) - 1, 0).bit_length()
    buf = np.zeros((width,), np.uint8)
    buf[: data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), width)
    return [json.loads(rows[p, : sizes[p]].tobytes().decode()) for p in range(len(sizes))]


def map_across_processes(fn: Callable[..., tuple], *columns: Sequence[Any]) -> tuple[list, ...]:
    """``fn(*columns)`` computed in shares: each process applies ``fn`` to its items
    (:func:`process_share`) and every process gets all results in item order.

    ``fn`` takes per-item sequences and returns a tuple of per-item sequences of JSON values
    (e.g. a reward function's ``(rewards, reasons)``); numpy arrays come back as lists.
    """
    n = len(columns[0])
    if any(len(c) != n for c in columns):
        raise ValueError("map_across_processes: columns of different lengths")
    mine = list(process_share(n))
    outs = fn(*([c[i] for i in mine] for c in columns))
    local = [[_plain(v) for v in out] for out in outs]
    if any(len(out) != len(mine) for out in local):
        raise ValueError("map_across_processes: fn must return one value per item")
    shares = allgather_objects(local)
    P = len(shares)
    return tuple([shares[i % P][k][i // P] for i in range(n)] for k in range(len(local)))


def sum_across_processes(counters: Mapping[str, Any]) -> dict[str, Any]:
    """Numbers summed over processes (nested dicts of numbers too, e.g. reason counts)."""
    def add(a: Any, b: Any) -> Any:
        if isinstance(a, dict) or isinstance(b, dict):
            a, b = a or {}, b or {}
            return {k: add(a.get(k, 0), b.get(k, 0)) for k in {**a, **b}}
        return a + b

    total: dict[str, Any] = {}
    for part in allgather_objects(_plain(dict(counters))):
        total = add(total, part)
    return total


def host_array(x: Any) -> Any:
    """The whole of ``x`` as a NumPy array on this process: gathered from every process when the
    array spans devices of several (a batch placed as a global array), else fetched."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier ``name``."""
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def _plain(value: Any) -> Any:
    """numpy scalars and arrays as Python numbers and lists (JSON values)."""
    import numpy as np

    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
