"""JetStream-style decode engine for the Flax Qwen3, in pure JAX.

Interface (JetStream's, minus its TensorFlow import): ``init_decode_state()``,
``prefill(padded_tokens, true_lengths, ...) -> Prefix``, ``insert(prefix, state, slots)``
(bulk), ``generate(state, steps=N) -> (state, ResultTokens)`` producing up to N tokens for every
live slot inside one jitted ``lax.while_loop`` (the host intervenes only every N tokens),
``free_slots`` and ``update_params``.

Every buffer has a static shape and is donated between calls. Prefill pads prompts to a length
bucket (powers of two and, from 64 on, three halves of one; or ``prefill_buckets``) and a row
bucket (powers of two up to the number of slots); a decode state's cache holds a cache bucket of
what its call needs (at most ``max_len``), so the number of compilations is bounded. Compiled
functions are shared by every engine in the process: they are cached by what determines the
compiled code (graphdef, cache dtype, mesh and sharding rules, the shapes, dtypes and shardings
of the arguments, and the static sampling options), so a new engine over the same model, or a
one-shot ``generate``, reuses them.
``compile_counts`` counts the compilations an engine actually performed (cache misses).

Randomness: each request carries its own raw PRNG key; token ``t`` of a request is drawn with
``fold_in(request_key, t)``, so outputs do not depend on slot count or scheduling order.
Log-probs: see :mod:`tapo_jax.sampling.logits` (unmodified policy at the sampling temperature).
Letters: S slots, M cache length, L layers, K kv heads, H head dim, P prefill rows, T prefill
length, V vocabulary, N decode steps per call.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tapo_jax.models import sharding as sharding_lib
from tapo_jax.models.qwen3 import (KVCache, decode_graphdef, fuse_projections,
                                   has_fused_projections, init_cache, unstack_layers)
from tapo_jax.sampling.logits import (draw_inverse_cdf, sample_tokens, truncation_mask,
                                      num_uniforms, uniforms)


@flax.struct.dataclass
class DecodeState:
    cache: KVCache  # k: L x [S, K, H, M], v: L x [S, K, M, H]; pos int32[S, M]
    next_pos: jax.Array  # int32[S]   position (= cache index) of the token fed next
    last_token: jax.Array  # int32[S]   token fed at the next step
    generated: jax.Array  # int32[S]   tokens produced so far (the prefill token included)
    max_new: jax.Array  # int32[S]   budget of new tokens
    done: jax.Array  # bool[S]    finished (or empty) slot
    stopped: jax.Array  # bool[S]    finished by a stop token (vs the length budget)
    keys: jax.Array  # uint32[S, 2] request PRNG keys
    temperature: jax.Array  # float32[S]
    top_p: jax.Array  # float32[S]
    top_k: jax.Array  # int32[S]
    min_p: jax.Array  # float32[S]
    stop_ids: jax.Array  # int32[E]   stop tokens (-1 = unused entry)
    history: jax.Array  # int32[S, M] token at each position (the prompt, written by insert,
    #                     then what speculative steps generate): the context that prompt-lookup
    #                     drafts are copied from. One-token steps leave it as it is (they never
    #                     read it, and any draft keeps the samples exact: a stale one is only
    #                     rejected more often)


@flax.struct.dataclass
class Prefix:
    """Prefilled requests, ready to insert: their KV and first sampled token."""

    k: tuple[jax.Array, ...]  # L x [P, K, H, T]
    v: tuple[jax.Array, ...]  # L x [P, K, T, H]
    true_length: jax.Array  # int32[P]
    first_token: jax.Array  # int32[P]
    first_logprob: jax.Array  # float32[P]
    keys: jax.Array  # uint32[P, 2]
    tokens: jax.Array  # int32[P, T] the prompts (right-padded)


@flax.struct.dataclass
class ResultTokens:
    """Tokens of N decode steps for every slot. ``valid[s, i]``: slot s produced token i."""

    tokens: jax.Array  # int32[S, N]
    logprobs: jax.Array  # float32[S, N]
    valid: jax.Array  # bool[S, N]
    lengths: jax.Array  # int32[S]  tokens generated so far per slot


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _length_step(n: int) -> int:
    """Smallest of 8, 16, 32, 64, 96, 128, 192, 256, 384, ... (powers of two, and from 64 on
    also three halves of one) that holds ``n``: at most a third of a prefill or a cache is
    padding above 64 tokens, at twice the compilations of powers of two alone."""
    p = max(8, _pow2_at_least(n))
    return 3 * p // 4 if p >= 128 and n <= 3 * p // 4 else p


# ------------------------------------------------------------------------ shared compilations
# (engine key, function name, static options, argument signature) -> jax.stages.Compiled. Kept
# for the life of the process (bounded by the bucketing above); clear_compile_cache() frees it.
_COMPILED: dict[tuple, Any] = {}


def clear_compile_cache() -> None:
    """Drop every compiled prefill / insert / decode / copy function of every engine."""
    _COMPILED.clear()


def _signature(args: Any) -> tuple:
    """What of the arguments determines the compiled code: tree structure, then shape, dtype,
    weak type and sharding of each leaf."""
    leaves, treedef = jax.tree.flatten(args)
    return treedef, tuple((x.shape, x.dtype, getattr(x, "weak_type", False),
                           getattr(x, "sharding", None)) for x in leaves)


def _freeze(rules: dict) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in rules.items()))


class Engine:
    """Owns the sampling-time copy of the weights and the compiled prefill / decode functions."""

    def __init__(self, graphdef: nnx.GraphDef, params: nnx.State, *, num_slots: int,
                 max_len: int, mesh: Any = None, prefill_buckets: Optional[Sequence[int]] = None,
                 max_stop_ids: int = 8, cache_dtype: Any = None):
        self.cfg = nnx.merge(graphdef, params).cfg
        if num_slots < 1 or max_len < 2:
            raise ValueError(f"num_slots must be >= 1 and max_len >= 2, got {num_slots}, {max_len}")
        self.num_slots, self.max_len = num_slots, max_len
        self.mesh = mesh if mesh is not None else sharding_lib.make_mesh(
            _single_mesh_cfg(), devices=jax.devices()[:1])
        # Decoding keeps one module (and one cache array) per layer even when training scans
        # stacked layers: a decode step then reads each layer's weights in place, where slicing
        # a stacked [L, ...] buffer per step would copy it (docs/design.md, "Model and memory").
        # Without tensor parallelism the q/k/v and gate/up weights are fused (one matmul each,
        # model dim first: fewer and faster kernels per step); params already in that layout
        # (another engine's) are taken as they are.
        already = has_fused_projections(params)
        self.fused = already or self.mesh.shape["tensor"] == 1
        self.graphdef = graphdef if already else decode_graphdef(graphdef, self.cfg, self.fused)
        to_decode = functools.partial(_decode_params, self.cfg, fused=self.fused and not already)
        self.rules = sharding_lib.SAMPLE_RULES
        self.prefill_buckets = tuple(sorted(prefill_buckets)) if prefill_buckets else None
        self.max_stop_ids = max_stop_ids
        self.cache_dtype = jnp.dtype(cache_dtype or self.cfg.dtype)
        # compilations this engine performed; calls served by the shared cache do not count
        self.compile_counts: collections.Counter = collections.Counter()
        self._params_sh = sharding_lib.state_shardings(
            jax.eval_shape(to_decode, params), self.mesh, self.rules)
        self._to_decode = to_decode
        self._base_key = (self.graphdef, self.cache_dtype, self.mesh, _freeze(self.rules))
        self._local: dict[tuple, Any] = {}  # this engine's view of _COMPILED (no graphdef hash)
        self._params_sig: Optional[tuple] = None
        n_dp = sharding_lib.data_parallel_size(self.mesh)
        self._slot_multiple = n_dp if num_slots % n_dp == 0 else 1
        if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)):
            # abstract params: an engine whose programs can be lowered and analysed, not run
            self.params = jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                jax.eval_shape(to_decode, params), self._params_sh)
            self._params_sig = _signature(self.params)
        else:
            self.update_params(params)

    # -------------------------------------------------------------------- compiled functions
    def _compiled(self, name: str, args: tuple, static: dict, make_jit) -> Any:
        """The compiled ``name`` for ``args`` (params excluded: they are part of the engine's
        key) and ``static`` options: from this engine's table, else the process-wide cache,
        else compiled now (and counted)."""
        local_key = (name, tuple(sorted(static.items())), _signature(args))
        fn = self._local.get(local_key)
        if fn is None:
            params_sig = None if name == "copy" else self._params_sig
            key = (self._base_key, params_sig) + local_key
            fn = _COMPILED.get(key)
            if fn is None:
                call_args = args if name == "copy" else (self.params,) + args
                fn = make_jit().lower(*call_args, **static).compile()
                _COMPILED[key] = fn
                self.compile_counts[name] += 1
            self._local[local_key] = fn
        return fn

    # -------------------------------------------------------------------- weights and state
    def update_params(self, params: nnx.State) -> None:
        """New policy weights (resharded to the sampling rules; a copy, never an alias)."""
        copy = self._compiled("copy", (params,), {}, lambda: jax.jit(
            functools.partial(_copy_impl, self._to_decode), out_shardings=self._params_sh))
        self.params = copy(params)
        sig = _signature(self.params)
        if sig != self._params_sig:  # other dtypes: another set of compilations
            self._params_sig, self._local = sig, {}

    def init_decode_state(self, stop_ids: Sequence[int] = (), num_slots: Optional[int] = None,
                          cache_len: Optional[int] = None) -> DecodeState:
        """Empty decode state of ``num_slots`` slots (default all; fewer decode fewer rows per
        step: use a :meth:`row_bucket` for few requests, so compilations stay bounded) with
        ``cache_len`` cache slots per sequence (default ``max_len``; a call whose sequences
        need fewer allocates, fills and copies less: use a :meth:`cache_bucket`)."""
        S, E = num_slots or self.num_slots, self.max_stop_ids
        M = cache_len or self.max_len
        if not 2 <= M <= self.max_len:
            raise ValueError(f"cache_len {M} outside [2, {self.max_len}]")
        stops = np.full((E,), -1, np.int32)
        stops[: len(stop_ids)] = stop_ids
        state = DecodeState(
            cache=init_cache(self.cfg, S, M, self.cache_dtype),
            next_pos=jnp.zeros((S,), jnp.int32), last_token=jnp.zeros((S,), jnp.int32),
            generated=jnp.zeros((S,), jnp.int32), max_new=jnp.zeros((S,), jnp.int32),
            done=jnp.ones((S,), bool), stopped=jnp.zeros((S,), bool),
            keys=jnp.zeros((S, 2), jnp.uint32), temperature=jnp.ones((S,), jnp.float32),
            top_p=jnp.ones((S,), jnp.float32), top_k=jnp.zeros((S,), jnp.int32),
            min_p=jnp.zeros((S,), jnp.float32), stop_ids=jnp.asarray(stops),
            history=jnp.zeros((S, M), jnp.int32))
        return jax.device_put(state, self._state_shardings(state))

    def _state_shardings(self, state: DecodeState) -> DecodeState:
        S = state.done.shape[0]
        slot = sharding_lib.logical_sharding(self.mesh, ("batch",), self.rules, (S,))
        slot2 = sharding_lib.logical_sharding(self.mesh, ("batch", None), self.rules, (S, 2))
        rep = sharding_lib.logical_sharding(self.mesh, (None,), self.rules, (self.max_stop_ids,))
        hist = sharding_lib.logical_sharding(self.mesh, ("batch", None), self.rules,
                                             state.history.shape)
        return DecodeState(
            cache=sharding_lib.cache_shardings(state.cache, self.mesh, self.rules),
            next_pos=slot, last_token=slot, generated=slot, max_new=slot, done=slot,
            stopped=slot, keys=slot2, temperature=slot, top_p=slot, top_k=slot, min_p=slot,
            stop_ids=rep, history=hist)

    # -------------------------------------------------------------------- buckets
    def length_bucket(self, n: int) -> int:
        if self.prefill_buckets:
            for b in self.prefill_buckets:
                if b >= n:
                    return min(b, self.max_len)  # a prefix never outgrows the cache
            raise ValueError(f"prompt of {n} tokens exceeds the largest prefill bucket "
                             f"{self.prefill_buckets[-1]}")
        return min(_length_step(n), self.max_len)

    def cache_bucket(self, n: int) -> int:
        """Cache slots per sequence for a call whose sequences reach ``n`` tokens: a power of two
        (at least 32) or, from 96 on, three halves of one; at most ``max_len`` (few compilations
        per engine)."""
        if n < 1:
            raise ValueError(f"cache length must be >= 1, got {n}")
        return min(max(32, _length_step(n)), self.max_len)

    def attend_bucket(self, n: int, cache_len: Optional[int] = None) -> int:
        """Cache slots a decode call reads when no live sequence reaches past slot ``n``: a
        power of two (at least 32) up to half the cache length, else the whole cache, so the
        number of decode compilations stays logarithmic in ``max_len``.

        A window is cut from the cache and written back once per call (see ``generate``), about
        four reads of the window; it pays when it skips at least half of the cache."""
        if n < 1:
            raise ValueError(f"attend length must be >= 1, got {n}")
        M = cache_len or self.max_len
        b = max(32, _pow2_at_least(n))
        return b if 2 * b <= M else M

    def row_bucket(self, n: int) -> int:
        """Prefill rows: powers of two from num_slots / 8 up to num_slots (few compilations)."""
        floor = max(self._slot_multiple, self.num_slots // 8, 1)
        b = min(max(floor, _pow2_at_least(n)), self.num_slots)
        return -(-b // self._slot_multiple) * self._slot_multiple

    # -------------------------------------------------------------------- prefill
    def prefill(self, tokens: np.ndarray, true_length: np.ndarray, keys: np.ndarray,
                sampling: dict[str, np.ndarray], *, k_bound: int, filtered: bool) -> Prefix:
        """Prefill right-padded prompts int32[P, T] and sample each one's first token."""
        args = (jnp.asarray(tokens), jnp.asarray(true_length), jnp.asarray(keys),
                *(jnp.asarray(sampling[k]) for k in ("temperature", "top_p", "top_k", "min_p")))
        static = dict(k_bound=k_bound, filtered=filtered)
        fn = self._compiled("prefill", args, static, lambda: jax.jit(
            functools.partial(_prefill_impl, self.graphdef, self.cache_dtype),
            static_argnames=tuple(static)))
        return fn(self.params, *args)

    # -------------------------------------------------------------------- insert
    def insert(self, prefix: Prefix, state: DecodeState, slots: np.ndarray, max_new: np.ndarray,
               sampling: dict[str, np.ndarray]) -> DecodeState:
        args = (prefix, state, jnp.asarray(slots, jnp.int32), jnp.asarray(max_new, jnp.int32),
                *(jnp.asarray(sampling[k]) for k in ("temperature", "top_p", "top_k", "min_p")))
        fn = self._compiled("insert", args, {}, lambda: jax.jit(_insert_impl,
                                                               donate_argnums=(2,)))
        return fn(self.params, *args)

    # -------------------------------------------------------------------- generate
    def generate(self, state: DecodeState, *, steps: int = 1, k_bound: int, filtered: bool,
                 attend_len: Optional[int] = None, draft: int = 0
                 ) -> tuple[DecodeState, ResultTokens]:
        """Up to ``steps`` decode steps for every live slot (stops early when every slot is
        done): one token per step, or with ``draft`` > 0 up to ``draft + 1`` (speculative
        decoding with prompt-lookup drafts, :func:`_spec_step`); ResultTokens then hold
        ``steps * (draft + 1)`` columns, each slot's tokens first.

        ``attend_len``: read only the first cache slots (from :meth:`attend_bucket`). It must
        exceed every live slot's ``next_pos + steps * (draft + 1) - 1``; None reads the whole
        cache. Below the
        cache length, the call decodes on a window of those slots, cut from the cache once and
        written back at the end.
        """
        M = state.cache.pos.shape[1]
        if attend_len is not None and not 0 < attend_len <= M:
            raise ValueError(f"attend_len {attend_len} outside [1, {M}]")
        if draft < 0:
            raise ValueError(f"draft must be >= 0, got {draft}")
        static = dict(steps=steps, k_bound=k_bound, filtered=filtered, attend_len=attend_len,
                      draft=draft)
        fn = self._compiled("generate", (state,), static, lambda: self._generate)
        return fn(self.params, state)

    @property
    def _generate(self):
        """The jitted decode call ``(params, state, *, steps, k_bound, filtered, attend_len)``,
        e.g. to lower it for analysis (calls go through the shared compilations)."""
        return jax.jit(functools.partial(_generate_impl, self.graphdef), donate_argnums=(1,),
                       static_argnames=("steps", "k_bound", "filtered", "attend_len", "draft"))

    def free_slots(self, state: DecodeState, slots: Sequence[int]) -> DecodeState:
        idx = jnp.asarray(list(slots), jnp.int32)
        return state.replace(done=state.done.at[idx].set(True))


