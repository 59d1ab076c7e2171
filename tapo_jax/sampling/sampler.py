"""Offline continuous batching over the engine (the MaxText offline-engine pattern).

Many prompts x n samples flow through a fixed number of decode slots: free slots are refilled
(batched prefill + bulk insert) as soon as sequences end, and the engine decodes ``chunk`` tokens
per call inside one jitted loop, reading only the cache slots the longest live sequence can
reach (a power-of-two bucket, while that skips at least half of the cache). Each request
(prompt i, sample j) draws with the key ``fold_in(fold_in(key(seed), i), j)``, so results do
not depend on the slot count or on the scheduling order. The stop token is part of the completion and its log-prob is returned.

Several processes (a multi-host run): every process calls :meth:`Sampler.generate` with the same
prompts and gets the same :class:`Rollouts`. Each process runs its own engine on its own devices
(:func:`local_mesh`, the process's part of the training mesh) with a process-local copy of the
weights (:func:`local_params`), decodes its share of the requests (request ``r`` on process
``r % P``), and the completions are all-gathered. As the keys depend only on (seed, prompt,
sample), the tokens do not depend on the number of processes. One process is the same code with
a share of every request and a gather over one process.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from tapo_jax.models import sharding as sharding_lib
from tapo_jax.sampling.engine import Engine


@dataclass
class Rollouts:
    """Completions of every (prompt, sample) request, in (prompt, sample) order."""

    prompt_index: np.ndarray  # int32[R]
    sample_index: np.ndarray  # int32[R]
    tokens: list[np.ndarray]  # R arrays int32[len]: completion ids (stop token included)
    logprobs: list[np.ndarray]  # R arrays float32[len]: rollout-time log-probs
    lengths: np.ndarray  # int32[R]
    finish_reason: list[str]  # "stop" | "length"
    stats: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.lengths)

    def group(self, i: int) -> list[np.ndarray]:
        """Completion token arrays of prompt ``i``, in sample order."""
        return [t for t, p in zip(self.tokens, self.prompt_index) if p == i]


def request_keys(seed: int, prompt_index: np.ndarray, sample_index: np.ndarray) -> np.ndarray:
    """Raw PRNG keys uint32[R, 2] of requests (deterministic in seed, prompt and sample index)."""
    base = jax.random.PRNGKey(seed)
    fold = jax.vmap(lambda i, j: jax.random.fold_in(jax.random.fold_in(base, i), j))
    return np.asarray(fold(np.asarray(prompt_index, np.uint32),
                           np.asarray(sample_index, np.uint32)))


def validate_request(prompts: Sequence[Sequence[int]], *, max_new_tokens: int, max_len: int,
                     vocab_size: int, stop_ids: Sequence[int], n: int, temperature: float,
                     top_p: float, top_k: int, min_p: float, max_stop_ids: int) -> None:
    """Clear errors for bad input, before anything is compiled."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0 or not 0 <= min_p < 1:
        raise ValueError(f"top_k must be >= 0 and min_p in [0, 1), got {top_k}, {min_p}")
    if len(stop_ids) > max_stop_ids:
        raise ValueError(f"at most {max_stop_ids} stop ids are supported, got {len(stop_ids)}")
    for s in stop_ids:
        if not 0 <= int(s) < vocab_size:
            raise ValueError(f"stop token id {s} is outside the vocabulary [0, {vocab_size})")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
        if len(p) >= max_len:
            raise ValueError(f"prompt {i} has {len(p)} tokens; the cache holds {max_len}")
        if len(p) + max_new_tokens > max_len:
            raise ValueError(
                f"prompt {i} ({len(p)} tokens) + max_new_tokens ({max_new_tokens}) overflows the "
                f"cache of {max_len} tokens; raise max_len or lower max_new_tokens")
        bad = [t for t in p if not 0 <= int(t) < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab_size}): {bad[:5]}")


