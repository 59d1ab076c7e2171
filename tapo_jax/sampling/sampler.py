"""Offline continuous batching over the engine (the MaxText offline-engine pattern).

Many prompts x n samples flow through a fixed number of decode slots: free slots are refilled
(batched prefill + bulk insert) as soon as sequences end, and the engine decodes ``chunk`` tokens
per call inside one jitted loop, reading only the cache slots the longest live sequence can
reach (a power-of-two bucket, while that skips at least half of the cache). Each request
(prompt i, sample j) draws with the key ``fold_in(fold_in(key(seed), i), j)``, so results do
not depend on the slot count or on the scheduling order. The stop token is part of the completion and its log-prob is returned.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

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
        self.engine = Engine(graphdef, params, num_slots=num_slots, max_len=max_len, mesh=mesh,
                             prefill_buckets=prefill_buckets)
        self.chunk = chunk
        self.tokenizer = tokenizer

    def update_params(self, params: Any) -> None:
        self.engine.update_params(params)

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
                 progress: Optional[Callable[[int, int], None]] = None) -> Rollouts:
        """Sample ``n`` completions of every prompt (token-id lists, or texts with a tokenizer).

        ``progress(done, total)`` is called after every decode chunk.
        """
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
        V = eng.cfg.vocab_size
        k_bound = V if top_k == 0 else min(top_k, V)
        filtered = bool(top_k > 0 or top_p < 1.0 or min_p > 0.0) and temperature > 0
        sampling_row = dict(temperature=np.float32(temperature), top_p=np.float32(top_p),
                            top_k=np.int32(top_k), min_p=np.float32(min_p))

        tokens: list[list[int]] = [[] for _ in range(R)]
        logps: list[list[float]] = [[] for _ in range(R)]
        stopped = np.zeros(R, bool)
        queue = collections.deque(range(R))
        active = eng.row_bucket(R)  # few requests (e.g. constructions) decode on fewer slots
        slot_req = [-1] * active
        state = eng.init_decode_state(stop_ids, num_slots=active)
        finished = 0
        decode_calls = 0

        while finished < R:
            free = [s for s, r in enumerate(slot_req) if r < 0]
            if free and queue:
                take = [queue.popleft() for _ in range(min(len(free), len(queue)))]
                state = self._admit(state, take, free, slot_req, prompts, p_idx, keys,
                                    max_new_tokens, sampling_row, k_bound, filtered,
                                    tokens, logps)
            # the furthest a live sequence can reach in this call bounds the cache slots read
            reach = max(len(prompts[p_idx[r]]) + len(tokens[r]) - 1
                        for r in slot_req if r >= 0) + self.chunk  # (a slot is live here)
            state, res = eng.generate(state, steps=self.chunk, k_bound=k_bound,
                                      filtered=filtered, attend_len=eng.attend_bucket(reach))
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
                progress(finished, R)

        wall = time.perf_counter() - t_start
        lengths = np.array([len(t) for t in tokens], np.int32)
        return Rollouts(
            prompt_index=p_idx, sample_index=s_idx,
            tokens=[np.asarray(t, np.int32) for t in tokens],
            logprobs=[np.asarray(lp, np.float32) for lp in logps], lengths=lengths,
            finish_reason=["stop" if s else "length" for s in stopped],
            stats=dict(wall_s=wall, tokens=int(lengths.sum()),
                       tokens_per_s=float(lengths.sum() / max(wall, 1e-9)),
                       decode_calls=decode_calls,
                       compilations=sum(eng.compile_counts.values()) - compiles_before,
                       compile_counts=dict(eng.compile_counts)))

    def _admit(self, state, take, free, slot_req, prompts, p_idx, keys, max_new_tokens,
               sampling_row, k_bound, filtered, tokens, logps):
        """Prefill requests ``take`` (grouped by length bucket) and insert them into free slots."""
        eng = self.engine
        by_bucket: dict[int, list[int]] = collections.defaultdict(list)
        for r in take:
            by_bucket[eng.length_bucket(len(prompts[p_idx[r]]))].append(r)
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


def generate(model: Any, prompts: Sequence[Sequence[int]], *, n: int = 1, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
             stop_ids: Sequence[int] = (), seed: int = 0, num_slots: Optional[int] = None,
             max_len: Optional[int] = None, mesh: Any = None,
             progress: Optional[Callable[[int, int], None]] = None) -> Rollouts:
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
                            stop_ids=stop_ids, seed=seed, progress=progress)
