"""Verifiable math reward: r = 1 when the final boxed answer equals the gold answer, else 0.

    with Verifier() as verifier:                      # owns the sympy worker processes
        rewards, reasons = verifier.score(responses, golds)   # float32[N], N reason codes
    rewards, reasons = score(responses, golds)        # the same, with a verifier for this call

Pipeline per response (see extract.py, normalize.py, worker.py, pool.py):
  1. extraction: last closed \\boxed{}/\\fbox{} after </think>, in the last 4,000 characters;
  2. normalisation of both answers (notation only); with ``ordered_lists=True`` a gold that is a
     bare comma list (``4, 10, -2``) is compared as an ordered tuple (see ``Verifier``);
  3. exact fast paths in this process: integers compared as Python ints, equal strings, plain
     rationals compared as Fractions; a batch of integer answers never starts a worker;
  4. a complexity guard (power towers, huge factorials) before anything reaches sympy;
  5. sympy equivalence through math-verify in spawned workers with a hard per-item deadline.

Reason codes: "correct", "wrong", "no_box", "empty", "too_long", "too_complex", "parse_error",
"timeout", "bad_gold" (the gold answer itself is unusable), "error" (a worker died twice on the
item), and "lenient_correct" (lenient mode only: correct, but found without a box).
"""

from __future__ import annotations

import threading
from collections import OrderedDict, Counter
from collections.abc import Sequence

import numpy as np

from tapo_jax.rewards.extract import MAX_ANSWER_CHARS, TAIL_CHARS, extract_answer, extract_boxed
from tapo_jax.rewards.normalize import (
    MAX_DIGITS, as_tuple, fast_decide, is_bare_list, normalize, too_complex,
)
from tapo_jax.rewards.pool import VerifierStats, WorkerPool

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "REASONS",
    "Verifier",
    "VerifierStats",
    "extract_boxed",
    "reason_counts",
    "score",
]

DEFAULT_TIMEOUT_S = 5.0
REASONS = (
    "correct", "lenient_correct", "wrong", "no_box", "empty", "too_long", "too_complex",
    "parse_error", "timeout", "bad_gold", "error",
)
_CACHEABLE = frozenset({"correct", "wrong", "parse_error", "bad_gold"})