def _decode_params(cfg: Any, params: nnx.State, fused: bool = False) -> nnx.State:
    """The sampling copy's layout: per-layer params (q/k/v and gate/up fused when ``fused``),
    floats in the compute dtype. The model casts every weight to ``cfg.dtype`` before using it,
    so storing them so changes no result and halves the copy of float32 master weights."""
    dt = jnp.dtype(cfg.dtype)
    layout = fuse_projections(cfg, params) if fused else unstack_layers(cfg, params)
    return jax.tree.map(lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                        layout)


# ------------------------------------------------------------------------ compiled functions
# Pure functions of (params, arrays); the engine compiles them once per key (see _COMPILED).
def _copy_impl(to_decode, params):
    return sharding_lib.fresh_copy(to_decode(params))


def _prefill_impl(graphdef, cache_dtype, params, tokens, true_length, keys, temperature, top_p,
                  top_k, min_p, *, k_bound, filtered):
    model = nnx.merge(graphdef, params)
    P, T = tokens.shape
    mask = jnp.arange(T)[None, :] < true_length[:, None]
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (P, T))
    cache = init_cache(model.cfg, P, T, cache_dtype)
    hidden, cache = model(tokens, positions, mask, cache=cache, return_hidden=True)
    last = jnp.take_along_axis(hidden, (true_length - 1)[:, None, None], axis=1)[:, 0]
    logits = model.logits_from_hidden(last).astype(jnp.float32)
    step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, 0)
    tok, lp = sample_tokens(logits, step_keys, temperature, top_k, top_p, min_p,
                            k_bound=k_bound, filtered=filtered)
    return Prefix(k=cache.k, v=cache.v, true_length=true_length, first_token=tok,
                  first_logprob=lp, keys=keys, tokens=tokens)


