"""Qwen3 dense decoder in Flax NNX, numerically matching HF ``Qwen3ForCausalLM``.

Axis letters used in shapes and einsums:
  B batch, T new tokens, S keys (T without a cache, cache length with one), L layers,
  N query heads, K kv heads, G = N // K query heads per kv head, H head dim,
  D model dim, F mlp dim, V vocab.

Weights keep the HF ``(out, in)`` order, split per head where a head axis exists, so an HF tensor
becomes ours by a reshape only: ``q_proj`` [N, H, D], ``k_proj``/``v_proj`` [K, H, D], ``o_proj``
[D, N, H], ``gate_proj``/``up_proj`` [F, D], ``down_proj`` [D, F], ``embed_tokens``/``lm_head``
[V, D]. Every parameter is a ``weight`` leaf whose module path equals the HF tensor name, and
carries logical axis names (metadata ``out_sharding``) from ``vocab``, ``embed``, ``mlp``,
``q_heads``, ``kv_heads``, ``head_dim``, ``norm``; ``sharding.py`` maps them to mesh axes.

Numerics follow HF: RMSNorm statistics in float32 (the normalised value is cast to the compute
dtype before the weight multiplies it), rotary embeddings with ``rope_theta`` from the config in the
rotate-half layout (first half / second half of the head dim), ``q_norm``/``k_norm`` per head before
the rotation, softmax in float32, SwiGLU MLP. Masked attention logits take a large finite negative
value, so a fully masked query row gives finite (uniform) attention instead of NaN.

Over 400 lines on purpose: the model is one file, as its HF counterpart is, so a parity bug is
found by reading the two side by side (building blocks, the scanned stack, the cache).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from tapo_jax.config import ModelConfig
from tapo_jax.models.attention import MASK_VALUE, dot_product_attention

REMAT_POLICIES = {  # model.remat -> what a layer keeps for the backward pass
    "full": jax.checkpoint_policies.nothing_saveable,  # only the layer's input
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # + weight matmul outputs
}


@flax.struct.dataclass
class KVCache:
    """Keys/values of every layer for S cache slots per row.

    One array per layer, kv-head major: keys [B, K, H, S], values [B, K, S, H]. Decode attention
    is then two plain batched matmuls over (B, K), q [G, H] x keys [H, S] and probs [G, S] x
    values [S, H], each contracting a major dim of the cache: no transpose of the cache and no
    slice of a stacked [L, ...] buffer per step (on XLA:CPU either costs several times the
    attention maths, and contracting the minor H of [S, H] keys runs at half the speed).
    """

    k: tuple[jax.Array, ...]  # L x [B, K, H, S] rotary-embedded keys (after k_norm)
    v: tuple[jax.Array, ...]  # L x [B, K, S, H]
    pos: jax.Array  # int32[B, S] position of the token in each slot; -1 = empty


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any = jnp.float32) -> KVCache:
    """An empty cache with ``max_len`` slots per row."""
    k_shape = (batch, cfg.num_kv_heads, cfg.resolved_head_dim, max_len)
    v_shape = (batch, cfg.num_kv_heads, max_len, cfg.resolved_head_dim)
    return KVCache(
        k=tuple(jnp.zeros(k_shape, dtype) for _ in range(cfg.num_layers)),
        v=tuple(jnp.zeros(v_shape, dtype) for _ in range(cfg.num_layers)),
        pos=jnp.full((batch, max_len), -1, jnp.int32),
    )


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------


class Linear(nnx.Module):
    """A bias-free weight of any shape; the caller contracts it with an einsum."""

    def __init__(self, shape: tuple[int, ...], axes: tuple[str, ...], cfg: ModelConfig,
                 rngs: nnx.Rngs):
        value = cfg.init_std * jax.random.normal(rngs.params(), shape, jnp.float32)
        self.weight = nnx.Param(value.astype(cfg.param_dtype), out_sharding=axes,
                                eager_sharding=False)


class RMSNorm(nnx.Module):
    """y = weight * (x / sqrt(mean(x^2) + eps)), statistics in float32 (HF ``Qwen3RMSNorm``)."""

    def __init__(self, dim: int, cfg: ModelConfig):
        self.eps = cfg.rms_norm_eps
        self.weight = nnx.Param(jnp.ones((dim,), cfg.param_dtype), out_sharding=("norm",),
                                eager_sharding=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * y.astype(x.dtype)


def rope_angles(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """sin, cos float32[B, T, H/2] of the rotary angles positions * theta^(-2i/H)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions[..., None].astype(jnp.float32) * inv_freq
    return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """Rotate x [B, T, heads, H] in the rotate-half layout (pairs i and i + H/2)."""
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    sin, cos = sin[:, :, None, :], cos[:, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def _project_heads(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [B, T, D] times a per-head weight [N, H, D] -> [B, T, N, H].

    Contracted as one [B*T, D] x [N*H, D]^T matmul (the reshapes are free): XLA:CPU would
    otherwise re-lay out the 3-D weight on every call, a full weight copy per decode step.
    """
    n, h, d = w.shape
    return jnp.einsum("BTD,ED->BTE", x, w.reshape(n * h, d)).reshape(*x.shape[:2], n, h)


class Attention(nnx.Module):
    """Grouped-query attention with per-head q_norm/k_norm (HF ``Qwen3Attention``).

    ``fused``: q, k and v heads in one ``qkv_proj`` [D, N + 2K, H] (the decode engine's layout,
    see :func:`fuse_projections`): one [B*T, D] x [D, (N + 2K) H] matmul instead of three."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, fused: bool = False):
        n, k, h, d = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim, cfg.hidden_size
        self.fused, self.heads = fused, (n, k)
        if fused:
            self.qkv_proj = Linear((d, n + 2 * k, h), ("embed", None, "head_dim"), cfg, rngs)
        else:
            self.q_proj = Linear((n, h, d), ("q_heads", "head_dim", "embed"), cfg, rngs)
            self.k_proj = Linear((k, h, d), ("kv_heads", "head_dim", "embed"), cfg, rngs)
            self.v_proj = Linear((k, h, d), ("kv_heads", "head_dim", "embed"), cfg, rngs)
        self.o_proj = Linear((d, n, h), ("embed", "q_heads", "head_dim"), cfg, rngs)
        self.q_norm = RMSNorm(h, cfg)
        self.k_norm = RMSNorm(h, cfg)
        self.impl, self.block = cfg.attention, cfg.attention_block

    def __call__(self, x, sin, cos, mask, cache=None, slots=None, attend_len=None,
                 segment_ids=None, packed=False):
        """x [B, T, D]. Without a cache: causal attention under ``segment_ids`` int32[B, T]
        (:mod:`tapo_jax.models.attention`, implementation ``cfg.attention``; ``mask`` unused;
        ``packed``: rows may hold several sequences).
        With a cache: mask bool[B, T, S]; cache is this layer's (k [B, K, H, S_cache],
        v [B, K, S_cache, H]), written at slot slots[b, t]; only its first ``attend_len`` slots
        (S) are read.
        Returns ([B, T, D], cache)."""
        dt = x.dtype
        if self.fused:
            w = self.qkv_proj.weight[...].astype(dt)  # [D, N + 2K, H]
            n_q, n_kv = self.heads
            qkv = jnp.einsum("BTD,DE->BTE", x, w.reshape(w.shape[0], -1)).reshape(
                *x.shape[:2], *w.shape[1:])
            q, k, v = jnp.split(qkv, (n_q, n_q + n_kv), axis=2)
        else:
            q = _project_heads(x, self.q_proj.weight[...].astype(dt))
            k = _project_heads(x, self.k_proj.weight[...].astype(dt))
            v = _project_heads(x, self.v_proj.weight[...].astype(dt))
        q = apply_rope(self.q_norm(q), sin, cos)
        k = apply_rope(self.k_norm(k), sin, cos)
        k_axes = v_axes = "BSKH"  # layouts of the keys / values attended to
        if cache is not None:
            ck, cv = cache
            rows = jnp.arange(x.shape[0])[:, None]
            # advanced indices (rows, slots) around slices: the update is [B, T, K, H]
            ck = ck.at[rows, :, :, slots].set(k.astype(ck.dtype), mode="drop")
            cv = cv.at[rows, :, slots].set(v.astype(cv.dtype), mode="drop")
            cache = (ck, cv)
            k, v = ck[..., :attend_len].astype(dt), cv[:, :, :attend_len].astype(dt)
            k_axes, v_axes = "BKHS", "BKSH"
        b, t, n, h = q.shape
        kv_heads = v.shape[v_axes.index("K")]
        if cache is None:
            out = dot_product_attention(q, k, v, segment_ids, implementation=self.impl,
                                        block_size=self.block, packed=packed)
        elif t == 1:
            # one decode token: plain batched mat-vecs over (B, K), half the cache traffic of
            # the general contraction below on XLA:CPU (decode attention is bandwidth-bound)
            qg = q.reshape(b, kv_heads, n // kv_heads, h)
            logits = jnp.einsum("BKGH,BKHS->BKGS", qg, k, preferred_element_type=jnp.float32)
            logits = jnp.where(mask[:, 0, None, None], logits * h**-0.5, MASK_VALUE)
            probs = jax.nn.softmax(logits, axis=-1).astype(dt)
            out = jnp.einsum("BKGS,BKSH->BKGH", probs, v).reshape(b, t, n, h)
        else:  # prefill into the cache
            qg = q.reshape(b, t, kv_heads, n // kv_heads, h)
            logits = jnp.einsum(f"BTKGH,{k_axes}->BKGTS", qg, k,
                                preferred_element_type=jnp.float32)
            logits = jnp.where(mask[:, None, None], logits * h**-0.5, MASK_VALUE)
            probs = jax.nn.softmax(logits, axis=-1).astype(dt)
            out = jnp.einsum(f"BKGTS,{v_axes}->BTKGH", probs, v).reshape(b, t, n, h)
        wo = self.o_proj.weight[...].astype(dt)  # [D, N, H] -> [D, N*H]: a plain matmul
        out = jnp.einsum("BTE,DE->BTD", out.reshape(b, t, n * h), wo.reshape(wo.shape[0], -1))
        return out, cache


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)).

    ``fused``: gate and up in one ``gate_up_proj`` [D, 2, F] (the decode engine's layout, see
    :func:`fuse_projections`): one [B*T, D] x [D, 2F] matmul instead of two [F, D]^T ones."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, fused: bool = False):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.fused = fused
        if fused:
            self.gate_up_proj = Linear((d, 2, f), ("embed", None, "mlp"), cfg, rngs)
        else:
            self.gate_proj = Linear((f, d), ("mlp", "embed"), cfg, rngs)
            self.up_proj = Linear((f, d), ("mlp", "embed"), cfg, rngs)
        self.down_proj = Linear((d, f), ("embed", "mlp"), cfg, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = x.dtype
        if self.fused:
            w = self.gate_up_proj.weight[...].astype(dt)  # [D, 2, F]
            h = jnp.einsum("BTD,DE->BTE", x, w.reshape(w.shape[0], -1))
            gate, up = h[..., :w.shape[2]], h[..., w.shape[2]:]
        else:
            gate = jnp.einsum("BTD,FD->BTF", x, self.gate_proj.weight[...].astype(dt))
            up = jnp.einsum("BTD,FD->BTF", x, self.up_proj.weight[...].astype(dt))
        return jnp.einsum("BTF,DF->BTD", jax.nn.silu(gate) * up,
                          self.down_proj.weight[...].astype(dt))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, fused: bool = False):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg)
        self.self_attn = Attention(cfg, rngs, fused)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg)
        self.mlp = MLP(cfg, rngs, fused)

    def __call__(self, x, sin, cos, mask, cache=None, slots=None, attend_len=None,
                 segment_ids=None, packed=False):
        h, cache = self.self_attn(self.input_layernorm(x), sin, cos, mask, cache, slots,
                                  attend_len, segment_ids, packed)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class Backbone(nnx.Module):
    """HF ``Qwen3Model``: embed_tokens, layers, norm."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, fused: bool = False):
        self.embed_tokens = Linear((cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg,
                                   rngs)
        layers = [DecoderLayer(cfg, rngs, fused) for _ in range(cfg.num_layers)]
        # scan_layers: one DecoderLayer whose params carry a leading "layers" axis [L, ...]
        self.layers = _stack_layers(layers) if cfg.scan_layers else nnx.List(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg)


def _stack_layers(layers: list[DecoderLayer]) -> DecoderLayer:
    """The layers' params stacked on a new leading axis, named ``layers`` in their metadata."""
    graphdef, _ = nnx.split(layers[0])
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(nnx.split(m)[1] for m in layers))

    def name_axis(v: nnx.Variable) -> nnx.Variable:
        axes = tuple(v.get_metadata().get("out_sharding") or (None,) * (v[...].ndim - 1))
        return v.replace(v[...], out_sharding=("layers",) + axes)

    stacked = jax.tree.map(name_axis, stacked, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, stacked)


