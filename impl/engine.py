"""Prefill, decode and generation over a paged KV cache.

``prefill`` feeds one sequence's prompt (optionally in chunks); ``decode`` feeds one
token to each of several sequences at once, whatever their lengths. Both check
their input completely before the cache is touched, so a rejected call changes
nothing; ``generate`` checks the whole run (context and blocks) before its first
step. Every call ends in ``mx.eval``: MLX is lazy, and a timing that does not
force the work measures nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from impl.model import KVPools, Model
from impl.paged_cache import CacheFullError, PagedKVCache, StepPlan, check_id, check_int


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
    compiled: bool = False,
) -> mx.array:
    """Feed ``tokens`` to ``seq`` (after whatever it has cached); logits (T, vocab).

    With ``chunk_size``, the prompt goes through the model ``chunk_size`` tokens at a
    time, each chunk attending to the cached chunks before it. ``trace``, when given,
    collects each chunk's per-layer activations (see ``Model.__call__``) by name.
    ``compiled`` is as for ``decode``; MLX traces once per chunk length, so it pays
    off for prompts of repeating lengths (fixed-size chunks), not one-off prompts.
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
        tok = mx.array(chunk)[None]
        if compiled and trace is None:
            out = CompiledSteps.of(model)(tok, cache, plan)
        else:
            out = _forward(model, tok, cache, plan, trace)  # (1, t, vocab)
        logits.append(out[0])
    return logits[0] if len(logits) == 1 else mx.concatenate(logits, axis=0)


def decode(
    model: Model,
    cache: PagedKVCache,
    seqs: Sequence[Hashable],
    tokens: Sequence[int] | np.ndarray,
    trace: dict[str, list[mx.array]] | None = None,
    compiled: bool = False,
) -> mx.array:
    """Feed one token to each sequence in ``seqs`` in one batch; logits (B, vocab).

    ``compiled`` runs the step as an ``mx.compile``d graph (see ``CompiledSteps``):
    the same ops, without rebuilding the graph in Python every step. It is off by
    default because a compiled graph keeps what it traced: code patched afterwards
    (the suites inject faults that way) would not reach it.
    """
    ids = _check_tokens(model, tokens, "decode tokens")
    if isinstance(seqs, str | bytes):  # else "ab" would be read as sequences "a" and "b"
        raise TypeError(f"seqs must be a list of sequence ids, got {type(seqs).__name__}")
    if ids.size != len(seqs):
        raise InputError(f"decode: {len(seqs)} sequences but {ids.size} tokens")
    model.check_cache(cache)
    for s in seqs:
        _check_room(model, cache, s, 1)
    plan = cache.plan(list(seqs), 1)
    tok = mx.array(ids)[:, None]
    if compiled and trace is None:
        out = CompiledSteps.of(model)(tok, cache, plan)
    else:
        out = _forward(model, tok, cache, plan, trace)  # (B, 1, vocab)
    return out[:, 0]


def _forward(
    model: Model,
    tokens: mx.array,
    cache: PagedKVCache,
    plan: StepPlan,
    trace: dict[str, list[mx.array]] | None,
) -> mx.array:
    step: dict[str, mx.array] | None = {} if trace is not None else None
    out = model(tokens, cache, plan, step)
    mx.eval(out, cache.k, cache.v, step)
    if trace is not None:
        for name, value in step.items():
            trace.setdefault(name, []).append(value)
    return out


@dataclass
class StepPools:
    """The pools a compiled step reads and rewrites: a ``KVPools`` over the traced
    function's own lists, so the cache itself is not touched inside the trace."""

    k: list[mx.array]
    v: list[mx.array]

    def update_layer(self, layer: int, k_pool: mx.array, v_pool: mx.array) -> None:
        self.k[layer], self.v[layer] = k_pool, v_pool


# forward(tokens, positions, slots, block_tables, context_lens, k_pools, v_pools)
#   -> (logits, k_pools, v_pools)
StepGraph = Callable[..., tuple[mx.array, list[mx.array], list[mx.array]]]


