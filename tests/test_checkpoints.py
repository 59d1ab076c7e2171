"""Checkpoints: round trip, exact resume, keep-last-M, atomicity under SIGKILL mid-save, and clear
errors for missing or corrupt checkpoints."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tapo_jax.config import ColdStartConfig, Config, MeshConfig, ModelConfig
from tapo_jax.models import sharding as sh
from tapo_jax.models.presets import PRESETS
from tapo_jax.train.step import make_train_step
from tapo_jax.train.checkpoints import Checkpointer, check_checkpoint_dir
from tapo_jax.types import CheckpointError
from tapo_jax.train.state import abstract_train_state, create_train_state, make_optimizer, \
    optim_config_for
from tapo_jax.types import TrainBatch

ROOT = Path(__file__).resolve().parents[1]


def sft_batch(seed: int, b: int = 4, t: int = 12, vocab: int = 512) -> TrainBatch:
    r = np.random.default_rng(seed)
    tokens = r.integers(1, vocab, (b, t)).astype(np.int32)
    ones = np.ones((b, t), np.int32)
    lm = np.zeros((b, t), np.float32)
    lm[:, 3:] = 1.0
    z = np.zeros(b, np.float32)
    return TrainBatch(tokens=tokens, positions=np.cumsum(ones, 1).astype(np.int32) - 1,
                      attention_mask=ones, loss_mask=lm, query_index=z.astype(np.int32),
                      is_reflection=z > 0, rewards=z, row_mask=z + 1, group_ids=z.astype(np.int32),
                      advantages=z, old_logprobs=lm * 0, ref_logprobs=lm * 0)


@pytest.fixture(scope="module")
def run():
    """A tiny SFT run on the 8-device mesh: config, mesh, optimizer, graphdef, jitted step."""
    cfg = Config(model=ModelConfig(**PRESETS["tiny"]),
                 cold_start=ColdStartConfig(steps=10, learning_rate=1e-2, warmup_steps=1))
    mesh = sh.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    tx = make_optimizer(*optim_config_for(cfg, "sft"))
    graphdef, state, _ = create_train_state(cfg.model, tx, mesh, seed=0)
    step = make_train_step(graphdef, cfg, mesh, kind="sft", donate=False)
    return cfg, mesh, tx, state, step


def leaves_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def test_round_trip_and_keep_last(run, tmp_path):
    cfg, mesh, tx, state, step = run
    _, abstract, shardings = abstract_train_state(cfg.model, tx, mesh)
    key = jax.random.fold_in(jax.random.key(7), 3)
    with Checkpointer(tmp_path / "ck", save_every=2, keep=2) as ck:
        assert not ck.save(1, state)  # not due
        s = state
        for i in range(1, 7):
            s, _ = step(s, sft_batch(i))
            ck.save(i, s, data_state={"epoch": 1, "index": 5 * i}, rng=key, config=cfg)
        assert ck.all_steps() == [4, 6]  # every 2 steps, last 2 kept
        r = ck.restore(abstract)
    assert r.step == 6 and r.data_state == {"epoch": 1, "index": 30}
    assert leaves_equal(r.state, s)
    assert np.array_equal(jax.random.key_data(r.rng), jax.random.key_data(key))
    assert r.config == json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples -> lists
    # restored into the target shardings
    for got, want in zip(jax.tree.leaves(r.state), jax.tree.leaves(shardings)):
        assert got.sharding == want


def test_resume_equals_uninterrupted(run, tmp_path):
    cfg, mesh, tx, state, step = run
    straight = state
    for i in range(3):
        straight, m_straight = step(straight, sft_batch(100 + i))
    s = state
    with Checkpointer(tmp_path / "ck", save_every=1, keep=1) as ck:
        for i in range(2):
            s, _ = step(s, sft_batch(100 + i))
        ck.save(2, s, data_state={"next": 2})
    with Checkpointer(tmp_path / "ck", save_every=1, keep=1) as ck:
        r = ck.restore(abstract_train_state(cfg.model, tx, mesh)[1])
    resumed, m_resumed = step(r.state, sft_batch(100 + r.data_state["next"]))
    assert int(resumed.step) == 3
    assert leaves_equal(resumed, straight)
    assert leaves_equal(m_resumed, m_straight)


def test_missing_and_corrupt_checkpoints(run, tmp_path):
    cfg, mesh, tx, state, _ = run
    abstract = abstract_train_state(cfg.model, tx, mesh)[1]
    missing = tmp_path / "nothing_here"
    with pytest.raises(CheckpointError, match="nothing_here"):
        check_checkpoint_dir(missing)
    with Checkpointer(tmp_path / "empty") as ck:
        with pytest.raises(CheckpointError, match="no checkpoint found in .*empty"):
            ck.restore(abstract)
    d = tmp_path / "corrupt"
    with Checkpointer(d) as ck:
        ck.save(1, state, force=True)
        with pytest.raises(CheckpointError, match="step 5"):
            ck.restore(abstract, step=5)
    # Damage every array file of the state item.
    files = [p for p in (d / "1" / "state").rglob("*") if p.is_file() and p.stat().st_size > 0
             and "METADATA" not in p.name.upper()]
    assert files
    for p in files:
        p.write_bytes(b"\0garbage" * 3)
    with Checkpointer(d) as ck:
        with pytest.raises(CheckpointError, match="checkpoint 1 in .*corrupt.*corrupt"):
            ck.restore(abstract)


KILL_SCRIPT = textwrap.dedent("""
    import asyncio, sys, time
    import jax, jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from tapo_jax.train.checkpoints import Checkpointer

    def state(v):
        return {"w": jnp.full((64, 256), v, jnp.float32), "step": jnp.int32(v)}

    ck = Checkpointer(sys.argv[1], save_every=1, keep=3)
    ck.save(1, state(1.0), data_state={"pos": 1})
    print("SAVED1", flush=True)

    async def stalled_finalize(self, *args, **kwargs):
        # every file of checkpoint 2 is written; only the commit (rename) is left
        print("MIDSAVE", flush=True)
        while True:
            time.sleep(1)

    atomicity.AtomicRenameTemporaryPath.finalize = stalled_finalize
    ck.save(2, state(2.0), data_state={"pos": 2})
    print("UNREACHABLE", flush=True)
""")


# orbax's background event loop may report a closed loop at interpreter teardown; unrelated.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_kill_mid_save_keeps_previous_checkpoint(tmp_path):
    d = tmp_path / "ck"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(d)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    seen = []
    deadline = time.time() + 120
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("MIDSAVE") or time.time() > deadline:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert any(line.startswith("SAVED1") for line in seen), "".join(seen)
    assert any(line.startswith("MIDSAVE") for line in seen), "".join(seen)
    assert not (d / "2").exists()  # the interrupted save never appears as a checkpoint
    abstract = {"w": jax.ShapeDtypeStruct((64, 256), jnp.float32),
                "step": jax.ShapeDtypeStruct((), jnp.int32)}
    with Checkpointer(d, save_every=1, keep=3) as ck:
        assert ck.latest_step() == 1
        r = ck.restore(abstract)
        assert r.step == 1 and r.data_state == {"pos": 1}
        np.testing.assert_array_equal(np.asarray(r.state["w"]), np.ones((64, 256), np.float32))
        # the directory stays usable: the next save of step 2 succeeds
        assert ck.save(2, {"w": jnp.zeros((64, 256)), "step": jnp.int32(2)})
        assert ck.all_steps() == [1, 2]
