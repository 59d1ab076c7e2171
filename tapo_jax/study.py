"""A paired, multi-seed study: does TAPO help, and does each of its parts act?

One study config (``configs/study.yaml``) names a base run config, protocol overrides applied to
every run, the seeds and the arms (each arm = the base config with a few switches changed).
For every seed the study trains ONE cold start and starts every arm from it
(``train.init_from``), so arms are paired: their differences at a seed come from RL alone. The
initial params of every arm are hashed and checked against the cold start's.

Outputs (``<output_dir>/``): ``study.md`` (table of mean and 95% interval over seeds per arm,
per-seed paired differences against the reference arm, per-arm mechanism diagnostics),
``study.json`` (everything, per seed and per arm), ``figure3.png`` (the six training-dynamics
panels of the figure arms, seed-averaged, rolling mean over the faint raw series), and one run
directory per (seed, arm). A study that is run again skips the runs it already finished.

Over 400 lines on purpose: the study's spec, its runs and its report are one command; they share
the spec's arms and seeds and nothing else in the package uses them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import yaml

from tapo_jax.config import ConfigError, load_config

log = logging.getLogger("tapo_jax")

__all__ = ["StudySpec", "load_study", "run_study", "summarize", "t_interval"]

# metrics.jsonl keys averaged over RL steps into the per-arm diagnostics
DIAGNOSTICS = (
    ("zpd_share", "tapo/zpd_eligible_share"),
    ("constructions", "tapo/constructions_attempted"),
    ("parse_rate", "diag/parse_rate"),
    ("success_rate", "diag/success_rate"),
    ("verbatim_prefix", "diag/verbatim_prefix_rate"),
    ("recovery", "diag/recovery_rate"),
    ("reflect_early", "diag/reflect_early_rate"),
    ("reflect_late", "diag/reflect_late_rate"),
    ("analysis_at_error", "diag/analysis_at_error_rate"),
    ("ref_nonzero_adv", "diag/ref_nonzero_adv_share"),
    ("ref_adv_mean", "diag/ref_adv_mean"),
    ("ots_prefix", "diag/ots_prefix_mean"),
    ("ots_reflection", "diag/ots_reflection_mean"),
    ("ots_continuation", "diag/ots_continuation_mean"),
    ("ots_low_prefix", "diag/ots_prefix_low_share"),
    ("ots_low_reflection", "diag/ots_reflection_low_share"),
    ("ots_low_continuation", "diag/ots_continuation_low_share"),
    ("pg_loss_ref", "pg_loss_ref"),
    ("train_accuracy", "accuracy"),
)
# two-sided 95% Student t quantiles by degrees of freedom
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}


@dataclass
class StudySpec:
    base_config: str
    overrides: list[str]
    seeds: list[int]
    arms: dict[str, list[str]]
    reference: str
    figure_arms: list[str]
    output_dir: str
    metric: str = "pass@1"
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _as_list(x: Any, key: str, source: str) -> list:
    if x is None:
        return []
    if not isinstance(x, list):
        raise ConfigError(f"{source}: '{key}' must be a list, got {x!r}")
    return x


def load_study(path: str | Path, *, quick: bool = False, output_dir: Optional[str] = None,
               overrides: Optional[list[str]] = None, arms: Optional[list[str]] = None,
               seeds: Optional[list[int]] = None) -> StudySpec:
    """The study config; ``quick`` applies its ``quick:`` section (seeds, arms, overrides);
    ``arms`` / ``seeds`` then select among the config's arms / replace the seeds."""
    spec = _load_study(path, quick=quick, output_dir=output_dir, overrides=overrides)
    if arms:
        missing = [a for a in arms if a not in spec.arms and a not in _all_arms(path)]
        if missing:
            raise ConfigError(f"{path}: arms {missing} are not in the study config")
        every = _all_arms(path)
        spec.arms = {a: every[a] for a in arms}
        if spec.reference not in spec.arms:
            raise ConfigError(f"the reference arm {spec.reference!r} must be among --arms")
        spec.figure_arms = [a for a in spec.figure_arms if a in spec.arms]
    if seeds:
        spec.seeds = list(seeds)
    return spec


