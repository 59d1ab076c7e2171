"""A pytest-xdist plugin: a test whose worker process dies is run once more, on a fresh worker.

A worker that dies mid-test (a fatal signal in native code: XLA, LLVM, PyTorch, the allocator)
fails that test with "worker 'gwN' crashed while running ...", whatever the test checks. Such a
death is rescheduled once; xdist replaces the dead worker, and the second run's outcome is the
test's. A test that kills its worker twice fails. A failed assertion or a raised exception is
never rerun: only a worker's death is. Every rerun is listed at the end of the session, so a
crash is never hidden, only kept from failing the run on its first occurrence.

``tests/conftest.py`` enables it for the suite; elsewhere, ``-p crash_rerun`` with ``tests/`` on
the path. Without xdist (``-n 0``) there are no workers and it does nothing.
"""

from __future__ import annotations

import pytest

_RERUNS = 1
_crashes: dict[str, int] = {}


@pytest.hookimpl(optionalhook=True)
def pytest_handlecrashitem(crashitem, report, sched):
    _crashes[crashitem] = _crashes.get(crashitem, 0) + 1
    if _crashes[crashitem] > _RERUNS:
        return None  # the report stays "failed"
    try:
        sched.mark_test_pending(crashitem)
    except NotImplementedError:  # a scheduler that cannot reschedule: the crash fails the test
        return None
    report.outcome = "rerun"
    return True


def pytest_report_teststatus(report):
    if report.outcome == "rerun":
        return "rerun", "R", ("RERUN", {"yellow": True})
    return None


def pytest_terminal_summary(terminalreporter):
    if not _crashes:
        return
    terminalreporter.section("worker crashes")
    for nodeid, n in _crashes.items():
        fate = "run once more" if n <= _RERUNS else f"failed after {n} crashes"
        terminalreporter.write_line(f"{nodeid}: its worker died {n} time(s); {fate}")