def _insert_impl(params, prefix, state, slots, max_new, temperature, top_p, top_k, min_p):
    """Write prefix rows into ``slots`` (int32[P], -1 = skip this row)."""
    del params  # every engine function takes the params first
    T = prefix.v[0].shape[2]
    M = state.cache.pos.shape[1]
    tgt = jnp.where(slots >= 0, slots, state.done.shape[0])  # out of range -> dropped
    k = tuple(c.at[tgt, :, :, :T].set(x.astype(c.dtype), mode="drop")
              for c, x in zip(state.cache.k, prefix.k))
    v = tuple(c.at[tgt, :, :T].set(x.astype(c.dtype), mode="drop")
              for c, x in zip(state.cache.v, prefix.v))
    cols = jnp.arange(M)[None, :]
    pos_rows = jnp.where(cols < prefix.true_length[:, None], cols, -1).astype(jnp.int32)
    pos = state.cache.pos.at[tgt].set(pos_rows, mode="drop")
    first_stop = jnp.any(prefix.first_token[:, None] == state.stop_ids[None, :], axis=-1)
    done = first_stop | (max_new <= 1)
    # the prompt, then the first token at position true_length
    hist_rows = jnp.zeros((slots.shape[0], M), jnp.int32).at[:, :T].set(prefix.tokens)
    hist_rows = jnp.where(cols < prefix.true_length[:, None], hist_rows, 0)
    hist_rows = hist_rows.at[jnp.arange(slots.shape[0]), prefix.true_length].set(
        prefix.first_token, mode="drop")
    history = state.history.at[tgt].set(hist_rows, mode="drop")

    def put(field, value):
        return field.at[tgt].set(value.astype(field.dtype), mode="drop")

    return state.replace(
        cache=KVCache(k=k, v=v, pos=pos), history=history,
        next_pos=put(state.next_pos, prefix.true_length),
        last_token=put(state.last_token, prefix.first_token),
        generated=put(state.generated, jnp.ones_like(slots)),
        max_new=put(state.max_new, max_new), done=put(state.done, done),
        stopped=put(state.stopped, first_stop), keys=put(state.keys, prefix.keys),
        temperature=put(state.temperature, temperature), top_p=put(state.top_p, top_p),
        top_k=put(state.top_k, top_k), min_p=put(state.min_p, min_p))