def _all_arms(path: str | Path) -> dict[str, list[str]]:
    raw = yaml.safe_load(Path(path).read_text()) or {}
    return {str(k): [str(o) for o in (v or [])] for k, v in (raw.get("arms") or {}).items()}


def _load_study(path: str | Path, *, quick: bool, output_dir: Optional[str],
                overrides: Optional[list[str]]) -> StudySpec:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"study config not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    src = str(path)
    known = {"base_config", "overrides", "seeds", "arms", "reference", "figure_arms",
             "output_dir", "metric", "quick", "name", "description"}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"{src}: unknown study keys {sorted(unknown)}")
    arms = raw.get("arms") or {}
    if not isinstance(arms, dict) or not arms:
        raise ConfigError(f"{src}: 'arms' must map arm names to lists of overrides")
    arms = {str(k): [str(o) for o in _as_list(v, f"arms.{k}", src)] for k, v in arms.items()}
    seeds = [int(s) for s in _as_list(raw.get("seeds"), "seeds", src)]
    over = [str(o) for o in _as_list(raw.get("overrides"), "overrides", src)]
    out = str(raw.get("output_dir", "runs/study"))
    if quick:
        q = raw.get("quick") or {}
        seeds = [int(s) for s in _as_list(q.get("seeds", seeds), "quick.seeds", src)]
        names = [str(a) for a in _as_list(q.get("arms", list(arms)), "quick.arms", src)]
        missing = [a for a in names if a not in arms]
        if missing:
            raise ConfigError(f"{src}: quick.arms {missing} are not in arms")
        arms = {a: arms[a] for a in names}
        over = over + [str(o) for o in _as_list(q.get("overrides"), "quick.overrides", src)]
        out = str(q.get("output_dir", out + "_quick"))
    if not seeds:
        raise ConfigError(f"{src}: no seeds")
    reference = str(raw.get("reference", next(iter(arms))))
    if reference not in arms:
        raise ConfigError(f"{src}: reference arm {reference!r} is not among the arms {list(arms)}")
    base = Path(raw.get("base_config", "configs/demo.yaml"))
    if not base.is_absolute() and not base.is_file():
        base = path.parent.parent / base if (path.parent.parent / base).is_file() else base
    return StudySpec(
        base_config=str(base), overrides=over + list(overrides or []), seeds=seeds, arms=arms,
        reference=reference,
        figure_arms=[a for a in _as_list(raw.get("figure_arms"), "figure_arms", src) if a in arms],
        output_dir=output_dir or out, metric=str(raw.get("metric", "pass@1")), source=src)


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def _run_cfg(spec: StudySpec, seed: int, extra: list[str], out_dir: Path):
    return load_config(spec.base_config, spec.overrides + extra + [
        f"train.seed={seed}", f"train.output_dir={out_dir}", "train.progress=false",
        "eval.before_and_after=false", "train.export_hf=true"])


def _evaluate_dir(cfg, run_dir: Path) -> dict:
    from tapo_jax.train.inference import run_evaluation

    res = run_evaluation(cfg, checkpoint=str(run_dir / "hf"), out_dir=str(run_dir / "eval"))
    return res.to_dict()


def _finished(path: Path) -> Optional[dict]:
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return None
    return None


def _cold_start(spec: StudySpec, seed: int, out: Path) -> dict:
    done = _finished(out / "study_result.json")
    if done is not None:
        return done
    from tapo_jax.train.run import run_training

    cfg = _run_cfg(spec, seed, ["train.steps=0", "train.overwrite=true"], out)
    t0 = time.time()
    summary = run_training(cfg)
    result = dict(seed=seed, arm="cold_start", summary=summary, seconds=time.time() - t0,
                  eval=_evaluate_dir(cfg, out), init_params_sha256=summary["init_params_sha256"])
    result["seconds_with_eval"] = time.time() - t0
    (out / "study_result.json").write_text(json.dumps(result, indent=1, default=float))
    return result


