"""Prefill, decode and generation over a paged KV cache (docs/api.md#generate). Every call
checks all its input before the cache changes: a rejected call changes nothing."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from conform_mlx.impl.kernels.policy import KernelPolicy, current_policy
from conform_mlx.impl.model import KVPools, Model
from conform_mlx.impl.paged_cache import (
    CacheFullError,
    PagedKVCache,
    StepPlan,
    check_id,
    check_int,
    check_seqs,
)


class InputError(ValueError):
    """Token ids or lengths the model cannot accept."""


def _check_tokens(model: Model, tokens: Sequence[int] | np.ndarray, what: str) -> np.ndarray:
    ids = np.asarray(tokens)
    if ids.ndim != 1 or ids.size == 0:
        raise InputError(
            f"{what}: expected a non-empty 1-D list of token ids, got shape {ids.shape}"
        )
    if not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"{what}: token ids must be integers, got dtype {ids.dtype}")
    vocab = model.config.vocab_size
    bad = np.flatnonzero((ids < 0) | (ids >= vocab))
    if bad.size:
        raise InputError(
            f"{what}: token id {int(ids[bad[0]])} at index {int(bad[0])} is outside the "
            f"vocabulary [0, {vocab})"
        )
    return ids.astype(np.int32)


def _check_room(model: Model, seq: Hashable, have: int, extra: int, what: str = "") -> None:
    """InputError unless ``extra`` more tokens after ``have`` fit the context; ``what``
    spells out ``extra`` in the message (default "N new tokens")."""
    limit = model.config.max_position_embeddings
    if have + extra > limit:
        raise InputError(
            f"sequence {seq!r}: {have} cached + {what or f'{extra} new tokens'} exceeds the "
            f"context length max_position_embeddings={limit}"
        )


def prefill(
    model: Model,
    cache: PagedKVCache,
    seq: Hashable,
    tokens: Sequence[int] | np.ndarray,
    chunk_size: int | None = None,
    trace: dict[str, list[mx.array]] | None = None,
    steps: CompiledSteps | None = None,
) -> mx.array:
    """Feed ``tokens`` to ``seq`` after what it has cached; logits (T, vocab); ``chunk_size``
    tokens per step; ``trace`` collects each chunk's activations by name; ``steps`` as decode."""
    ids = _check_tokens(model, tokens, f"prompt for sequence {seq!r}")
    model.check_cache(cache)
    _check_room(model, seq, cache.tokens(seq), ids.size)
    if chunk_size is not None and check_int(chunk_size, "chunk_size") <= 0:
        raise InputError(f"chunk_size must be positive, got {chunk_size}")
    step = chunk_size or ids.size
    chunks = [ids[i : i + step] for i in range(0, ids.size, step)]
    cache.ensure_room([seq], ids.size)  # for every chunk, before the first is cached
    logits = []
    for chunk in chunks:
        plan = cache.plan([seq], chunk.size)
        out = _step(model, mx.array(chunk)[None], cache, plan, trace, steps)  # (1, t, vocab)
        logits.append(out.squeeze(0))  # not out[0]: MLX would gather (copy) the logits
    return logits[0] if len(logits) == 1 else mx.concatenate(logits, axis=0)


def decode(
    model: Model,
    cache: PagedKVCache,
    seqs: Sequence[Hashable],
    tokens: Sequence[int] | np.ndarray,
    trace: dict[str, list[mx.array]] | None = None,
    steps: CompiledSteps | None = None,
) -> mx.array:
    """Feed one token to each of ``seqs`` in one batch; logits (B, vocab). ``steps`` (a kept
    ``CompiledSteps(model)``) runs it compiled; without it, patched model code reaches it."""
    ids = _check_tokens(model, tokens, "decode tokens")
    check_seqs(seqs)
    if ids.size != len(seqs):
        raise InputError(f"decode: {len(seqs)} sequences but {ids.size} tokens")
    plan = _plan_decode(model, cache, seqs, steps is not None)
    return _step(model, mx.array(ids)[:, None], cache, plan, trace, steps)[:, 0]