class CompiledSteps:
    """A model's forward over explicit arrays, ``mx.compile``d once per
    ``StepPlan.fresh`` (a Python flag, so it selects a graph rather than feeding one).

    MLX traces a graph again for each new set of input shapes (a batch size, a chunk
    length, a block table width), keeps every trace, and replays them without
    running Python. The model's arrays (weights, RoPE frequencies) are implicit
    inputs, so loading new weights reaches the compiled graph. Held by the model
    (``Model.compiled_steps``), so its traces live as long as the model does.
    """

    def __init__(self, model: Model) -> None:
        self.model = model
        self.graphs: dict[bool, StepGraph] = {}

    @classmethod
    def of(cls, model: Model) -> CompiledSteps:
        """``model``'s compiled steps, made on first use."""
        if model.compiled_steps is None:
            model.compiled_steps = cls(model)
        return model.compiled_steps

    def graph(self, fresh: bool) -> StepGraph:
        """The compiled forward for steps with this ``StepPlan.fresh``."""
        if fresh not in self.graphs:
            model = self.model

            def forward(tokens, positions, slots, block_tables, context_lens, k_pools, v_pools):
                pools = StepPools(list(k_pools), list(v_pools))
                plan = StepPlan(positions, slots, block_tables, context_lens, fresh)
                return model(tokens, pools, plan), pools.k, pools.v

            self.graphs[fresh] = mx.compile(forward, inputs=model.state)
        return self.graphs[fresh]

    def __call__(self, tokens: mx.array, cache: KVPools, plan: StepPlan) -> mx.array:
        """One step through the compiled graph; installs the new pools in ``cache``."""
        p = plan
        out, k_pools, v_pools = self.graph(plan.fresh)(
            tokens, p.positions, p.slots, p.block_tables, p.context_lens, cache.k, cache.v
        )
        for layer, (k_pool, v_pool) in enumerate(zip(k_pools, v_pools)):
            cache.update_layer(layer, k_pool, v_pool)
        mx.eval(out, cache.k, cache.v)
        return out


def to_numpy(logits: mx.array) -> np.ndarray:
    """Logits as float32 numpy, whatever the model dtype."""
    return np.array(logits.astype(mx.float32))


@dataclass
class Sampler:
    """Greedy when ``temperature == 0``; otherwise temperature + nucleus (top-p)
    sampling from a numpy generator seeded once, so a seed fixes the whole run."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    _rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise InputError(
                f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}"
            )
        self._rng = np.random.default_rng(self.seed)

    def __call__(self, logits: np.ndarray) -> int:
        if self.temperature == 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / self.temperature
        p = np.exp(z - z.max())
        p /= p.sum()
        order = np.argsort(-p, kind="stable")
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), self.top_p)) + 1]
        q = p[keep] / p[keep].sum()
        return int(keep[self._rng.choice(keep.size, p=q)])


@dataclass
class Generation:
    prompt: list[int]
    tokens: list[int]  # generated, EOS included when it stopped the run
    prefill_ms: float
    decode_ms: list[float]  # one entry per decode step: len(tokens) - 1 of them
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
    compiled: bool = False,
) -> Generation:
    """Generate up to ``max_new_tokens`` tokens after ``prompt``.

    The last generated token is returned but never fed back, so the cache ends
    with ``len(prompt) + len(tokens) - 1`` tokens (see ``impl.paged_cache``).
    Without a ``cache``, one sized for prompt + max_new_tokens is made.
    ``compiled`` is passed to every ``decode`` step.

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
    out = [sampler(to_numpy(logits[-1]))]
    prefill_ms = (time.perf_counter() - t0) * 1e3
    kept = [logits]
    decode_ms: list[float] = []
    while len(out) < max_new_tokens and out[-1] not in eos:
        t0 = time.perf_counter()
        logits = decode(model, cache, [seq], [out[-1]], compiled=compiled)
        out.append(sampler(to_numpy(logits[0])))
        decode_ms.append((time.perf_counter() - t0) * 1e3)
        if keep_logits:
            kept.append(logits)
    reason = "eos" if out[-1] in eos else "max_new_tokens"
    all_logits = to_numpy(mx.concatenate(kept, axis=0)) if keep_logits else None
    return Generation(ids.tolist(), out, prefill_ms, decode_ms, reason, all_logits)


def _param_dtype(model: Model) -> mx.Dtype:
    return model.model.embed_tokens.weight.dtype
