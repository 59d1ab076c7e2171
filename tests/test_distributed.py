"""Multi-process initialisation: two local CPU processes connect and compute across processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tapo_jax.train.distributed import plan_initialization

ROOT = Path(__file__).resolve().parents[1]
LOCAL_DEVICES = 2

# Each process contributes rows filled with (process_id + 1) * (row + 1); a jitted sum over the
# global array and an all-gather must see both processes' data.
WORKER = textwrap.dedent(
    """
    import faulthandler, json, os, sys
    faulthandler.dump_traceback_later(45, exit=True)  # a hang prints every thread's stack
    import numpy as np
    from tapo_jax.train.distributed import initialize_distributed
    info = initialize_distributed()
    import jax, jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from jax.experimental import multihost_utils
    pid = jax.process_index()
    local = np.stack([np.full((3,), (pid + 1) * (r + 1), np.float32)
                      for r in range(jax.local_device_count())])
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    glob = jax.make_array_from_process_local_data(sharding, local)
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(glob)
    gathered = multihost_utils.process_allgather(np.float32(pid + 10))
    result = dict(info=info.__dict__, global_shape=list(glob.shape),
                  total=float(total.addressable_data(0)), gathered=np.asarray(gathered).tolist())
    with open(sys.argv[1], "w") as f:  # a file: the runtime's own threads also write to stdout
        json.dump(result, f)
    # Leave through the shutdown barrier (as the exit handler does), then skip interpreter
    # teardown: tearing down the CPU (gloo) runtime can race between processes on exit.
    jax.distributed.shutdown()
    os._exit(0)
    """
)


def _tail(out: str, n: int = 3000) -> str:
    return "\n".join(ln for ln in out.splitlines() if not ln.startswith("[Gloo]"))[-n:]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TAPO_", "SLURM_", "OMPI_", "JAX_COORDINATOR", "TPU_"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={LOCAL_DEVICES}")
    return env


def test_two_cpu_processes_compute_across_processes(tmp_path):
    port = _free_port()
    procs, paths = [], [tmp_path / f"result{pid}.json" for pid in range(2)]
    for pid in range(2):
        env = _clean_env()
        env.update(TAPO_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", TAPO_NUM_PROCESSES="2",
                   TAPO_PROCESS_ID=str(pid), TAPO_INIT_TIMEOUT="40")
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, str(paths[pid])],
                                      env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outputs, errors, timed_out = [], [], False
    deadline = time.monotonic() + 50
    for p in procs:
        try:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            p.kill()
            out, err = p.communicate()
        outputs.append(out)
        errors.append(err)
    logs = "\n".join(f"--- process {i} (rc {p.returncode}):\n{_tail(o + e)}"
                     for i, (p, o, e) in enumerate(zip(procs, outputs, errors)))
    assert not timed_out, f"distributed workers did not finish within 50 s\n{logs}"
    assert all(p.returncode == 0 for p in procs), logs

    # Independent reference: rows (pid + 1) * (r + 1), 3 columns, both processes.
    expected_total = sum(3.0 * (pid + 1) * (r + 1)
                         for pid in range(2) for r in range(LOCAL_DEVICES))
    assert all(p.is_file() for p in paths), logs
    results = [json.loads(p.read_text()) for p in paths]
    assert sorted(r["info"]["process_index"] for r in results) == [0, 1]
    for r in results:
        assert r["info"]["process_count"] == 2
        assert r["info"]["local_device_count"] == LOCAL_DEVICES
        assert r["info"]["device_count"] == 2 * LOCAL_DEVICES
        assert r["info"]["initialized"] and r["info"]["method"] == "env"
        assert r["global_shape"] == [2 * LOCAL_DEVICES, 3]
        assert r["total"] == expected_total
        assert r["gathered"] == [10.0, 11.0]


def test_failing_process_exits_without_waiting_for_its_peers():
    """After an uncaught exception a process skips the shutdown barrier and exits at once."""
    port = _free_port()
    code = ("from tapo_jax.train.distributed import initialize_distributed as f\n"
            "import jax, os, sys, time\n"
            "f()\n"
            "print('READY', flush=True)\n"
            "if jax.process_index() == 1: raise RuntimeError('boom')\n"
            "time.sleep(60)\n")
    procs = []
    for pid in range(2):
        env = _clean_env()
        env.update(TAPO_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", TAPO_NUM_PROCESSES="2",
                   TAPO_PROCESS_ID=str(pid), TAPO_INIT_TIMEOUT="40")
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        out, err = procs[1].communicate(timeout=45)
        assert procs[1].returncode == 1, _tail(out + err)
        assert "READY" in out and "RuntimeError: boom" in err
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()


def test_single_process_is_a_noop_in_a_subprocess():
    code = ("from tapo_jax.train.distributed import initialize_distributed as f; "
            "i = f(); print('RESULT', i.process_count, i.initialized, i.method)")
    out = subprocess.run([sys.executable, "-c", code], env=_clean_env(), cwd=ROOT,
                         capture_output=True, text=True, timeout=50)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "RESULT 1 False single" in out.stdout


def test_plan_from_environment():
    assert plan_initialization({}) is None
    assert plan_initialization({"TAPO_DISTRIBUTED": "0", "SLURM_NTASKS": "4",
                                "SLURM_JOB_ID": "7"}) is None
    plan = plan_initialization({"TAPO_COORDINATOR_ADDRESS": "10.0.0.1:1234",
                                "TAPO_NUM_PROCESSES": "4", "TAPO_PROCESS_ID": "3",
                                "TAPO_LOCAL_DEVICE_IDS": "0,1"})
    assert plan.method == "env"
    assert plan.kwargs == dict(coordinator_address="10.0.0.1:1234", num_processes=4,
                               process_id=3, initialization_timeout=300,
                               heartbeat_timeout_seconds=100, local_device_ids=[0, 1])
    # JAX's own variable name is honoured for the address.
    plan = plan_initialization({"JAX_COORDINATOR_ADDRESS": "h:1", "TAPO_NUM_PROCESSES": "2",
                                "TAPO_PROCESS_ID": "0"})
    assert plan.kwargs["coordinator_address"] == "h:1"
    # One process with explicit coordinates is still a single process.
    assert plan_initialization({"TAPO_COORDINATOR_ADDRESS": "h:1", "TAPO_NUM_PROCESSES": "1",
                                "TAPO_PROCESS_ID": "0"}) is None
    assert plan_initialization({"SLURM_NTASKS": "8", "SLURM_JOB_ID": "7"}).method == "slurm"
    assert plan_initialization({"SLURM_NTASKS": "1", "SLURM_JOB_ID": "7"}) is None
    assert plan_initialization({"OMPI_COMM_WORLD_SIZE": "2"}).method == "ompi"
    assert plan_initialization({"TPU_WORKER_HOSTNAMES": "a,b"}).method == "tpu"
    assert plan_initialization({"TAPO_DISTRIBUTED": "1", "TPU_SKIP_MDS_QUERY": "1"}).method == (
        "forced")


@pytest.mark.parametrize("env, needle", [
    ({"TAPO_NUM_PROCESSES": "2", "TAPO_PROCESS_ID": "0"}, "TAPO_COORDINATOR_ADDRESS"),
    ({"TAPO_COORDINATOR_ADDRESS": "h:1", "TAPO_NUM_PROCESSES": "2"}, "TAPO_PROCESS_ID"),
    ({"TAPO_COORDINATOR_ADDRESS": "h:1", "TAPO_NUM_PROCESSES": "2", "TAPO_PROCESS_ID": "2"},
     "TAPO_PROCESS_ID < TAPO_NUM_PROCESSES"),
    ({"TAPO_COORDINATOR_ADDRESS": "h", "TAPO_NUM_PROCESSES": "2", "TAPO_PROCESS_ID": "0"},
     "host:port"),
    ({"TAPO_COORDINATOR_ADDRESS": "h:1", "TAPO_NUM_PROCESSES": "two", "TAPO_PROCESS_ID": "0"},
     "TAPO_NUM_PROCESSES='two'"),
    ({"TAPO_DISTRIBUTED": "maybe"}, "TAPO_DISTRIBUTED"),
])
def test_bad_environment_is_named(env, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        plan_initialization(env)


# --------------------------------------------------------------------------------------------
# Launchers (launch/tpu.sh, launch/gpu.sh): syntax, usage, and the command that reaches Python
# --------------------------------------------------------------------------------------------

LAUNCH = ROOT / "launch"
ODD_ARGS = ["train", "--config", "configs/demo.yaml", "data.prompt_template={prompt} & $HOME 'x'"]


def _script_env(tmp_path, **extra) -> dict[str, str]:
    """Environment without gcloud / scontrol on PATH, plus fakes from tmp_path/bin."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    env = {k: v for k, v in _clean_env().items() if k not in ("XLA_FLAGS", "PYTHON")}
    env["PATH"] = f"{bin_dir}:/usr/bin:/bin"
    env.update(extra)
    return env


