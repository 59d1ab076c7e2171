"""How well a policy writes micro-reflective reconstructions on the embedded arithmetic task.

The RL loop's construction path, offline and on one policy: rollouts of the policy to the
first ``--problems`` training problems of a run config (``num_samples`` each, at the rollout
temperature / top-p), rewarded by the math verifier; DCS (``n_pos``, ``n_neg``, ``m_max``); the
synthesis prompt of each (wrong, reference) pair; the policy's construction at the construction
temperature / top-p; strict parsing; every reconstruction judged by the task's oracle
(``tapo_jax.construction.diagnostics.check_construction``). Prints one JSON line:

- the RL loop's rates (``parse_rate``, ``success_rate``, ``verbatim_prefix_rate``,
  ``recovery_rate``, ``reflect_rate``, ``reflect_early_rate``, ``reflect_late_rate``) and the ZPD
  share;
- ``analysis_step_accuracy``: over parsed constructions, the analysis names the wrong
  response's first error step (its last ``Step k:``, either of the cold start's analysis
  styles); ``analysis_at_error_rate`` is the same over those whose wrong response has an error
  the oracle locates (the RL loop's diagnostic);
- ``reference_diverges_at_error``: the share of pairs whose reference's first line that differs
  from the wrong response is that response's first error line (where comparing the two locates
  the error);
- ``outcomes``: counts per placement of the reflection (``at_error`` verbatim or with the prefix
  altered, ``early``, ``late``, ``none``) and unparsed outputs; ``--examples N`` adds N texts of
  each.

    python benchmarks/construction_quality.py --model runs/demo/hf_cold_start --config configs/demo.yaml
"""

from __future__ import annotations

import argparse
import collections
import json


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="HF directory of the policy")
    p.add_argument("--config", default="configs/demo.yaml", help="run config (data, rl, sampling)")
    p.add_argument("--seed", type=int, default=None, help="data seed (default: train.seed)")
    p.add_argument("--problems", type=int, default=128, help="training problems rolled out")
    p.add_argument("--sample-seed", type=int, default=0, help="seed of rollouts and constructions")
    p.add_argument("--examples", type=int, default=0, help="texts shown per outcome")
    p.add_argument("overrides", nargs="*", help="config overrides KEY=VALUE")
    args = p.parse_args(argv)

    import numpy as np
    from flax import nnx

    from tapo_jax.config import construction_budget, load_config
    from tapo_jax.construction import diagnostics as D
    from tapo_jax.construction import selection as dcs
    from tapo_jax.construction import synthesis
    from tapo_jax.data import arithmetic as A
    from tapo_jax.data.datasets import format_prompt
    from tapo_jax.data.tokenizers import end_of_turn_id
    from tapo_jax.models.hf import load_hf
    from tapo_jax.rewards.verifier import score
    from tapo_jax.sampling.sampler import Sampler

    cfg = load_config(args.config, args.overrides)
    if cfg.data.kind != "arithmetic":
        raise SystemExit("construction_quality: the config's data.kind must be arithmetic")
    rl, sc = cfg.rl, cfg.sampling
    seed = cfg.train.seed if args.seed is None else args.seed
    problems = A.make_splits(cfg.data, seed)[0][: args.problems]
    tok = A.build_tokenizer()
    stop = [end_of_turn_id(tok)]

    def encode(text: str) -> list[int]:
        return tok(format_prompt(text, tok), add_special_tokens=False)["input_ids"]

    def texts_of(ro, n_prompts: int, n: int) -> list[list[str]]:
        out: list[list[str]] = [[] for _ in range(n_prompts)]
        for i in range(len(ro)):
            out[ro.prompt_index[i]].append(
                tok.decode(ro.tokens[i][: ro.lengths[i]], skip_special_tokens=True))
        assert all(len(o) == n for o in out)
        return out

    graphdef, params = nnx.split(load_hf(args.model), nnx.Param)
    budget = construction_budget(cfg)
    prompt_len = max(len(encode(q.question)) for q in problems)
    sampler = Sampler(graphdef, params, num_slots=sc.num_slots,
                      max_len=max(prompt_len + sc.max_new_tokens, 4 * sc.max_prompt_len + budget))
    K = rl.num_samples
    ro = sampler.generate([encode(q.question) for q in problems], n=K,
                          max_new_tokens=sc.max_new_tokens, temperature=sc.temperature,
                          top_p=sc.top_p, stop_ids=stop, seed=args.sample_seed)
    texts = texts_of(ro, len(problems), K)
    rewards, _ = score([t for g in texts for t in g],
                       [str(q.answer) for q in problems for _ in range(K)])
    rewards = np.asarray(rewards, np.float32).reshape(len(problems), K)
    sel = dcs.select_candidates(rewards, n_pos=rl.n_pos, n_neg=rl.n_neg, m_max=rl.m_max,
                                rng=np.random.default_rng(args.sample_seed))
    pairs = [(problems[s.query], texts[s.query][s.wrong], texts[s.query][s.ref])
             for s in sel.pairs]
    style = synthesis.resolve_style(rl.synthesis_template, cfg.data.kind)
    prompts = [synthesis.build_synthesis_prompt(q.question, w, r, style=style, mode=rl.construction)
               for q, w, r in pairs]
    outs = [g[0] for g in texts_of(
        sampler.generate([encode(x) for x in prompts], n=1, max_new_tokens=budget,
                         temperature=sc.construction_temperature, top_p=sc.construction_top_p,
                         stop_ids=stop, seed=args.sample_seed + 1), len(prompts), 1)] \
        if prompts else []

    parsed = [synthesis.parse_construction(o) for o in outs]
    ok = [i for i, c in enumerate(parsed) if c.ok]
    r_rew, _ = score([parsed[i].reconstruction for i in ok], [str(pairs[i][0].answer) for i in ok])
    checks, outcomes = [], collections.Counter()
    step_right = diverge_at_error = 0
    examples: dict[str, list] = collections.defaultdict(list)
    for (q, w, r), o, c in zip(pairs, outs, parsed):
        diverge_at_error += D.reference_clean_to_error(q.question, w, r)
        if not c.ok:
            key = "unparsed"
        else:
            chk = D.check_construction(q.question, w, c.reconstruction,
                                       float(r_rew[len(checks)]), c.analysis)
            checks.append(chk)
            step_right += chk.analysis_at_error is True  # None: no error to name
            key = chk.placement
            if key == "at_error":
                key += "/verbatim" if chk.verbatim_prefix else "/prefix_altered"
        outcomes[key] += 1
        if len(examples[key]) < args.examples:
            examples[key].append(dict(question=q.question, wrong=w, reference=r, output=o))
    n = len(pairs)
    out = dict(model=args.model, problems=len(problems), seed=seed, rollout_accuracy=float(
        rewards.mean()), zpd_share=sel.eligible_share, pairs=n,
        **D.construction_report(n, len(ok), checks),
        analysis_step_accuracy=step_right / len(ok) if ok else None,
        reference_diverges_at_error=diverge_at_error / n if n else None,
        outcomes=dict(sorted(outcomes.items())))
    if args.examples:
        out["examples"] = examples
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
