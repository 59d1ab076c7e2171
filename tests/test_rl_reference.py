"""Independent NumPy (float64) reference implementations of the RL objectives.

Written from docs/design.md ("Method") and the paper's equations with explicit loops, without
looking at the vectorised JAX code, so the tests can compare the two. Imported by test_rl_*.py; it holds no
tests itself.
"""

from __future__ import annotations

import math

import numpy as np

# --------------------------------------------------------------------------------------------
# Advantages (Eq. 4, 5)
# --------------------------------------------------------------------------------------------


def group_advantages(rewards, group_ids, mask, num_groups, eps=1e-6, std_normalize=True,
                     std_ddof=0, scale="group"):
    rewards = np.asarray(rewards, np.float64)
    n = len(rewards)
    out = np.zeros(n)
    valid_rows = [i for i in range(n) if mask[i] > 0]
    batch_vals = [rewards[i] for i in valid_rows]
    if batch_vals:
        bm = sum(batch_vals) / len(batch_vals)
        bss = sum((v - bm) ** 2 for v in batch_vals)
        batch_std = math.sqrt(bss / max(len(batch_vals) - std_ddof, 1))
    else:
        batch_std = 0.0
    for g in range(num_groups):
        members = [i for i in valid_rows if int(group_ids[i]) == g]
        if not members:
            continue
        vals = [rewards[i] for i in members]
        if len(members) == 1:
            out[members[0]] = vals[0]
            continue
        if max(vals) == min(vals):
            continue  # all equal -> 0
        mean = sum(vals) / len(vals)
        ss = sum((v - mean) ** 2 for v in vals)
        std = math.sqrt(ss / max(len(vals) - std_ddof, 1)) if scale == "group" else batch_std
        for i in members:
            a = rewards[i] - mean
            out[i] = a / (std + eps) if std_normalize else a
    return out


def assign_group_ids(query_index, is_reflection, num_queries, decoupled=True):
    out = []
    for q, r in zip(query_index, is_reflection):
        out.append(int(q) + num_queries if (r and decoupled) else int(q))
    return np.array(out, np.int64)


# --------------------------------------------------------------------------------------------
# Per-token pieces
# --------------------------------------------------------------------------------------------


def ots_weights(logprobs, entropy, w_min=0.01, w_max=10.0):
    s = np.asarray(logprobs, np.float64) + np.asarray(entropy, np.float64)
    with np.errstate(over="ignore"):
        w = np.exp(s)
    return np.minimum(np.maximum(w, w_min), w_max)


def _ratio(lp, old):
    d = float(lp) - float(old)
    d = min(max(d, -20.0), 20.0)
    return math.exp(d)


def clipped_surrogate(logprobs, old_logprobs, advantages, eps_low=0.2, eps_high=0.2,
                      dual_clip_c=None):
    lp = np.asarray(logprobs, np.float64)
    B, T = lp.shape
    adv = np.asarray(advantages, np.float64)
    out = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            a = adv[b] if adv.ndim == 1 else adv[b, t]
            r = _ratio(lp[b, t], old_logprobs[b, t])
            rc = min(max(r, 1 - eps_low), 1 + eps_high)
            obj = min(r * a, rc * a)  # PPO objective, to maximise
            loss = -obj
            if dual_clip_c is not None and a < 0:
                loss = min(loss, -dual_clip_c * a)
            out[b, t] = loss
    return out


def clipped_surrogate_grad(logprobs, old_logprobs, advantages, eps_low=0.2, eps_high=0.2,
                           dual_clip_c=None):
    """d loss_t / d logprob_t: -A rho inside the trust region, 0 where clipped."""
    lp = np.asarray(logprobs, np.float64)
    B, T = lp.shape
    out = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            a = advantages[b]
            d = lp[b, t] - old_logprobs[b, t]
            if abs(d) > 20.0:
                continue
            r = math.exp(d)
            if a > 0 and r > 1 + eps_high:
                continue
            if a < 0 and r < 1 - eps_low:
                continue
            if dual_clip_c is not None and a < 0 and r > dual_clip_c:
                continue
            out[b, t] = -a * r
    return out