def _arm(spec: StudySpec, seed: int, name: str, cold: Path, out: Path) -> dict:
    done = _finished(out / "study_result.json")
    if done is not None:
        return done
    from tapo_jax.train.metrics import read_metrics
    from tapo_jax.train.run import run_training

    cfg = _run_cfg(spec, seed, spec.arms[name] + [
        f"train.init_from={cold / 'hf'}", "cold_start.enabled=false", "train.overwrite=true"],
        out)
    t0 = time.time()
    summary = run_training(cfg)
    seconds = time.time() - t0
    result = dict(seed=seed, arm=name, overrides=spec.arms[name], summary=summary,
                  seconds=seconds, eval=_evaluate_dir(cfg, out),
                  init_params_sha256=summary.get("init_params_sha256"),
                  diagnostics=_diagnostics(read_metrics(out)))
    result["seconds_with_eval"] = time.time() - t0
    (out / "study_result.json").write_text(json.dumps(result, indent=1, default=float))
    return result


def _diagnostics(records: list[dict]) -> dict[str, Optional[float]]:
    """Means over the RL steps that logged each diagnostic (None when none did)."""
    out: dict[str, Optional[float]] = {}
    for name, key in DIAGNOSTICS:
        v = [r[key] for r in records if isinstance(r.get(key), (int, float))]
        out[name] = float(np.mean(v)) if v else None
    v = [r.get("diag/ref_rows", 0.0) for r in records]
    out["ref_rows_per_step"] = float(np.mean(v)) if records else None
    return out