def _step(graphdef, params, state: DecodeState, keys, u, k_bound, filtered, max_len):
    """One token for every live slot, drawn with ``keys`` uint32[S, 2] (and ``u`` =
    uniforms(keys, n) with n = num_uniforms(...), or None). ``state.cache`` may be a window of
    the first slots of the full cache (``max_len`` slots): the window is attended to whole."""
    model = nnx.merge(graphdef, params)
    live = ~state.done
    logits, cache = model(state.last_token[:, None], state.next_pos[:, None],
                          live[:, None], cache=state.cache, cache_index=state.next_pos)
    tok, lp = sample_tokens(logits[:, 0].astype(jnp.float32), keys, state.temperature,
                            state.top_k, state.top_p, state.min_p, k_bound=k_bound,
                            filtered=filtered, u=u)
    is_stop = jnp.any(tok[:, None] == state.stop_ids[None, :], axis=-1)
    generated = state.generated + live
    out_of_room = state.next_pos + 2 > max_len
    done = state.done | (live & (is_stop | (generated >= state.max_new) | out_of_room))
    new = state.replace(
        cache=cache,
        next_pos=jnp.where(live, state.next_pos + 1, state.next_pos),
        last_token=jnp.where(live, tok, state.last_token), generated=generated,
        done=done, stopped=state.stopped | (live & is_stop))
    return new, tok, lp, live


