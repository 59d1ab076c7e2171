"""Google Tunix's vanilla sampler on bench_sampler.py's workload; runs in its own venv.

Not part of tapo-jax and never imported by it: ``bench_sampler.py --tunix-python PY`` runs this
file with a Python that has Tunix installed and reads the JSON line it prints. Setup (once):

    python3 -m venv /work/venv-tunix
    /work/venv-tunix/bin/pip install google-tunix jax==<the jax of tapo-jax's venv>
    python benchmarks/bench_sampler.py --tunix-python /work/venv-tunix/bin/python

The model is Tunix's own Qwen3 (``tunix.models.qwen3``) loaded from the same HF checkpoint as
the other cases (``create_model_from_safe_tensors``), the prompts are the same token ids (a
tokenizer stand-in maps the ids through unchanged: all prompts have the same length, so nothing
is padded), no stop token (every sequence generates ``--new-tokens`` tokens), temperature 0.6,
top-p 0.9, with ``--top-k`` 0 (top-p alone; Tunix then sorts the whole vocabulary) or 50.
tokens/s is the steady state over ``--repeats`` calls after a first (compiling) call.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time


class _IdTokenizer:
    """Token ids written as text ("12 7 4095") and back: the prompts are ids already."""

    def encode(self, text: str, **_) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids, **_) -> str:
        return " ".join(str(int(i)) for i in ids)

    def bos_id(self):
        return None  # no BOS is prepended

    def eos_id(self) -> int:
        return -2  # never sampled

    def pad_id(self) -> int:
        return -1  # never a prompt id (prompts are not padded anyway)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--top-k", type=int, default=0)
    args = p.parse_args()

    import jax
    import numpy as np
    import tunix
    from importlib.metadata import version
    from tunix.generate import sampler as sampler_lib
    from tunix.models.qwen3 import model as model_lib
    from tunix.models.qwen3 import params as params_lib

    with open(os.path.join(args.ckpt, "config.json")) as f:
        hc = json.load(f)
    theta = hc.get("rope_theta") or (hc.get("rope_parameters") or {}).get("rope_theta", 10000)
    cfg = model_lib.ModelConfig(
        num_layers=hc["num_hidden_layers"], vocab_size=hc["vocab_size"],
        embed_dim=hc["hidden_size"], hidden_dim=hc["intermediate_size"],
        num_heads=hc["num_attention_heads"], head_dim=hc["head_dim"],
        num_kv_heads=hc["num_key_value_heads"], rope_theta=int(theta),
        norm_eps=hc["rms_norm_eps"], use_tied_embedding=hc.get("tie_word_embeddings", False))
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), devices=jax.devices()[:1],
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with jax.set_mesh(mesh):
        model = params_lib.create_model_from_safe_tensors(args.ckpt, cfg, mesh)
    cache = sampler_lib.CacheConfig(cache_size=args.prompt_len + args.new_tokens,
                                    num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads,
                                    head_dim=cfg.head_dim)
    sampler = sampler_lib.Sampler(model, _IdTokenizer(), cache)
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size,
                                                (args.batch, args.prompt_len)).tolist()
    texts = [" ".join(map(str, ids)) for ids in prompts]

    def call(seed: int) -> int:
        out = sampler(texts, max_generation_steps=args.new_tokens,
                      max_prompt_length=args.prompt_len, temperature=0.6, top_p=0.9,
                      top_k=args.top_k or None, seed=seed, echo=False, pad_output=True)
        return sum(len(t) for t in out.tokens)

    t0 = time.perf_counter()
    tokens = call(0)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for r in range(args.repeats):
        tokens = call(r + 1)
    steady = (time.perf_counter() - t0) / args.repeats
    print(json.dumps(dict(
        case="tunix" if not args.top_k else f"tunix_top_k{args.top_k}",
        tunix_version=version("google-tunix"), jax_version=jax.__version__,
        device=jax.devices()[0].device_kind, top_p=0.9, top_k=args.top_k, batch=args.batch,
        prompt_len=args.prompt_len, new_tokens=args.new_tokens, tokens=tokens,
        tokens_per_s=round(tokens / steady, 1), steady_call_s=round(steady, 3),
        compile_s=round(first - steady, 2),
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        load_avg_1m=round(os.getloadavg()[0], 2), cpus=os.cpu_count())), flush=True)
    del tunix
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