def run_study(spec: StudySpec) -> dict:
    """Cold start per seed, then every arm from it; returns (and writes) the study report."""
    import jax

    from tapo_jax.train.metrics import setup_logging

    setup_logging()
    out = Path(spec.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # every arm recompiles the same functions: keep the compiled executables on disk
    old = (jax.config.jax_compilation_cache_dir,
           jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", str(out / ".jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    try:
        return _run_study(spec, out)
    finally:
        jax.config.update("jax_compilation_cache_dir", old[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])


def machine_info() -> dict[str, Any]:
    """Where the study ran: the same commit and seeds have given bit-identical numbers on one
    machine and different ones on another CPU (XLA:CPU compiles for the host's vector width,
    likely why), and the machine sets the wall time."""
    import jax

    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    cpu = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    isa = next((x for x in ("avx512f", "avx2", "avx", "sse4_2", "asimd") if x in flags), None)
    return dict(cpu=cpu, cpu_vector_isa=isa, cpu_count=os.cpu_count(), jax=jax.__version__,
                backend=jax.default_backend(), device_kind=jax.devices()[0].device_kind,
                device_count=jax.device_count())


def _run_study(spec: StudySpec, out: Path) -> dict:
    (out / "study_spec.json").write_text(json.dumps(spec.__dict__, indent=1))
    t0 = time.time()
    results: dict[str, Any] = {"cold_start": {}, "arms": {a: {} for a in spec.arms}}
    for seed in spec.seeds:
        cold_dir = out / f"seed{seed}" / "cold_start"
        cs = _cold_start(spec, seed, cold_dir)
        results["cold_start"][seed] = cs
        log.info("study: seed %d cold start %s = %.3f", seed, spec.metric,
                 _metric(cs, spec.metric))
        for name in spec.arms:
            r = _arm(spec, seed, name, cold_dir, out / f"seed{seed}" / name)
            if r.get("init_params_sha256") != cs["init_params_sha256"]:
                raise RuntimeError(f"arm {name} at seed {seed} did not start from the seed's "
                                   "cold-start params (hash differs)")
            results["arms"][name][seed] = r
            log.info("study: seed %d arm %s %s = %.3f (%.0f s)", seed, name, spec.metric,
                     _metric(r, spec.metric), r["seconds_with_eval"])
        if not spec.arms:
            continue
        # the report so far (every finished seed), rewritten after each seed
        partial = summarize(spec, results)
        (out / "study.json").write_text(json.dumps(partial, indent=1, default=float))
        (out / "study.md").write_text(format_report(partial))
    report = summarize(spec, results)
    report["seconds"] = time.time() - t0
    report["machine"] = machine_info()
    name = "study" if spec.arms else "cold_starts"  # a cold-start-only run keeps the study's
    (out / f"{name}.json").write_text(json.dumps(report, indent=1, default=float))
    md = format_report(report)
    (out / f"{name}.md").write_text(md)
    if spec.figure_arms:
        try:
            _figure(spec, out)
            report["figure"] = str(out / "figure3.png")
        except Exception as e:  # the figure must never lose the study
            log.warning("figure failed: %s", e)
    print(md)
    return report


# --------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------


def _metric(result: dict, metric: str) -> float:
    ev = result["eval"]
    if metric.startswith("pass@"):
        return float(ev["pass_at_k"][metric]["mean"])
    v = ev.get(metric, {}).get("mean")
    return float("nan") if v is None else float(v)


def t_interval(values: list[float]) -> dict[str, Optional[float]]:
    """Mean and half-width of the two-sided 95% Student t interval (None for n < 2)."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], np.float64)
    if v.size == 0:
        return {"mean": None, "half_width": None, "n": 0}
    if v.size == 1:
        return {"mean": float(v[0]), "half_width": None, "n": 1}
    df = v.size - 1
    t = _T95.get(df) or next((_T95[k] for k in sorted(_T95) if k >= df), 1.96)
    return {"mean": float(v.mean()), "half_width": float(t * v.std(ddof=1) / math.sqrt(v.size)),
            "n": int(v.size)}


COLUMNS = ("pass@1", "pass@2", "pass@3", "pass@4", "pass@5", "dsr", "err", "dsr_oracle",
           "err_oracle")


def summarize(spec: StudySpec, results: dict) -> dict:
    """Per-arm intervals over seeds, per-seed paired differences, per-arm diagnostics."""
    seeds = [s for s in spec.seeds if s in results["cold_start"]]
    rows: dict[str, dict] = {}
    per_seed: dict[str, dict] = {}
    entries = {"cold_start": results["cold_start"], **results["arms"]}
    for name, by_seed in entries.items():
        vals = {c: [_metric(by_seed[s], c) for s in seeds if s in by_seed] for c in COLUMNS}
        rows[name] = {c: t_interval(v) for c, v in vals.items()}
        per_seed[name] = {s: {c: _metric(by_seed[s], c) for c in COLUMNS} for s in seeds
                          if s in by_seed}
        refl = [by_seed[s]["eval"]["counts"].get("oracle_reflecting", 0) for s in seeds
                if s in by_seed]
        rows[name]["oracle_reflecting_responses"] = int(sum(refl))
    ref = spec.reference
    paired: dict[str, dict] = {}
    for name in results["arms"]:
        d = [per_seed[name][s][spec.metric] - per_seed[ref][s][spec.metric] for s in seeds
             if s in per_seed[name] and s in per_seed[ref]]
        paired[name] = {"per_seed": d, **t_interval(d),
                        "wins": int(sum(x > 0 for x in d)), "losses": int(sum(x < 0 for x in d))}
    diags = {}
    for name, by_seed in results["arms"].items():
        keys = {k for s in by_seed for k in by_seed[s].get("diagnostics", {})}
        diags[name] = {k: _mean_none([by_seed[s]["diagnostics"].get(k) for s in by_seed])
                       for k in sorted(keys)}
    cold = [per_seed["cold_start"][s][spec.metric] for s in seeds]
    spread = float(max(cold) - min(cold)) if cold else None
    return dict(spec=spec.__dict__, seeds=seeds, table=rows, per_seed=per_seed, paired=paired,
                diagnostics=diags, cold_start_spread=spread, runs=_jsonable(results))


def _mean_none(v: list) -> Optional[float]:
    v = [x for x in v if x is not None]
    return float(np.mean(v)) if v else None


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=float))


def _cell(iv: dict) -> str:
    if iv.get("mean") is None:
        return "–"
    if iv.get("half_width") is None:
        return f"{100 * iv['mean']:.1f}"
    return f"{100 * iv['mean']:.1f} ± {100 * iv['half_width']:.1f}"


def format_report(report: dict) -> str:
    spec = report["spec"]
    seeds = report["seeds"]
    lines = [f"# Study ({len(seeds)} seeds: {', '.join(map(str, seeds))})", "",
             "Values in %: mean ± half-width of the 95% t interval over seeds (each seed: the "
             "mean over its evaluation runs). DSR / ERR from reflection markers; DSR-o / ERR-o "
             "with reflection and recovery read by the task's oracle. Refl.: responses with a "
             "reflection line (oracle), all seeds.", "",
             "| arm | Pass@1 | Pass@2 | Pass@3 | Pass@4 | Pass@5 | DSR | ERR | DSR-o | ERR-o "
             "| Refl. |", "|---" * 11 + "|"]
    for name, row in report["table"].items():
        cells = [_cell(row[c]) for c in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells)
                     + f" | {row['oracle_reflecting_responses']} |")
    ref, metric = spec["reference"], spec["metric"]
    if report.get("machine"):
        m = report["machine"]
        lines += ["", f"Ran on {m['cpu']} ({m['cpu_vector_isa'] or 'no vector ISA read'}, "
                  f"{m['cpu_count']} cores; jax {m['jax']}, {m['device_count']} "
                  f"{m['backend']} devices)"
                  + (f" in {report['seconds'] / 60:.1f} min" if report.get("seconds") else "")
                  + ". The same commit and seeds repeat their numbers on one machine, not "
                  "across CPUs (XLA:CPU compiles for the host's vector width)."]
    cold = report["per_seed"]["cold_start"]
    lines += ["", f"Cold start {metric} per seed: "
              + ", ".join(f"seed {s} {100 * cold[s][metric]:.1f}" for s in seeds)
              + f"; spread (max - min) {100 * (report['cold_start_spread'] or 0):.1f} points."]
    if not report["paired"]:
        return "\n".join(lines) + "\n"
    lines += ["", f"Paired difference in {metric} against {ref} (points), per seed and mean ± "
              "95% interval; wins / losses over seeds:", "",
              "| arm | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | W/L |",
              "|---" * (len(seeds) + 3) + "|"]
    for name, p in report["paired"].items():
        per = [f"{100 * d:+.1f}" for d in p["per_seed"]]
        per += ["–"] * (len(seeds) - len(per))
        lines.append(f"| {name} | " + " | ".join(per) + f" | {_cell(p)} | "
                     f"{p['wins']}/{p['losses']} |")
    names = [n for n, _ in DIAGNOSTICS] + ["ref_rows_per_step"]
    lines += ["", "Mechanism diagnostics per arm (mean over RL steps, then over seeds; rates as "
              "fractions; OTS weights at the rollout params; – = never logged):", "",
              "| arm | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for arm, d in report["diagnostics"].items():
        cells = ["–" if d.get(k) is None else f"{d[k]:.3g}" for k in names]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _figure(spec: StudySpec, out: Path) -> None:
    """Seed-averaged metrics per figure arm, drawn as the six dynamics panels."""
    from tapo_jax.train.metrics import read_metrics
    from tapo_jax.evaluation.plot import PANELS, plot_runs

    keys = {k for _, names in PANELS for k in names}
    dirs = []
    for arm in spec.figure_arms:
        by_step: dict[int, dict[str, list[float]]] = {}
        for s in spec.seeds:
            d = out / f"seed{s}" / arm
            if not (d / "metrics.jsonl").is_file():
                continue
            for r in read_metrics(d):
                for k in keys:
                    if isinstance(r.get(k), (int, float)):
                        by_step.setdefault(int(r["step"]), {}).setdefault(k, []).append(r[k])
        path = out / "figure_data" / arm
        path.mkdir(parents=True, exist_ok=True)
        with (path / "metrics.jsonl").open("w") as f:
            for step in sorted(by_step):
                rec = {"step": step, **{k: float(np.mean(v)) for k, v in by_step[step].items()}}
                f.write(json.dumps(rec) + "\n")
        dirs.append(path)
    plot_runs(dirs, out / "figure3.png", labels=list(spec.figure_arms), rolling=5,
              title=f"Training dynamics, mean over seeds {spec.seeds}")
