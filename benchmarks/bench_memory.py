"""Per-device memory of a recipe's compiled programs, on a virtual CPU mesh, without running them.

For a config file and a device count, compiles (never runs) on ``--devices`` virtual CPU devices,
with abstract params, optimizer state and batches at the config's real shapes:

- ``rl``: the RL train step (the whole rollout batch as its argument, micro-batched inside as
  ``train.micro_batch_size`` says);
- ``logprob``: the teacher-forced log-prob forward (old / reference log-probs);
- ``sft``: the cold-start SFT step;
- ``decode``: the engine's decode call (``sampling.num_slots`` slots, the run sampler's cache
  length: for TAPO the synthesis prompt plus construction budget; sampling-layout weights).
  ``temp_gb_native`` is its temporaries without XLA:CPU's float32 copies of bf16 operands
  (see ``tapo_jax.memory.decode_memory``).

and prints one JSON line each: per-device argument, output, alias and temporary bytes (GB), the
live total (arguments + temporaries + outputs not aliased to a donated argument) and the compile
time, from XLA's ``compiled.memory_analysis()``. With ``rl`` and ``decode``, a ``run_peak``
line adds what lives through the whole run (the train state and the sampler's weight copy) to
each program's own figure; ``--budget-gb`` fails the run when that peak exceeds the budget.

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

    from tapo_jax.config import load_config, sampler_max_len
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
    results = {}
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
            shape = {"slots": cfg.sampling.num_slots, "cache_len": sampler_max_len(cfg)}
        else:
            print(f"unknown --what {what!r}", file=sys.stderr)
            return 2
        results[what] = stats
        native = (stats["argument_gb"] + stats["temp_gb_native"] if what == "decode"
                  else stats["total_gb"])
        worst = max(worst, native)
        print(json.dumps({"program": what, **shape, **common,
                          **{k: round(v, 3) if isinstance(v, float) else v
                             for k, v in stats.items()}}), flush=True)
    if {"rl", "decode"} <= set(results):
        # The train state and the sampler's weights live through the whole run: each program's
        # peak adds what it does not already take as an argument.
        train_state = results["rl"]["argument_gb"]
        sampler_weights = _sampler_weight_gb(cfg, mesh)
        dec = results["decode"]
        peaks = {"rl": results["rl"]["total_gb"] + sampler_weights,
                 "decode": dec["argument_gb"] + dec["temp_gb_native"] + train_state}
        if "logprob" in results:
            peaks["logprob"] = results["logprob"]["total_gb"] + train_state + sampler_weights
        peak = max(peaks.values())
        worst = max(worst, peak)
        print(json.dumps({"program": "run_peak", **common, "train_state_gb": round(train_state, 3),
                          "sampler_weights_gb": round(sampler_weights, 3),
                          **{f"peak_{k}_gb": round(v, 3) for k, v in peaks.items()},
                          "peak_gb": round(peak, 3)}), flush=True)
    if args.budget_gb and worst > args.budget_gb:
        print(f"over budget: {worst:.2f} GB > {args.budget_gb} GB per device", file=sys.stderr)
        return 1
    return 0


def _sampler_weight_gb(cfg, mesh) -> float:
    """Per-device bytes of the engine's weight copy (compute dtype, sampling shardings)."""
    import jax
    import numpy as np

    from tapo_jax.models import sharding as sharding_lib
    from tapo_jax.sampling.engine import _decode_params
    from tapo_jax.train.state import abstract_params

    params = jax.eval_shape(lambda p: _decode_params(cfg.model, p),
                            abstract_params(cfg.model)[1])
    shardings = sharding_lib.state_shardings(params, mesh, sharding_lib.SAMPLE_RULES)
    total = 0
    for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)):
        shard = s.shard_shape(x.shape)
        total += int(np.prod(shard)) * x.dtype.itemsize
    return total / 1e9


if __name__ == "__main__":
    sys.exit(main())