class Sampler:
    """Reusable continuous-batching sampler: keeps the engine and its compilations across calls
    (the RL loop calls :meth:`generate` every step after :meth:`update_params`)."""

    def __init__(self, graphdef: Any, params: Any, *, mesh: Any = None, num_slots: int = 64,
                 max_len: int = 512, prefill_buckets: Optional[Sequence[int]] = None,
                 chunk: int = 16, tokenizer: Any = None):
        # ``mesh`` may span processes (the training mesh): the engine runs on this process's
        # part of it; without a mesh, on this process's first device
        local = local_mesh(mesh) if mesh is not None else sharding_lib.make_mesh(
            _one_device(), devices=jax.local_devices()[:1])
        self.engine = Engine(graphdef, local_params(params, local), num_slots=num_slots,
                             max_len=max_len, mesh=local, prefill_buckets=prefill_buckets)
        self.chunk = chunk
        self.tokenizer = tokenizer
        self.last_stats: dict[str, Any] = {}  # wall / prefill seconds of the last generate
        self._prefill_calls = 0

    def update_params(self, params: Any) -> None:
        self.engine.update_params(local_params(params, self.engine.mesh))

    @property
    def compile_counts(self) -> dict[str, int]:
        return dict(self.engine.compile_counts)

    def encode_texts(self, texts: Sequence[str], *, chat: bool = True) -> list[list[int]]:
        """Token ids of text prompts (chat template, Qwen3 non-thinking mode by default)."""
        if self.tokenizer is None:
            raise ValueError("text prompts need a tokenizer (Sampler(..., tokenizer=...))")
        from tapo_jax.data.datasets import encode_prompts

        return encode_prompts(list(texts), self.tokenizer, chat=chat)

    def generate(self, prompts: Sequence[Sequence[int]] | Sequence[str], *, n: int = 1,
                 max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, min_p: float = 0.0, stop_ids: Sequence[int] = (), seed: int = 0,
                 progress: Optional[Callable[[int, int], None]] = None,
                 draft_tokens: int = 0) -> Rollouts:
        """Sample ``n`` completions of every prompt (token-id lists, or texts with a tokenizer).

        ``progress(done, total)`` is called after every decode chunk. ``draft_tokens`` > 0:
        speculative decoding with prompt-lookup drafts (up to that many tokens copied from the
        sequence's own context after a match of its last tokens, verified in one forward;
        the samples have exactly the same distribution, though not the same values, as
        without it): fewer decode steps where completions repeat their prompt, as TAPO's
        reconstructions copy the wrong response up to its error.
        """
        if draft_tokens < 0:
            raise ValueError(f"draft_tokens must be >= 0, got {draft_tokens}")
        eng = self.engine
        if prompts and isinstance(prompts[0], str):
            prompts = self.encode_texts(prompts)  # type: ignore[arg-type]
        prompts = [list(map(int, p)) for p in prompts]
        stop_ids = [int(s) for s in stop_ids]
        validate_request(prompts, max_new_tokens=max_new_tokens, max_len=eng.max_len,
                         vocab_size=eng.cfg.vocab_size, stop_ids=stop_ids, n=n,
                         temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                         max_stop_ids=eng.max_stop_ids)
        for length in {len(p) for p in prompts}:
            eng.length_bucket(length)  # a prompt beyond the largest prefill bucket fails here
        t_start = time.perf_counter()
        compiles_before = sum(eng.compile_counts.values())
        R = len(prompts) * n
        p_idx = np.repeat(np.arange(len(prompts), dtype=np.int32), n)
        s_idx = np.tile(np.arange(n, dtype=np.int32), len(prompts))
        keys = request_keys(seed, p_idx, s_idx) if R else np.zeros((0, 2), np.uint32)
        mine = list(range(jax.process_index(), R, jax.process_count()))  # this process's share
        V = eng.cfg.vocab_size
        k_bound = V if top_k == 0 else min(top_k, V)
        filtered = bool(top_k > 0 or top_p < 1.0 or min_p > 0.0) and temperature > 0
        sampling_row = dict(temperature=np.float32(temperature), top_p=np.float32(top_p),
                            top_k=np.int32(top_k), min_p=np.float32(min_p))

        tokens: list[list[int]] = [[] for _ in range(R)]
        logps: list[list[float]] = [[] for _ in range(R)]
        stopped = np.zeros(R, bool)
        queue = collections.deque(mine)
        active = eng.row_bucket(max(len(mine), 1))  # few requests decode on fewer slots
        slot_req = [-1] * active
        # the cache holds what this call's longest request reaches (and its prefill bucket)
        longest = max((len(p) for p in prompts), default=1)
        cache_len = min(max(eng.cache_bucket(longest + max_new_tokens),
                            eng.length_bucket(longest)), eng.max_len)
        state = eng.init_decode_state(stop_ids, num_slots=active, cache_len=cache_len)
        finished = 0
        decode_calls = 0
        prefill_s = 0.0  # prefill + insert (blocked on by the first tokens' read-back)
        prefill_calls_before = self._prefill_calls

        while finished < len(mine):
            free = [s for s, r in enumerate(slot_req) if r < 0]
            if free and queue:
                take = [queue.popleft() for _ in range(min(len(free), len(queue)))]
                t_admit = time.perf_counter()
                state = self._admit(state, take, free, slot_req, prompts, p_idx, keys,
                                    max_new_tokens, sampling_row, k_bound, filtered,
                                    tokens, logps)
                prefill_s += time.perf_counter() - t_admit
            # the furthest a live sequence can reach in this call bounds the cache slots read
            reach = max(len(prompts[p_idx[r]]) + len(tokens[r]) - 1
                        for r in slot_req if r >= 0) + self.chunk * (draft_tokens + 1)
            state, res = eng.generate(state, steps=self.chunk, k_bound=k_bound,
                                      filtered=filtered, draft=draft_tokens,
                                      attend_len=eng.attend_bucket(min(reach, cache_len),
                                                                   cache_len))
            decode_calls += 1
            toks, lps, valid, done, stop = jax.device_get(
                (res.tokens, res.logprobs, res.valid, state.done, state.stopped))
            for s, r in enumerate(slot_req):
                if r < 0:
                    continue
                m = valid[s]
                tokens[r].extend(toks[s][m].tolist())
                logps[r].extend(lps[s][m].tolist())
                if done[s]:
                    stopped[r] = bool(stop[s])
                    slot_req[s] = -1
                    finished += 1
            if progress is not None:
                progress(finished, len(mine))

        tokens, logps, stopped = _gather_requests(R, mine, max_new_tokens, tokens, logps, stopped)
        wall = time.perf_counter() - t_start
        lengths = np.array([len(t) for t in tokens], np.int32)
        self.last_stats = dict(wall_s=wall, prefill_s=prefill_s, requests=R,
                               prompt_tokens=int(sum(len(prompts[i]) for i in p_idx)))
        return Rollouts(
            prompt_index=p_idx, sample_index=s_idx,
            tokens=[np.asarray(t, np.int32) for t in tokens],
            logprobs=[np.asarray(lp, np.float32) for lp in logps], lengths=lengths,
            finish_reason=["stop" if s else "length" for s in stopped],
            stats=dict(wall_s=wall, tokens=int(lengths.sum()),
                       tokens_per_s=float(lengths.sum() / max(wall, 1e-9)),
                       decode_calls=decode_calls, prefill_s=prefill_s, cache_len=cache_len,
                       prefill_calls=self._prefill_calls - prefill_calls_before,
                       compilations=sum(eng.compile_counts.values()) - compiles_before,
                       compile_counts=dict(eng.compile_counts)))

    def _admit(self, state, take, free, slot_req, prompts, p_idx, keys, max_new_tokens,
               sampling_row, k_bound, filtered, tokens, logps):
        """Prefill requests ``take`` (grouped by length bucket) and insert them into free slots."""
        eng = self.engine
        by_bucket: dict[int, list[int]] = collections.defaultdict(list)
        for r in take:
            by_bucket[eng.length_bucket(len(prompts[p_idx[r]]))].append(r)
        # a shorter bucket's requests fill the padding rows of the next longer one for free
        lengths = sorted(by_bucket)
        for short, long_ in zip(lengths, lengths[1:]):
            n_long = len(by_bucket[long_])
            if (n_long <= eng.num_slots and eng.row_bucket(n_long + len(by_bucket[short]))
                    == eng.row_bucket(n_long)):
                by_bucket[long_] = by_bucket.pop(short) + by_bucket[long_]
        free = list(free)
        for T, reqs in sorted(by_bucket.items()):
            P = eng.row_bucket(len(reqs))
            for start in range(0, len(reqs), P):
                part = reqs[start:start + P]
                toks = np.zeros((P, T), np.int32)
                true_len = np.ones((P,), np.int32)
                k = np.zeros((P, 2), np.uint32)
                for row, r in enumerate(part):
                    ids = prompts[p_idx[r]]
                    toks[row, :len(ids)] = ids
                    true_len[row] = len(ids)
                    k[row] = keys[r]
                samp = {name: np.full((P,), v) for name, v in sampling_row.items()}
                prefix = eng.prefill(toks, true_len, k, samp, k_bound=k_bound, filtered=filtered)
                self._prefill_calls += 1
                slots = np.full((P,), -1, np.int32)
                for row, r in enumerate(part):
                    s = free.pop(0)
                    slots[row] = s
                    slot_req[s] = r
                state = eng.insert(prefix, state, slots, np.full((P,), max_new_tokens, np.int32),
                                   samp)
                first, first_lp = jax.device_get((prefix.first_token, prefix.first_logprob))
                for row, r in enumerate(part):
                    tokens[r].append(int(first[row]))
                    logps[r].append(float(first_lp[row]))
        return state


