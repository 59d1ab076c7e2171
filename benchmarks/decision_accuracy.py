"""Does a cold-started policy know *where the first error is*? Teacher-forced accuracy at the
construction targets' decision tokens.

A construction target decides where the error is at a few tokens only
(:func:`tapo_jax.data.sft_examples.decision_offsets`): the analysis's step number (or, in the
``walk`` / ``compare`` styles, each "pass or name this step" token), and in the reconstruction
the first token of each line up to the reflection ("copy the wrong response's next line" or
"reflect here"). This script builds fresh construction examples exactly as the cold start
builds them (``--data-seed`` picks their problems and slips), runs the policy teacher-forced
over prompt + target, and reports, for the decision tokens and for every other target token,
the share where the policy's most likely token is the target's (``argmax_acc``) and the mean
negative log-likelihood, plus the share of examples whose decisions are all right. The analysis
and reconstruction decisions are also reported apart, and so are the other tokens of the
erroneous line the reconstruction copies before its reflection (``error_line``: a verbatim
prefix needs the wrong value there, where the reference shows another).

    python benchmarks/decision_accuracy.py --config configs/demo.yaml --checkpoint runs/demo/hf
    python benchmarks/decision_accuracy.py --checkpoint RUN/hf --examples 512 cold_start.analysis=compare

``--from-runs RUN ...`` (after the overrides) scores the construction prompts TAPO runs logged
instead: the policy's own wrong and correct responses, the target the cold start would write
for them. Split by whether the policy's reference is clean, this shows how far the decision
learnt on the cold start's examples carries over to the responses RL actually pairs.

    python benchmarks/decision_accuracy.py --checkpoint STUDY/seed0/cold_start/hf \
        cold_start.analysis=compare --from-runs STUDY/seed0/tapo

Prints one JSON line. Needs a checkpoint the config's model can load (an HF export, a run
directory or a checkpoints directory).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _encode(tokenizer):
    return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]


def decision_report(cfg, policy, params, *, examples: int, data_seed: int,
                    batch_size: int = 32) -> dict:
    """The scores on ``examples`` fresh construction examples, built as the cold start builds
    them (problems and slips from ``data_seed``)."""
    from tapo_jax.construction.synthesis import resolve_style
    from tapo_jax.data import sft_examples
    from tapo_jax.config import slip_kind_list
    from tapo_jax.data.arithmetic import cold_start_problems

    cs = cfg.cold_start
    problems = cold_start_problems(cfg.data, data_seed, examples)
    data = sft_examples.build_cold_start(
        problems, seed=data_seed, construction_fraction=1.0,
        style=resolve_style(cfg.rl.synthesis_template, cfg.data.kind),
        mode="full" if cfg.rl.construction == "full" else "micro",
        reference_slip_fraction=cs.reference_slip_fraction, analysis=cs.analysis,
        slip_kinds=slip_kind_list(cs.slip_kinds))
    return dict(score_pairs(cfg, policy, params, data.constructions, batch_size=batch_size),
                analysis_style=cs.analysis, data_seed=data_seed)


_PROMPT = re.compile(r"Q: (.*)\nWrong:\n(.*)\nRef:\n(.*)$", re.S)


def logged_pairs(cfg, run_dirs) -> tuple[list[tuple[str, str]], list[bool], dict[str, int]]:
    """(prompt, target) for every construction prompt the TAPO runs in ``run_dirs`` logged
    (``examples.jsonl``): the prompt exactly as the policy saw it (its own wrong response and
    its own correct response as the reference), the target as the cold start would write it
    (the oracle's analysis in the ``cold_start.analysis`` style, then the reconstruction that
    continues with the correct solution). Also whether each reference is clean (no wrong line:
    a correct final answer can follow a wrong step and a cancelling one), and the counts of
    records skipped because they are not JSON, their prompt does not parse, or their wrong
    response has no error the oracle locates."""
    from tapo_jax.construction.synthesis import resolve_style
    from tapo_jax.data import sft_examples
    from tapo_jax.data.arithmetic import Problem, first_error_step, parse_question

    style = resolve_style(cfg.rl.synthesis_template, cfg.data.kind)
    mode = "full" if cfg.rl.construction == "full" else "micro"
    pairs, clean = [], []
    skipped = {"unparsed_record": 0, "unparsed_prompt": 0, "no_located_error": 0}
    for run in run_dirs:
        path = Path(run) / "examples.jsonl"
        if not path.is_file():
            raise SystemExit(f"{path}: no such file (a TAPO run directory logs it)")
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # e.g. a line cut short when its run was killed
                skipped["unparsed_record"] += 1
                continue
            if not isinstance(r, dict) or r.get("kind") != "construction":
                continue
            m = _PROMPT.search(str(r.get("prompt", "")))
            try:
                q, wrong, ref = m.groups()
                problem = Problem(*parse_question(q))
            except (AttributeError, ValueError):
                skipped["unparsed_prompt"] += 1
                continue
            if first_error_step(q, wrong) is None:
                skipped["no_located_error"] += 1
                continue
            try:
                _, target = sft_examples.construction_example(
                    problem, wrong, style=style, mode=mode, shown_reference=ref,
                    analysis=cfg.cold_start.analysis)
            except ValueError:  # nothing to fix: the wrong response is a prefix of the solution
                skipped["no_located_error"] += 1
                continue
            pairs.append((r["prompt"], target))
            clean.append(first_error_step(q, ref) is None)
    return pairs, clean, skipped


def logged_report(cfg, policy, params, run_dirs, *, batch_size: int = 32) -> dict:
    """The scores on the construction prompts TAPO runs logged, overall and split by whether
    the policy's own reference is clean: how far the decision learnt on the cold start's
    examples carries to the policy's own responses."""
    pairs, clean, skipped = logged_pairs(cfg, run_dirs)
    if not pairs:
        raise SystemExit("no logged construction prompt with a located error in "
                         + ", ".join(map(str, run_dirs)))
    out = dict(score_pairs(cfg, policy, params, pairs, batch_size=batch_size),
               analysis_style=cfg.cold_start.analysis, runs=[str(r) for r in run_dirs],
               skipped=skipped)
    for name, want in (("clean_reference", True), ("unclean_reference", False)):
        sub = [p for p, c in zip(pairs, clean) if c == want]
        out[name] = score_pairs(cfg, policy, params, sub, batch_size=batch_size) if sub else None
    return out