def _lookup_draft(history: jax.Array, cur: jax.Array, draft: int, ngram: int) -> jax.Array:
    """Prompt-lookup drafts int32[S, draft]: the tokens that followed the latest earlier
    occurrence of each row's last ``n`` tokens (positions cur - n + 1 .. cur) in its own context
    (prompt and generated tokens), for the longest n <= ``ngram`` that occurs; -1 where a row
    has no occurrence (or the occurrence is followed by fewer tokens)."""
    S, M = history.shape
    j = jnp.arange(M)[None, :]  # candidate end of an earlier occurrence
    best = jnp.full((S,), -1, jnp.int32)
    found = jnp.zeros((S,), bool)
    for n in range(ngram, 0, -1):
        match = (j < cur[:, None]) & (j >= n - 1) & (cur[:, None] >= n - 1)
        for k in range(n):
            tail = jnp.take_along_axis(history, jnp.maximum(cur - k, 0)[:, None], axis=1)
            match &= jnp.roll(history, k, axis=1) == tail  # history[j - k] == history[cur - k]
        j_n = jnp.max(jnp.where(match, j, -1), axis=1).astype(jnp.int32)
        best = jnp.where(found, best, j_n)
        found |= j_n >= 0
    at = best[:, None] + 1 + jnp.arange(draft)[None, :]
    ok = found[:, None] & (at <= cur[:, None])  # only tokens already known
    return jnp.where(ok, jnp.take_along_axis(history, jnp.minimum(at, M - 1), axis=1), -1)