def _fake(tmp_path, name: str, body: str) -> Path:
    path = tmp_path / "bin" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)
    return path


# A stand-in interpreter: prints each argument on its own line plus the distributed variables.
FAKE_PYTHON = ('for a in "$@"; do echo "ARG:$a"; done\n'
               'echo "ENV:$TAPO_DISTRIBUTED|$TAPO_COORDINATOR_ADDRESS|$TAPO_NUM_PROCESSES|'
               '$TAPO_PROCESS_ID|$XLA_PYTHON_CLIENT_MEM_FRACTION"\necho "XLA:$XLA_FLAGS"\n'
               'echo "PWD:$(pwd)"\n')


@pytest.mark.parametrize("script", ["tpu.sh", "gpu.sh"])
def test_launcher_syntax_and_usage(script, tmp_path):
    path = LAUNCH / script
    assert subprocess.run(["bash", "-n", str(path)], timeout=10).returncode == 0
    text = path.read_text()
    assert "set -euo pipefail" in text and "tapo_jax.cli" in text
    env = _script_env(tmp_path)
    for flag in ("--help", "-h"):
        out = subprocess.run(["bash", str(path), flag], env=env, capture_output=True, text=True,
                             timeout=10)
        assert out.returncode == 0 and out.stdout.startswith("Usage:"), out.stderr
    out = subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True, timeout=10)
    assert out.returncode == 2 and "Usage:" in out.stderr