def _layer_at(stacked: DecoderLayer, i: int) -> DecoderLayer:
    graphdef, state = nnx.split(stacked)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


class Qwen3(nnx.Module):
    """Qwen3 causal LM. Parameter paths follow HF (``model.layers.0.self_attn.q_proj.weight``);
    ``lm_head`` is None when the embeddings are tied."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, fused_projections: bool = False):
        """``fused_projections``: the decode layout of the weights (q/k/v and gate/up fused,
        see :func:`fuse_projections`); the training / HF layout without it."""
        self.cfg = cfg
        self.model = Backbone(cfg, rngs, fused_projections)
        self.lm_head = nnx.data(None if cfg.tie_word_embeddings else Linear(
            (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg, rngs))

    def head_weight(self) -> jax.Array:
        """The [V, D] lm-head matrix (the embedding table when tied)."""
        head = self.lm_head if self.lm_head is not None else self.model.embed_tokens
        return head.weight[...]

    def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
        """[..., D] -> [..., V] with lm_head (or the tied embedding), in cfg.dtype."""
        dt = jnp.dtype(self.cfg.dtype)
        return jnp.einsum("...D,VD->...V", hidden.astype(dt), self.head_weight().astype(dt))

    def __call__(self, tokens, positions=None, attention_mask=None, *, segment_ids=None,
                 cache=None, cache_index=None, attend_len=None, return_hidden=False,
                 output_hidden_states=False):
        """tokens int32[B, T]; positions int32[B, T] (default arange(T), or with a mask
        cumsum(attention_mask) - 1 clipped at 0, or with segment ids the index within each
        segment); attention_mask [B, T] (1 = real token).

        Without a cache: causal attention within the sequence, keys with mask 0 ignored.
        ``segment_ids`` int32[B, T] packs several sequences in a row: a token attends only to
        earlier tokens with the same id (0 = padding, as attention_mask 0). The attention
        implementation, rematerialisation and layer scan follow ``cfg.attention``,
        ``cfg.remat`` and ``cfg.scan_layers``.

        With a cache: row b's new keys go to slots cache_index[b] + t (writes past S are
        dropped), their ``pos`` is positions[b, t] (-1 where masked), and query (b, t) attends to
        every slot j with 0 <= pos[b, j] <= positions[b, t]. ``attend_len`` (static) reads only
        the first slots of the cache: every slot a query may attend to must lie below it (the
        decode engine passes a bucket of the longest live sequence, so short sequences in a
        long cache do not pay for its empty tail).

        Returns logits [B, T, V] (or final-norm hidden [B, T, D] when return_hidden), then the
        new cache when one was given, then (with output_hidden_states) the L + 1 hidden states
        of HF: the embeddings, the output of layers 0..L-2, and the final-norm output.
        """
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        b, t = tokens.shape
        mask = (jnp.ones((b, t), bool) if attention_mask is None
                else jnp.asarray(attention_mask).astype(bool))
        packed = segment_ids is not None
        if packed:
            if cache is not None:
                raise ValueError("segment_ids (packed rows) are for the forward without a cache")
            segment_ids = jnp.where(mask, jnp.asarray(segment_ids, jnp.int32), 0)
            if positions is None:
                positions = segment_positions(segment_ids)
        if positions is None:
            if attention_mask is None:
                positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            else:
                positions = jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)
        positions = jnp.asarray(positions, jnp.int32)
        sin, cos = rope_angles(positions, cfg.resolved_head_dim, cfg.rope_theta)
        x = jnp.take(self.model.embed_tokens.weight[...], tokens, axis=0).astype(dt)

        if cache is None:
            if not packed:
                segment_ids = mask.astype(jnp.int32)
            x, hidden_states = self._layers(x, sin, cos, segment_ids, packed,
                                            output_hidden_states)
            new_cache = None
        else:
            x, hidden_states, new_cache = self._layers_cached(
                x, sin, cos, mask, positions, cache, cache_index, attend_len)
        x = self.model.norm(x)
        hidden_states = hidden_states[:-1] + [x]

        out = x if return_hidden else self.logits_from_hidden(x)
        result: tuple = (out,)
        if new_cache is not None:
            result += (new_cache,)
        if output_hidden_states:
            result += (tuple(hidden_states),)
        return result[0] if len(result) == 1 else result

    def _layers(self, x, sin, cos, segment_ids, packed, keep_hidden):
        """The decoder layers without a cache (unrolled or scanned, each rematerialised by
        ``cfg.remat``). Returns the last layer's output and the list of L + 1 hidden states
        (when ``keep_hidden``; else [x] only)."""
        cfg = self.cfg

        def run(graphdef, state, x):
            layer = nnx.merge(graphdef, state)
            return layer(x, sin, cos, None, segment_ids=segment_ids, packed=packed)[0]

        if cfg.remat != "none":
            run = jax.checkpoint(run, policy=REMAT_POLICIES[cfg.remat], static_argnums=(0,),
                                 prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            graphdef, stacked = nnx.split(self.model.layers)

            def body(h, state):
                h = run(graphdef, state, h)
                return h, (h if keep_hidden else None)

            y, hs = jax.lax.scan(body, x, stacked)
            hidden = [x] + (list(hs) if keep_hidden else [y])
            return y, hidden
        hidden = [x]
        for layer in self.model.layers:
            graphdef, state = nnx.split(layer)
            x = run(graphdef, state, x)
            hidden.append(x)
        return x, hidden

    def _layers_cached(self, x, sin, cos, mask, positions, cache, cache_index, attend_len):
        """The decoder layers reading and writing a KV cache (prefill and decode)."""
        cfg = self.cfg
        b, t = mask.shape
        start = jnp.zeros((b,), jnp.int32) if cache_index is None else cache_index
        slots = jnp.asarray(start, jnp.int32)[:, None] + jnp.arange(t, dtype=jnp.int32)
        rows = jnp.arange(b)[:, None]
        new_pos = cache.pos.at[rows, slots].set(jnp.where(mask, positions, -1), mode="drop")
        if attend_len is not None and not 0 < attend_len <= new_pos.shape[1]:
            raise ValueError(f"attend_len {attend_len} outside [1, {new_pos.shape[1]}]")
        kpos = new_pos[:, None, :attend_len]
        attn_mask = (kpos >= 0) & (kpos <= positions[:, :, None])
        layer_kv = list(zip(cache.k, cache.v))
        hidden = [x]
        for i in range(cfg.num_layers):
            layer = (_layer_at(self.model.layers, i) if cfg.scan_layers
                     else self.model.layers[i])
            x, layer_kv[i] = layer(x, sin, cos, attn_mask, layer_kv[i], slots, attend_len)
            hidden.append(x)
        new_cache = KVCache(k=tuple(k for k, _ in layer_kv), v=tuple(v for _, v in layer_kv),
                            pos=new_pos)
        return x, hidden, new_cache


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """int32[B, T] index of each token within its segment (a run of equal ids)."""
    t = segment_ids.shape[1]
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids.shape)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


def apply(graphdef: nnx.GraphDef, state: nnx.State, *args, **kwargs):
    """Functional call: ``nnx.merge(graphdef, state)(*args, **kwargs)`` (use inside jit)."""
    return nnx.merge(graphdef, state)(*args, **kwargs)


# ----------------------------------------------------------------------------------------------
# Per-layer view of scanned params (the decode engine's layout)
# ----------------------------------------------------------------------------------------------


def unstacked_graphdef(graphdef: nnx.GraphDef, cfg: ModelConfig) -> nnx.GraphDef:
    """The graphdef of the same model with one module per layer (``scan_layers`` off)."""
    if not cfg.scan_layers:
        return graphdef
    flat = dataclasses.replace(cfg, scan_layers=False)
    return nnx.split(nnx.eval_shape(lambda: Qwen3(flat, rngs=nnx.Rngs(0))))[0]


def unstack_layers(cfg: ModelConfig, state: nnx.State) -> nnx.State:
    """Params of a scanned model (``model.layers.*`` stacked [L, ...]) as per-layer params
    (``model.layers.{i}.*``) for :func:`unstacked_graphdef`; the identity without scan_layers.
    Pure: use inside jit (the decode engine does, in the copy it makes of the weights)."""
    if not cfg.scan_layers:
        return state
    flat_cfg = dataclasses.replace(cfg, scan_layers=False)
    target = nnx.split(nnx.eval_shape(lambda: Qwen3(flat_cfg, rngs=nnx.Rngs(0))))[1]
    source = dict(nnx.to_flat_state(state))

    def value(path):
        if path[:2] == ("model", "layers"):
            src, i = source[("model", "layers") + tuple(path[3:])], int(path[2])
            return (src[...] if isinstance(src, nnx.Variable) else src)[i]
        src = source[tuple(path)]
        return src[...] if isinstance(src, nnx.Variable) else src

    for path, var in nnx.to_flat_state(target):
        var.set_value(value(path))
    return target


# ----------------------------------------------------------------------------------------------
# Fused decode layout: q/k/v and gate/up projections in one weight each
# ----------------------------------------------------------------------------------------------


def has_fused_projections(state: nnx.State) -> bool:
    """Whether ``state`` holds params of the fused decode layout (``fused_projections``)."""
    return any("gate_up_proj" in map(str, path) for path, _ in nnx.to_flat_state(state))


def decode_graphdef(graphdef: nnx.GraphDef, cfg: ModelConfig, fused: bool) -> nnx.GraphDef:
    """The graphdef of the same model with one module per layer, with the fused projections
    of :func:`fuse_projections` when ``fused`` (``graphdef`` itself when neither changes it)."""
    if not fused:
        return unstacked_graphdef(graphdef, cfg)
    flat = dataclasses.replace(cfg, scan_layers=False)
    return nnx.split(nnx.eval_shape(
        lambda: Qwen3(flat, rngs=nnx.Rngs(0), fused_projections=True)))[0]


def fuse_projections(cfg: ModelConfig, state: nnx.State) -> nnx.State:
    """Per-layer params (scanned ones unstacked) in the fused layout: ``qkv_proj`` [D, N + 2K, H]
    = q [N, H, D], k [K, H, D] and v [K, H, D] concatenated over heads and moved model-dim first;
    ``gate_up_proj`` [D, 2, F] = gate and up [F, D] stacked and moved model-dim first. Every
    product is the same dot product as before. Pure: use inside jit."""
    flat_cfg = dataclasses.replace(cfg, scan_layers=False)
    target = nnx.split(nnx.eval_shape(
        lambda: Qwen3(flat_cfg, rngs=nnx.Rngs(0), fused_projections=True)))[1]
    source = {tuple(map(str, p)): v for p, v in nnx.to_flat_state(unstack_layers(cfg, state))}

    def get(path):
        v = source[tuple(map(str, path))]
        return v[...] if isinstance(v, nnx.Variable) else v

    for path, var in nnx.to_flat_state(target):
        path = tuple(map(str, path))
        if path[-2] == "qkv_proj":
            base = path[:-2]
            w = jnp.concatenate([get(base + (f"{n}_proj", "weight")) for n in "qkv"], axis=0)
            var.set_value(jnp.transpose(w, (2, 0, 1)))
        elif path[-2] == "gate_up_proj":
            base = path[:-2]
            w = jnp.stack([get(base + (f"{n}_proj", "weight")) for n in ("gate", "up")])
            var.set_value(jnp.transpose(w, (2, 0, 1)))
        else:
            var.set_value(get(path))
    return target
