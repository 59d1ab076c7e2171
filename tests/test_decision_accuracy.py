"""benchmarks/decision_accuracy.py against the training path's teacher-forced log-probs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from tapo_jax.config import load_config
from tapo_jax.construction.synthesis import resolve_style
from tapo_jax.data import sft_examples
from tapo_jax.data.arithmetic import cold_start_problems
from tapo_jax.train.policy import Policy
from tapo_jax.train.step import token_logprobs

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("decision_accuracy",
                                              ROOT / "benchmarks" / "decision_accuracy.py")
DA = importlib.util.module_from_spec(spec)
spec.loader.exec_module(DA)


def test_decision_report_equals_the_training_logprobs_at_the_decision_tokens():
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["model.preset=tiny"])
    policy = Policy(cfg)
    cfg = policy.cfg
    n, seed = 12, 7
    rep = DA.decision_report(cfg, policy, policy.params, examples=n, data_seed=seed,
                             batch_size=8)
    # independent: the same examples, one unpadded row at a time through token_logprobs
    data = sft_examples.build_cold_start(
        cold_start_problems(cfg.data, seed, n), seed=seed, construction_fraction=1.0,
        style=resolve_style(cfg.rl.synthesis_template, cfg.data.kind),
        reference_slip_fraction=cfg.cold_start.reference_slip_fraction)
    rows = sft_examples.tokenize_pairs(data.constructions, policy.tokenizer)
    encode = lambda t: policy.tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    nll = {"a": [], "r": [], "e": [], "o": []}
    for (_, target), (p, r) in zip(data.constructions, rows):
        idx, dropped = sft_examples.decision_token_indices(target, encode)
        assert dropped == 0
        recon_at = len(encode(target[:target.find("<reconstruction>")]))
        line = range(*sft_examples.token_span(target, sft_examples.error_line_span(target),
                                              encode))
        # one row, right-padded to a fixed length (causal: the padding changes nothing before)
        ids = list(p) + list(r)
        seq = np.zeros((1, 320), np.int32)
        seq[0, :len(ids)] = ids
        mask = (np.arange(320) < len(ids)).astype(np.int32)[None]
        pos = np.arange(320, dtype=np.int32)[None]
        lp, _ = token_logprobs(policy.graphdef, policy.params, jnp.asarray(seq),
                               jnp.asarray(pos), jnp.asarray(mask))
        lp = np.asarray(lp)[0, len(p):]
        for j in range(len(r)):
            key = ("r" if j >= recon_at else "a") if j in idx else ("e" if j in line else "o")
            nll[key].append(-lp[j])
    assert rep["examples"] == n and rep["decisions_dropped"] == 0
    assert rep["analysis_decision"]["tokens"] == len(nll["a"]) == n  # one step number each
    assert rep["reconstruction_decision"]["tokens"] == len(nll["r"]) >= n
    assert rep["other"]["tokens"] == len(nll["o"])
    assert rep["error_line"]["tokens"] == len(nll["e"]) >= 5 * n  # e.g. "3 - 1 = 4" less its start
    for key, name in (("a", "analysis_decision"), ("r", "reconstruction_decision"),
                      ("e", "error_line"), ("o", "other")):
        np.testing.assert_allclose(rep[name]["nll"], np.mean(nll[key]), rtol=2e-3, atol=1e-4)
        assert 0.0 <= rep[name]["argmax_acc"] <= 1.0


def test_logged_pairs_rebuild_the_cold_start_target_for_the_policys_own_prompts(tmp_path):
    import json

    from tapo_jax.construction.synthesis import build_synthesis_prompt

    cfg = load_config(ROOT / "configs" / "demo.yaml",
                      ["model.preset=tiny", "cold_start.analysis=compare"])
    q = "Compute 5 + 14 + 24."
    wrong = "5 + 14 = 18\n18 + 24 = 42\n\\boxed{42}"  # off by one at step 1, carried forward
    clean = "5 + 14 = 19\n19 + 24 = 43\n\\boxed{43}"
    unclean = "5 + 14 = 20\n20 + 24 = 43\n\\boxed{43}"  # right answer after a cancelled slip
    recs = [{"step": 0, "kind": "construction", "prompt": build_synthesis_prompt(q, wrong, ref, style="compact"),
             "output": "x"} for ref in (clean, unclean)]
    recs += [{"step": 1, "kind": "reconstruction", "question": q},  # not a construction prompt
             {"step": 1, "kind": "construction", "prompt": "garbage", "output": ""},
             {"step": 1, "kind": "construction", "output": "",  # nothing to fix
              "prompt": build_synthesis_prompt(q, clean, clean, style="compact")}]
    run = tmp_path / "tapo"
    run.mkdir()
    (run / "examples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs)
                                        + '{"kind": "constr')  # cut short by a killed run
    pairs, is_clean, skipped = DA.logged_pairs(cfg, [run])
    assert [p for p, _ in pairs] == [recs[0]["prompt"], recs[1]["prompt"]]
    assert is_clean == [True, False]
    assert skipped == {"unparsed_record": 1, "unparsed_prompt": 1, "no_located_error": 1}
    assert pairs[0][1] == ("<analysis>1. 18 | 19\nStep 1: arithmetic error.</analysis>\n"
                           "<reconstruction>5 + 14 = 18\nWait, 5 + 14 = 19, not 18.\n"
                           "19 + 24 = 43\n\\boxed{43}</reconstruction>")
    assert pairs[1][1].startswith("<analysis>1. 18 | 20\nStep 1: arithmetic error.</analysis>")
    policy = Policy(cfg)
    rep = DA.logged_report(policy.cfg, policy, policy.params, [run], batch_size=4)
    assert rep["examples"] == 2 and rep["skipped"] == skipped
    assert rep["clean_reference"]["examples"] == rep["unclean_reference"]["examples"] == 1
    one = DA.score_pairs(policy.cfg, policy, policy.params, pairs[:1], batch_size=4)
    assert rep["clean_reference"] == one