def kl(logprobs, ref_logprobs, kind="k3"):
    d = np.asarray(ref_logprobs, np.float64) - np.asarray(logprobs, np.float64)
    if kind == "k1":
        return -d
    if kind == "k2":
        return 0.5 * d**2
    d = np.clip(d, -20, 20)
    return np.clip(np.exp(d) - d - 1, -10, 10)


def aggregate(per_token, mask, mode, max_len=None):
    """Returns (value, numerator, denominator)."""
    x = np.asarray(per_token, np.float64)
    B, T = x.shape
    L = T if max_len is None else max_len
    if mode == "token-mean":
        num, den = 0.0, 0
        for b in range(B):
            for t in range(T):
                if mask[b, t] > 0:
                    num += x[b, t] * mask[b, t]
                    den += mask[b, t]
        return (num / den if den else 0.0), num, den
    num, den = 0.0, 0
    for b in range(B):
        toks = [t for t in range(T) if mask[b, t] > 0]
        if not toks:
            continue
        s = sum(x[b, t] * mask[b, t] for t in toks)
        c = sum(mask[b, t] for t in toks)
        if mode == "seq-mean-token-mean":
            num += s / c
        elif mode == "seq-mean-token-sum":
            num += s
        elif mode == "seq-mean-token-sum-norm":
            num += s / L
        else:
            raise ValueError(mode)
        den += 1
    return (num / den if den else 0.0), num, den


def aggregate_weights(mask, mode, max_len=None):
    """d aggregate / d per_token[b, t]."""
    m = np.asarray(mask, np.float64)
    B, T = m.shape
    L = T if max_len is None else max_len
    w = np.zeros((B, T))
    if mode == "token-mean":
        tot = m.sum()
        return m / tot if tot else w
    nseq = int((m.sum(1) > 0).sum())
    if nseq == 0:
        return w
    for b in range(B):
        c = m[b].sum()
        if c == 0:
            continue
        if mode == "seq-mean-token-mean":
            w[b] = m[b] / c / nseq
        elif mode == "seq-mean-token-sum":
            w[b] = m[b] / nseq
        else:
            w[b] = m[b] / L / nseq
    return w


def log_softmax(z):
    z = np.asarray(z, np.float64)
    mx = z.max(-1, keepdims=True)
    return z - mx - np.log(np.exp(z - mx).sum(-1, keepdims=True))


def entropy(logits):
    lp = log_softmax(logits)
    return -(np.exp(lp) * lp).sum(-1)


def target_logprobs(logits, targets):
    lp = log_softmax(logits)
    return np.take_along_axis(lp, np.asarray(targets)[..., None], -1)[..., 0]


# --------------------------------------------------------------------------------------------
# TAPO loss (Eq. 2, 6, 7, 8)
# --------------------------------------------------------------------------------------------


def _masks(b, cfg):
    B, T = b["loss_mask"].shape
    m_o = np.zeros((B, T))
    m_r = np.zeros((B, T))
    for i in range(B):
        if b["row_mask"][i] <= 0:
            continue
        if not b["is_reflection"][i]:
            m_o[i] = b["loss_mask"][i]
        else:
            ok = b["rewards"][i] > 0
            if cfg.sft_only:
                use = ok
            else:
                use = cfg.negatives or ok
            if use:
                m_r[i] = b["loss_mask"][i]
    return m_o, m_r


