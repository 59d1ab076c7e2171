"""Per-step metrics: a JSONL file, TensorBoard and wandb (when installed), a live progress line and
a phase timer.

- :class:`MetricsWriter` appends one JSON object per logged step to ``<run_dir>/metrics.jsonl``
  (``{"step": s, "time": unix_seconds, <name>: float, ...}``), mirrors every scalar to
  TensorBoard (``<run_dir>/tb``, via tensorboardX) and, when asked and installed, to wandb.
  Device arrays are fetched with one ``jax.device_get`` per step. On resume, lines of steps after
  the restored step are dropped so a resumed run's file reads like an uninterrupted one.
- :class:`Progress` is a tqdm bar whose postfix shows a few key numbers.
- :class:`StepTimer` measures the time split of an iteration (sampling, construction, reward,
  logprobs, update) and turns token counts into tokens/s.
- :func:`setup_logging` sends the ``tapo_jax`` logger's INFO lines to stderr.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np

log = logging.getLogger("tapo_jax")

__all__ = ["METRICS_FILE", "MetricsWriter", "Progress", "StepTimer", "read_metrics",
           "setup_logging", "to_floats"]

METRICS_FILE = "metrics.jsonl"
PHASES = ("sampling", "construction", "reward", "logprobs", "update")


def setup_logging() -> None:
    """INFO lines of the ``tapo_jax`` logger on stderr (whatever other libraries configured)."""
    if not any(getattr(h, "_tapo", False) for h in log.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        handler._tapo = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    logging.getLogger("absl").setLevel(logging.WARNING)


def to_floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Plain Python floats of scalar metrics (one host transfer for all device arrays)."""
    import jax

    host = jax.device_get(dict(metrics))
    out = {}
    for k, v in host.items():
        arr = np.asarray(v)
        if arr.size != 1:
            raise ValueError(f"metric {k!r} must be a scalar, got shape {arr.shape}")
        out[k] = float(arr.reshape(()))
    return out


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` (``path`` is the file or its run directory)."""
    p = Path(path)
    if p.is_dir():
        p = p / METRICS_FILE
    if not p.is_file():
        raise FileNotFoundError(f"no metrics file at {p}")
    records = []
    with p.open() as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a killed process
                    continue
    return records


def _json_value(v: float) -> Any:
    return v if math.isfinite(v) else str(v)  # JSON has no nan/inf literals


class MetricsWriter:
    """Writes metrics of each logged step to JSONL, TensorBoard and optionally wandb.

    Args:
      run_dir: directory of the run (created).
      tensorboard: also write TensorBoard events when tensorboardX is installed.
      wandb_project: a wandb project name to log to when wandb is installed (None: off).
      config: the run config (dict or dataclass), given to wandb.
      resume_step: drop JSONL records with ``step > resume_step`` (after a restore).
      enabled: False makes every call a no-op (e.g. on non-zero processes of a multi-host job).
    """

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True,
                 wandb_project: Optional[str] = None, config: Any = None,
                 resume_step: Optional[int] = None, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.path = self.run_dir / METRICS_FILE
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._file = self.path.open("a")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                log.info("TensorBoard logging off: tensorboardX is not installed "
                         "(pip install 'tapo-jax[tensorboard]'); metrics go to %s", self.path)
            else:
                self._tb = SummaryWriter(str(self.run_dir / "tb"))
        if wandb_project:
            try:
                import wandb
            except ImportError:
                log.warning("wandb_project %r given but wandb is not installed: not logging "
                            "to wandb", wandb_project)
            else:
                import dataclasses

                cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
                self._wandb = wandb.init(project=wandb_project, dir=str(self.run_dir),
                                         config=cfg, resume="allow")

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
        """Log ``metrics`` (scalars; device arrays allowed) for ``step``; returns the floats."""
        values = to_floats(metrics)
        if not self.enabled:
            return values
        record = {"step": int(step), "time": time.time()}
        record.update({k: _json_value(v) for k, v in values.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, int(step))
        if self._wandb is not None:
            self._wandb.log(values, step=int(step))
        return values

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress_bar(total: int, *, initial: int = 0, desc: str = "", enabled: bool = True):
    """A tqdm bar on stderr, or None when disabled. When stderr is not a terminal (a log file,
    CI) it redraws at most every 30 s, so logs get a few readable lines rather than thousands."""
    if not enabled:
        return None
    import sys

    from tqdm.auto import tqdm

    tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                mininterval=0.1 if tty else 30.0)


class Progress:
    """A tqdm progress line: ``step/total`` plus the latest values of ``keys``.

    ``keys`` maps metric names to short labels, e.g. ``{"accuracy": "acc", "grad_norm": "gn"}``.
    """

    DEFAULT_KEYS = {"loss": "loss", "accuracy": "acc", "response_length_mean": "len",
                    "kl": "kl", "ots_weight_mean": "ots", "grad_norm": "gn",
                    "perf/tokens_per_s": "tok/s"}

    def __init__(self, total: int, *, initial: int = 0, desc: str = "train",
                 keys: Optional[Mapping[str, str]] = None, enabled: bool = True):
        self.keys = dict(self.DEFAULT_KEYS if keys is None else keys)
        self._bar = progress_bar(total, initial=initial, desc=desc, enabled=enabled)

    def update(self, step: int, values: Mapping[str, float]) -> None:
        """Move to ``step`` and show ``values`` (plain floats, e.g. the return value of
        :meth:`MetricsWriter.write`)."""
        if self._bar is None:
            return
        post = {label: f"{values[k]:.4g}" for k, label in self.keys.items() if k in values}
        self._bar.set_postfix(post, refresh=False)
        self._bar.update(max(step - self._bar.n, 0))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class StepTimer:
    """Wall time per phase of one iteration and tokens/s.

    Usage::

        timer = StepTimer()
        with timer.phase("sampling"):
            rollouts = sample(...)
        with timer.phase("update") as t:
            state, m = train_step(state, batch)
            t.block(state)           # wait for the device before the clock stops
        metrics.update(timer.metrics(tokens={"sampling": n_generated, "update": n_trained}))
        timer.reset()
    """

    class _Phase:
        def __init__(self) -> None:
            self._pending: list[Any] = []

        def block(self, *values: Any) -> None:
            """Include the device work producing ``values`` in this phase's time."""
            self._pending.extend(values)

    def __init__(self, phases: Sequence[str] = PHASES):
        self.phases = tuple(phases)
        self.times: dict[str, float] = {}
        self._start = time.perf_counter()

    def reset(self) -> None:
        self.times = {}
        self._start = time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator["StepTimer._Phase"]:
        """Time a block; repeated phases add up."""
        handle = StepTimer._Phase()
        t0 = time.perf_counter()
        try:
            yield handle
        finally:
            if handle._pending:
                import jax

                jax.block_until_ready(handle._pending)
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0

    def metrics(self, tokens: Optional[Mapping[str, float]] = None) -> dict[str, float]:
        """``time/<phase>`` seconds for every phase (0 when not run), ``time/total`` since the
        last reset, and for each phase with a token count ``perf/<phase>_tokens_per_s``;
        ``perf/tokens_per_s`` is all counted tokens over the total time."""
        total = time.perf_counter() - self._start
        out = {f"time/{p}": self.times.get(p, 0.0) for p in self.phases}
        out.update({f"time/{p}": t for p, t in self.times.items()})
        out["time/total"] = total
        if tokens:
            for p, n in tokens.items():
                t = self.times.get(p, 0.0)
                out[f"perf/{p}_tokens_per_s"] = float(n) / t if t > 0 else 0.0
            out["perf/tokens_per_s"] = float(sum(tokens.values())) / total if total > 0 else 0.0
        return out
