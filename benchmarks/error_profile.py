"""Where a policy's answers to the embedded arithmetic task go wrong.

Greedy answers to the held-out problems of a run config (``make_splits`` of its data settings and
seed), classified by the task's oracle: correct, or the first wrong line (step 1-based, or the boxed answer line) and the kind of error
(``classify_error``: arithmetic, sign, operand, skipped, answer, missing, format), per number of
steps and in total, and how far each first wrong result is from the right one (``error_offset``:
off by 1, 2, 10 or more, wrong operands, other). Prints one JSON line.

``--slips N`` profiles instead N wrong solutions as the config's cold start draws them
(``cold_start.slip_kinds``), with no model: the two profiles side by side show whether the
cold start's construction examples teach the errors the policy makes.

    python benchmarks/error_profile.py --model runs/demo/hf_cold_start --config configs/demo.yaml
    python benchmarks/error_profile.py --slips 3000 --config configs/demo.yaml
"""

from __future__ import annotations

import argparse
import collections
import json


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="HF directory of the policy")
    p.add_argument("--slips", type=int, default=0,
                   help="profile N cold-start slips of the config instead of a policy")
    p.add_argument("--config", default="configs/demo.yaml", help="run config (data settings)")
    p.add_argument("--seed", type=int, default=None, help="data seed (default: train.seed)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = p.parse_args(argv)
    if bool(args.model) == bool(args.slips):
        p.error("give exactly one of --model and --slips")

    from tapo_jax.config import load_config
    from tapo_jax.data import arithmetic as A
    from tapo_jax.data.datasets import format_prompt
    from tapo_jax.models.hf import load_hf
    from tapo_jax.sampling import generate

    cfg = load_config(args.config, args.overrides)
    if cfg.data.kind != "arithmetic":
        raise SystemExit("error_profile: the config's data.kind must be arithmetic")
    seed = cfg.train.seed if args.seed is None else args.seed
    if args.slips:
        print(json.dumps(slip_profile(cfg, args.slips, seed)))
        return 0
    _, problems = A.make_splits(cfg.data, seed)
    tok = A.build_tokenizer()
    ids = [tok(format_prompt(q.question, tok), add_special_tokens=False)["input_ids"]
           for q in problems]
    ro = generate(load_hf(args.model), ids, max_new_tokens=args.max_new_tokens, temperature=0.0,
                  stop_ids=[tok.convert_tokens_to_ids("<|im_end|>")])
    counts: collections.Counter = collections.Counter()
    offsets: collections.Counter = collections.Counter()
    for i in range(len(ro)):
        q = problems[ro.prompt_index[i]]
        text = tok.decode(ro.tokens[i][: ro.lengths[i]], skip_special_tokens=True)
        steps = len(A.parse_question(q.question)[1])
        k = A.first_error_step(q.question, text)
        if k is None:
            counts[f"{steps}_steps/correct"] += 1
        else:  # line k (0-based); line `steps` is the boxed answer
            where = f"step_{k + 1}" if k < steps else "answer_line"
            counts[f"{steps}_steps/{where}/{A.classify_error(q.question, text, k)}"] += 1
            offsets[A.error_offset(q.question, text, k)] += 1
    total: collections.Counter = collections.Counter()
    for key, n in counts.items():
        parts = key.split("/")
        total[parts[1] if len(parts) == 2 else f"{parts[1]}/{parts[2]}"] += n
    print(json.dumps(dict(model=args.model, problems=len(problems), seed=seed,
                          by_outcome=dict(sorted(total.items())),
                          by_steps=dict(sorted(counts.items())),
                          first_error_offset=shares(offsets))))
    return 0


def shares(counts: collections.Counter) -> dict:
    from tapo_jax.data.arithmetic import OFFSET_CLASSES

    n = sum(counts.values())
    return dict(errors=n, **{k: round(counts[k] / n, 4) if n else None for k in OFFSET_CLASSES})


def slip_profile(cfg, n: int, seed: int) -> dict:
    """``error_offset`` shares of ``n`` wrong solutions drawn as the cold start draws them."""
    import numpy as np

    from tapo_jax.config import slip_kind_list
    from tapo_jax.data import arithmetic as A

    kinds = slip_kind_list(cfg.cold_start.slip_kinds)
    rng = np.random.default_rng(seed)
    problems = A.cold_start_problems(cfg.data, seed, n)
    offsets: collections.Counter = collections.Counter()
    for p in problems:
        slip = A.draw_slip(p, rng, kinds)
        if slip is not None:
            offsets[A.error_offset(p.question, slip.text, slip.step)] += 1
    return dict(slips=n, seed=seed, slip_kinds=cfg.cold_start.slip_kinds or "(default)",
                first_error_offset=shares(offsets))


if __name__ == "__main__":
    raise SystemExit(main())