def tapo_loss(lp, old, ent, b, cfg, max_len=None):
    """Reference loss value and its gradient w.r.t. ``lp`` (entropy treated as a constant
    except in the entropy bonus, whose gradient w.r.t. ``ent`` is returned as well)."""
    m_o, m_r = _masks(b, cfg)
    act = m_o + m_r
    adv = b["advantages"]
    kw = dict(eps_low=cfg.eps_low, eps_high=cfg.eps_high, dual_clip_c=cfg.dual_clip_c)
    pg = clipped_surrogate(lp, old, adv, **kw)
    pg_g = clipped_surrogate_grad(lp, old, adv, **kw)
    w = ots_weights(lp, ent, cfg.w_min, cfg.w_max) if cfg.ots else np.ones_like(pg)
    mode = cfg.loss_agg
    l_o, _, _ = aggregate(pg, m_o, mode, max_len)
    g = aggregate_weights(m_o, mode, max_len) * pg_g
    if cfg.sft_only:
        l_r, _, _ = aggregate(-np.asarray(lp, np.float64), m_r, mode, max_len)
        g = g + cfg.lam * aggregate_weights(m_r, mode, max_len) * -1.0
    else:
        l_r, _, _ = aggregate(pg * w, m_r, mode, max_len)
        g = g + cfg.lam * aggregate_weights(m_r, mode, max_len) * w * pg_g
    loss = l_o + cfg.lam * l_r
    g_ent = np.zeros_like(g)
    if cfg.kl_coef:
        k = kl(lp, b["ref_logprobs"], cfg.kl_kind)
        d = np.asarray(b["ref_logprobs"], np.float64) - np.asarray(lp, np.float64)
        if cfg.kl_kind == "k1":
            dk = np.ones_like(d)
        elif cfg.kl_kind == "k2":
            dk = -d
        else:
            dk = 1.0 - np.exp(d)  # valid when |d| < 20 and k3 < 10
        loss += cfg.kl_coef * aggregate(k, act, mode, max_len)[0]
        g = g + cfg.kl_coef * aggregate_weights(act, mode, max_len) * dk
    if cfg.entropy_coef:
        loss -= cfg.entropy_coef * aggregate(ent, act, mode, max_len)[0]
        g_ent = -cfg.entropy_coef * aggregate_weights(act, mode, max_len)
    return loss, g, g_ent, dict(pg_loss_orig=l_o, pg_loss_ref=l_r, w=w, m_o=m_o, m_r=m_r)


# --------------------------------------------------------------------------------------------
# OPSD
# --------------------------------------------------------------------------------------------


def opsd(student_logits, teacher_logits, mask, beta, temperature=1.0, top_k=0):
    s = np.asarray(student_logits, np.float64) / temperature
    t = np.asarray(teacher_logits, np.float64) / temperature
    B, T, V = s.shape
    div = np.zeros((B, T))
    for b in range(B):
        for j in range(T):
            sv, tv = s[b, j], t[b, j]
            if top_k:
                idx = np.argsort(-tv, kind="stable")[:top_k]
                sv, tv = sv[idx], tv[idx]
            ps = np.exp(log_softmax(sv))
            pt = np.exp(log_softmax(tv))
            if beta == 0:
                d = np.sum(pt * np.log(pt / ps))
            elif beta == 1:
                d = np.sum(ps * np.log(ps / pt))
            else:
                pm = beta * pt + (1 - beta) * ps
                d = beta * np.sum(pt * np.log(pt / pm)) + (1 - beta) * np.sum(ps * np.log(ps / pm))
            div[b, j] = max(d, 0.0)
    m = np.asarray(mask, np.float64)
    tot = m.sum()
    return (div * m).sum() / tot if tot else 0.0


# --------------------------------------------------------------------------------------------
# Test utility
# --------------------------------------------------------------------------------------------


def jit_traced(fn, n, name):
    """``jax.jit`` of ``fn`` that fails if traced more than ``n`` times (chex.assert_max_traces).

    chex counts traces per (call stack, source, name), so every wrapper gets its own name.
    """
    import chex
    import jax

    def call(*args, **kwargs):
        return fn(*args, **kwargs)

    call.__name__ = call.__qualname__ = f"traced_{name}"
    return jax.jit(chex.assert_max_traces(call, n=n))
