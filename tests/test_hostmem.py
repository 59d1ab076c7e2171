"""The command line's re-execution with glibc malloc on transparent huge pages."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tapo_jax.hostmem import OPT_OUT, TUNABLE, hugepage_malloc_env

LINUX = dict(system="Linux", libc="glibc")


def test_adds_the_tunable_once():
    env = hugepage_malloc_env({"PATH": "/bin"}, **LINUX)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": f"{TUNABLE}=1"}
    assert hugepage_malloc_env(env, **LINUX) is None  # the re-executed process stays


def test_keeps_other_tunables_and_an_explicit_setting():
    env = hugepage_malloc_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, **LINUX)
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{TUNABLE}=1"
    # the user's own value, whatever it is, is left alone
    assert hugepage_malloc_env({"GLIBC_TUNABLES": f"{TUNABLE}=0"}, **LINUX) is None
    assert hugepage_malloc_env({"GLIBC_TUNABLES": f"a=1:{TUNABLE}=2"}, **LINUX) is None
    # a tunable whose name only starts with it is another tunable
    assert hugepage_malloc_env({"GLIBC_TUNABLES": f"{TUNABLE}x=1"}, **LINUX) is not None


@pytest.mark.parametrize("environ, system, libc", [
    ({}, "Darwin", ""),
    ({}, "Linux", "musl"),
    ({OPT_OUT: "0"}, "Linux", "glibc"),
])
def test_leaves_the_process_alone(environ, system, libc):
    assert hugepage_malloc_env(environ, system=system, libc=libc) is None


PROBE = ("import os; from tapo_jax.hostmem import reexec_with_hugepage_malloc as r; "
         "print('run', os.getpid()); r(); print('tunables', os.environ.get('GLIBC_TUNABLES'))")


def _probe(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", OPT_OUT)}
    env.update(extra)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split("\n")
    return [line for line in out if line]


@pytest.mark.skipif(sys.platform != "linux" or not os.confstr("CS_GNU_LIBC_VERSION")
                    .startswith("glibc"), reason="glibc only")
def test_reexecutes_the_same_command_line_once():
    lines = _probe()
    # the first run re-executes itself before printing the tunables; the same process (pid)
    # runs the command a second time, now with the tunable set, and goes on
    assert len(lines) == 3 and lines[0].startswith("run ") and lines[1] == lines[0]
    assert lines[2] == f"tunables {TUNABLE}=1"
    assert _probe(**{OPT_OUT: "0"})[1:] == ["tunables None"]
    lines = _probe(GLIBC_TUNABLES="glibc.malloc.arena_max=4")
    assert len(lines) == 3 and lines[2] == f"tunables glibc.malloc.arena_max=4:{TUNABLE}=1"
