"""Math reward throughput, and the MATH-500 self-consistency check.

    python benchmarks/bench_reward.py [--workers 2] [--n 4000] [--math-json path/to/math.json]

Prints one JSON line per case. Throughput cases (the workers are started and warm before timing;
startup time is its own line):
  int          integer answers only (settled in the calling process, no worker)
  rational     \\frac{a}{b} / decimal / a/b answers (exact Fractions in the calling process)
  sympy        distinct symbolic answers (radicals, pi, polynomials): every pair goes to a worker
  mix          50% int, 25% rational, 25% symbolic, all distinct
  rl_groups    8 samples per problem drawn from a few candidate answers (repeats hit the cache)
With --math-json: every gold answer, boxed, must verify against itself, once through the whole
reward and once with the exact fast paths off (every pair through sympy); prints the failures.
"""

from __future__ import annotations

import argparse
import json
import random
import time

from tapo_jax.rewards.verifier import Verifier, reason_counts


def _int_pairs(rng: random.Random, n: int) -> list[tuple[str, str]]:
    out = []
    for _ in range(n):
        g = rng.randint(-10**6, 10**6)
        p = g if rng.random() < 0.5 else g + rng.randint(1, 9)
        out.append((str(g), f"Adding these up gives \\boxed{{{p}}}."))
    return out


def _rational_pairs(rng: random.Random, n: int) -> list[tuple[str, str]]:
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 999), rng.choice([2, 4, 5, 8, 10, 16, 20, 25])
        k = rng.randint(1, 5)
        form = rng.randrange(3)
        if form == 0:
            pred = f"\\dfrac{{{a * k}}}{{{b * k}}}"
        elif form == 1:
            pred = repr(a / b)
        else:
            pred = f"{a + (rng.random() < 0.5)}/{b}"
        out.append((f"\\frac{{{a}}}{{{b}}}", f"So the ratio is $\\boxed{{{pred}}}$."))
    return out


def _sympy_pairs(rng: random.Random, n: int) -> list[tuple[str, str]]:
    out = []
    seen = set()
    while len(out) < n:
        a, b, c = rng.randint(2, 40), rng.choice([2, 3, 5, 6, 7]), rng.randint(1, 60)
        form = rng.randrange(3)
        if form == 0:
            gold, pred = f"{a}\\sqrt{{{b}}}", f"\\sqrt{{{a * a * b}}}"
        elif form == 1:
            gold, pred = f"{c}\\pi", f"\\frac{{{2 * c}\\pi}}{{2}}"
        else:
            gold, pred = f"{a}x^2 + {c}x + {b}", f"{b} + {c}x + {a}x^2"
        if rng.random() < 0.3:
            pred = pred.replace(str(b), str(b + 1), 1)
        if (gold, pred) not in seen:
            seen.add((gold, pred))
            out.append((gold, f"Therefore \\boxed{{{pred}}}"))
    return out


def _time(verifier: Verifier, case: str, pairs: list[tuple[str, str]], **extra) -> None:
    golds = [g for g, _ in pairs]
    responses = [r for _, r in pairs]
    verifier.clear_cache()  # each case starts cold; repeats inside a case may hit the cache
    before = verifier.stats.as_dict()
    t0 = time.perf_counter()
    _, reasons = verifier.score(responses, golds)
    dt = time.perf_counter() - t0
    after = verifier.stats.as_dict()
    delta = {k: after[k] - before[k] for k in after if isinstance(after[k], int)}
    print(json.dumps({
        "case": case, "n": len(pairs), "seconds": round(dt, 4),
        "scores_per_s": round(len(pairs) / dt, 1), "reasons": reason_counts(reasons),
        "stats": delta, **extra,
    }), flush=True)


def _math_self_check(path: str, workers: int) -> None:
    with open(path) as f:
        rows = json.load(f)
    golds = [str(r["answer"]) for r in rows]
    responses = [f"The final answer is $\\boxed{{{g}}}$." for g in golds]
    for case, fast_path in (("math500_self_check", True), ("math500_self_check_sympy", False)):
        with Verifier(num_workers=workers, fast_path=fast_path) as v:
            v.start(wait=True)
            t0 = time.perf_counter()
            _, reasons = v.score(responses, golds)
            dt = time.perf_counter() - t0
        failures = [(g, r) for g, r in zip(golds, reasons) if r != "correct"]
        print(json.dumps({
            "case": case, "n": len(golds), "failed": len(failures), "seconds": round(dt, 3),
            "reasons": reason_counts(reasons), "examples": failures[:10],
        }), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--n", type=int, default=4000, help="items per in-process case")
    ap.add_argument("--n-sympy", type=int, default=400, help="items per worker-bound case")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--math-json", default=None)
    args = ap.parse_args()
    rng = random.Random(args.seed)

    with Verifier(num_workers=args.workers) as v:
        t0 = time.perf_counter()
        v.start(wait=True)
        print(json.dumps({"case": "worker_startup", "workers": args.workers,
                          "seconds": round(time.perf_counter() - t0, 3)}), flush=True)
        _time(v, "int", _int_pairs(rng, args.n))
        _time(v, "rational", _rational_pairs(rng, args.n))
        _time(v, "sympy", _sympy_pairs(rng, args.n_sympy))
        k = args.n_sympy  # the mix has as many symbolic items as the sympy case
        mix = _int_pairs(rng, 2 * k) + _rational_pairs(rng, k) + _sympy_pairs(rng, k)
        rng.shuffle(mix)
        _time(v, "mix", mix)
        groups = []
        for gold, response in _sympy_pairs(rng, args.n // 8):
            wrong = response.replace("\\boxed{", "\\boxed{2+", 1)
            groups += [(gold, rng.choice([response, response, wrong])) for _ in range(8)]
        _time(v, "rl_groups", groups, samples_per_problem=8)

    if args.math_json:
        _math_self_check(args.math_json, args.workers)


if __name__ == "__main__":
    main()
