"""The ``tapo-jax`` command line: train, eval, sample, plot, convert, filter.

Every subcommand takes ``--config FILE`` (optional where defaults make sense) followed by dotted
``key=value`` overrides, e.g. ``tapo-jax train --config configs/demo.yaml train.steps=10``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from tapo_jax.config import ConfigError, load_config


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.num_layers=2")


def _cmd_train(args: argparse.Namespace) -> int:
    from tapo_jax.train.run import run_training

    cfg = load_config(args.config, args.overrides)
    run_training(cfg)
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    from tapo_jax.study import load_study, run_study

    spec = load_study(args.config, quick=args.quick, output_dir=args.out,
                      overrides=args.overrides,
                      arms=args.arms.split(",") if args.arms else None,
                      seeds=[int(x) for x in args.seeds.split(",")] if args.seeds else None)
    if args.cold_start_only:
        spec = dataclasses.replace(spec, arms={}, figure_arms=[])
    run_study(spec)
    return 0


def _config_for(args: argparse.Namespace):
    """``--config`` with the overrides; without it, the config a checkpoint's run directory
    recorded (``DIR/config.yaml``, also for ``DIR/checkpoints``), else the defaults."""
    path = args.config
    if path is None and args.checkpoint:
        from pathlib import Path

        ckpt = Path(args.checkpoint)
        for run_dir in (ckpt, ckpt.parent):
            if (run_dir / "config.yaml").is_file():
                path = str(run_dir / "config.yaml")
                break
    return load_config(path, args.overrides)


def _cmd_eval(args: argparse.Namespace) -> int:
    from tapo_jax.train.inference import run_evaluation

    cfg = _config_for(args)
    run_evaluation(cfg, checkpoint=args.checkpoint, out_dir=args.out)
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from tapo_jax.train.inference import run_sample

    cfg = _config_for(args)
    run_sample(cfg, prompts=args.prompt, n=args.n, checkpoint=args.checkpoint)
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from tapo_jax.evaluation.plot import plot_runs

    out = plot_runs(args.run_dirs, args.out)
    print(f"wrote {out}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    if "--from-checkpoint" not in args.rest:
        from tapo_jax.models.hf import convert_main

        return convert_main(args.rest)
    p = argparse.ArgumentParser(prog="tapo-jax convert --from-checkpoint",
                                description="export a training checkpoint as an HF directory")
    p.add_argument("--from-checkpoint", required=True, metavar="DIR",
                   help="run directory or its checkpoints/ directory (newest step is used)")
    p.add_argument("--to-hf", required=True, metavar="OUT")
    p.add_argument("--config", "-c", default=None,
                   help="the run's config (default: DIR/config.yaml)")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(args.rest)
    from pathlib import Path

    from tapo_jax.train.inference import export_checkpoint

    config = a.config
    if config is None:
        run_dir = Path(a.from_checkpoint)
        run_dir = run_dir.parent if run_dir.name == "checkpoints" else run_dir
        config = str(run_dir / "config.yaml")
    cfg = load_config(config, a.overrides)
    print(f"wrote {export_checkpoint(cfg, a.from_checkpoint, a.to_hf)}")
    return 0


def _cmd_filter(args: argparse.Namespace) -> int:
    from tapo_jax.train.inference import run_filter

    cfg = _config_for(args)
    run_filter(cfg, out_path=args.out, n=args.n, lo=args.lo, hi=args.hi, checkpoint=args.checkpoint)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tapo-jax",
        description="TAPO / GRPO / OPSD / SFT training of Qwen3 models in JAX.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="cold start and/or RL training (GRPO, TAPO, OPSD)")
    _add_config_args(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("study", help="paired multi-seed study: one cold start per seed, every "
                       "arm from it; table with 95%% intervals, paired differences, diagnostics")
    p.add_argument("--config", "-c", default="configs/study.yaml", help="study config")
    p.add_argument("--quick", action="store_true", help="the config's quick preset")
    p.add_argument("--out", default=None, help="output directory (default: from the config)")
    p.add_argument("--arms", default=None, help="comma-separated arms of the config to run")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (replace the config's)")
    p.add_argument("--cold-start-only", action="store_true",
                   help="train and evaluate only the seeds' cold starts (their spread over "
                   "seeds); report in cold_starts.md / .json beside the study's")
    p.add_argument("overrides", nargs="*", help="run-config overrides applied to every run")
    p.set_defaults(func=_cmd_study)

    p = sub.add_parser("eval", help="Pass@k, DSR and ERR of a policy on a dataset")
    _add_config_args(p)
    p.add_argument("--checkpoint", default=None, help="run dir, checkpoint dir or HF dir")
    p.add_argument("--out", default=None, help="output directory (default: train.output_dir/eval)")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("sample", help="sample completions for prompts")
    _add_config_args(p)
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--checkpoint", default=None)
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("plot", help="draw the six training-dynamics panels of one or more runs")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out", default="training_dynamics.png")
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("convert", help="convert between HF checkpoints and tapo-jax checkpoints")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="see `tapo-jax convert --help`")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("filter", help="keep problems whose pass rate lies in [lo, hi]")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="output JSONL path")
    p.add_argument("--n", type=int, default=8, help="samples per problem")
    p.add_argument("--lo", type=float, default=0.125)
    p.add_argument("--hi", type=float, default=0.875)
    p.add_argument("--checkpoint", default=None)
    p.set_defaults(func=_cmd_filter)
    return parser


_JAX_COMMANDS = ("train", "eval", "sample", "filter", "study")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in _JAX_COMMANDS:
            # multi-host jobs connect their processes before anything touches a device
            from tapo_jax.train.distributed import initialize_distributed

            initialize_distributed()
        return args.func(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a missing or unreadable checkpoint: its message names the path
        from tapo_jax.types import CheckpointError

        if not isinstance(e, CheckpointError):
            raise
        print(f"checkpoint error: {e}", file=sys.stderr)
        return 2


def entry() -> int:
    """The ``tapo-jax`` command (and ``python -m tapo_jax.cli``): :func:`main` in a process
    whose malloc uses transparent huge pages (tapo_jax.hostmem)."""
    from tapo_jax.hostmem import reexec_with_hugepage_malloc

    reexec_with_hugepage_malloc()
    return main()


if __name__ == "__main__":
    sys.exit(entry())