class Verifier:
    """Scores responses against gold answers; owns a lazily started pool of sympy workers.

    Use as a context manager or call ``close()``; workers are also shut down when the verifier is
    garbage collected and at interpreter exit. ``stats`` counts items, timeouts and restarts.
    Calls from several threads are serialised.

    ``guard=False`` lets power towers through to the workers (the deadline still applies);
    ``fast_path=False`` sends every extracted pair to sympy (for checking the sympy path itself).

    ``ordered_lists`` is the policy for a gold answer that is a bare comma list (``4, 10, -2``,
    no enclosing brackets). False (default): it is a set, and ``10, 4, -2`` is correct, as for
    "enter all solutions, separated by commas" (MATH's convention, math-verify's reading).
    True: it is an ordered tuple, and only the same items in the same order are correct (for
    datasets whose lists mean sequences). Either way a gold written as a set
    (``\\{4, 10, -2\\}``) stays a set and one written as a tuple (``(4, 10, -2)``) stays ordered.
    """

    def __init__(
        self,
        *,
        num_workers: int = 2,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        tail_chars: int = TAIL_CHARS,
        max_answer_chars: int = MAX_ANSWER_CHARS,
        max_digits: int = MAX_DIGITS,
        guard: bool = True,
        fast_path: bool = True,
        ordered_lists: bool = False,
        cache_size: int = 65536,
        chunk_size: int = 32,
        memory_limit_mb: int = 4096,
        startup_timeout_s: float = 120.0,
    ):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self.tail_chars = tail_chars
        self.max_answer_chars = max_answer_chars
        self.max_digits = max_digits
        self.guard = guard
        self.fast_path = fast_path
        self.ordered_lists = ordered_lists
        self.cache_size = cache_size
        self.stats = VerifierStats()
        self.pool = WorkerPool(
            num_workers,
            memory_limit_mb=memory_limit_mb,
            startup_timeout_s=startup_timeout_s,
            chunk_size=chunk_size,
            stats=self.stats,
        )
        self._cache: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._lock = threading.Lock()

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self, wait: bool = True) -> Verifier:
        """Start the workers now instead of on first need (``wait``: until they are ready)."""
        with self._lock:
            self.pool.start(wait=wait)
        return self

    def close(self) -> None:
        with self._lock:
            self.pool.close()

    def clear_cache(self) -> None:
        """Forget cached verdicts (golds stay cached inside the workers)."""
        with self._lock:
            self._cache.clear()

    def __enter__(self) -> Verifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- scoring --------------------------------------------------------------------------------
    def score(
        self,
        responses: Sequence[str | None],
        golds: Sequence[str | int | float],
        *,
        timeout_s: float | None = None,
        lenient: bool = False,
    ) -> tuple[np.ndarray, list[str]]:
        """(rewards float32[N], reasons list[N]) for N responses and their N gold answers.

        ``timeout_s`` (default: the verifier's) bounds the sympy work per item. ``lenient`` also
        accepts "the answer is ..." without a box (evaluation only; reported "lenient_correct").
        """
        if len(responses) != len(golds):
            raise ValueError(f"score: {len(responses)} responses but {len(golds)} golds")
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        with self._lock:
            reasons = self._score(responses, golds, timeout_s, lenient)
            for r in reasons:
                self.stats.reasons[r] = self.stats.reasons.get(r, 0) + 1
        rewards = np.array([r in ("correct", "lenient_correct") for r in reasons], np.float32)
        return rewards, reasons

    def _gold(self, gold: str | int | float) -> str | None:
        """Normalised gold answer, or None when unusable."""
        # str, not repr: repr(np.int64(5)) is "np.int64(5)"
        text = gold if isinstance(gold, str) else str(gold)
        if "\\boxed" in text or "\\fbox" in text:
            text = extract_boxed(text, tail_chars=0) or text
        g = normalize(text)
        if not g or len(g) > self.max_answer_chars:
            return None
        return g

    def _score(self, responses, golds, timeout_s: float, lenient: bool) -> list[str]:
        n = len(responses)
        self.stats.items += n
        reasons: list[str | None] = [None] * n
        lenient_found = [False] * n
        todo: dict[tuple[str, str], list[int]] = {}  # pair -> indices waiting on the workers
        gold_norm: dict[object, str | None] = {}
        for i, (response, gold) in enumerate(zip(responses, golds)):
            answer, how = extract_answer(
                response, tail_chars=self.tail_chars, max_chars=self.max_answer_chars,
                lenient=lenient,
            )
            if answer is None:
                reasons[i] = how
                self.stats.fast_path += 1
                continue
            lenient_found[i] = how == "lenient"
            key = (type(gold), gold)
            if key not in gold_norm:
                gold_norm[key] = self._gold(gold)
            g = gold_norm[key]
            pred = normalize(answer)
            if g is not None and pred and self.ordered_lists and is_bare_list(g):
                g, pred = as_tuple(g), as_tuple(pred)
            if g is None:
                reasons[i] = "bad_gold"
            elif not pred:
                reasons[i] = "empty"
            else:
                reasons[i] = fast_decide(g, pred) if self.fast_path else None
                if reasons[i] is None:
                    cached = self._cache.get((g, pred))
                    if cached is not None:
                        self._cache.move_to_end((g, pred))
                        self.stats.cache_hits += 1
                        reasons[i] = cached
                    elif self.guard and too_complex(pred, max_digits=self.max_digits):
                        reasons[i] = "too_complex"
                    elif self.guard and too_complex(g, max_digits=self.max_digits):
                        reasons[i] = "bad_gold"
                    else:
                        todo.setdefault((g, pred), []).append(i)
                        continue
            self.stats.fast_path += 1

        if todo:
            pairs = list(todo)
            self.stats.worker_items += len(pairs)
            for pair, code in zip(pairs, self.pool.run(pairs, timeout_s)):
                for i in todo[pair]:
                    reasons[i] = code
                if code in _CACHEABLE:
                    self._cache[pair] = code
                    if len(self._cache) > self.cache_size:
                        self._cache.popitem(last=False)
        return [
            "lenient_correct" if r == "correct" and lenient_found[i] else r
            for i, r in enumerate(reasons)
        ]


def score(
    responses: Sequence[str | None],
    golds: Sequence[str | int | float],
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    lenient: bool = False,
) -> tuple[np.ndarray, list[str]]:
    """Math reward of N responses against N gold answers, with a verifier for this call only.

    Returns ``(rewards float32[N] in {0, 1}, reasons list[str] of N codes)``; see the module
    docstring for the codes. ``timeout_s`` is the hard per-item deadline of the sympy check.
    The verifier's workers start only if some pair needs sympy and are shut down on return; a
    caller that scores many batches (the training loop) holds one :class:`Verifier` instead.
    """
    with Verifier(timeout_s=timeout_s) as verifier:
        return verifier.score(responses, golds, lenient=lenient)


def reason_counts(reasons: Sequence[str]) -> dict[str, int]:
    """Histogram of reason codes (for logging)."""
    return dict(Counter(reasons))
