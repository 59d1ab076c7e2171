"""Model presets: Qwen3 dense sizes (from their public ``config.json``) and tiny test models."""

from __future__ import annotations

_QWEN3_COMMON = dict(
    vocab_size=151936,
    head_dim=128,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=40960,
)

PRESETS: dict[str, dict] = {
    "qwen3-0.6b": dict(_QWEN3_COMMON, hidden_size=1024, intermediate_size=3072, num_layers=28,
                       num_heads=16, num_kv_heads=8, tie_word_embeddings=True),
    "qwen3-1.7b": dict(_QWEN3_COMMON, hidden_size=2048, intermediate_size=6144, num_layers=28,
                       num_heads=16, num_kv_heads=8, tie_word_embeddings=True),
    "qwen3-4b": dict(_QWEN3_COMMON, hidden_size=2560, intermediate_size=9728, num_layers=36,
                     num_heads=32, num_kv_heads=8, tie_word_embeddings=True),
    "qwen3-8b": dict(_QWEN3_COMMON, hidden_size=4096, intermediate_size=12288, num_layers=36,
                     num_heads=32, num_kv_heads=8, tie_word_embeddings=False),
    "qwen3-14b": dict(_QWEN3_COMMON, hidden_size=5120, intermediate_size=17408, num_layers=40,
                      num_heads=40, num_kv_heads=8, tie_word_embeddings=False),
    # Tiny models for tests and the embedded CPU demo.
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=16, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                 tie_word_embeddings=True, max_position_embeddings=2048),
    "tiny-untied": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                        num_heads=4, num_kv_heads=1, head_dim=24, rope_theta=5_000_000.0,
                        rms_norm_eps=1e-6, tie_word_embeddings=False,
                        max_position_embeddings=2048),
    "demo": dict(vocab_size=128, hidden_size=128, intermediate_size=384, num_layers=4,
                 num_heads=4, num_kv_heads=2, head_dim=32, rope_theta=10_000.0,
                 rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=1024),
}
