"""Programs that tests/test_multihost.py runs in one or several processes (one per process).

    python tests/multihost_worker.py train ARGS...      # `tapo-jax train ARGS` with a scripted
                                                        # share of the rollouts (see below)
    python tests/multihost_worker.py sample OUT.json     # the sampler's tokens for fixed prompts

Processes are joined through the TAPO_* variables (tapo_jax/train/distributed.py). Each program
leaves through the distributed shutdown barrier and then skips interpreter teardown (tearing
down the CPU collectives can race between processes at exit).

A randomly initialised tiny model never solves a problem, so ``train`` makes the RL rollouts
informative: every rollout call still runs the real sampler (on every process, with the
current weights), then the completions of question prompts are replaced by a script (query q:
``c(q)`` correct step-by-step solutions, then slipped ones) and those of synthesis prompts by
the oracle's construction for the quoted wrong answer. Rewards, DCS, parsing, advantages and
the update then see known, non-trivial data. Evaluation samples for real.
"""

from __future__ import annotations

import json
import os
import sys
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _leave(code: int) -> None:
    import jax

    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()
    os._exit(code)


def correct_count(question: str, k: int) -> int:
    """How many of the K scripted rollouts of ``question`` are right (deterministic)."""
    return zlib.crc32(question.encode()) % (k + 1)


def _scripted_sample_fn(real_sample_fn, problems):
    """Wrap ``Policy.sample_fn``: the RL loop's calls (no sampling overrides) get the script."""
    import numpy as np

    from tapo_jax.data import arithmetic as A
    from tapo_jax.data.sft_examples import construction_example
    from tapo_jax.train.rollout import Completion

    by_question = {p.question: p for p in problems}

    def sample_fn(self, params, **overrides):
        inner = real_sample_fn(self, params, **overrides)
        if overrides:  # evaluation: real samples
            return inner
        tok = self.tokenizer
        slips: dict[str, list[str]] = {}

        def encode(text):
            return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

        def sample(prompt_ids, n, max_new_tokens, seed, **decoding):
            real = inner(prompt_ids, n, max_new_tokens, seed)  # the multi-host sampler runs
            out = []
            for ids, got in zip(prompt_ids, real):
                text = tok.decode(ids, skip_special_tokens=True)
                assert len(got) == n
                if "Wrong:" in text:  # a synthesis prompt (compact style)
                    q = next(q for q in by_question if q in text)
                    wrong = next(w for w in slips[q] if w.strip() in text)
                    _, target = construction_example(by_question[q], wrong)
                    out.append([Completion(encode(target), [0.0] * 3, "stop")])
                    continue
                q = next(q for q in by_question if q in text)
                p = by_question[q]
                rng = np.random.default_rng(zlib.crc32(q.encode()) + seed % 1000)
                group = []
                for k in range(n):
                    if k < correct_count(q, n):
                        t = p.solution
                    else:
                        slip = None
                        while slip is None:
                            slip = A.make_slip(p, rng)
                        t = slip.text
                        slips.setdefault(q, []).append(t)
                    group.append(Completion(encode(t), [-0.5] * len(encode(t)), "stop"))
                out.append(group)
            return out

        return sample

    return sample_fn


def train(argv: list[str]) -> int:
    from tapo_jax.train.distributed import initialize_distributed

    initialize_distributed()
    from tapo_jax.cli import main
    from tapo_jax.config import load_config
    from tapo_jax.data.arithmetic import make_splits
    from tapo_jax.train.policy import Policy

    args = argv[argv.index("--config") + 1:]
    cfg = load_config(args[0], [a for a in args[1:] if "=" in a])
    problems = make_splits(cfg.data, cfg.train.seed)[0]
    Policy.sample_fn = _scripted_sample_fn(Policy.sample_fn, problems)
    return main(["train", *argv])


def sampled_tokens(devices) -> dict:
    """Completions of 5 prompts x 3 samples of a tiny random Qwen3 on a (1, -1, 1) mesh over
    ``devices`` (every process's part of them, in several processes)."""
    import jax
    import numpy as np
    from flax import nnx

    from tapo_jax.config import MeshConfig, load_config
    from tapo_jax.models import sharding
    from tapo_jax.sampling import Sampler

    cfg = load_config(str(ROOT / "configs/demo.yaml"),
                      ["model.preset=tiny", "model.vocab_size=128", "model.num_layers=1"])
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1), devices=devices)
    model = sharding.create_sharded_model(cfg.model, mesh, sharding.TRAIN_RULES, seed=3)
    graphdef, params = nnx.split(model, nnx.Param)
    sampler = Sampler(graphdef, params, mesh=mesh, num_slots=8, max_len=48)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 128, size=int(L)).tolist() for L in (5, 9, 3, 12, 7)]
    ro = sampler.generate(prompts, n=3, max_new_tokens=20, temperature=1.0, seed=11)
    return dict(processes=jax.process_count(), devices=len(devices),
                local_devices=jax.local_device_count(), tokens=[t.tolist() for t in ro.tokens],
                logprobs=[lp.tolist() for lp in ro.logprobs], finish_reason=ro.finish_reason)


def sample(out_path: str) -> int:
    """:func:`sampled_tokens` over every device of every process, written per process."""
    from tapo_jax.train.distributed import initialize_distributed

    initialize_distributed()
    import jax

    result = sampled_tokens(jax.devices())
    Path(out_path).with_suffix(f".p{jax.process_index()}.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    command, rest = sys.argv[1], sys.argv[2:]
    try:
        code = {"train": train, "sample": lambda a: sample(a[0])}[command](rest)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    _leave(int(code or 0))
