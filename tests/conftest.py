"""Shared test fixtures.

JAX sees 8 virtual CPU devices in every test process (as in CI, which sets the same XLA flag), so
sharded code paths run locally exactly as in CI; single-device code simply uses the first device.

Fixtures for model tests:

``hf_checkpoint(**dims) -> Path`` (session scope)
    Builds a tiny random HF ``Qwen3ForCausalLM`` with transformers, saves it with
    ``save_pretrained`` into a session temp dir and returns the directory. Calls with the same
    arguments return the same directory (built once). Keyword arguments (all optional):
    ``vocab_size=96, hidden_size=64, intermediate_size=112, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=None (= hidden/heads), rope_theta=1e6, tie=True,
    dtype="float32" | "bfloat16", seed=0, std=0.2, max_shard_size=None`` (e.g. "40KB" writes
    a sharded checkpoint with ``model.safetensors.index.json``).
    Weights are drawn N(0, std^2) and every RMSNorm weight 1 + N(0, std^2), larger than HF's
    init, so that attention patterns, rotary phases and the norms visibly shape the logits.

A test whose xdist worker dies (a fatal signal in native code) is run once more on a fresh
worker, and listed under "worker crashes" at the end; failed assertions are never rerun
(tests/crash_rerun.py).

Marker ``transfer_guard``: the test body runs under ``jax.transfer_guard("disallow")``, so an
implicit host-to-device transfer (a NumPy array or Python scalar handed to a jitted function, an
eager ``jnp`` op on host data) fails it; transfers that are meant are explicit
(``jax.device_put`` / ``jax.device_get`` / ``place_batch``). Module-scoped fixtures run before
the guard.

``hf_torch(path) -> transformers.Qwen3ForCausalLM`` (session scope)
    The checkpoint at ``path`` loaded by transformers in float32 with eager attention, in eval
    mode (cached per path): the reference implementation for parity tests.
"""

from __future__ import annotations

import os
import sys

_FLAG = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import pytest  # noqa: E402


def pytest_configure(config):
    if not config.pluginmanager.has_plugin("crash_rerun"):
        import crash_rerun

        config.pluginmanager.register(crash_rerun, "crash_rerun")
    config.addinivalue_line(
        "markers", "transfer_guard: run under jax.transfer_guard('disallow') (no implicit "
        "host<->device transfer)")


@pytest.fixture(autouse=True)
def _transfer_guard(request):
    if request.node.get_closest_marker("transfer_guard") is None:
        yield
        return
    import jax

    with jax.transfer_guard("disallow"):
        yield


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Each module's compiled programs are dropped after it, so a worker's memory stays bounded."""
    yield
    if "jax" in sys.modules:
        import gc

        sys.modules["jax"].clear_caches()
        gc.collect()


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    import torch
    import transformers

    built: dict = {}

    def make(*, vocab_size=96, hidden_size=64, intermediate_size=112, num_layers=2, num_heads=4,
             num_kv_heads=2, head_dim=None, rope_theta=1e6, tie=True, dtype="float32", seed=0,
             std=0.2, max_shard_size=None):
        key = (vocab_size, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads,
               head_dim, rope_theta, tie, dtype, seed, std, max_shard_size)
        if key in built:
            return built[key]
        hc = transformers.Qwen3Config(
            vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
            num_hidden_layers=num_layers, num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            head_dim=head_dim if head_dim is not None else hidden_size // num_heads,
            rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta)},
            tie_word_embeddings=tie, max_position_embeddings=256)
        torch.manual_seed(seed)
        model = transformers.Qwen3ForCausalLM(hc)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(1.0 + std * torch.randn_like(p))
                else:
                    p.normal_(0.0, std)
        model = model.to(getattr(torch, dtype))
        path = tmp_path_factory.mktemp("hf_qwen3")
        kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        model.save_pretrained(path, **kwargs)
        built[key] = path
        return path

    return make


@pytest.fixture(scope="session")
def hf_torch():
    import transformers

    loaded: dict = {}

    def load(path):
        key = str(path)
        if key not in loaded:
            model = transformers.Qwen3ForCausalLM.from_pretrained(
                path, dtype="float32", attn_implementation="eager")
            loaded[key] = model.eval()
        return loaded[key]

    return load
