"""Host memory: start the command-line process with glibc's malloc on transparent huge pages.

XLA:CPU allocates each execution's temporaries afresh: 350 MB for the demo's cold-start step at
32 x 128 tokens. Under glibc's defaults they come back from the kernel as fresh 4 KB pages every
step (about 85,000 faults and 0.17 s of kernel time per step there; ``benchmarks/
bench_cold_start.py``, case ``unpacked_q32_hugepages``). glibc 2.35 and newer
take the tunable ``glibc.malloc.hugetlb=1``, which asks the kernel for transparent huge pages
for malloc's memory (2 MB pages where the kernel's ``transparent_hugepage`` setting is
``madvise`` or ``always``): the same step then takes under a thousand faults, and the demo's
cold start runs about 5 % faster per step (docs/design.md has the figures).

Tunables are read when a process starts, so :func:`reexec_with_hugepage_malloc` re-executes the
command line once with the tunable added to ``GLIBC_TUNABLES``. It does nothing off Linux/glibc,
when ``GLIBC_TUNABLES`` already sets ``glibc.malloc.hugetlb`` (to anything; so it never loops),
or when ``TAPO_JAX_HUGEPAGE_MALLOC=0``. It only changes where memory comes from, never a result.
The ``tapo-jax`` entry point calls it; :func:`tapo_jax.cli.main` called from Python does not.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "TAPO_JAX_HUGEPAGE_MALLOC"


def hugepage_malloc_env(environ: Mapping[str, str], *, system: str, libc: str
                        ) -> dict[str, str] | None:
    """The environment to re-execute with, or None when the current one should stay."""
    if system != "Linux" or libc != "glibc" or environ.get(OPT_OUT, "1") == "0":
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if any(t.split("=", 1)[0] == TUNABLE for t in tunables.split(":")):
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}=1" if tunables else f"{TUNABLE}=1"
    return env


def _libc() -> str:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").split()[0]  # "glibc 2.36"
    except (AttributeError, ValueError, OSError, IndexError):
        return ""


def reexec_with_hugepage_malloc() -> None:
    """Replace this process by the same command line with :func:`hugepage_malloc_env`'s
    environment (returns only when there is nothing to change or the exec fails)."""
    env = hugepage_malloc_env(os.environ, system=platform.system(), libc=_libc())
    if env is None:
        return
    argv = list(getattr(sys, "orig_argv", []))
    if not argv or not sys.executable:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *argv[1:]], env)
    except OSError:
        return  # carry on with the default allocator
