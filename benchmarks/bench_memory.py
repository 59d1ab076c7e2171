"""Per-device memory of a recipe's compiled programs, on a virtual CPU mesh, without running them.

For a config file and a device count, compiles (never runs) on ``--devices`` virtual CPU devices,
with abstract params, optimizer state and batches at the config's real shapes:

- ``rl``: the RL train step (the whole rollout batch as its argument, micro-batched inside as
  ``train.micro_batch_size`` says);
- ``logprob``: the teacher-forced log-prob forward (old / reference log-probs);
- ``sft``: the cold-start SFT step;
- ``decode``: the engine's decode call (``sampling.num_slots`` slots, a cache of
  ``max_prompt_len + max_new_tokens`` tokens, sampling-layout weights).

and prints one JSON line each: per-device argument, output, alias and temporary bytes (GB), the
live total (arguments + temporaries + outputs not aliased to a donated argument) and the compile
time, from XLA's ``compiled.memory_analysis()``.

    python benchmarks/bench_memory.py --config configs/qwen3_8b_tapo.yaml --devices 8
    python benchmarks/bench_memory.py --config configs/qwen3_0.6b_tapo.yaml --devices 8 \\
        --rows-per-device 1 --length 4096 --what rl          # the issue's fixed shape
    python benchmarks/bench_memory.py --config configs/qwen3_8b_tapo.yaml --devices 8 \\
        model.attention=xla model.remat=none model.scan_layers=false     # the old defaults

Trailing ``section.key=value`` arguments override the config, as on the ``tapo-jax`` CLI.
CPU figures of the partitioned program: a TPU or GPU compile of the same program differs in
layout padding and fusion, not in what is kept live.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--what", default="rl,logprob,sft,decode",
                   help="comma-separated: rl, logprob, sft, decode")
    p.add_argument("--length", type=int, default=0,
                   help="tokens per training row (default max_prompt_len + max_new_tokens)")
    p.add_argument("--rows-per-device", type=int, default=0,
                   help="training rows per device (default: the recipe's rollout batch, "
                        "batch_size x (num_samples + m_max for TAPO), split over the devices)")
    p.add_argument("--budget-gb", type=float, default=0.0,
                   help="exit 1 if a program's live total exceeds this (per device)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)

    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    from tapo_jax.config import load_config
    from tapo_jax.memory import logprob_memory, param_count, train_step_memory, decode_memory
    from tapo_jax.models import sharding as sharding_lib

    cfg = load_config(args.config, args.overrides)
    devices = jax.devices()[: args.devices]
    mesh = sharding_lib.make_mesh(cfg.mesh, devices=devices)
    n_batch = mesh.shape["data"] * mesh.shape["fsdp"]
    length = args.length or cfg.sampling.max_prompt_len + cfg.sampling.max_new_tokens
    if args.rows_per_device:
        rows = args.rows_per_device * n_batch
    else:
        per_query = cfg.rl.num_samples + (cfg.rl.m_max if cfg.rl.algorithm == "tapo" else 0)
        rows = cfg.train.batch_size * per_query
    mb = cfg.train.micro_batch_size
    unit = n_batch if mb <= 0 else max(mb, n_batch)
    rows = -(-rows // unit) * unit
    m = cfg.model
    common = {"config": args.config, "devices": args.devices, "mesh": dict(mesh.shape),
              "params_b": round(param_count(cfg) / 1e9, 3), "attention": m.attention,
              "remat": m.remat, "scan_layers": m.scan_layers, "dtype": m.dtype,
              "param_dtype": m.param_dtype}
    worst = 0.0
    for what in args.what.split(","):
        if what == "rl":
            stats = train_step_memory(cfg, mesh, kind="rl", rows=rows, length=length)
            shape = {"rows": rows, "length": length, "micro_batch_size": mb}
        elif what == "sft":
            cs_rows = -(-cfg.cold_start.batch_size // n_batch) * n_batch
            cs_len = cfg.cold_start.max_len or length
            stats = train_step_memory(cfg, mesh, kind="sft", rows=cs_rows, length=cs_len)
            shape = {"rows": cs_rows, "length": cs_len, "micro_batch_size": mb}
        elif what == "logprob":
            stats = logprob_memory(cfg, mesh, rows=rows, length=length, micro_batch_size=mb)
            shape = {"rows": rows, "length": length, "micro_batch_size": mb}
        elif what == "decode":
            stats = decode_memory(cfg, mesh)
            shape = {"slots": cfg.sampling.num_slots, "cache_len": length}
        else:
            print(f"unknown --what {what!r}", file=sys.stderr)
            return 2
        worst = max(worst, stats["total_gb"])
        print(json.dumps({"program": what, **shape, **common,
                          **{k: round(v, 3) if isinstance(v, float) else v
                             for k, v in stats.items()}}), flush=True)
    if args.budget_gb and worst > args.budget_gb:
        print(f"over budget: {worst:.2f} GB > {args.budget_gb} GB per device", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
