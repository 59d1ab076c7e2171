"""Several processes equal one: 2 local CPU processes x 2 devices against 1 process x 4 devices.

- the sampler's tokens for the same seed (each process decodes a share of the requests on its
  own devices; the completions are gathered);
- the whole training run (cold start, TAPO with constructions that parse, evaluation before and
  after, checkpoints, then a resumed step): the same metrics.jsonl values and eval table;
- a process killed mid-run makes its peer exit non-zero within a bounded time.

The programs run in subprocesses (tests/multihost_worker.py), joined as tests/test_distributed.py
joins them; they share one persistent compilation cache.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests" / "multihost_worker.py")

TINY = [
    "model.preset=tiny", "model.vocab_size=128", "model.num_layers=1",
    "sampling.max_new_tokens=16", "sampling.max_prompt_len=32", "sampling.num_slots=16",
    "sampling.construction_max_new_tokens=16", "sampling.temperature=1.0",
    "rl.num_samples=4", "rl.n_pos=1", "rl.n_neg=1", "rl.m_max=2",
    "data.num_train=64", "data.num_eval=8", "data.max_steps=2",
    "cold_start.steps=2", "cold_start.batch_size=4", "cold_start.warmup_steps=0",
    "train.batch_size=2", "train.checkpoint_every=1", "train.progress=false",
    "optim.learning_rate=1e-3", "optim.warmup_steps=0",
    # evaluation samples like the rollouts, so it reuses their compiled programs
    "eval.num_samples=5", "eval.num_problems=4", "eval.runs=1", "eval.temperature=1.0",
    "eval.top_p=1.0",
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], *, processes: int, devices: int, logs: Path, cache: Path,
           heartbeat: int = 100) -> list[subprocess.Popen]:
    """``processes`` workers with ``devices`` CPU devices each, joined when more than one."""
    port = _free_port()
    procs = []
    for pid in range(processes):
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("TAPO_", "SLURM_", "OMPI_", "JAX_COORDINATOR", "TPU_"))}
        env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                   JAX_COMPILATION_CACHE_DIR=str(cache),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
        if processes > 1:
            env.update(TAPO_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                       TAPO_NUM_PROCESSES=str(processes), TAPO_PROCESS_ID=str(pid),
                       TAPO_INIT_TIMEOUT="60", TAPO_HEARTBEAT_TIMEOUT=str(heartbeat))
        log = open(logs.with_suffix(f".p{pid}.log"), "w")
        procs.append(subprocess.Popen([sys.executable, WORKER, *args], env=env, cwd=ROOT,
                                      stdout=log, stderr=subprocess.STDOUT))
    return procs


def _tail(path: Path, n: int = 2500) -> str:
    lines = [ln for ln in path.read_text().splitlines() if not ln.startswith("[Gloo]")]
    return "\n".join(lines)[-n:]


def _run(args: list[str], *, processes: int, devices: int, logs: Path, cache: Path,
         timeout: float = 600) -> None:
    procs = _start(args, processes=processes, devices=devices, logs=logs, cache=cache)
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    report = "\n".join(f"--- process {i} (rc {p.returncode}):\n"
                       f"{_tail(logs.with_suffix(f'.p{i}.log'))}" for i, p in enumerate(procs))
    assert all(p.returncode == 0 for p in procs), report


def _train(tmp_path, name, cache, *, processes, devices, extra=()):
    out = tmp_path / name
    _run(["train", "--config", "configs/demo.yaml", *TINY, f"train.output_dir={out}", *extra],
         processes=processes, devices=devices, logs=tmp_path / name, cache=cache)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return out, metrics


@pytest.mark.slow
def test_sampler_tokens_do_not_depend_on_the_process_count(tmp_path, cache_dir):
    """2 processes x 2 devices (subprocesses) against 1 process x 4 devices (this one)."""
    import jax

    from multihost_worker import sampled_tokens

    out = tmp_path / "tokens.json"
    _run(["sample", str(out)], processes=2, devices=2, logs=tmp_path / "sample", cache=cache_dir,
         timeout=300)
    one = sampled_tokens(jax.devices()[:4])
    assert len(one["tokens"]) == 15 and sum(map(len, one["tokens"])) > 15
    for p in range(2):  # every process holds all completions
        part = json.loads(out.with_suffix(f".p{p}.json").read_text())
        assert (part["processes"], part["devices"], part["local_devices"]) == (2, 4, 2)
        assert part["tokens"] == one["tokens"]
        assert part["finish_reason"] == one["finish_reason"]
        for a, b in zip(part["logprobs"], one["logprobs"]):
            assert len(a) == len(b) and all(math.isclose(x, y, abs_tol=1e-5)
                                            for x, y in zip(a, b))


# Logged values that must agree (wall times and throughputs differ by nature).
def _comparable(record: dict) -> dict:
    return {k: v for k, v in record.items()
            if k != "time" and not k.startswith(("time/", "tokens_per_s/"))}


@pytest.mark.slow
def test_two_processes_train_evaluate_checkpoint_and_resume_like_one(tmp_path, cache_dir):
    many, m_first = _train(tmp_path, "many", cache_dir, processes=2, devices=2,
                           extra=["train.steps=2"])
    assert (many / "checkpoints" / "2").is_dir() and (many / "hf" / "config.json").is_file()
    many, m_all = _train(tmp_path, "many", cache_dir, processes=2, devices=2,
                         extra=["train.steps=3", "train.resume=true"])
    one, o_all = _train(tmp_path, "one", cache_dir, processes=1, devices=4,
                        extra=["train.steps=3"])
    assert m_all[:2] == m_first  # resuming kept the first run's lines
    assert [r["step"] for r in m_all] == [r["step"] for r in o_all] == [1, 2, 3]
    # the runs are informative: rewards, parsed and correct constructions, a moving update
    assert sum(r["tapo/constructions_parsed"] for r in o_all) > 0
    assert sum(r["tapo/constructions_correct"] for r in o_all) > 0
    assert all(0 < r["accuracy"] < 1 for r in o_all)
    assert all(r["grad_norm"] > 0 and r["num_ref_tokens"] > 0 for r in o_all[:2])
    for a, b in zip(m_all, o_all):
        a, b = _comparable(a), _comparable(b)
        assert sorted(a) == sorted(b)
        if a["step"] == 3:  # reward-pool counters count since the process started (resumed)
            a, b = ({k: v for k, v in r.items() if not k.startswith("reward_pool/")}
                    for r in (a, b))
        for k in a:
            assert math.isclose(a[k], b[k], rel_tol=1e-4, abs_tol=1e-5), (a["step"], k, a[k], b[k])
    # the eval table (before: after the cold start; after: at step 3, in the resumed run)
    e_many = json.loads((many / "eval" / "eval.json").read_text())
    e_one = json.loads((one / "eval" / "eval.json").read_text())
    assert sorted(e_many) == sorted(e_one) == ["after", "before"]
    for name in e_one:
        for key in ("pass_at_k", "counts", "reasons", "problem_pass_rate", "dsr", "err"):
            assert e_many[name][key] == e_one[name][key], (name, key)
    assert e_one["before"]["counts"]["responses"] == 4 * 5
    from tapo_jax.evaluation.evaluate import format_table

    assert format_table(e_many) == format_table(e_one)
    assert (many / "eval" / "eval.md").read_text() == (one / "eval" / "eval.md").read_text()


@pytest.mark.slow
def test_killed_process_makes_its_peer_exit(tmp_path, cache_dir):
    """Process 1 is killed during the RL loop; process 0 exits non-zero within the heartbeat
    timeout (plus slack), instead of waiting forever in a collective."""
    out = tmp_path / "killed"
    args = ["train", "--config", "configs/demo.yaml", *TINY, f"train.output_dir={out}",
            "train.steps=50", "cold_start.enabled=false", "eval.before_and_after=false"]
    procs = _start(args, processes=2, devices=2, logs=tmp_path / "killed", cache=cache_dir,
                   heartbeat=10)
    try:
        deadline = time.monotonic() + 300
        metrics = out / "metrics.jsonl"
        while not (metrics.is_file() and metrics.read_text().strip()):
            assert time.monotonic() < deadline, _tail(tmp_path / "killed.p0.log")
            assert all(p.poll() is None for p in procs), _tail(tmp_path / "killed.p0.log")
            time.sleep(0.5)
        procs[1].send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        try:
            procs[0].wait(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail("process 0 still runs 90 s after its peer was killed\n"
                        + _tail(tmp_path / "killed.p0.log"))
        waited = time.monotonic() - t0
        log = _tail(tmp_path / "killed.p0.log", 100_000)
        assert procs[0].returncode != 0, log[-3000:]
        assert "tapo-jax: process 0 of 2 stops after" in log, log[-3000:]
        print(f"process 0 exited {waited:.1f} s after process 1 was killed")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
