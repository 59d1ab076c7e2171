"""tests/crash_rerun.py, in a pytest session of its own with two xdist workers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

SUITE = '''
import os
from pathlib import Path

MARKS = Path(os.environ["CRASH_MARKS"])


def _count(name):
    path = MARKS / name
    n = int(path.read_text()) if path.exists() else 0
    path.write_text(str(n + 1))
    return n + 1


def test_crashes_once():
    if _count("once") == 1:
        os.abort()


def test_crashes_always():
    _count("always")
    os.abort()


def test_fails_an_assertion():
    assert _count("assertion") == 0


def test_passes():
    _count("passes")
'''


def test_a_dead_worker_reruns_its_test_once_and_an_assertion_is_never_rerun(tmp_path):
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_suite.py").write_text(SUITE)
    marks = tmp_path / "marks"
    marks.mkdir()
    env = dict(os.environ, CRASH_MARKS=str(marks), PYTHONPATH=str(TESTS))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "2", "-p", "crash_rerun",
         "-p", "no:cacheprovider", str(suite)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    runs = {p.name: int(p.read_text()) for p in marks.iterdir()}
    assert runs == {"once": 2, "always": 2, "assertion": 1, "passes": 1}, out
    assert "2 failed, 2 passed, 2 rerun" in out, out
    assert "test_crashes_once: its worker died 1 time(s); run once more" in out
    assert "test_crashes_always: its worker died 2 time(s); failed after 2 crashes" in out
