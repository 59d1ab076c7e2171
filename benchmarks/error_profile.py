"""Where a policy's answers to the embedded arithmetic task go wrong.

Greedy answers to the held-out problems of a run config (``make_splits`` of its data settings and
seed), classified by the task's oracle: correct, or the first wrong line (step 1-based, or the boxed answer line) and the kind of error
(``classify_error``: arithmetic, sign, operand, skipped, answer, missing, format), per number of
steps and in total. Prints one JSON line.

    python benchmarks/error_profile.py --model runs/demo/hf_cold_start --config configs/demo.yaml
"""

from __future__ import annotations

import argparse
import collections
import json


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="HF directory of the policy")
    p.add_argument("--config", default="configs/demo.yaml", help="run config (data settings)")
    p.add_argument("--seed", type=int, default=None, help="data seed (default: train.seed)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    args = p.parse_args(argv)

    from tapo_jax.config import load_config
    from tapo_jax.data import arithmetic as A
    from tapo_jax.data.datasets import format_prompt
    from tapo_jax.models.hf import load_hf
    from tapo_jax.sampling import generate

    cfg = load_config(args.config, [])
    if cfg.data.kind != "arithmetic":
        raise SystemExit("error_profile: the config's data.kind must be arithmetic")
    seed = cfg.train.seed if args.seed is None else args.seed
    _, problems = A.make_splits(cfg.data, seed)
    tok = A.build_tokenizer()
    ids = [tok(format_prompt(q.question, tok), add_special_tokens=False)["input_ids"]
           for q in problems]
    ro = generate(load_hf(args.model), ids, max_new_tokens=args.max_new_tokens, temperature=0.0,
                  stop_ids=[tok.convert_tokens_to_ids("<|im_end|>")])
    counts: collections.Counter = collections.Counter()
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
    total: collections.Counter = collections.Counter()
    for key, n in counts.items():
        parts = key.split("/")
        total[parts[1] if len(parts) == 2 else f"{parts[1]}/{parts[2]}"] += n
    print(json.dumps(dict(model=args.model, problems=len(problems), seed=seed,
                          by_outcome=dict(sorted(total.items())),
                          by_steps=dict(sorted(counts.items())))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
