"""Top-p draw cost per decode step: the three ways to draw one token per row from a nucleus.

- ``sort``: sort the vocabulary, cumulative sum, cut, draw (what transformers' and Tunix's
  top-p samplers do);
- ``mask``: tapo_jax's sort-free kept set (``truncation_mask``: exact bisection over float32 bit
  patterns, 31 passes over the vocabulary) then an inverse-CDF draw;
- ``rejection``: tapo_jax's default when no row uses top-k (``draw_truncated``: propose from the
  untruncated distribution, accept iff kept, one pass per proposal; masked fallback).

All three are jitted on the same probabilities (softmax of random logits of the given scale at
temperature 0.6) and timed alternately; one JSON line per vocabulary size with the median
milliseconds per call over ``--rounds`` calls, and the rows' mean number of proposals.

    python benchmarks/bench_truncation.py                       # 64 rows; vocab 4096, 151936
    python benchmarks/bench_truncation.py --rows 256 --vocab 151936 --top-p 0.95
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--vocab", type=int, nargs="+", default=[4096, 151936])
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--logit-scale", type=float, default=3.0,
                   help="std of the random logits (0.02: a random model's near-flat logits)")
    p.add_argument("--rounds", type=int, default=30)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from tapo_jax.sampling.logits import (REJECTION_TRIES, draw_inverse_cdf, draw_truncated,
                                          truncation_mask, uniforms)

    def by_sort(probs, keys, top_p):
        order = jnp.argsort(-probs, axis=-1)
        sorted_p = jnp.take_along_axis(probs, order, axis=-1)
        before = jnp.cumsum(sorted_p, axis=-1) - sorted_p
        kept = jnp.where(before < top_p[:, None], sorted_p, 0.0)
        choice = draw_inverse_cdf(keys, kept)
        return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]

    def by_mask(probs, keys, top_p):
        zeros = jnp.zeros(probs.shape[:1])
        keep = truncation_mask(probs, zeros.astype(jnp.int32), top_p, zeros)
        return draw_inverse_cdf(keys, jnp.where(keep, probs, 0.0))

    def by_rejection(probs, keys, top_p):
        zeros = jnp.zeros(probs.shape[:1])
        return draw_truncated(probs, zeros.astype(jnp.int32), top_p, zeros,
                              uniforms(keys, REJECTION_TRIES + 1))

    fns = {"sort": jax.jit(by_sort), "mask": jax.jit(by_mask),
           "rejection": jax.jit(by_rejection)}
    for vocab in args.vocab:
        rng = np.random.default_rng(0)
        logits = rng.normal(0.0, args.logit_scale, (args.rows, vocab)).astype(np.float32)
        probs = jax.nn.softmax(jnp.asarray(logits) / 0.6, axis=-1)
        top_p = jnp.full((args.rows,), args.top_p, jnp.float32)

        def keys(r):
            return jax.random.key_data(jax.random.split(jax.random.key(r), args.rows))

        for f in fns.values():
            f(probs, keys(0), top_p).block_until_ready()
        times: dict[str, list[float]] = {k: [] for k in fns}
        for r in range(args.rounds):
            k = keys(r + 1)
            k.block_until_ready()
            for name, f in fns.items():
                t0 = time.perf_counter()
                f(probs, k, top_p).block_until_ready()
                times[name].append(time.perf_counter() - t0)
        # the nucleus mass sets the acceptance rate: mean proposals per row = 1 / P(nucleus)
        s = np.sort(np.asarray(probs, np.float64), axis=-1)[:, ::-1]
        before = np.cumsum(s, axis=-1) - s
        mass = np.where(before < args.top_p, s, 0.0).sum(-1)
        ms = {k: round(1e3 * float(np.median(v)), 3) for k, v in times.items()}
        print(json.dumps({
            "case": "top_p_draw", "rows": args.rows, "vocab": vocab, "top_p": args.top_p,
            "logit_scale": args.logit_scale, "rounds": args.rounds, "ms_per_call": ms,
            "mask_over_rejection": round(ms["mask"] / ms["rejection"], 2),
            "sort_over_rejection": round(ms["sort"] / ms["rejection"], 2),
            "mean_proposals_per_row": round(float(np.mean(1.0 / mass)), 3),
            "backend": jax.default_backend()}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
