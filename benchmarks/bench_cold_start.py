"""Cold-start step time: the demo's cold start under two batch layouts and two host allocators.

- ``packed_q64``: length groups 64 tokens wide, each batch's rows packed in pairs (rows of
  twice the group's length, segment ids keep them apart): the cold start before
  ``cold_start.length_quantum`` / ``cold_start.packing`` existed.
- ``unpacked_q32``: length groups 32 tokens wide, rows unpacked (the defaults), glibc's malloc
  as a plain ``python`` process has it.
- ``unpacked_q32_hugepages``: the same with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, as the
  ``tapo-jax`` command runs (tapo_jax.hostmem): XLA:CPU's per-step temporaries on transparent
  huge pages instead of freshly faulted 4 KB pages.

Both train the demo config's model on its own cold-start data (``cold_start.num_problems``
problems) with the same seed for ``--steps`` steps, each case in its own subprocess (its own
compilations, its own environment). Prints one JSON line per case and round, then one with the
medians: ``total_s`` (compilations included), ``s_per_step``, ``faults_per_step`` (minor page
faults) and ``sys_s_per_step`` (kernel time) over the second half of the steps (every group's
shape compiled by then), the final loss, and each case's speedups over ``unpacked_q32``. The
cases alternate over ``--rounds`` rounds (a shared machine's speed drifts by 20% over minutes).

    python benchmarks/bench_cold_start.py                 # 200 steps, 2 rounds (~15 min, 2 cores)
    python benchmarks/bench_cold_start.py --cases unpacked_q32,unpacked_q32_hugepages
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys

_Q32 = ["cold_start.length_quantum=32", "cold_start.packing=false"]
CASES = {  # name: (config overrides, environment added to the case's process)
    "packed_q64": (["cold_start.length_quantum=64", "cold_start.packing=true"], {}),
    "unpacked_q32": (_Q32, {}),
    "unpacked_q32_hugepages": (_Q32, {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}),
}
BASELINE = "unpacked_q32"


def run_case(name: str, steps: int, config: str) -> dict:
    import jax

    from tapo_jax.config import load_config
    from tapo_jax.data.arithmetic import cold_start_problems
    from tapo_jax.train.policy import Policy
    from tapo_jax.train.sft import run_cold_start
    from tapo_jax.train.state import make_optimizer, optim_config_for, train_state_from_params

    cfg = load_config(config, [f"cold_start.steps={steps}", "cold_start.target_pass1=null",
                               "train.log_every=10"] + CASES[name][0])
    policy = Policy(cfg)
    cfg = policy.cfg
    state, _ = train_state_from_params(policy.params, make_optimizer(*optim_config_for(cfg, "sft")),
                                       policy.mesh, donate=True)
    problems = cold_start_problems(cfg.data, cfg.train.seed, cfg.cold_start.num_problems)
    elapsed: dict[int, float] = {}
    usage: dict[int, resource.struct_rusage] = {}

    def log_fn(step: int, metrics: dict) -> None:
        elapsed[step] = metrics["elapsed_s"]
        usage[step] = resource.getrusage(resource.RUSAGE_SELF)

    state, summary = run_cold_start(cfg, graphdef=policy.graphdef, state=state,
                                    mesh=policy.mesh, tokenizer=policy.tokenizer,
                                    problems=problems, log_fn=log_fn, progress=False)
    jax.block_until_ready(state.params)
    half = max(s for s in elapsed if s <= steps // 2)
    n = steps - half
    return dict(case=name, steps=steps, total_s=round(summary["seconds"], 1),
                s_per_step=round((elapsed[steps] - elapsed[half]) / n, 4),
                faults_per_step=round((usage[steps].ru_minflt - usage[half].ru_minflt) / n),
                sys_s_per_step=round((usage[steps].ru_stime - usage[half].ru_stime) / n, 4),
                glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""),
                length_groups=summary["length_buckets"], final_loss=summary["final_loss"],
                backend=jax.default_backend())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--cases", default=",".join(CASES),
                    help=f"comma-separated subset of {', '.join(CASES)} (must include {BASELINE})")
    ap.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps < 20:
        ap.error("--steps must be >= 20")
    if args.case:
        print(json.dumps(run_case(args.case, args.steps, args.config)), flush=True)
        return
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown or BASELINE not in cases:
        ap.error(f"--cases: unknown {unknown}" if unknown else f"--cases must include {BASELINE}")
    base_env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    results: dict[str, list[dict]] = {name: [] for name in cases}
    for r in range(args.rounds):
        for name in cases:
            out = subprocess.run([sys.executable, __file__, "--case", name, "--steps",
                                  str(args.steps), "--config", args.config],
                                 capture_output=True, text=True, check=True,
                                 env={**base_env, **CASES[name][1]})
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["round"] = r
            results[name].append(row)
            print(json.dumps(row), flush=True)
    keys = ("total_s", "s_per_step", "faults_per_step", "sys_s_per_step")
    med = {name: {k: statistics.median(x[k] for x in rows) for k in keys}
           for name, rows in results.items()}
    base = med[BASELINE]
    speedup = {name: dict(step=round(base["s_per_step"] / m["s_per_step"], 3),
                          total=round(base["total_s"] / m["total_s"], 3))
               for name, m in med.items() if name != BASELINE}
    print(json.dumps(dict(summary=med, speedup_over_baseline=speedup, baseline=BASELINE)))


if __name__ == "__main__":
    main()