def _spec_step(graphdef, params, state: DecodeState, draft: int, ngram: int, k_bound: int,
               filtered: bool, max_len: int):
    """Up to ``draft + 1`` tokens per live slot from one forward (speculative decoding with a
    prompt-lookup draft): the model reads the last token and the draft, each draft token is
    accepted with probability p(token) under the sampling distribution (temperature, top-k,
    top-p, min-p) at its position, and at the first rejection a token is drawn from p without
    the rejected token (renormalised); when every draft token is accepted one more is drawn from
    the next position. Each emitted token is then distributed exactly as in :func:`_step`
    (the draft is a point mass: the residual of speculative sampling is p with that token
    removed); temperature 0 accepts a draft token iff it is the argmax. Token g of a request
    draws with fold_in(request key, g) (the acceptance uniform with fold_in(that key, 1)).
    Returns (state, tokens int32[S, draft + 1], logprobs, valid bool[S, draft + 1])."""
    model = nnx.merge(graphdef, params)
    S = state.done.shape[0]
    D = draft + 1
    V = model.cfg.vocab_size
    live = ~state.done
    cur = state.next_pos
    proposal = _lookup_draft(state.history, cur, draft, ngram)  # [S, draft]
    feed = jnp.concatenate([state.last_token[:, None], jnp.maximum(proposal, 0)], axis=1)
    positions = cur[:, None] + jnp.arange(D)[None, :]
    logits, cache = model(feed, positions, live[:, None] & (positions < max_len),
                          cache=state.cache, cache_index=cur)
    logits = logits.astype(jnp.float32)  # [S, D, V]
    greedy = state.temperature <= 0
    t = jnp.where(greedy, 1.0, state.temperature)[:, None, None]
    logp = jax.nn.log_softmax(logits / t, axis=-1)
    probs = jnp.exp(logp)
    if filtered:
        rep = lambda x: jnp.repeat(x, D)  # noqa: E731  per-row params for every position
        keep = truncation_mask(probs.reshape(S * D, V), rep(state.top_k), rep(state.top_p),
                               rep(state.min_p)).reshape(S, D, V)
        probs = jnp.where(keep, probs, 0.0)
    probs = probs / jnp.sum(probs, axis=-1, keepdims=True)
    top = jax.nn.one_hot(jnp.argmax(logits, axis=-1), V, dtype=jnp.float32)
    probs = jnp.where(greedy[:, None, None], top, probs)

    g = state.generated[:, None] + jnp.arange(D)[None, :]  # index of each candidate token
    fold = jax.vmap(jax.vmap(jax.random.fold_in, (None, 0)), (0, 0))
    keys = fold(state.keys, g)  # [S, D, 2]
    u_draw = uniforms(keys)  # [S, D]: the draw of token g (as _step's inverse-CDF draw)
    u_accept = uniforms(jax.vmap(jax.vmap(jax.random.fold_in, (0, None)), (0, None))(keys, 1))
    p_draft = jnp.take_along_axis(probs[:, :draft], jnp.maximum(proposal, 0)[..., None],
                                  axis=-1)[..., 0]
    accept = (proposal >= 0) & (u_accept[:, :draft] < p_draft)
    n_acc = jnp.sum(jnp.cumprod(accept.astype(jnp.int32), axis=1), axis=1)  # leading accepts
    final = jnp.take_along_axis(probs, n_acc[:, None, None], axis=1)[:, 0]  # [S, V]
    rejected = jnp.take_along_axis(jnp.concatenate(
        [proposal, jnp.full((S, 1), -1, proposal.dtype)], axis=1), n_acc[:, None], axis=1)[:, 0]
    final = jnp.where(jnp.arange(V)[None, :] == rejected[:, None], 0.0, final)
    u_final = jnp.take_along_axis(u_draw, n_acc[:, None], axis=1)[:, 0]
    last = draw_inverse_cdf(None, final, u=u_final)
    emitted = jnp.where(jnp.arange(D)[None, :] < n_acc[:, None],
                        jnp.concatenate([proposal, jnp.zeros((S, 1), proposal.dtype)], axis=1),
                        last[:, None])  # [S, D]: draft tokens, then the drawn one
    lp = jnp.take_along_axis(logp, emitted[..., None], axis=-1)[..., 0]
    # how many of the n_acc + 1 candidates are kept: up to the first stop token, the budget,
    # and the room in the cache
    idx = jnp.arange(D)[None, :]
    is_stop = jnp.any(emitted[..., None] == state.stop_ids[None, None, :], axis=-1)
    first_stop = jnp.min(jnp.where(is_stop & (idx <= n_acc[:, None]), idx, D), axis=1)
    count = jnp.minimum(n_acc + 1, first_stop + 1)
    count = jnp.minimum(count, state.max_new - state.generated)
    count = jnp.minimum(count, max_len - 1 - cur)
    count = jnp.where(live, jnp.maximum(count, 0), 0)
    valid = idx < count[:, None]
    stopped_now = live & (first_stop < count)
    generated = state.generated + count
    new_pos = cur + count
    done = state.done | (live & (stopped_now | (generated >= state.max_new)
                                 | (new_pos + 2 > max_len)))
    rows = jnp.arange(S)[:, None]
    history = state.history.at[rows, jnp.where(valid, cur[:, None] + 1 + idx, max_len)].set(
        emitted, mode="drop")
    last_tok = jnp.take_along_axis(emitted, jnp.maximum(count - 1, 0)[:, None], axis=1)[:, 0]
    new = state.replace(
        cache=cache, history=history, next_pos=new_pos,
        last_token=jnp.where(count > 0, last_tok, state.last_token), generated=generated,
        done=done, stopped=state.stopped | stopped_now)
    return new, emitted, lp, valid