# --------------------------------------------------------------------------------------------
# Several processes: the local engine mesh, local weights, the gather of completions
# --------------------------------------------------------------------------------------------


def local_mesh(mesh: Mesh) -> Mesh:
    """This process's part of a (data, fsdp, tensor) ``mesh``, as a (1, n, tensor) mesh.

    Sampling shards slots over data x fsdp and weights over tensor only, so the rows of
    ``tensor`` devices of this process form its sampling mesh (the whole mesh, reshaped, on one
    process). Each tensor group must lie within one process.
    """
    t = mesh.shape["tensor"]
    groups = np.asarray(mesh.devices).reshape(-1, t)  # mesh axes are (data, fsdp, tensor)
    if any(len({d.process_index for d in g}) > 1 for g in groups):
        raise ValueError(f"mesh.tensor = {t} spans several processes; sampling needs each "
                         "tensor group on the devices of one host (lower mesh.tensor)")
    mine = [g for g in groups if g[0].process_index == jax.process_index()]
    if not mine:
        raise ValueError("the mesh holds none of this process's devices")
    return Mesh(np.asarray(mine).reshape(1, len(mine), t), sharding_lib.MESH_AXES,
                axis_types=(AxisType.Auto,) * len(sharding_lib.MESH_AXES))


def local_params(params: Any, mesh: Mesh) -> Any:
    """``params`` as arrays on ``mesh`` (process-local), laid out by the sampling rules.

    Params held only by this process's devices (or abstract ones) are returned as they are
    (the engine's copy places them). Params of a mesh that spans processes are first resharded
    on their own mesh to the sampling rules (one jitted copy: each device then holds what a
    sampling device needs), then each leaf is rebuilt on ``mesh`` from this process's shards.
    """
    leaves = jax.tree.leaves(params)
    if all(not isinstance(x, jax.Array) or x.is_fully_addressable for x in leaves):
        return params  # process-local (or abstract) params: the engine places them
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    source = leaves[0].sharding.mesh
    spread = sharding_lib.state_shardings(abstract, source, sharding_lib.SAMPLE_RULES)
    target = sharding_lib.state_shardings(abstract, mesh, sharding_lib.SAMPLE_RULES)
    gathered = jax.jit(lambda p: p, out_shardings=spread)(params)
    return jax.tree.map(_rebuild_local, gathered, target)


