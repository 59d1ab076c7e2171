"""Metrics JSONL / TensorBoard writer, resume truncation, timer, progress line and the
six-panel training-dynamics plot."""

from __future__ import annotations

import json
import time

import jax.numpy as jnp
import numpy as np
import pytest

from tapo_jax.train.metrics import MetricsWriter, Progress, StepTimer, read_metrics
from tapo_jax.evaluation.plot import PANELS, plot_runs


def fake_run(run_dir, steps, seed, *, with_ots=True):
    r = np.random.default_rng(seed)
    with MetricsWriter(run_dir) as w:
        for s in range(1, steps + 1):
            m = {"pg_loss_orig": jnp.float32(r.normal()), "accuracy": s / steps,
                 "grad_norm": np.float32(abs(r.normal())), "response_length_mean": 10.0 + s,
                 "kl": jnp.asarray(0.01 * s), "loss": float(r.normal())}
            if with_ots:
                m["ots_weight_mean"] = 1.0 - 0.01 * s
            w.write(s, m)


def test_jsonl_contents_and_tensorboard(tmp_path):
    with MetricsWriter(tmp_path) as w:
        out = w.write(1, {"loss": jnp.float32(0.5), "grad_norm": np.float64(2.0), "n": 3})
        w.write(2, {"loss": jnp.asarray([0.25]), "kl": float("nan")})
        with pytest.raises(ValueError, match="'bad' must be a scalar"):
            w.write(3, {"bad": jnp.zeros(2)})
    assert out == {"loss": 0.5, "grad_norm": 2.0, "n": 3.0}
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(x) for x in lines)
    assert first["step"] == 1 and first["loss"] == 0.5 and first["grad_norm"] == 2.0
    assert abs(first["time"] - time.time()) < 60
    assert second == {**second, "step": 2, "loss": 0.25, "kl": "nan"}
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))  # tensorboardX installed


def test_resume_drops_later_steps(tmp_path):
    fake_run(tmp_path, 5, 0)
    with MetricsWriter(tmp_path, resume_step=3, tensorboard=False) as w:
        w.write(4, {"loss": 9.0})
    steps = [r["step"] for r in read_metrics(tmp_path)]
    assert steps == [1, 2, 3, 4] and read_metrics(tmp_path)[-1]["loss"] == 9.0


def test_timer_split_and_tokens_per_s():
    timer = StepTimer()
    with timer.phase("sampling"):
        time.sleep(0.05)
    with timer.phase("update") as t:
        x = jnp.ones((64, 64)) @ jnp.ones((64, 64))
        t.block(x)
    with timer.phase("sampling"):
        time.sleep(0.05)
    m = timer.metrics(tokens={"sampling": 1000, "update": 500})
    assert m["time/sampling"] >= 0.1 and m["time/construction"] == 0.0
    assert m["time/total"] >= m["time/sampling"] + m["time/update"]
    np.testing.assert_allclose(m["perf/sampling_tokens_per_s"], 1000 / m["time/sampling"])
    np.testing.assert_allclose(m["perf/tokens_per_s"], 1500 / m["time/total"], rtol=1e-6)
    timer.reset()
    assert timer.metrics()["time/sampling"] == 0.0


def test_progress_line(capsys):
    p = Progress(total=3, desc="rl")
    p.update(1, {"loss": 0.123456, "accuracy": 0.5, "other": 1.0})
    p.update(3, {"loss": 0.1})
    p.close()
    err = capsys.readouterr().err
    assert "rl" in err and "3/3" in err and "loss=0.1" in err
    Progress(total=3, enabled=False).update(1, {"loss": 1.0})  # silent no-op


def test_plot_six_panels_overlay(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image
    import matplotlib.pyplot as plt

    fake_run(tmp_path / "grpo", 8, 1, with_ots=False)
    fake_run(tmp_path / "tapo", 8, 2)
    captured = {}
    orig_savefig = plt.Figure.savefig

    def spy(self, *a, **k):
        captured["fig"] = self
        return orig_savefig(self, *a, **k)

    plt.Figure.savefig = spy
    try:
        out = plot_runs([tmp_path / "grpo", tmp_path / "tapo" / "metrics.jsonl"],
                        tmp_path / "plots" / "dyn.png", smoothing=0.5)
    finally:
        plt.Figure.savefig = orig_savefig
    assert out.is_file() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(out).shape[0] > 100
    axes = captured["fig"].axes
    assert len(axes) == 6 == len(PANELS)
    titles = [ax.get_title() for ax in axes]
    assert titles == [t for t, _ in PANELS]
    legends = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in axes]
    assert legends[0] == ["tapo"]  # GRPO logged no OTS weight
    assert all(lg == ["grpo", "tapo"] for lg in legends[1:])
    kl = [ln for ln in axes[5].get_lines() if ln.get_label() == "tapo"][0]
    np.testing.assert_allclose(kl.get_xdata(), np.arange(1, 9))
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        plot_runs([tmp_path / "missing"], tmp_path / "x.png")
