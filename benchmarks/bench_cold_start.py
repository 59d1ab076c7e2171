"""Cold-start step time: the demo's cold start under two batch layouts, side by side.

- ``packed_q64``: length groups 64 tokens wide, each batch's rows packed in pairs (rows of
  twice the group's length, segment ids keep them apart): the cold start before
  ``cold_start.length_quantum`` / ``cold_start.packing`` existed.
- ``unpacked_q32``: length groups 32 tokens wide, rows unpacked (the defaults).

Both train the demo config's model on its own cold-start data (``cold_start.num_problems``
problems) with the same seed for ``--steps`` steps, each case in its own subprocess (its own
compilations). Prints one JSON line per case and round, then one with the medians:
``total_s`` (compilations included), ``s_per_step`` over the second half of the steps (every
group's shape compiled by then) and the final loss. The cases alternate over
``--rounds`` rounds (a shared machine's speed drifts by 20% over minutes).

    python benchmarks/bench_cold_start.py                 # 200 steps, 2 rounds (~10 min, 2 cores)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CASES = {
    "packed_q64": ["cold_start.length_quantum=64", "cold_start.packing=true"],
    "unpacked_q32": ["cold_start.length_quantum=32", "cold_start.packing=false"],
}


def run_case(name: str, steps: int, config: str) -> dict:
    import jax

    from tapo_jax.config import load_config
    from tapo_jax.data.arithmetic import cold_start_problems
    from tapo_jax.train.policy import Policy
    from tapo_jax.train.sft import run_cold_start
    from tapo_jax.train.state import make_optimizer, optim_config_for, train_state_from_params

    cfg = load_config(config, [f"cold_start.steps={steps}", "cold_start.target_pass1=null",
                               "train.log_every=10"] + CASES[name])
    policy = Policy(cfg)
    cfg = policy.cfg
    state, _ = train_state_from_params(policy.params, make_optimizer(*optim_config_for(cfg, "sft")),
                                       policy.mesh, donate=True)
    problems = cold_start_problems(cfg.data, cfg.train.seed, cfg.cold_start.num_problems)
    elapsed: dict[int, float] = {}

    def log_fn(step: int, metrics: dict) -> None:
        elapsed[step] = metrics["elapsed_s"]

    state, summary = run_cold_start(cfg, graphdef=policy.graphdef, state=state,
                                    mesh=policy.mesh, tokenizer=policy.tokenizer,
                                    problems=problems, log_fn=log_fn, progress=False)
    jax.block_until_ready(state.params)
    half = max(s for s in elapsed if s <= steps // 2)
    return dict(case=name, steps=steps, total_s=round(summary["seconds"], 1),
                s_per_step=round((elapsed[steps] - elapsed[half]) / (steps - half), 4),
                length_groups=summary["length_buckets"], final_loss=summary["final_loss"],
                backend=jax.default_backend())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps < 20:
        ap.error("--steps must be >= 20")
    if args.case:
        print(json.dumps(run_case(args.case, args.steps, args.config)), flush=True)
        return
    results: dict[str, list[dict]] = {name: [] for name in CASES}
    for r in range(args.rounds):
        for name in CASES:
            out = subprocess.run([sys.executable, __file__, "--case", name, "--steps",
                                  str(args.steps), "--config", args.config],
                                 capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["round"] = r
            results[name].append(row)
            print(json.dumps(row), flush=True)
    med = {name: dict(total_s=statistics.median(x["total_s"] for x in rows),
                      s_per_step=statistics.median(x["s_per_step"] for x in rows))
           for name, rows in results.items()}
    old, new = med["packed_q64"], med["unpacked_q32"]
    print(json.dumps(dict(summary=med,
                          step_speedup=round(old["s_per_step"] / new["s_per_step"], 3),
                          total_speedup=round(old["total_s"] / new["total_s"], 3))))


if __name__ == "__main__":
    main()