def score_pairs(cfg, policy, params, pairs, *, batch_size: int = 32) -> dict:
    """Teacher-forced scores of ``policy`` on construction (prompt, target) pairs."""
    import jax
    import jax.numpy as jnp

    from tapo_jax.data import sft_examples
    from tapo_jax.models import qwen3

    cs = cfg.cold_start
    tok = policy.tokenizer
    rows = sft_examples.tokenize_pairs(pairs, tok, chat=cfg.data.chat_template)
    encode = _encode(tok)
    # per row and target token: 0 other, 1 analysis decision, 2 reconstruction decision,
    # 3 the rest of the erroneous line the reconstruction copies before its reflection
    kinds: list[np.ndarray] = []
    dropped = 0
    for (_, target), (_, r_ids) in zip(pairs, rows):
        idx, d = sft_examples.decision_token_indices(target, encode, cs.analysis)
        dropped += d
        recon_at = len(encode(target[:target.find("<reconstruction>")]))
        k = np.zeros(len(r_ids), np.int8)
        span = sft_examples.error_line_span(target)
        tspan = span and sft_examples.token_span(target, span, encode)
        if tspan:
            k[tspan[0]:tspan[1]] = 3
        for i in idx:
            k[i] = 2 if i >= recon_at else 1
        kinds.append(k)

    @jax.jit
    def forward(p, tokens, mask):
        logits = qwen3.apply(policy.graphdef, p, tokens, attention_mask=mask)
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return jnp.argmax(lp, -1), lp

    length = max(len(p) + len(r) for p, r in rows)
    length = -(-length // 32) * 32
    hit = {0: [], 1: [], 2: [], 3: []}
    nll = {0: [], 1: [], 2: [], 3: []}
    all_right, line_right = [], []
    pad = 0
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        toks = np.full((batch_size, length), pad, np.int32)
        mask = np.zeros((batch_size, length), np.int32)
        for i, (p, r) in enumerate(chunk):
            seq = list(p) + list(r)
            toks[i, :len(seq)] = seq
            mask[i, :len(seq)] = 1
        am, lp = jax.device_get(forward(params, jnp.asarray(toks), jnp.asarray(mask)))
        for i, (p, r) in enumerate(chunk):
            k = kinds[s + i]
            pos = len(p) - 1 + np.arange(len(r))  # logits at pos predict token pos + 1
            tgt = np.asarray(r)
            ok = am[i, pos] == tgt
            lpt = lp[i, pos, tgt]
            for kind in (0, 1, 2, 3):
                sel = k == kind
                hit[kind] += ok[sel].tolist()
                nll[kind] += (-lpt[sel]).tolist()
            dec = (k == 1) | (k == 2)
            if dec.any():
                all_right.append(bool(ok[dec].all()))
            if (k == 3).any():
                line_right.append(bool(ok[k == 3].all()))

    def stats(v_hit, v_nll):
        return dict(tokens=len(v_hit),
                    argmax_acc=round(float(np.mean(v_hit)), 4) if v_hit else None,
                    nll=round(float(np.mean(v_nll)), 4) if v_nll else None)

    return dict(examples=len(rows),
                decision=stats(hit[1] + hit[2], nll[1] + nll[2]),
                analysis_decision=stats(hit[1], nll[1]),
                reconstruction_decision=stats(hit[2], nll[2]),
                error_line=stats(hit[3], nll[3]),
                other=stats(hit[0], nll[0]),
                examples_all_decisions_right=(round(float(np.mean(all_right)), 4)
                                              if all_right else None),
                examples_error_line_right=(round(float(np.mean(line_right)), 4)
                                           if line_right else None),
                decisions_dropped=dropped)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--checkpoint", required=True, help="HF export, run or checkpoints dir")
    ap.add_argument("--examples", type=int, default=512)
    ap.add_argument("--data-seed", type=int, default=12345,
                    help="seed of the examples' problems and slips (not a training seed)")
    ap.add_argument("--from-runs", nargs="+", metavar="RUN",
                    help="score the construction prompts these TAPO runs logged (their own "
                         "responses) instead of fresh examples")
    ap.add_argument("overrides", nargs="*", help="config overrides, key=value")
    a = ap.parse_args(argv)

    from tapo_jax.config import load_config
    from tapo_jax.train.policy import policy_for

    cfg = load_config(a.config, a.overrides)
    if cfg.data.kind != "arithmetic":
        raise SystemExit("decision_accuracy: the construction examples are the arithmetic "
                         "task's (data.kind = arithmetic)")
    policy, params = policy_for(cfg, a.checkpoint)
    if a.from_runs:
        report = logged_report(policy.cfg, policy, params, a.from_runs)
    else:
        report = decision_report(policy.cfg, policy, params, examples=a.examples,
                                 data_seed=a.data_seed)
    report["checkpoint"] = a.checkpoint
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
