"""Prefill, decode and generation over a paged KV cache.

``prefill`` feeds one sequence's prompt (optionally in chunks); ``decode`` feeds one
token to each of several sequences at once, whatever their lengths. Both check
their input completely before the cache is touched, so a rejected call changes
nothing; ``generate`` checks the whole run (context and blocks) before its first
step. ``prefill`` and ``decode`` end in ``mx.eval``: MLX is lazy, and a timing that
does not force the work measures nothing. ``generate`` instead pipelines its decode
steps (``decode_lazy``): each step is queued with ``mx.async_eval`` before the host
waits for the token before it, so building one graph overlaps running the last.
"""

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


def _check_room(model: Model, cache: PagedKVCache, seq: Hashable, extra: int) -> None:
    limit = model.config.max_position_embeddings
    have = cache.tokens(seq)
    if have + extra > limit:
        raise InputError(
            f"sequence {seq!r}: {have} cached + {extra} new tokens exceeds the context "
            f"length max_position_embeddings={limit}"
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
    """Feed ``tokens`` to ``seq`` (after whatever it has cached); logits (T, vocab).

    With ``chunk_size``, the prompt goes through the model ``chunk_size`` tokens at a
    time, each chunk attending to the cached chunks before it. ``trace``, when given,
    collects each chunk's per-layer activations (see ``Model.__call__``) by name.
    ``steps`` is as for ``decode``; MLX traces once per chunk length, so it pays off
    for prompts of repeating lengths (fixed-size chunks), not one-off prompts.
    """
    ids = _check_tokens(model, tokens, f"prompt for sequence {seq!r}")
    model.check_cache(cache)
    _check_room(model, cache, seq, ids.size)
    if chunk_size is not None and check_int(chunk_size, "chunk_size") <= 0:
        raise InputError(f"chunk_size must be positive, got {chunk_size}")
    step = chunk_size or ids.size
    chunks = [ids[i : i + step] for i in range(0, ids.size, step)]
    # Chunks after the first would otherwise meet a full pool with earlier ones cached.
    cache.ensure_room([seq], ids.size)
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
    """Feed one token to each sequence in ``seqs`` in one batch; logits (B, vocab).

    ``steps`` (the caller's ``CompiledSteps(model)``, made once and reused) runs the
    step as an ``mx.compile``d graph: the same ops, without rebuilding the graph in
    Python every step. Without it the step is built op by op, so code patched into
    the model reaches it (the suites inject faults that way).
    """
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
    """``decode`` without the ``mx.eval``: logits (B, vocab), unevaluated.

    ``tokens`` is a (B,) integer mx.array, typically a sampler's output not yet
    computed, so the next step's graph can be built (and queued with
    ``mx.async_eval``) while the previous one still runs. Its values are not
    checked, since reading them would wait for that step: ids made by a sampler
    over the vocabulary are in range by construction. Everything the host knows
    without them is checked as in ``decode`` (the cache's shape, context room,
    free blocks) before the cache changes; the new pools are installed lazily.
    """
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
    # int32 like decode's ids, so both share one compiled trace per shape.
    tok = tokens.astype(mx.int32)[:, None]
    return _step(model, tok, cache, plan, None, steps, lazy=True)[:, 0]


def _plan_decode(
    model: Model, cache: PagedKVCache, seqs: Sequence[Hashable], compiled: bool = False
) -> StepPlan:
    """The host-side checks of a decode step, then its plan (which reserves the room).

    For a compiled step the block tables are padded on the host to the width the
    step is traced for (``bucket_width``); an eager step gets them unpadded, since
    the CPU's ops path gathers every block the table lists (13% slower a batch-4
    CPU step, padded).
    """
    model.check_cache(cache)
    for s in seqs:
        _check_room(model, cache, s, 1)
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
    """One forward step, logits (B, T, vocab); the cache's new pools installed.

    Evaluated unless ``lazy``. A ``trace`` needs the Python forward, so it runs
    eagerly even when ``steps`` are given.
    """
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
    """The pools a compiled step reads and rewrites: a ``KVPools`` over the traced
    function's own lists, so the cache itself is not touched inside the trace."""

    kv: list[mx.array]

    def update_layer(self, layer: int, kv_pool: mx.array) -> None:
        self.kv[layer] = kv_pool


# forward(tokens, positions, slots, blocks, offsets, block_tables, context_lens, kv_pools)
#   -> (logits, kv_pools, marks)
StepGraph = Callable[..., tuple[mx.array, list[mx.array], list[mx.array]]]


def step_arrays(plan: StepPlan) -> list[mx.array]:
    """The plan's arrays in ``StepPlan`` field order, block tables padded to their
    width bucket: what a compiled step takes besides the tokens and pools."""
    p = plan
    tables = pad_block_tables(p.block_tables)
    return [p.positions, p.slots, p.blocks, p.offsets, tables, p.context_lens]


def bucket_width(width: int) -> int:
    """The block-table width a compiled step is traced for: the next power of two.

    MLX traces a compiled graph again for every new input shape, and a sequence's
    table grows by one block every ``block_size`` tokens; padding to powers of two
    makes a run of n blocks trace about log2(n) graphs instead of n.
    """
    return 1 << max(width - 1, 0).bit_length()


def pad_block_tables(block_tables: mx.array) -> mx.array:
    """``block_tables`` (B, W) widened to ``bucket_width(W)`` with block 0.

    The pad must name a real block, so a gather through it stays inside the pool;
    it is never read as context: the decode kernel stops at ``context_lens`` and the
    ops twin zeroes and masks every slot at or past it, so whatever block 0 holds
    (another sequence's keys, a NaN) cannot reach the output.
    """
    batch, width = block_tables.shape
    pad = bucket_width(width) - width
    if pad == 0:
        return block_tables
    return mx.concatenate([block_tables, mx.zeros((batch, pad), dtype=block_tables.dtype)], axis=1)


class CompiledSteps:
    """A model's forward over explicit arrays, ``mx.compile``d once per
    ``StepPlan.fresh`` (a Python flag, so it selects a graph rather than feeding one).

    MLX traces a graph again for each new set of input shapes (a batch size, a chunk
    length, a block table width), keeps every trace, and replays them without
    running Python. Block tables are padded to width buckets (``pad_block_tables``)
    so a growing context retraces only at powers of two. ``traces`` counts the
    traces: it is incremented inside the traced function, which runs only when MLX
    traces. The model's arrays (weights, RoPE frequencies) are implicit inputs, so
    loading new weights reaches the compiled graph. Made by the caller once per model,
    after the model is built (fusing projections changes its graph), and kept as long
    as it steps that model: the engine, or whoever calls ``generate`` repeatedly.
    """

    def __init__(self, model: Model) -> None:
        self.model = model
        self.graphs: dict[tuple[bool, KernelPolicy], StepGraph] = {}
        self.traces = 0

    def graph(self, fresh: bool) -> StepGraph:
        """The compiled forward for steps with this ``StepPlan.fresh`` under the
        current kernel policy (a graph bakes in the kernels it was traced with)."""
        policy = current_policy()
        if (fresh, policy) not in self.graphs:
            model = self.model

            def forward(tokens, *fields_and_pools):
                self.traces += 1  # Python here runs only while MLX traces
                *fields, kv_pools = fields_and_pools
                pools = StepPools(list(kv_pools))
                plan = StepPlan(*fields, fresh=fresh)
                layers = model.config.num_hidden_layers
                row_kernels = model.runs_row_kernels(tokens.size)
                marks = dict.fromkeys(policy.commits(layers, row_kernels))
                logits = model(tokens, pools, plan, marks=marks)
                return logits, pools.kv, [marks[i] for i in sorted(marks)]

            self.graphs[fresh, policy] = mx.compile(forward, inputs=model.state)
        return self.graphs[fresh, policy]

    def __call__(self, tokens: mx.array, cache: KVPools, plan: StepPlan) -> mx.array:
        """One step through the compiled graph, evaluated; installs the new pools."""
        out = self.lazy(tokens, cache, plan)
        mx.eval(out, cache.kv)
        return out

    def lazy(self, tokens: mx.array, cache: KVPools, plan: StepPlan) -> mx.array:
        """``__call__`` without the final ``mx.eval``: the logits and the pools it
        installs are for the caller to queue (``mx.async_eval``) or chain. The step up
        to each layer of the policy's ``commits`` is queued here already, so the GPU
        starts on it while the host encodes the rest."""
        step = self.graph(plan.fresh)
        out, kv_pools, marks = step(tokens, *step_arrays(plan), cache.kv)
        # The traced graph returns pools of the shapes and dtype it took: installed
        # without update_layer's checks, whose Python cost a step is 22 calls.
        cache.kv[:] = kv_pools
        for mark in marks:
            mx.async_eval(mark)
        return out


def to_numpy(logits: mx.array) -> np.ndarray:
    """Logits as float32 numpy, whatever the model dtype."""
    return np.array(logits.astype(mx.float32))


@dataclass
class Sampler:
    """Greedy when ``temperature == 0``; otherwise temperature + nucleus (top-p)
    sampling. It runs on the device: logits in, token ids out as an mx.array, so
    ``generate`` can feed a token to the next step before the host has read it.

    Randomness is MLX's, from a key made of ``seed`` and split once per call, so a
    seed fixes the whole run; a pipelined run asks for its keys in the same order
    as an unpipelined one, so both draw the same tokens.
    """

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
        """Token ids from ``logits`` (..., vocab), int32: shape (...), or with
        ``num_samples`` (..., num_samples) independent draws from one distribution
        in one call (the suites check nucleus frequencies this way). Uses one key.
        """
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
        # Nucleus, in most-likely-first order: a token is kept while the mass of the
        # tokens before it is still short of top_p, which keeps the smallest prefix
        # whose mass reaches top_p (the first token always). categorical normalises
        # what is left, which is the renormalisation.
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
    # One entry per decode step, len(tokens) - 1 of them: host time from one token
    # being available to the next (pipelined, so not the step's own run time).
    decode_ms: list[float]
    stop_reason: str  # "eos" or "max_new_tokens"
    # (len(prompt) + len(tokens) - 1, vocab) float32: the logits after every fed token
    # (all prompt positions, then each decode step); only with keep_logits=True.
    logits: np.ndarray | None = None


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
    """Generate up to ``max_new_tokens`` tokens after ``prompt``.

    The last generated token is returned but never fed back, so the cache ends
    with ``len(prompt) + len(tokens) - 1`` tokens (see ``impl.paged_cache``).
    Without a ``cache``, one sized for prompt + max_new_tokens is made.

    Pipelined: the sampler runs on the device (``Sampler``), and each decode step
    is built from the previous step's token before the host has read it, then
    queued with ``mx.async_eval`` (``decode_lazy``); only then does the host wait
    for that previous token. So the host sees EOS one step late, after the step
    that feeds it is queued: that step is rolled back (``cache.trim``), keeping
    the rule above exact. No step is queued past ``max_new_tokens``. ``steps`` (a
    ``CompiledSteps(model)`` the caller keeps across calls) runs each decode step as
    a compiled graph; without it the steps are built op by op, so code patched into
    the model reaches them. The prefill is never compiled: a prompt's length rarely
    repeats.

    All-or-nothing: before the first step, the whole run must fit what ``seq``
    already holds, both in the context and in the pool,
      tokens(seq) + len(prompt) + max_new_tokens - 1 <= max_position_embeddings
      blocks for those tokens (copy-on-write included) <= free blocks
    else InputError or CacheFullError with the cache as it was. A run that stops
    early at EOS needed less, but is held to its longest.
    """
    max_new_tokens = check_int(max_new_tokens, "max_new_tokens")
    if max_new_tokens <= 0:
        raise InputError(f"max_new_tokens must be positive, got {max_new_tokens}")
    ids = _check_tokens(model, prompt, "prompt")
    check_id(seq, "seq")
    have = cache.tokens(seq) if cache is not None and seq in cache.sequences else 0
    fed = ids.size + max_new_tokens - 1  # the last generated token is never fed
    limit = model.config.max_position_embeddings
    if have + fed > limit:
        raise InputError(
            f"sequence {seq!r}: {have} cached + {ids.size} prompt + {max_new_tokens - 1} "
            f"fed-back tokens = {have + fed} exceeds the context length "
            f"max_position_embeddings={limit}"
        )
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
