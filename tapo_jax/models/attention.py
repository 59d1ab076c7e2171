"""Attention over whole sequences (training, teacher-forced forwards): one function, several
implementations, chosen by ``model.attention`` in one place (:func:`resolve_implementation`).

Letters: B batch, T queries, S keys (S = T: no cache), N query heads, K kv heads, G = N // K,
H head dim. Inputs q [B, T, N, H], k / v [B, S, K, H]; output [B, T, N, H] in q's dtype.

The mask is given by segment ids int32[B, T] (0 = padding): query t attends to key s iff s <= t
(causal by index), seg[s] != 0 and seg[t] == seg[s]. A row holding one sequence has ids 1 on its
tokens and 0 on its padding, left or right; several sequences packed in one row have ids
1, 2, ... Query rows that attend to no key (padding) give 0 in every implementation.

Implementations:

- ``xla``: einsum, float32 logits and probabilities [B, K, G, T, S]: the reference, and the
  fastest on CPU for short sequences; its memory grows as T x S per layer.
- ``blockwise``: memory-efficient attention in pure JAX (any backend): query blocks x key blocks
  with an online softmax; a custom VJP recomputes each block in the backward pass from the
  output and the row log-sum-exp, so nothing of size T x S is stored. Blocks above the causal
  diagonal are skipped. Memory O(B x N x T x H + block^2) per layer.
- ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (cuDNN flash attention),
  CUDA only, bfloat16 / float16 inputs. Rows with one sequence are rotated to start at column 0
  and described by their lengths (its padding mask); packed rows pass an explicit mask.
- ``splash``: the Pallas TPU splash-attention kernel shipped with JAX (causal mask, segment ids,
  grouped-query heads as one multi-query kernel per kv head), under ``shard_map`` over the batch
  when a mesh is set; elsewhere it runs in Pallas interpret mode (slow; tests only).
- ``auto``: splash on TPU, cudnn on GPU for 16-bit inputs, otherwise xla up to
  :data:`AUTO_XLA_MAX_LEN` tokens and blockwise beyond.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "blockwise", "cudnn", "splash")
AUTO_XLA_MAX_LEN = 1024  # auto: xla up to this many tokens, blockwise beyond (CPU, float32 GPU)
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
SPLASH_BLOCK = 128  # sequence lengths are padded to a multiple of this for splash


def resolve_implementation(implementation: str, length: int, dtype=jnp.float32,
                           backend: Optional[str] = None) -> str:
    """The concrete implementation ``auto`` stands for at this length, dtype and backend."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, "
                         f"got {implementation!r}")
    if implementation != "auto":
        return implementation
    backend = backend or jax.default_backend()
    if backend == "tpu":
        return "splash"
    if backend in ("gpu", "cuda") and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "xla" if length <= AUTO_XLA_MAX_LEN else "blockwise"


def segment_mask(seg_q: jax.Array, seg_k: jax.Array, q_offset=0, k_offset=0) -> jax.Array:
    """bool[B, Tq, Sk]: causal by index (query index q_offset + t, key index k_offset + s),
    same segment, key not padding."""
    tq, sk = seg_q.shape[1], seg_k.shape[1]
    causal = (q_offset + jnp.arange(tq))[:, None] >= (k_offset + jnp.arange(sk))[None, :]
    same = seg_q[:, :, None] == seg_k[:, None, :]
    return causal[None] & same & (seg_k[:, None, :] != 0)


def _zero_padding_rows(out: jax.Array, segment_ids: jax.Array) -> jax.Array:
    return jnp.where((segment_ids != 0)[:, :, None, None], out, jnp.zeros((), out.dtype))


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
                          implementation: str = "xla", block_size: int = 512,
                          packed: bool = False) -> jax.Array:
    """Causal attention of q [B, T, N, H] over k, v [B, T, K, H] under ``segment_ids`` [B, T].

    ``implementation`` is one of :data:`IMPLEMENTATIONS` (``auto`` resolved here);
    ``block_size`` is the blockwise block (queries and keys); ``packed`` tells the cudnn path
    that rows may hold several sequences (otherwise each row's tokens must be one contiguous
    run, as left or right padding gives).
    """
    b, t, n, h = q.shape
    if k.shape != v.shape or k.shape[:2] != (b, t) or k.shape[3] != h or n % k.shape[2]:
        raise ValueError(f"attention shapes: q {q.shape}, k {k.shape}, v {v.shape}")
    impl = resolve_implementation(implementation, t, q.dtype)
    segment_ids = jnp.asarray(segment_ids, jnp.int32)
    scale = h ** -0.5
    if impl == "xla":
        return xla_attention(q, k, v, segment_ids, scale)
    if impl == "blockwise":
        return blockwise_attention(q, k, v, segment_ids, scale=scale, block_size=block_size)
    if impl == "cudnn":
        return _cudnn_attention(q, k, v, segment_ids, scale, packed)
    return _splash_attention(q, k, v, segment_ids, scale)


# ----------------------------------------------------------------------------------------------
# xla: the reference
# ----------------------------------------------------------------------------------------------


