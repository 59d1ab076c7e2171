"""Parent side of the verifier: persistent spawned workers with a hard per-item deadline.

Workers are created with multiprocessing's "spawn" context (forking a process that runs JAX can
deadlock), start lazily on the first item that needs sympy, and are shut down by ``close()``, by
leaving a ``with`` block, when the pool is garbage collected, or at interpreter exit.

Items travel in chunks (one pipe message per chunk, one small reply per item). The parent times
each item from the previous reply; an item past its deadline gets code "timeout", its worker is
terminated (SIGTERM, then SIGKILL) and replaced, and the rest of the chunk is handed out again.
A worker that dies on its own (killed from outside, out of memory) is replaced the same way; its
current item is retried once and then gets code "error".
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import sys
import time
import types
import weakref
from collections import deque

from tapo_jax.rewards.worker import worker_main

_STARTUP_FAILURES_ALLOWED = 3


@dataclasses.dataclass
class VerifierStats:
    """Running counters of one verifier (read them to log reward health)."""

    items: int = 0  # responses scored
    fast_path: int = 0  # settled in the calling process (no answer, exact match, guard, cache)
    cache_hits: int = 0  # items answered from the result cache
    worker_items: int = 0  # pairs sent to sympy workers
    timeouts: int = 0  # items past the deadline (their worker was killed and replaced)
    worker_restarts: int = 0  # workers replaced (after a timeout, a crash or a failed start)
    worker_crashes: int = 0  # workers found dead without being killed by the pool
    reasons: dict[str, int] = dataclasses.field(default_factory=dict)  # reason code -> count

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@contextlib.contextmanager
def _bare_main():
    """Start children without re-importing the caller's ``__main__``.

    A spawned child normally re-runs the parent's main script (or re-imports its ``-m`` module) to
    unpickle its target. The worker target lives in an importable module, so the child needs
    nothing from ``__main__``; hiding it keeps a training script without an
    ``if __name__ == "__main__"`` guard (or its JAX import) out of the workers.
    """
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main


class _Worker:
    """One worker process and the items it is working on."""

    def __init__(self, ctx, index: int, memory_limit_mb: int):
        self.conn, child_conn = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(
            target=worker_main,
            args=(child_conn, memory_limit_mb),
            name=f"tapo-jax-reward-{index}",
            daemon=True,
        )
        with _bare_main():
            self.proc.start()
        child_conn.close()
        self.started_at = time.monotonic()
        self.ready = False
        self.chunk: deque[int] = deque()  # item indices sent and not yet answered, in order
        self.item_started = 0.0

    def stop(self, grace_s: float = 0.5) -> None:
        """Terminate, then kill; always reaps the process and closes the pipe."""
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(grace_s)
            if self.proc.is_alive():
                self.proc.kill()
        self.proc.join()
        self.conn.close()
        self.proc.close()


def _shutdown(workers: list[_Worker]) -> None:
    for w in workers:
        try:
            w.conn.send(None)
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + 1.0
    for w in workers:
        w.proc.join(max(0.0, deadline - time.monotonic()))
        w.stop()
    workers.clear()


class WorkerPool:
    """Runs ``(gold, pred)`` pairs through sympy workers; see the module docstring."""

    def __init__(
        self,
        num_workers: int = 2,
        *,
        memory_limit_mb: int = 4096,
        startup_timeout_s: float = 120.0,
        chunk_size: int = 32,
        stats: VerifierStats | None = None,
    ):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.num_workers = num_workers
        self.memory_limit_mb = memory_limit_mb
        self.startup_timeout_s = startup_timeout_s
        self.chunk_size = chunk_size
        self.stats = stats if stats is not None else VerifierStats()
        self._ctx = mp.get_context("spawn")
        self._workers: list[_Worker] = []
        self._startup_failures = 0
        self._closed = False
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self, wait: bool = False) -> None:
        """Start the workers (no-op when running); with ``wait`` block until they are ready."""
        if self._closed:
            raise RuntimeError("the verifier pool is closed")
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self._ctx, len(self._workers), self.memory_limit_mb))
        if wait:
            while not all(w.ready for w in self._workers):
                self._poll(None, None, None)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def started(self) -> bool:
        return bool(self._workers)

    def pids(self) -> list[int]:
        """Process ids of the current workers (for monitoring and tests)."""
        return [w.proc.pid for w in self._workers]

    def close(self) -> None:
        self._closed = True
        self._finalizer()

    # --- work -----------------------------------------------------------------------------------
    def run(self, items: list[tuple[str, str]], timeout_s: float) -> list[str]:
        """One code per (gold, pred) item; never blocks past ~timeout_s per item."""
        if not items:
            return []
        self.start()
        for w in list(self._workers):  # left busy by an interrupted call: its replies are stale
            if w.chunk:
                w.chunk.clear()
                self._replace(w)
        results: list[str | None] = [None] * len(items)
        retried: set[int] = set()
        pending = deque(range(len(items)))
        chunk = max(1, min(self.chunk_size, -(-len(items) // (2 * self.num_workers))))
        while pending or any(w.chunk for w in self._workers):
            for w in list(self._workers):
                if w.ready and not w.chunk and pending:
                    keys = [pending.popleft() for _ in range(min(chunk, len(pending)))]
                    try:
                        w.conn.send([(k, items[k][0], items[k][1]) for k in keys])
                    except (OSError, ValueError):
                        pending.extendleft(reversed(keys))
                        self._replace(w, crashed=True)
                        continue
                    w.chunk.extend(keys)
                    w.item_started = time.monotonic()
            self._poll(timeout_s, results, pending, retried)
        return results  # type: ignore[return-value]

    def _poll(self, timeout_s, results, pending, retried=None) -> None:
        """Wait for replies or the nearest deadline, then handle replies, deaths and deadlines."""
        now = time.monotonic()
        deadlines = [w.started_at + self.startup_timeout_s for w in self._workers if not w.ready]
        if timeout_s is not None:
            deadlines += [w.item_started + timeout_s for w in self._workers if w.chunk]
        wait_s = max(0.0, min(deadlines) - now) if deadlines else None
        waitables = [w.conn for w in self._workers] + [w.proc.sentinel for w in self._workers]
        mp_connection.wait(waitables, timeout=wait_s)
        for w in list(self._workers):
            dead = False
            try:
                while w.conn.poll():
                    self._handle(w, w.conn.recv(), results)
            except (EOFError, OSError):
                dead = True
            if dead or not w.proc.is_alive():
                if not w.ready:
                    self._count_startup_failure()
                self._requeue_after_crash(w, results, pending, retried)
                self._replace(w, crashed=True)
        now = time.monotonic()
        for w in list(self._workers):
            if w.chunk and timeout_s is not None and now > w.item_started + timeout_s:
                results[w.chunk.popleft()] = "timeout"
                self.stats.timeouts += 1
                pending.extendleft(reversed(w.chunk))
                w.chunk.clear()
                self._replace(w)
            elif not w.ready and now > w.started_at + self.startup_timeout_s:
                self._count_startup_failure()
                self._replace(w)

    def _count_startup_failure(self) -> None:
        self._startup_failures += 1
        if self._startup_failures > _STARTUP_FAILURES_ALLOWED:
            self.close()
            raise RuntimeError(
                f"math verifier workers failed to start {self._startup_failures} times in a row "
                f"(died, or not ready within {self.startup_timeout_s} s)"
            )

    def _handle(self, w: _Worker, msg, results) -> None:
        tag = msg[0]
        if tag == "ready":
            w.ready = True
            self._startup_failures = 0
        elif tag == "fatal":
            self.close()
            raise RuntimeError(f"math verifier worker failed to start: {msg[1]}")
        else:
            key, code = msg
            expected = w.chunk.popleft()
            if key != expected:
                raise RuntimeError(f"verifier protocol error: reply {key}, expected {expected}")
            results[key] = code
            w.item_started = time.monotonic()

    def _requeue_after_crash(self, w: _Worker, results, pending, retried) -> None:
        if not w.chunk:
            return
        first = w.chunk.popleft()
        if first in retried:  # it crashed a worker twice: give up on it
            results[first] = "error"
        else:
            retried.add(first)
            w.chunk.appendleft(first)
        pending.extendleft(reversed(w.chunk))
        w.chunk.clear()

    def _replace(self, w: _Worker, crashed: bool = False) -> None:
        index = self._workers.index(w)
        w.stop()
        self.stats.worker_restarts += 1
        self.stats.worker_crashes += int(crashed)
        self._workers[index] = _Worker(self._ctx, index, self.memory_limit_mb)
