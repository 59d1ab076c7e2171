"""One short accelerator check: a random-weight Qwen3-0.6B-shaped RL step and decode throughput.

Prints JSON lines: ``rl_step`` (ms per step, MFU = 6 x params x tokens / time / peak FLOP/s,
the device's peak memory), ``decode`` (tokens/s and the HBM-bandwidth fraction: bytes a decode
step must read, weights plus the live KV cache, x steps/s / peak bandwidth) and ``attention``
(the implementation ``auto`` chose and its max difference from ``xla`` on one layer's inputs).
Run through ``benchmarks/device_check.sh``; peaks come from the device kind (override with
``--peak-tflops`` / ``--peak-gbps``).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

PEAKS = {  # device kind substring -> (bf16 dense TFLOP/s, HBM GB/s)
    "H200": (989.0, 4800.0), "H100": (989.0, 3350.0), "A100": (312.0, 2039.0),
    "v5p": (459.0, 2765.0), "v5 lite": (197.0, 819.0), "v5e": (197.0, 819.0),
    "v6": (918.0, 1640.0), "v4": (275.0, 1228.0),
}


def _peaks(kind: str, tflops: float, gbps: float) -> tuple[float, float]:
    for key, (f, b) in PEAKS.items():
        if key.lower() in kind.lower():
            return tflops or f, gbps or b
    return tflops or float("nan"), gbps or float("nan")


def _peak_memory_gb() -> float:
    stats = jax.local_devices()[0].memory_stats() or {}
    return round(stats.get("peak_bytes_in_use", float("nan")) / 1e9, 3)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--peak-tflops", type=float, default=0.0)
    p.add_argument("--peak-gbps", type=float, default=0.0)
    args = p.parse_args()

    from tapo_jax.config import Config, MeshConfig, ModelConfig, RLConfig, TrainConfig
    from tapo_jax.memory import param_count
    from tapo_jax.models import attention as attn
    from tapo_jax.models import sharding as sh
    from tapo_jax.models.presets import PRESETS
    from tapo_jax.train.step import make_train_step
    from tapo_jax.sampling import Sampler
    from tapo_jax.train.state import create_train_state, make_optimizer, optim_config_for
    from tapo_jax.types import TrainBatch

    dev = jax.local_devices()[0]
    tflops, gbps = _peaks(dev.device_kind, args.peak_tflops, args.peak_gbps)
    model = ModelConfig(**PRESETS["qwen3-0.6b"], dtype="bfloat16", param_dtype="float32",
                        attention="auto", remat="full", scan_layers=True)
    cfg = Config(model=model, rl=RLConfig(), train=TrainConfig(steps=10))
    mesh = sh.make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    tx = make_optimizer(*optim_config_for(cfg, "rl"))
    graphdef, state, _ = create_train_state(model, tx, mesh, seed=0)
    n_params = param_count(cfg)

    # Attention: auto's choice against the xla reference on one layer-sized input.
    r = np.random.default_rng(0)
    q = jnp.asarray(r.normal(size=(2, 1024, 16, 128)), jnp.bfloat16)
    k = jnp.asarray(r.normal(size=(2, 1024, 8, 128)), jnp.bfloat16)
    seg = jnp.ones((2, 1024), jnp.int32).at[0, :100].set(0)
    chosen = attn.resolve_implementation("auto", 1024, jnp.bfloat16)
    got = attn.dot_product_attention(q, k, k, seg, implementation="auto")
    ref = attn.dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                     k.astype(jnp.float32), seg, implementation="xla")
    print(json.dumps({"check": "attention", "device": dev.device_kind, "auto": chosen,
                      "max_abs_diff_vs_xla": float(jnp.max(jnp.abs(got.astype(jnp.float32) - ref)))}),
          flush=True)

    # RL step.
    b, t = args.rows, args.length
    am = np.ones((b, t), np.int32)
    batch = TrainBatch(
        tokens=r.integers(0, model.vocab_size, (b, t)).astype(np.int32),
        positions=np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
        attention_mask=am, loss_mask=np.ones((b, t), np.float32),
        query_index=np.arange(b, dtype=np.int32) // 4, is_reflection=np.zeros(b, bool),
        rewards=(np.arange(b) % 2).astype(np.float32), row_mask=np.ones(b, np.float32),
        group_ids=np.zeros(b, np.int32), advantages=r.normal(size=b).astype(np.float32),
        old_logprobs=np.full((b, t), -5.0, np.float32), ref_logprobs=np.zeros((b, t), np.float32))
    batch = jax.tree.map(lambda x: jax.device_put(x, sh.batch_sharding(mesh, x.ndim)), batch)
    step = make_train_step(graphdef, cfg, mesh, kind="rl")
    t0 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t0) / args.steps
    n_dev = len(jax.devices())
    print(json.dumps({"check": "rl_step", "device": dev.device_kind, "devices": n_dev,
                      "rows": b, "length": t, "params_b": round(n_params / 1e9, 3),
                      "compile_s": round(compile_s, 1), "ms_per_step": round(dt * 1e3, 1),
                      "mfu": round(6 * n_params * b * t / dt / (tflops * 1e12 * n_dev), 4),
                      "peak_memory_gb": _peak_memory_gb(), "loss": float(m["loss"])}), flush=True)

    # Decode.
    sampler = Sampler(graphdef, state.params, mesh=mesh, num_slots=args.slots,
                      max_len=64 + args.new_tokens)
    prompts = [list(r.integers(0, model.vocab_size, 32)) for _ in range(args.slots)]
    kw = dict(max_new_tokens=args.new_tokens, temperature=1.0, seed=0)
    sampler.generate(prompts, **kw)  # compile
    t0 = time.perf_counter()
    out = sampler.generate(prompts, **dict(kw, seed=1))
    dt = time.perf_counter() - t0
    tokens = int(np.sum(out.lengths))
    steps_per_s = args.new_tokens / dt
    weight_bytes = n_params * 2  # bf16 sampling copy
    kv_bytes = (2 * model.num_layers * args.slots * (32 + args.new_tokens / 2)
                * model.num_kv_heads * model.head_dim * 2)  # mean live cache per step
    bw = (weight_bytes / n_dev + kv_bytes / n_dev) * steps_per_s
    print(json.dumps({"check": "decode", "device": dev.device_kind, "slots": args.slots,
                      "new_tokens": args.new_tokens, "tokens_per_s": round(tokens / dt, 1),
                      "hbm_fraction": round(bw / (gbps * 1e9), 4),
                      "peak_memory_gb": _peak_memory_gb()}), flush=True)


if __name__ == "__main__":
    main()