def test_tpu_launcher_runs_the_same_command_on_all_workers(tmp_path):
    # Fake gcloud: record the arguments, then run --command in a shell as a worker would.
    _fake(tmp_path, "gcloud", 'for a in "$@"; do echo "GCLOUD:$a"; case "$a" in '
          '--command=*) cmd="${a#--command=}";; esac; done\ncd "$WORKER_HOME" && bash -c "$cmd"\n')
    fake_py = _fake(tmp_path, "fakepython", FAKE_PYTHON)
    (tmp_path / "home" / "tapo-jax").mkdir(parents=True)
    env = _script_env(tmp_path, TPU_NAME="my-tpu", ZONE="us-east5-a", PROJECT="proj",
                      PYTHON=str(fake_py), WORKER_HOME=str(tmp_path / "home"))
    out = subprocess.run(["bash", str(LAUNCH / "tpu.sh"), *ODD_ARGS], env=env,
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    gcloud = [ln[len("GCLOUD:"):] for ln in lines if ln.startswith("GCLOUD:")]
    assert gcloud[:6] == ["compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--zone"]
    assert "--worker=all" in gcloud and gcloud[-2:] == ["--project", "proj"]
    assert [ln[4:] for ln in lines if ln.startswith("ARG:")] == ["-m", "tapo_jax.cli", *ODD_ARGS]
    assert any(ln.startswith("ENV:1|") for ln in lines)  # TAPO_DISTRIBUTED=1 on the workers
    assert f"PWD:{tmp_path / 'home' / 'tapo-jax'}" in lines
    # --setup installs the checkout with the [tpu] extra first (here through the fake Python).
    out = subprocess.run(["bash", str(LAUNCH / "tpu.sh"), "--setup", "eval"], env=env,
                         capture_output=True, text=True, timeout=20)
    args = [ln[4:] for ln in out.stdout.splitlines() if ln.startswith("ARG:")]
    assert out.returncode == 0 and args == ["-m", "pip", "install", "-q", "-e", "tapo-jax[tpu]",
                                            "-m", "tapo_jax.cli", "eval"], out.stderr
    # A missing checkout without REPO_URL is named on the worker.
    out = subprocess.run(["bash", str(LAUNCH / "tpu.sh"), "--setup", "eval"],
                         env=dict(env, REPO_DIR="absent"), capture_output=True, text=True,
                         timeout=20)
    assert out.returncode != 0 and "absent missing" in out.stderr and "ARG:" not in out.stdout
    # Without TPU_NAME it stops with a message naming the variable, before calling gcloud.
    env.pop("TPU_NAME")
    out = subprocess.run(["bash", str(LAUNCH / "tpu.sh"), "train"], env=env, capture_output=True,
                         text=True, timeout=10)
    assert out.returncode != 0 and "TPU_NAME" in out.stderr and "GCLOUD" not in out.stdout


def test_gpu_launcher_passes_coordinates_flags_and_arguments(tmp_path):
    fake_py = _fake(tmp_path, "fakepython", FAKE_PYTHON)
    env = _script_env(tmp_path, PYTHON=str(fake_py), TAPO_COORDINATOR_ADDRESS="10.0.0.1:1234",
                      TAPO_NUM_PROCESSES="2", TAPO_PROCESS_ID="1", XLA_FLAGS="--xla_mine=1")
    out = subprocess.run(["bash", str(LAUNCH / "gpu.sh"), *ODD_ARGS], env=env,
                         capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [ln[4:] for ln in lines if ln.startswith("ARG:")] == ["-m", "tapo_jax.cli", *ODD_ARGS]
    assert "ENV:|10.0.0.1:1234|2|1|0.90" in lines
    xla = next(ln[4:] for ln in lines if ln.startswith("XLA:"))
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in xla
    assert xla.endswith("--xla_mine=1")  # the user's flags come last and win

    # Slurm: coordinates from the job, head node from scontrol.
    _fake(tmp_path, "scontrol", 'echo node-a\necho node-b\n')
    env = _script_env(tmp_path, PYTHON=str(fake_py), SLURM_JOB_ID="7", SLURM_NTASKS="2",
                      SLURM_PROCID="1", SLURM_JOB_NODELIST="node-[a-b]")
    out = subprocess.run(["bash", str(LAUNCH / "gpu.sh"), "eval"], env=env, capture_output=True,
                         text=True, timeout=10)
    assert out.returncode == 0, out.stderr
    assert f"ENV:|node-a:{61440 + 7}|2|1|0.90" in out.stdout.splitlines()

    # Half-set coordinates are refused with the missing name.
    env = _script_env(tmp_path, PYTHON=str(fake_py), TAPO_NUM_PROCESSES="2")
    out = subprocess.run(["bash", str(LAUNCH / "gpu.sh"), "eval"], env=env, capture_output=True,
                         text=True, timeout=10)
    assert out.returncode != 0 and "TAPO_COORDINATOR_ADDRESS" in out.stderr


def test_gpu_launcher_default_xla_flags_exist_in_this_xla(tmp_path):
    """XLA aborts on unknown flags; the defaults must be known to the installed XLA build."""
    env = _script_env(tmp_path, DRY_RUN="1")
    out = subprocess.run(["bash", str(LAUNCH / "gpu.sh"), "train"], env=env, capture_output=True,
                         text=True, timeout=10)
    flags = next(ln.split("=", 1)[1] for ln in out.stdout.splitlines()
                 if ln.startswith("XLA_FLAGS="))
    assert flags.count("--xla_gpu_") == 3
    env = _clean_env()
    env["XLA_FLAGS"] = flags
    code = "import jax; jax.numpy.ones(2).block_until_ready()"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=50)
    assert run.returncode == 0, run.stderr[-2000:]


def test_host_collectives_on_one_process():
    """One process: the share is every item, the gathers return this process's values."""
    import numpy as np

    from tapo_jax.train.distributed import (allgather_objects, map_across_processes,
                                            process_share, sum_across_processes)

    assert list(process_share(5)) == [0, 1, 2, 3, 4]
    assert allgather_objects({"a": [1, 2.5, "x"]}) == [{"a": [1, 2.5, "x"]}]
    seen = []

    def score(texts, golds):
        seen.append(list(texts))
        return np.asarray([float(t == g) for t, g in zip(texts, golds)], np.float32), \
            [f"r{t}" for t in texts]

    rewards, reasons = map_across_processes(score, ["1", "2", "3"], ["1", "0", "3"])
    assert rewards == [1.0, 0.0, 1.0] and reasons == ["r1", "r2", "r3"]
    assert seen == [["1", "2", "3"]]
    assert sum_across_processes({"items": 3, "reasons": {"wrong": 2}}) == {
        "items": 3, "reasons": {"wrong": 2}}
    with pytest.raises(ValueError, match="one value per item"):
        map_across_processes(lambda t: ([1],), ["a", "b"])