def _generate_impl(graphdef, params, state, *, steps, k_bound, filtered, attend_len, draft=0,
                   ngram=3):
    S, M = state.cache.pos.shape
    width = steps * (draft + 1)  # tokens a slot may produce in this call
    buf = (jnp.zeros((S, width), jnp.int32), jnp.zeros((S, width), jnp.float32),
           jnp.zeros((S, width), bool))
    # The loop runs on a window of the first ``attend_len`` cache slots, cut once per call
    # and written back at the end: slicing inside the loop would copy the attended cache
    # of every layer at every step (on XLA:CPU more than the attention maths costs).
    full = state.cache
    if attend_len is not None and attend_len < M:
        state = state.replace(cache=KVCache(
            k=tuple(c[..., :attend_len] for c in full.k),
            v=tuple(c[:, :, :attend_len] for c in full.v), pos=full.pos[:, :attend_len]))

    def cond(carry):
        i, st, _, _ = carry
        return (i < steps) & ~jnp.all(st.done)

    if draft > 0:
        def body(carry):
            i, st, filled, (toks, lps, valid) = carry
            st, tok, lp, ok = _spec_step(graphdef, params, st, draft, ngram, k_bound, filtered,
                                         M)
            # each slot's tokens go after the ones it already produced in this call
            at = jnp.where(ok, filled[:, None] + jnp.arange(draft + 1)[None, :], width)
            rows = jnp.arange(S)[:, None]
            toks = toks.at[rows, at].set(tok, mode="drop")
            lps = lps.at[rows, at].set(lp, mode="drop")
            valid = valid.at[rows, at].set(True, mode="drop")
            return i + 1, st, filled + jnp.sum(ok, axis=1), (toks, lps, valid)
    else:
        # Token g of a request is drawn with fold_in(request key, g); a slot live at step i of
        # this call has generated g0 + i tokens. All keys (and uniforms) of the call at once:
        # on XLA:CPU each PRNG evaluation is a small loop, costly per decode step.
        offsets = jnp.arange(steps, dtype=state.generated.dtype)
        fold = jax.vmap(jax.vmap(jax.random.fold_in, (0, 0)), (None, 1), 1)
        step_keys = fold(state.keys, state.generated[:, None] + offsets[None, :])  # [S, N, 2]
        vocab = nnx.merge(graphdef, params).cfg.vocab_size
        n_u = num_uniforms(vocab, k_bound=k_bound, filtered=filtered)
        step_u = uniforms(step_keys, n_u) if n_u else None  # [S, N] or [S, N, n_u]

        def body(carry):
            i, st, filled, (toks, lps, valid) = carry
            keys = jax.lax.dynamic_index_in_dim(step_keys, i, axis=1, keepdims=False)
            u = (None if step_u is None else
                 jax.lax.dynamic_index_in_dim(step_u, i, axis=1, keepdims=False))
            st, tok, lp, live = _step(graphdef, params, st, keys, u, k_bound, filtered, M)
            toks = jax.lax.dynamic_update_slice(toks, tok[:, None], (0, i))
            lps = jax.lax.dynamic_update_slice(lps, lp[:, None], (0, i))
            valid = jax.lax.dynamic_update_slice(valid, live[:, None], (0, i))
            return i + 1, st, filled, (toks, lps, valid)

    _, state, _, (toks, lps, valid) = jax.lax.while_loop(
        cond, body, (0, state, jnp.zeros((S,), jnp.int32), buf))
    if state.cache is not full:
        put = lambda big, win: jax.lax.dynamic_update_slice(  # noqa: E731
            big, win, (0,) * big.ndim)
        state = state.replace(cache=KVCache(
            k=tuple(map(put, full.k, state.cache.k)), v=tuple(map(put, full.v, state.cache.v)),
            pos=put(full.pos, state.cache.pos)))
    return state, ResultTokens(tokens=toks, logprobs=lps, valid=valid,
                               lengths=state.generated)


def _single_mesh_cfg():
    from tapo_jax.config import MeshConfig

    return MeshConfig(data=1, fsdp=1, tensor=1)