def decode_lazy(
    model: Model,
    cache: PagedKVCache,
    seqs: Sequence[Hashable],
    tokens: mx.array,
    steps: CompiledSteps | None = None,
) -> mx.array:
    """``decode`` without the ``mx.eval`` (logits (B, vocab), pools unevaluated). ``tokens``: a
    (B,) integer mx.array, its values unchecked (that would wait); all else as ``decode``."""
    if not isinstance(tokens, mx.array):
        raise TypeError(f"decode_lazy: tokens must be an mx.array, got {type(tokens).__name__}")
    if tokens.ndim != 1 or not mx.issubdtype(tokens.dtype, mx.integer):
        raise InputError(
            f"decode_lazy: tokens must be a 1-D integer mx.array, got {tokens.shape} {tokens.dtype}"
        )
    check_seqs(seqs)
    if tokens.size != len(seqs):
        raise InputError(f"decode_lazy: {len(seqs)} sequences but {tokens.size} tokens")
    plan = _plan_decode(model, cache, seqs, steps is not None)
    tok = tokens.astype(mx.int32)[:, None]  # int32 as decode's: one trace per shape
    return _step(model, tok, cache, plan, None, steps, lazy=True)[:, 0]


def _plan_decode(
    model: Model, cache: PagedKVCache, seqs: Sequence[Hashable], compiled: bool = False
) -> StepPlan:
    """The host-side checks of a decode step, then its plan (which reserves the room); tables
    padded to ``bucket_width`` only when compiled (docs/kernel-notes.md#engine)."""
    model.check_cache(cache)
    for s in seqs:
        _check_room(model, s, cache.tokens(s), 1)
    return cache.plan(list(seqs), 1, table_width=bucket_width if compiled else None)


def _step(
    model: Model,
    tokens: mx.array,
    cache: PagedKVCache,
    plan: StepPlan,
    trace: dict[str, list[mx.array]] | None,
    steps: CompiledSteps | None,
    lazy: bool = False,
) -> mx.array:
    """One step: logits (B, T, vocab), pools installed; evaluated unless ``lazy``; a ``trace``
    runs it eagerly."""
    model.keep_transposes()  # outside any trace: weights replaced since get new views
    if steps is not None and trace is None:
        if steps.model is not model:
            raise ValueError("steps: CompiledSteps of another model")
        return steps.lazy(tokens, cache, plan) if lazy else steps(tokens, cache, plan)
    step: dict[str, mx.array] | None = {} if trace is not None else None
    out = model(tokens, cache, plan, step)
    if not lazy:
        mx.eval(out, cache.kv, step)
    if trace is not None:
        for name, value in step.items():
            trace.setdefault(name, []).append(value)
    return out


@dataclass
class StepPools:
    """A ``KVPools`` over a compiled step's own list: the trace never touches the cache."""

    kv: list[mx.array]

    def update_layer(self, layer: int, kv_pool: mx.array) -> None:
        self.kv[layer] = kv_pool


# (tokens, *step_arrays(plan), kv_pools) -> (logits, kv_pools, marks)
StepGraph = Callable[..., tuple[mx.array, list[mx.array], list[mx.array]]]


def step_arrays(plan: StepPlan) -> list[mx.array]:
    """A compiled step's plan inputs, in ``StepPlan`` field order, tables padded: a chunk
    over a cache to ``KernelPolicy.chunk_buckets`` widths an octave, else a power of two."""
    p = plan
    chunk = not p.fresh and p.positions.shape[1] > 1
    tables = pad_block_tables(p.block_tables, current_policy().chunk_buckets if chunk else 1)
    return [p.positions, p.slots, p.blocks, p.offsets, tables, p.context_lens]


