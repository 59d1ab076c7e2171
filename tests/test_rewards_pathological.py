"""Math reward under hostile inputs: every call returns within the deadline plus 1 s with the
right reason, the pool survives killed workers, and no worker outlives the interpreter."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tapo_jax.rewards.verifier import Verifier

DEADLINE_S = 2.0
SLACK_S = 1.0
TEN_MB = 10 * 1024 * 1024
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def verifier():
    with Verifier(num_workers=2, timeout_s=DEADLINE_S) as v:
        v.start(wait=True)
        yield v


def _timed(verifier, response, gold, **kw):
    t0 = time.monotonic()
    rewards, reasons = verifier.score([response], [gold], **kw)
    return float(rewards[0]), reasons[0], time.monotonic() - t0


def _wait_ready(verifier):
    """Let replacement workers finish starting (not part of any item's deadline)."""
    verifier.start(wait=True)


TOWER = "2^{2^{2^{2^{2^{2}}}}}"  # 2^(2^65536)

GUARDED = [
    # (name, response, gold, reason)
    ("10MB_no_box", "x" * TEN_MB, "5", "no_box"),
    ("10MB_then_box", "x" * TEN_MB + " \\boxed{5}", "5", "correct"),
    # the box of a 10 MB answer opens outside the search window
    ("10MB_box_content", "\\boxed{" + "1" * TEN_MB + "}", "5", "no_box"),
    ("3k_box_content", "\\boxed{" + "1" * 3000 + "}", "5", "too_long"),
    ("10MB_think", "<think>" + "y" * TEN_MB, "5", "no_box"),
    ("10000_nested_braces", "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}", "1", "no_box"),
    ("1500_nested_braces", "\\boxed{" + "{" * 1500 + "1" + "}" * 1500 + "}", "1", "too_long"),
    ("400_nested_braces", "\\boxed{" + "{" * 400 + "1" + "}" * 400 + "}", "1", "correct"),
    ("10000_open_braces", "\\boxed{" * 10_000, "1", "no_box"),
    ("tower_9999", "\\boxed{9^{9^{9^9}}}", "5", "too_complex"),
    ("2^10^10", "\\boxed{2^{10^{10}}}", "5", "too_complex"),
    ("power_tower", "\\boxed{" + TOWER + "}", "5", "too_complex"),
    ("symbolic_tower", "\\boxed{x^{9^{9^9}}}", "x", "too_complex"),
    ("huge_factorial", "\\boxed{(10^{9})!}", "5", "too_complex"),
]


@pytest.mark.parametrize("name, response, gold, reason", GUARDED, ids=[g[0] for g in GUARDED])
def test_guarded_inputs_are_fast(verifier, name, response, gold, reason):
    reward, got, seconds = _timed(verifier, response, gold)
    assert got == reason
    assert reward == (1.0 if reason == "correct" else 0.0)
    assert seconds < DEADLINE_S + SLACK_S, f"{name}: {seconds:.2f} s"


UNGUARDED = [("tower_9999", "9^{9^{9^9}}"), ("2^10^10", "2^{10^{10}}"), ("power_tower", TOWER)]


@pytest.mark.parametrize("name, answer", UNGUARDED, ids=[u[0] for u in UNGUARDED])
def test_deadline_is_the_backstop(verifier, name, answer):
    """With the cheap guard off, sympy gets stuck; the parent kills the worker at the deadline."""
    _wait_ready(verifier)
    before = verifier.stats.as_dict()
    verifier.guard = False
    t0 = time.monotonic()
    try:
        rewards, reasons = verifier.score(
            ["\\boxed{" + answer + "}", "\\boxed{2\\sqrt{2}}", "\\boxed{\\sqrt{3}}"],
            ["5", "\\sqrt{8}", "2"],
        )
    finally:
        verifier.guard = True
    seconds = time.monotonic() - t0
    assert reasons == ["timeout", "correct", "wrong"]
    assert rewards.tolist() == [0.0, 1.0, 0.0]
    assert seconds < DEADLINE_S + SLACK_S, f"{name}: {seconds:.2f} s"
    after = verifier.stats.as_dict()
    assert after["timeouts"] == before["timeouts"] + 1
    assert after["worker_restarts"] == before["worker_restarts"] + 1


def test_timeout_returns_within_deadline_plus_slack(verifier):
    _wait_ready(verifier)
    verifier.guard = False
    try:
        reward, reason, seconds = _timed(verifier, "\\boxed{9^{9^{9^9}}}", "7")
    finally:
        verifier.guard = True
    assert (reward, reason) == (0.0, "timeout")
    assert DEADLINE_S <= seconds < DEADLINE_S + SLACK_S, f"{seconds:.2f} s"


def test_per_call_timeout_override(verifier):
    _wait_ready(verifier)
    verifier.guard = False
    try:
        reward, reason, seconds = _timed(verifier, "\\boxed{2^{10^{10}}}", "7", timeout_s=0.5)
    finally:
        verifier.guard = True
    assert (reward, reason) == (0.0, "timeout")
    assert seconds < 0.5 + SLACK_S


def test_pool_survives_killed_workers(verifier):
    _wait_ready(verifier)
    old = verifier.pool.pids()
    crashes = verifier.stats.worker_crashes
    for pid in old:
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    golds = ["\\sqrt{8}", "\\frac{\\pi}{2}", "x^2-1", "3"]
    responses = [
        "\\boxed{2\\sqrt{2}}", "\\boxed{\\frac{2\\pi}{4}}",
        "\\boxed{(x-1)(x+1)}", "\\boxed{\\sqrt{9}}",
    ]
    rewards, reasons = verifier.score(responses, golds)
    assert reasons == ["correct"] * 4 and rewards.tolist() == [1.0] * 4
    assert verifier.stats.worker_crashes == crashes + 2
    assert not set(verifier.pool.pids()) & set(old)
    for pid in old:  # reaped, not left as zombies
        assert not os.path.exists(f"/proc/{pid}")


def test_pool_survives_workers_killed_mid_batch(verifier):
    """Items in flight on a killed worker are handed out again and still score correctly."""
    import threading

    _wait_ready(verifier)
    crashes = verifier.stats.worker_crashes
    n = 80
    golds = [f"{k} + {k + 1}x^2" for k in range(n)]
    responses = [f"\\boxed{{{k + 1}x^2 + {k}}}" for k in range(n)]
    out = {}
    t = threading.Thread(target=lambda: out.update(result=verifier.score(responses, golds)))
    t.start()
    time.sleep(0.15)
    for pid in verifier.pool.pids():
        os.kill(pid, signal.SIGKILL)
    t.join(60)
    rewards, reasons = out["result"]
    assert reasons == ["correct"] * n and rewards.sum() == n
    _, reasons = verifier.score(["\\boxed{\\sqrt{12}}"], ["2\\sqrt{3}"])  # notices late deaths too
    assert reasons == ["correct"]
    assert verifier.stats.worker_crashes == crashes + 2


_EXIT_SCRIPT = textwrap.dedent(
    """
    import sys
    print("MAIN-RAN", flush=True)  # must print once: workers never re-run the main script
    from tapo_jax.rewards.verifier import Verifier
    verifier = Verifier()  # never closed: its workers must end with the interpreter
    rewards, reasons = verifier.score(["\\\\boxed{\\\\sqrt{8}}"], ["2\\\\sqrt{2}"])
    assert reasons == ["correct"], reasons
    print("PIDS", *verifier.pool.pids(), flush=True)
    """
)


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


def test_no_worker_outlives_the_interpreter(tmp_path):
    script = tmp_path / "uses_reward.py"  # a main script with no __main__ guard
    script.write_text(_EXIT_SCRIPT)
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120,
        env=_env(),
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("MAIN-RAN") == 1
    pids = [int(p) for p in out.stdout.split("PIDS", 1)[1].split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 5.0
    while any(os.path.exists(f"/proc/{p}") for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(os.path.exists(f"/proc/{p}") for p in pids)


def test_close_is_idempotent_and_final():
    v = Verifier(num_workers=1)
    v.start(wait=True)
    (pid,) = v.pool.pids()
    v.close()
    v.close()
    assert not os.path.exists(f"/proc/{pid}")
    with pytest.raises(RuntimeError, match="closed"):
        v.score(["\\boxed{\\sqrt{2}}"], ["\\sqrt{2} + 0"])


def test_warmup_items_take_the_equivalence_path():
    """A worker checks WARMUP before it reports ready, so a fresh worker's first items do not
    pay sympy's first-use costs inside their deadline; each warm-up item must be an equivalence
    that needs sympy (not a string match), and correct."""
    from tapo_jax.rewards.worker import WARMUP, Checker

    checker = Checker()
    assert [checker.check(gold, pred) for gold, pred in WARMUP] == ["correct"] * len(WARMUP)
    assert all(pred[len("\\boxed{"):-1] != gold for gold, pred in WARMUP)