def xla_attention(q, k, v, segment_ids, scale):
    b, t, n, h = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, t, kv, n // kv, h)
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32)
    mask = segment_mask(segment_ids, segment_ids)
    logits = jnp.where(mask[:, None, None], logits * scale, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v).reshape(b, t, n, h)
    return _zero_padding_rows(out, segment_ids)


# ----------------------------------------------------------------------------------------------
# blockwise: online softmax forward, recomputing backward (custom VJP)
# ----------------------------------------------------------------------------------------------


def blockwise_attention(q, k, v, segment_ids, *, scale: float, block_size: int = 512):
    """Memory-efficient causal attention (see the module docstring); any backend."""
    b, t, n, h = q.shape
    blk = max(8, min(block_size, -(-t // 8) * 8))
    tp = -(-t // blk) * blk
    pad = ((0, 0), (0, tp - t))
    if tp != t:
        q, k, v = (jnp.pad(x, pad + ((0, 0), (0, 0))) for x in (q, k, v))
        segment_ids = jnp.pad(segment_ids, pad)
    kv = k.shape[2]
    qg = q.reshape(b, tp, kv, n // kv, h)
    out = _flash(qg, k, v, segment_ids, scale, blk)
    return out.reshape(b, tp, n, h)[:, :t]


def _blocks(x, i, blk, axis=1):
    return jax.lax.dynamic_slice_in_dim(x, i * blk, blk, axis=axis)


def _block_scores(qi, kj, si, sj, i, j, blk, scale):
    """Scaled logits float32[B, K, G, blk, blk] of query block i x key block j, and the mask."""
    s = jnp.einsum("BTKGH,BSKH->BKGTS", qi, kj, preferred_element_type=jnp.float32) * scale
    mask = segment_mask(si, sj, i * blk, j * blk)[:, None, None]
    return s, mask


def _flash_forward(qg, k, v, seg, scale, blk):
    """out [B, T, K, G, H] (q's dtype) and row log-sum-exp float32[B, K, G, T]."""
    b, tp, kv, g, h = qg.shape
    nb = tp // blk

    def q_block(i):
        qi, si = _blocks(qg, i, blk), _blocks(seg, i, blk)

        def body(j, carry):
            m, l, acc = carry
            kj, vj, sj = _blocks(k, j, blk), _blocks(v, j, blk), _blocks(seg, j, blk)
            s, mask = _block_scores(qi, kj, si, sj, i, j, blk, scale)
            s = jnp.where(mask, s, MASK_VALUE)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
            alpha = jnp.exp(m - m_new)
            l = alpha * l + jnp.sum(p, axis=-1)
            pv = jnp.einsum("BKGTS,BSKH->BKGTH", p.astype(v.dtype), vj,
                            preferred_element_type=jnp.float32)
            return m_new, l, alpha[..., None] * acc + pv

        init = (jnp.full((b, kv, g, blk), MASK_VALUE, jnp.float32),
                jnp.zeros((b, kv, g, blk), jnp.float32),
                jnp.zeros((b, kv, g, blk, h), jnp.float32))
        m, l, acc = jax.lax.fori_loop(0, i + 1, body, init)  # key blocks up to the diagonal
        nonzero = l > 0
        out = acc / jnp.where(nonzero, l, 1.0)[..., None]
        lse = jnp.where(nonzero, m + jnp.log(jnp.where(nonzero, l, 1.0)), 0.0)
        return out.astype(qg.dtype), lse

    out, lse = jax.lax.map(q_block, jnp.arange(nb))  # [nb, B, K, G, blk, (H)]
    out = jnp.moveaxis(out, 0, 3).reshape(b, kv, g, tp, h)
    lse = jnp.moveaxis(lse, 0, 3).reshape(b, kv, g, tp)
    return jnp.transpose(out, (0, 3, 1, 2, 4)), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(qg, k, v, seg, scale, blk):
    return _flash_forward(qg, k, v, seg, scale, blk)[0]


def _flash_fwd(qg, k, v, seg, scale, blk):
    out, lse = _flash_forward(qg, k, v, seg, scale, blk)
    return out, (qg, k, v, seg, out, lse)


def _flash_bwd(scale, blk, res, dout):
    qg, k, v, seg, out, lse = res
    b, tp, kv, g, h = qg.shape
    nb = tp // blk
    do = dout.astype(jnp.float32)
    delta = jnp.einsum("BTKGH,BTKGH->BKGT", do, out.astype(jnp.float32))  # rowsum(dO * O)

    def probs(i, j):
        """P and dS float32[B, K, G, blk, blk] of block (i, j)."""
        qi, si = _blocks(qg, i, blk), _blocks(seg, i, blk)
        kj, vj, sj = _blocks(k, j, blk), _blocks(v, j, blk), _blocks(seg, j, blk)
        s, mask = _block_scores(qi, kj, si, sj, i, j, blk, scale)
        p = jnp.where(mask, jnp.exp(s - _blocks(lse, i, blk, axis=3)[..., None]), 0.0)
        dp = jnp.einsum("BTKGH,BSKH->BKGTS", _blocks(do, i, blk), vj.astype(jnp.float32))
        ds = p * (dp - _blocks(delta, i, blk, axis=3)[..., None])
        return p, ds

    def dq_block(i):  # key blocks 0..i
        def body(j, acc):
            _, ds = probs(i, j)
            return acc + jnp.einsum("BKGTS,BSKH->BTKGH", ds,
                                    _blocks(k, j, blk).astype(jnp.float32)) * scale

        return jax.lax.fori_loop(0, i + 1, body, jnp.zeros((b, blk, kv, g, h), jnp.float32))

    def dkv_block(j):  # query blocks j..nb-1
        def body(i, acc):
            dk, dv = acc
            p, ds = probs(i, j)
            dv = dv + jnp.einsum("BKGTS,BTKGH->BSKH", p, _blocks(do, i, blk))
            dk = dk + jnp.einsum("BKGTS,BTKGH->BSKH", ds,
                                 _blocks(qg, i, blk).astype(jnp.float32)) * scale
            return dk, dv

        zeros = jnp.zeros((b, blk, kv, h), jnp.float32)
        return jax.lax.fori_loop(j, nb, body, (zeros, zeros))

    def merge(x):  # [nb, B, blk, ...] -> [B, nb * blk, ...]
        return jnp.moveaxis(x, 0, 1).reshape(x.shape[1], nb * blk, *x.shape[3:])

    dq = merge(jax.lax.map(dq_block, jnp.arange(nb)))
    dk, dv = jax.lax.map(dkv_block, jnp.arange(nb))
    return (dq.astype(qg.dtype), merge(dk).astype(k.dtype), merge(dv).astype(v.dtype), None)


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------------------------
# cudnn (CUDA) and splash (TPU)
# ----------------------------------------------------------------------------------------------


def _cudnn_attention(q, k, v, segment_ids, scale, packed):
    valid = segment_ids != 0
    if packed:
        mask = segment_mask(segment_ids, segment_ids)[:, None]
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                           implementation="cudnn")
        return _zero_padding_rows(out, segment_ids)
    # One contiguous run per row: rotate it to start at column 0, attend with lengths, rotate back.
    t = q.shape[1]
    start = jnp.argmax(valid, axis=1).astype(jnp.int32)
    lengths = jnp.sum(valid, axis=1).astype(jnp.int32)
    fwd_idx = (jnp.arange(t)[None, :] + start[:, None]) % t
    back_idx = (jnp.arange(t)[None, :] - start[:, None]) % t

    def rotate(x, idx):
        return jnp.take_along_axis(x, idx[:, :, None, None], axis=1)

    out = jax.nn.dot_product_attention(
        rotate(q, fwd_idx), rotate(k, fwd_idx), rotate(v, fwd_idx), scale=scale, is_causal=True,
        query_seq_lengths=lengths, key_value_seq_lengths=lengths, implementation="cudnn")
    return _zero_padding_rows(rotate(out, back_idx), segment_ids)


def _splash_attention(q, k, v, segment_ids, scale):
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash, splash_attention_mask as splash_mask)

    b, t, n, h = q.shape
    kv = k.shape[2]
    tp = -(-t // SPLASH_BLOCK) * SPLASH_BLOCK
    if tp != t:  # padded keys get segment 0; padded queries are dropped below
        pad = ((0, 0), (0, tp - t), (0, 0), (0, 0))
        q, k, v = jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad)
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, tp - t)))
    blk = min(512, tp)
    sizes = splash.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk,
                              block_kv_dkv=blk, block_kv_dkv_compute=blk, block_q_dq=blk,
                              block_kv_dq=blk)
    g = n // kv
    mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((tp, tp))] * g)
    kernel = splash.make_splash_mqa_single_device(
        mask, block_sizes=sizes, interpret=jax.default_backend() != "tpu")

    def one_row(qr, kr, vr, sr):  # qr [K, G, T, H], kr/vr [K, T, H], sr [T]
        ids = splash.SegmentIds(q=sr, kv=sr)
        return jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh, segment_ids=ids))(qr, kr, vr)

    def run(q, k, v, seg):
        qh = jnp.transpose((q * scale).reshape(q.shape[0], tp, kv, g, h), (0, 2, 3, 1, 4))
        kh, vh = jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))
        out = jax.vmap(one_row)(qh, kh, vh, seg)  # [B, K, G, T, H]
        return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(q.shape[0], tp, n, h)

    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:  # Pallas calls are not partitioned by XLA: map over the batch shards
        from tapo_jax.models.sharding import BATCH_AXES

        axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and b % mesh.shape[a] == 0)
        spec = jax.sharding.PartitionSpec(axes or None)
        run = jax.shard_map(run, mesh=mesh, in_specs=(spec, spec, spec, spec), out_specs=spec,
                            check_vma=False)
    out = run(q, k, v, segment_ids).astype(q.dtype)
    return _zero_padding_rows(out, segment_ids)[:, :t]
