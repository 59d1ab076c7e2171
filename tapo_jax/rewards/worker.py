"""The verifier worker process: sympy equivalence through math-verify.

Runs in a spawned process (see ``pool.py``). Protocol over one duplex pipe, all values plain
Python (str / int / tuple / list):

  worker -> parent  ("ready", pid) once imports and a warm-up (WARMUP) are done, or
                    ("fatal", message) and exit
  parent -> worker  [(key, gold, pred), ...]   a chunk of items, or None to exit
  worker -> parent  (key, code) after each item, code in {"correct", "wrong", "parse_error",
                    "bad_gold", "error"}; the parent times each item from the previous reply.

math-verify's own SIGALRM timeouts are disabled (``parsing_timeout=None``,
``timeout_seconds=None``): they would turn a slow item into a silent "wrong", while the parent's
deadline kills the process and counts a "timeout". Parsed sympy objects never leave this process
and are never printed.

math-verify compares numbers with ``evalf(chop=True)``, which calls ``1/2004!`` and ``1/2006!``
equal (their difference is below the absolute chop threshold). ``_exact_agree`` re-checks every
positive verdict between two float-free numeric constants with a relative tolerance.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import OrderedDict

GOLD_CACHE_SIZE = 4096
_REL_TOL = 1e-30  # with 60 significant digits of evaluation


def _watch_parent(interval_s: float = 1.0) -> None:
    """Exit when the parent process dies (it could not kill us then)."""
    parent = os.getppid()

    def run() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=run, daemon=True, name="parent-watch").start()


def _limit_memory(memory_limit_mb: int) -> None:
    if memory_limit_mb <= 0:
        return
    try:
        import resource

        limit = memory_limit_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):
        pass  # not available on this platform: the parent's deadline still applies


def _exact_agree(a, b) -> bool:
    """False when two float-free numeric constants differ (relative to their size)."""
    from sympy import Expr, Float, UnevaluatedExpr, nan, oo, zoo

    if not (isinstance(a, Expr) and isinstance(b, Expr)):
        return True
    if a.free_symbols or b.free_symbols or a.has(Float, UnevaluatedExpr) or b.has(
        Float, UnevaluatedExpr
    ):
        return True
    va, vb = a.evalf(60), b.evalf(60)
    special = (oo, -oo, zoo, nan)
    if not (va.is_number and vb.is_number) or va.has(*special) or vb.has(*special):
        return True
    scale = max(abs(va), abs(vb))
    if not scale.is_comparable or scale == 0:
        return True
    return bool(abs(va - vb) <= scale * _REL_TOL)


class Checker:
    """Compares one (gold, pred) pair of normalised answers; golds are parsed once (LRU cache)."""

    def __init__(self) -> None:
        from math_verify import parse, verify

        self._parse, self._verify = parse, verify
        self._golds: OrderedDict[str, list] = OrderedDict()

    def _parsed(self, answer: str) -> list:
        return self._parse("\\boxed{" + answer + "}", parsing_timeout=None)

    def _gold(self, gold: str) -> list:
        parsed = self._golds.get(gold)
        if parsed is None:
            parsed = self._parsed(gold)
            self._golds[gold] = parsed
            if len(self._golds) > GOLD_CACHE_SIZE:
                self._golds.popitem(last=False)
        else:
            self._golds.move_to_end(gold)
        return parsed

    def check(self, gold: str, pred: str) -> str:
        try:
            g = self._gold(gold)
            if not g:
                return "bad_gold"
            p = self._parsed(pred)
            if not p:
                return "parse_error"
            if self._verify(g, p, timeout_seconds=None) and _exact_agree(g[0], p[0]):
                return "correct"
            return "parse_error" if all(isinstance(x, str) for x in p) else "wrong"
        except RecursionError:
            return "parse_error"
        except Exception:  # noqa: BLE001 - any sympy failure scores 0, counted by its code
            return "error"


# Checked once before a worker reports ready: sympy builds caches (radicals, rationals,
# polynomial expansion, tuples) on first use, which made a fresh worker's first items take up to
# 0.8 s each on an idle 2-core CPU, and pass their deadline on a loaded one.
WARMUP = (("\\sqrt{12}", "\\boxed{2\\sqrt{3}}"), ("\\frac{1}{2}", "\\boxed{0.5}"),
          ("x^2+2x+1", "\\boxed{(x+1)^2}"), ("(1, 2)", "\\boxed{(1,2)}"))


def worker_main(conn, memory_limit_mb: int) -> None:
    """Entry point of a spawned worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        _watch_parent()
        for name in ("math_verify", "latex2sympy2_extended"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        checker = Checker()
        for gold, pred in WARMUP:
            checker.check(gold, pred)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises
        conn.send(("fatal", f"{type(e).__name__}: {e}"))
        return
    _limit_memory(memory_limit_mb)  # after the imports: it bounds what an item may allocate
    conn.send(("ready", os.getpid()))
    while True:
        try:
            chunk = conn.recv()
        except (EOFError, OSError):
            return
        if chunk is None:
            return
        for key, gold, pred in chunk:
            try:
                code = checker.check(gold, pred)
            except MemoryError:
                code = "error"
            conn.send((key, code))