def bucket_width(width: int, per_octave: int = 1) -> int:
    """The table width a compiled step is traced for: the next of ``per_octave`` widths
    evenly spaced in each octave; 1: the next power of two (log2(n) traces)."""
    top = 1 << max(width - 1, 0).bit_length()
    step = max(top // (2 * per_octave), 1)  # (top / 2, top] in per_octave steps
    return max(-(-width // step) * step, 1)


def pad_block_tables(block_tables: mx.array, per_octave: int = 1) -> mx.array:
    """``block_tables`` (B, W) widened to ``bucket_width(W, per_octave)`` with block 0: a
    real block, so a gather stays in the pool; nothing past ``context_lens`` reaches the
    output."""
    batch, width = block_tables.shape
    pad = bucket_width(width, per_octave) - width
    if pad == 0:
        return block_tables
    return mx.concatenate([block_tables, mx.zeros((batch, pad), dtype=block_tables.dtype)], axis=1)


class CompiledSteps:
    """A model's forward over explicit arrays, ``mx.compile``d per ``StepPlan.fresh``,
    ``StepPlan.chunk_context`` and kernel policy; ``traces`` counts MLX's traces (one per input
    shape). Weights are implicit inputs, so new weights reach it. Make one per model, after it
    is built, and keep it."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.graphs: dict[tuple[bool, int, KernelPolicy], StepGraph] = {}
        self.traces = 0

    def graph(self, fresh: bool, chunk_context: int = 0) -> StepGraph:
        """The compiled forward for this ``fresh`` and ``chunk_context`` under the current
        kernel policy."""
        policy = current_policy()
        key = (fresh, chunk_context if policy.causal_chunks else 0, policy)
        if key not in self.graphs:
            model = self.model

            def forward(tokens, *fields_and_pools):
                self.traces += 1  # Python here runs only while MLX traces
                *fields, kv_pools = fields_and_pools
                pools = StepPools(list(kv_pools))
                plan = StepPlan(*fields, fresh=fresh, chunk_context=key[1])
                layers = model.config.num_hidden_layers
                row_kernels = model.runs_row_kernels(tokens.size)
                marks = dict.fromkeys(policy.commits(layers, row_kernels))
                logits = model(tokens, pools, plan, marks=marks)
                return logits, pools.kv, [marks[i] for i in sorted(marks)]

            self.graphs[key] = mx.compile(forward, inputs=model.state)
        return self.graphs[key]

    def __call__(self, tokens: mx.array, cache: KVPools, plan: StepPlan) -> mx.array:
        """One step through the compiled graph, evaluated; installs the new pools."""
        out = self.lazy(tokens, cache, plan)
        mx.eval(out, cache.kv)
        return out

    def lazy(self, tokens: mx.array, cache: KVPools, plan: StepPlan) -> mx.array:
        """``__call__`` without the ``mx.eval``; the step up to the ``commits`` layers is queued."""
        step = self.graph(plan.fresh, plan.chunk_context)
        out, kv_pools, marks = step(tokens, *step_arrays(plan), cache.kv)
        cache.kv[:] = kv_pools  # traced from the cache's own: update_layer's checks skipped
        for mark in marks:
            mx.async_eval(mark)
        return out


def to_numpy(logits: mx.array) -> np.ndarray:
    """Logits as float32 numpy, whatever the model dtype."""
    return np.array(logits.astype(mx.float32))


@dataclass
class Sampler:
    """Greedy at ``temperature == 0``, else temperature + nucleus (top-p), on the device; the key
    from ``seed`` is split once per call, so a seed fixes the run, pipelined or not."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    _key: mx.array = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise InputError(
                f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}"
            )
        self._key = mx.random.key(self.seed)

    def __call__(self, logits: mx.array) -> mx.array:
        """One token id per row of ``logits`` (..., vocab): int32, shape (...)."""
        return self.sample(logits)

    def sample(self, logits: mx.array, num_samples: int | None = None) -> mx.array:
        """int32 ids (...) from ``logits`` (..., vocab); with ``num_samples``, (..., num_samples)
        independent draws from one distribution. Uses one key."""
        if self.temperature == 0:
            best = mx.argmax(logits, axis=-1).astype(mx.int32)
            if num_samples is None:
                return best
            return mx.broadcast_to(best[..., None], (*best.shape, num_samples))
        z = logits.astype(mx.float32) / self.temperature
        key = self._next_key()
        if self.top_p >= 1:
            picks = mx.random.categorical(z, num_samples=num_samples, key=key)
            return picks.astype(mx.int32)
        # Nucleus: most likely first, keep a token while the mass before it is < top_p.
        order = mx.argsort(-z, axis=-1)
        z_sorted = mx.take_along_axis(z, order, axis=-1)
        before = mx.cumsum(mx.softmax(z_sorted, axis=-1), axis=-1, inclusive=False)
        z_kept = mx.where(before < self.top_p, z_sorted, -mx.inf)
        picks = mx.random.categorical(z_kept, num_samples=num_samples or 1, key=key)
        ids = mx.take_along_axis(order, picks.astype(mx.int32), axis=-1).astype(mx.int32)
        return ids if num_samples is not None else ids[..., 0]

    def _next_key(self) -> mx.array:
        self._key, key = mx.random.split(self._key)
        return key


@dataclass
class Generation:
    prompt: list[int]
    tokens: list[int]  # generated, EOS included when it stopped the run
    prefill_ms: float
    decode_ms: list[float]  # len(tokens) - 1: host ms from one token readable to the next
    stop_reason: str  # "eos" or "max_new_tokens"
    logits: np.ndarray | None = None  # keep_logits: (P + G - 1, vocab) float32, each fed token


def generate(
    model: Model,
    prompt: Sequence[int] | np.ndarray,
    max_new_tokens: int,
    *,
    cache: PagedKVCache | None = None,
    seq: Hashable = 0,
    sampler: Sampler | None = None,
    eos_token_ids: Sequence[int] | None = None,
    block_size: int = 16,
    keep_logits: bool = False,
    steps: CompiledSteps | None = None,
) -> Generation:
    """Up to ``max_new_tokens`` tokens after ``prompt`` (docs/api.md#generate). The last token is
    never fed back: the cache ends with ``len(prompt) + len(tokens) - 1``. Decode steps are
    pipelined (``decode_lazy``), the one queued after EOS trimmed; ``steps`` compiles them, not
    the prefill; without ``cache`` one is made. All-or-nothing: the run at its longest must fit
    the context and the free blocks (copy-on-write included) after what ``seq`` holds, else
    InputError or CacheFullError with the cache as it was."""
    max_new_tokens = check_int(max_new_tokens, "max_new_tokens")
    if max_new_tokens <= 0:
        raise InputError(f"max_new_tokens must be positive, got {max_new_tokens}")
    ids = _check_tokens(model, prompt, "prompt")
    check_id(seq, "seq")
    have = cache.tokens(seq) if cache is not None and seq in cache.sequences else 0
    fed = ids.size + max_new_tokens - 1  # the last generated token is never fed
    spelled = f"{ids.size} prompt + {max_new_tokens - 1} fed-back tokens = {have + fed}"
    _check_room(model, seq, have, fed, spelled)
    sampler = sampler or Sampler()
    eos = set(model.config.eos_token_id if eos_token_ids is None else eos_token_ids)
    if cache is None:
        cache = PagedKVCache.for_tokens(
            model.config, ids.size + max_new_tokens, block_size, _param_dtype(model)
        )
    model.check_cache(cache)
    added = seq not in cache.sequences
    if added:
        cache.add_sequence(seq)
    try:
        cache.ensure_room([seq], fed)
    except CacheFullError as e:
        if added:  # an empty sequence holds no blocks: releasing it undoes the add
            cache.release(seq)
        raise CacheFullError(
            f"generate on sequence {seq!r} ({have} cached): a prompt of {ids.size} tokens "
            f"and {max_new_tokens} new tokens feed {fed}; {e}"
        ) from None

    t0 = time.perf_counter()
    logits = prefill(model, cache, seq, ids)
    kept = [logits]
    token = sampler(logits[-1:])  # (1,) on the device, not yet read
    mx.async_eval(token)
    sampled = 1  # tokens sampled so far, read or not
    out: list[int] = []
    prefill_ms, decode_ms = 0.0, []
    while True:
        queued = None
        if sampled < max_new_tokens:
            step = decode_lazy(model, cache, [seq], token, steps=steps)
            queued = sampler(step)
            mx.async_eval(queued, cache.kv, step if keep_logits else None)
            sampled += 1
            if keep_logits:
                kept.append(step)
        out.append(token.item())  # waits for the token, not for the step just queued
        now = time.perf_counter()
        if len(out) == 1:
            prefill_ms = (now - t0) * 1e3
        else:
            decode_ms.append((now - t0) * 1e3)
        t0 = now
        if out[-1] in eos:
            if queued is not None:  # that step fed the EOS token: undo it
                cache.trim(seq, 1)
                if keep_logits:
                    kept.pop()
            break
        if queued is None:
            break
        token = queued
    reason = "eos" if out[-1] in eos else "max_new_tokens"
    all_logits = to_numpy(mx.concatenate(kept, axis=0)) if keep_logits else None
    return Generation(ids.tolist(), out, prefill_ms, decode_ms, reason, all_logits)


def _param_dtype(model: Model) -> mx.Dtype:
    return model.dtype