def _rebuild_local(x: jax.Array, sharding: Any) -> jax.Array:
    """The process-local array of ``sharding`` from the addressable shards of global ``x``."""
    def key(index):
        return tuple(s.indices(n)[:2] for s, n in zip(index, x.shape))

    held = {key(s.index): s.data for s in x.addressable_shards}
    bufs = []
    for device, index in sharding.addressable_devices_indices_map(x.shape).items():
        buf = held.get(key(index))
        if buf is None:
            raise ValueError(f"no local shard of a weight {x.shape} holds {index}: the "
                             "sampling layout needs slices another process holds")
        bufs.append(jax.device_put(buf, device))
    return jax.make_array_from_single_device_arrays(x.shape, sharding, bufs)


def _gather_requests(R: int, mine: list[int], width: int, tokens: list[list[int]],
                     logps: list[list[float]], stopped: np.ndarray
                     ) -> tuple[list[list[int]], list[list[float]], np.ndarray]:
    """Completions of all ``R`` requests on every process, from each process's share.

    Request ``r`` is row ``r // P`` of process ``r % P``; rows are padded to ``width``
    (max_new_tokens) and gathered with ``process_allgather`` (a stack over processes).
    """
    from jax.experimental import multihost_utils

    P = jax.process_count()
    rows = -(-R // P)
    tok = np.zeros((rows, width), np.int32)
    lp = np.zeros((rows, width), np.float32)
    length = np.zeros((rows,), np.int32)
    stop = np.zeros((rows,), bool)
    for k, r in enumerate(mine):
        m = len(tokens[r])
        tok[k, :m], lp[k, :m], length[k], stop[k] = tokens[r], logps[r], m, stopped[r]
    tok, lp, length, stop = (np.asarray(a) for a in
                             multihost_utils.process_allgather((tok, lp, length, stop)))
    out_t, out_lp = [], []
    all_stop = np.zeros(R, bool)
    for r in range(R):
        p, k = r % P, r // P
        out_t.append(tok[p, k, :length[p, k]].tolist())
        out_lp.append(lp[p, k, :length[p, k]].tolist())
        all_stop[r] = stop[p, k]
    return out_t, out_lp, all_stop


def _one_device():
    from tapo_jax.config import MeshConfig

    return MeshConfig(data=1, fsdp=1, tensor=1)


def generate(model: Any, prompts: Sequence[Sequence[int]], *, n: int = 1, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
             stop_ids: Sequence[int] = (), seed: int = 0, num_slots: Optional[int] = None,
             max_len: Optional[int] = None, mesh: Any = None,
             progress: Optional[Callable[[int, int], None]] = None,
             draft_tokens: int = 0) -> Rollouts:
    """One-shot convenience: sample ``n`` completions of each prompt with an NNX Qwen3 ``model``
    (docs/design.md, "Module contracts"). For repeated calls keep a :class:`Sampler`."""
    from flax import nnx

    graphdef, params = nnx.split(model, nnx.Param)
    longest = max((len(p) for p in prompts), default=1)
    slots = num_slots or min(64, max(1, len(prompts) * n))
    sampler = Sampler(graphdef, params, mesh=mesh, num_slots=slots,
                      max_len=max_len or longest + max_new_tokens)
    return sampler.generate(prompts, n=n, max_new_tokens=max_new_tokens,
                            temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                            stop_ids=stop_ids, seed=seed, progress=progress,
                            draft_tokens=draft_tokens)
