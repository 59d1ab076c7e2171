"""The cold start's batches: one length group per batch (``cold_start.length_quantum``), rows
packed in pairs only with ``cold_start.packing``; checked against hand-computed groups and the
batches the step receives."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from tapo_jax.config import load_config
from tapo_jax.train.sft import length_groups

try:
    from test_cold_start_target import TINY
except ImportError:  # tests/ imported as a package
    from tests.test_cold_start_target import TINY


def _examples(sizes):
    return [([1] * (n - 1), [2]) for n in sizes]  # prompt + response = n tokens


def test_length_groups_by_quantum():
    sizes = [5, 32, 33, 64, 65, 96, 97, 160]
    assert length_groups(_examples(sizes), quantum=32) == {
        32: [0, 1], 64: [2, 3], 96: [4, 5], 128: [6], 160: [7]}
    assert length_groups(_examples(sizes), quantum=64) == {64: [0, 1, 2, 3], 128: [4, 5, 6],
                                                           192: [7]}


def test_length_groups_fall_back_to_powers_of_two():
    sizes = [10, 40, 70, 100, 130, 170, 200, 230]  # 8 multiples of 32: more than 6 groups
    assert length_groups(_examples(sizes), quantum=32) == {
        32: [0], 64: [1], 128: [2, 3], 256: [4, 5, 6, 7]}


@pytest.mark.parametrize("packing", [False, True])
def test_each_batch_is_one_length_group(tmp_path, monkeypatch, packing):
    """The step gets batches padded to one group's length, packed only with cold_start.packing,
    every response token of the batch's examples kept."""
    from tapo_jax.train import run as run_mod
    from tapo_jax.train import sft as sft_mod

    seen = []
    real = sft_mod.make_train_step

    def recording(*args, **kwargs):
        step = real(*args, **kwargs)

        def wrapped(state, batch):
            seen.append(batch)
            return step(state, batch)

        return wrapped

    monkeypatch.setattr(sft_mod, "make_train_step", recording)
    cfg = load_config("configs/demo.yaml", TINY + [
        "cold_start.steps=3", "cold_start.target_pass1=null", "cold_start.length_quantum=32",
        f"cold_start.packing={str(packing).lower()}", f"train.output_dir={tmp_path / 'run'}"])
    summary = run_mod.run_training(cfg)
    groups = summary["cold_start"]["length_buckets"]
    assert len(seen) == 3 and all(g % 32 == 0 for g in groups)
    n = jax.device_count()  # the batch is rounded up to a multiple of the data-parallel size
    rows = -(-cfg.cold_start.batch_size // n) * n
    for batch in seen:
        tokens = np.asarray(batch.tokens)
        assert tokens.shape[0] == rows and tokens.shape[1] in groups
        # the longest example is longer than the next smaller group's length
        longest = int(np.asarray(batch.attention_mask).sum(1).max())
        assert longest > tokens.shape[1] - 32
        assert (batch.packing is not None) == packing
        if packing:  # packed rows of twice the group's length
            assert np.asarray(batch.packing.tokens).shape[1] == 2 * tokens.shape[1]
