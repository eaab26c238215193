"""Paged KV cache that stores only the K/V heads (grouped-query attention, no repeats).

One pool of fixed-size blocks per layer, holding K and V together: a pool row is
one token's K heads then its V heads, so a step writes both with one scatter. Each
sequence owns a block table listing the pool blocks that hold its tokens in order. Blocks are
handed out by a free-list allocator with reference counts, so a forked sequence
shares its parent's blocks until it writes into a shared one (copy on write).

Token accounting (the rule the suites test exactly):
  tokens(seq) == the number of tokens fed through the model for ``seq``.
  ``generate`` feeds the P prompt tokens and then every generated token except the
  last (the last one is returned, never fed back), so after P prompt tokens and G
  generated tokens: tokens == P + G - 1. The seed's "9 cached after 5 generated"
  is this rule with P = 5.

Invariants (asserted in suites/):
  blocks_used(seq) == ceil(tokens(seq) / block_size)
  num_free + num_used == num_blocks        (a block is used when its refcount > 0)
  refcount(b) == number of block tables that list b
  nbytes == 2 * layers * kv_heads * head_dim * itemsize * num_blocks * block_size

A step that appends to a batch of sequences copies a shared partial last block b
only as often as appending one sequence at a time would: of w sequences in the
batch that write into b (refcount r >= w),
  copies(b) == w      if r > w   (a holder outside the writers keeps the original)
  copies(b) == w - 1  if r == w  (the last writer is left owning b and writes in place)
and the step needs sum(copies) + sum(new blocks) free blocks.

All-or-nothing: every public method checks its arguments (types included: counts
are ints, numpy ints too, never bool or float) and the room it needs before it
changes anything, so a call that raises leaves tables, counts, refcounts and the
free list as they were.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import mlx.core as mx

from conform_mlx.impl.config import LlamaConfig


class CacheFullError(RuntimeError):
    """The pool has too few free blocks for a step; nothing was changed."""


def check_int(value: object, name: str) -> int:
    """``value`` as an int, or TypeError naming ``name``.

    Python and numpy integers count; bool does not (``trim(s, True)`` is a bug, not
    one token), and neither does a float, even a whole one: a count of 4.5 tokens
    would be kept and break every later step.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def check_seqs(seqs: object) -> None:
    """TypeError unless ``seqs`` is a sequence of ids and not a string (else "ab" would
    be read as the sequences "a" and "b")."""
    if isinstance(seqs, str | bytes) or not isinstance(seqs, Sequence):
        raise TypeError(f"seqs must be a list of sequence ids, got {type(seqs).__name__}")


def check_id(seq: object, name: str = "sequence id") -> Hashable:
    """``seq`` if it can key a block table, else TypeError naming ``name``."""
    try:
        hash(seq)
    except TypeError:
        raise TypeError(f"{name} must be hashable, got {type(seq).__name__} {seq!r}") from None
    return seq


class BlockAllocator:
    """Free list plus per-block reference counts over ``num_blocks`` pool blocks."""

    def __init__(self, num_blocks: int) -> None:
        num_blocks = check_int(num_blocks, "num_blocks")
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        # Popped from the end, so block 0 is handed out first (easier to read in tests).
        self._free = list(range(num_blocks - 1, -1, -1))
        self._refcount = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def free_list(self) -> list[int]:
        """The free blocks, the next one handed out last (a copy)."""
        return list(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def refcount(self, block: int) -> int:
        return self._refcount[self._check(block)]

    def allocate(self, n: int) -> list[int]:
        """``n`` fresh blocks with refcount 1, or CacheFullError with nothing taken."""
        n = check_int(n, "n")
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        if n > len(self._free):
            raise CacheFullError(
                f"KV cache out of blocks: need {n} free block(s), have {len(self._free)} "
                f"of {self.num_blocks}"
            )
        blocks = [self._free.pop() for _ in range(n)]
        for b in blocks:
            self._refcount[b] = 1
        return blocks

    def incref(self, block: int) -> None:
        if self._refcount[self._check(block)] == 0:
            raise ValueError(f"block {block} is free: allocate it before sharing it")
        self._refcount[block] += 1

    def decref(self, block: int) -> None:
        if self._refcount[self._check(block)] == 0:
            raise ValueError(f"block {block} is already free")
        self._refcount[block] -= 1
        if self._refcount[block] == 0:
            self._free.append(block)

    def _check(self, block: int) -> int:
        # A negative index would silently read another block's count.
        block = check_int(block, "block")
        if not 0 <= block < self.num_blocks:
            raise IndexError(f"block {block} is outside the pool [0, {self.num_blocks})")
        return block


# MLX's CUDA allocator gives an array made on the host managed memory. One of at most
# this many bytes comes from a small pool the GPU maps where it lies; a larger one
# moves to the GPU on the GPU's first read of it, a page fault.
SMALL_POOL_BYTES = 8


def step_fields(fields: list[list[int]]) -> list[mx.array]:
    """A step's int32 fields as MLX arrays, made so that the GPU reads them cheaply.

    Fields of at most two ints (a batch-1 decode step's) become one array each, all
    in MLX's small pool (``SMALL_POOL_BYTES``): no page migrates. Larger fields
    share one array, views of it, so a step costs one migration rather than one a
    field (measured: docs/kernel-notes.md#step-fields).
    """
    if all(len(f) * 4 <= SMALL_POOL_BYTES for f in fields):
        return [mx.array(f, mx.int32) for f in fields]
    packed = mx.array([v for f in fields for v in f], mx.int32)
    views, start = [], 0
    for f in fields:
        views.append(packed[start : start + len(f)])
        start += len(f)
    return views


class TableArrays:
    """A step's block tables as an MLX array, the same array as the last step's while
    they have not changed. In decode they change once every ``block_size`` tokens; an
    array the GPU has read stays in its memory, and a new one is a page migration
    (``step_fields``)."""

    def __init__(self) -> None:
        self.key: tuple[int, tuple[int, ...]] | None = None  # (width, flat tables)
        self.array: mx.array | None = None

    def __call__(self, tables: list[int], width: int) -> mx.array:
        """``tables``: B rows of ``width`` blocks, flat; returns them (B, width)."""
        key = (width, tuple(tables))
        if key != self.key:
            self.key, self.array = key, mx.array(tables, mx.int32).reshape(-1, width)
        return self.array


@dataclass(frozen=True)
class StepPlan:
    """Where one forward step's new tokens go; built by ``PagedKVCache.plan``.

    B sequences each append T tokens (prefill: B == 1; decode: T == 1).
    """

    positions: mx.array  # (B, T) int32, absolute position of each new token
    slots: mx.array  # (B * T,) int32, pool row = block * block_size + offset
    blocks: mx.array  # (B * T,) int32, slots // block_size
    offsets: mx.array  # (B * T,) int32, slots % block_size
    block_tables: mx.array  # (B, max_blocks) int32, padded with 0 past each table
    context_lens: mx.array  # (B,) int32, tokens cached after this step
    # Every sequence was empty before this step, so its new tokens are its whole
    # context (a prompt's first chunk): attention needs no cached prefix.
    fresh: bool = False


class PagedKVCache:
    """Block pools for every layer, block tables and token counts per sequence."""

    def __init__(
        self,
        config: LlamaConfig,
        num_blocks: int,
        block_size: int = 16,
        dtype: mx.Dtype = mx.float32,
    ) -> None:
        block_size = check_int(block_size, "block_size")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if not isinstance(dtype, mx.Dtype) or not mx.issubdtype(dtype, mx.floating):
            raise TypeError(f"dtype must be a floating mx.Dtype, got {dtype!r}")
        self.config = config
        self.block_size = block_size
        self.dtype = dtype
        self.allocator = BlockAllocator(num_blocks)
        # One pool per layer: (num_blocks, block_size, 2, num_key_value_heads, head_dim),
        # [:, :, 0] the keys and [:, :, 1] the values. Only the KV heads are stored;
        # query heads of a group read the same rows at attention time.
        shape = (self.num_blocks, block_size, 2, config.num_key_value_heads, config.dim_per_head)
        self.kv = [mx.zeros(shape, dtype=dtype) for _ in range(config.num_hidden_layers)]
        mx.eval(self.kv)
        self._tables: dict[Hashable, list[int]] = {}
        self._tokens: dict[Hashable, int] = {}
        self._table_arrays = TableArrays()

    @classmethod
    def for_tokens(
        cls,
        config: LlamaConfig,
        max_tokens: int,
        block_size: int = 16,
        dtype: mx.Dtype = mx.float32,
    ) -> PagedKVCache:
        """A pool just large enough for ``max_tokens`` tokens in one sequence."""
        max_tokens = check_int(max_tokens, "max_tokens")
        block_size = check_int(block_size, "block_size")
        if max_tokens <= 0 or block_size <= 0:
            raise ValueError(f"need max_tokens, block_size > 0, got {max_tokens}, {block_size}")
        return cls(config, math.ceil(max_tokens / block_size), block_size, dtype)

    # -- accounting -------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.kv)

    @property
    def sequences(self) -> list[Hashable]:
        return list(self._tables)

    def tokens(self, seq: Hashable) -> int:
        return self._tokens[self._check(seq)]

    def block_table(self, seq: Hashable) -> list[int]:
        return list(self._tables[self._check(seq)])

    def blocks_used(self, seq: Hashable) -> int:
        return len(self._tables[self._check(seq)])

    # -- sequence lifecycle -------------------------------------------------------
    def add_sequence(self, seq: Hashable) -> None:
        if check_id(seq) in self._tables:
            raise KeyError(f"sequence {seq!r} already exists")
        self._tables[seq] = []
        self._tokens[seq] = 0

    def release(self, seq: Hashable) -> None:
        """Drop ``seq``; its blocks return to the free list when no one else holds them."""
        for b in self._tables.pop(self._check(seq)):
            self.allocator.decref(b)
        del self._tokens[seq]

    def trim(self, seq: Hashable, n: int) -> int:
        """Forget the last ``n`` tokens of ``seq`` (all of them if it holds fewer), as
        after rejected speculative tokens; returns how many were dropped.

        Blocks past ``ceil(tokens / block_size)`` go back to the allocator (or lose a
        reference, if shared); the rows left behind in a kept block are overwritten
        by the next tokens, and no reader looks past ``tokens(seq)``.
        """
        n = check_int(n, "n")
        if n < 0:
            raise ValueError(f"cannot trim a negative number of tokens ({n})")
        table = self._tables[self._check(seq)]
        n = min(n, self._tokens[seq])
        self._tokens[seq] -= n
        keep = math.ceil(self._tokens[seq] / self.block_size)
        for b in table[keep:]:
            self.allocator.decref(b)
        del table[keep:]
        return n

    def fork(self, parent: Hashable, child: Hashable) -> None:
        """``child`` starts as a copy of ``parent`` sharing all its blocks.

        Full blocks stay shared for good; a shared partial last block is copied by
        whichever sequence appends to it first (see ``plan``).
        """
        table = self._tables[self._check(parent, "parent")]
        if check_id(child, "child") in self._tables:
            raise KeyError(f"sequence {child!r} already exists")
        for b in table:
            self.allocator.incref(b)
        self._tables[child] = list(table)
        self._tokens[child] = self._tokens[parent]

    # -- one forward step --------------------------------------------------------
    def plan(
        self,
        seqs: Sequence[Hashable],
        num_new: int,
        table_width: Callable[[int], int] | None = None,
    ) -> StepPlan:
        """Reserve room for ``num_new`` tokens in each of ``seqs`` and count them cached.

        The block tables are as wide as the longest table, or ``table_width`` of that
        (a compiled step's width bucket), padded with block 0: the pad is never read
        as context (see ``impl.engine.pad_block_tables``).

        All-or-nothing: the arguments, then the room (``block_needs``), are checked
        before any table, count or refcount changes; the blocks taken are exactly
        the ones counted, so no allocation after the check can fail.
        """
        seqs = self._check_step(seqs, num_new)
        num_new = int(num_new)
        needs = self.block_needs(seqs, num_new)
        self._raise_if_short(needs, num_new)
        for s, cow, new in needs:
            table = self._tables[s]
            if cow:
                self._copy_last_block(table)
            table.extend(self.allocator.allocate(new))

        bs = self.block_size
        fresh = all(self._tokens[s] == 0 for s in seqs)
        positions, slots = [], []
        for s in seqs:
            start, table = self._tokens[s], self._tables[s]
            pos = range(start, start + num_new)
            positions.extend(pos)
            slots.extend(table[p // bs] * bs + p % bs for p in pos)
            self._tokens[s] = start + num_new
        width = max(len(self._tables[s]) for s in seqs)
        if table_width is not None:
            width = max(width, table_width(width))
        tables = [b for s in seqs for b in self._tables[s] + [0] * (width - len(self._tables[s]))]
        context_lens = [self._tokens[s] for s in seqs]
        blocks = [s // bs for s in slots]
        offsets = [s % bs for s in slots]
        pos, slot, block, offset, lens = step_fields(
            [positions, slots, blocks, offsets, context_lens]
        )
        return StepPlan(
            positions=pos.reshape(len(seqs), num_new),
            slots=slot,
            blocks=block,
            offsets=offset,
            context_lens=lens,
            block_tables=self._table_arrays(tables, width),
            fresh=fresh,
        )

    def ensure_room(self, seqs: Sequence[Hashable], num_new: int) -> None:
        """Raise CacheFullError unless ``num_new`` more tokens fit in each of ``seqs``."""
        seqs = self._check_step(seqs, num_new)
        self._raise_if_short(self.block_needs(seqs, num_new), num_new)

    def block_needs(
        self, seqs: Sequence[Hashable], num_new: int
    ) -> list[tuple[Hashable, bool, int]]:
        """Per sequence: (seq, copies its shared partial last block first, new blocks).

        What ``plan`` allocates for ``num_new`` more tokens in each of ``seqs``, in
        order: new == ceil((tokens + num_new) / block_size) - blocks_used, and a
        sequence whose next row lands in a block someone else still holds copies it,
        counted per block as in the module docstring. Public so the suites can plant
        a wrong count here.
        """
        seqs = self._check_step(seqs, num_new)
        bs = self.block_size
        # Holders left of each block written this step: a writer that copies lets go
        # of it, so the last writer may find itself the only holder.
        holders: dict[int, int] = {}
        needs = []
        for s in seqs:
            n, table = self._tokens[s], self._tables[s]
            cow = False
            if n % bs:  # the next row lands in the partial last block
                b = table[-1]
                left = holders.setdefault(b, self.allocator.refcount(b))
                cow = left > 1
                holders[b] = left - cow
            needs.append((s, cow, math.ceil((n + num_new) / bs) - len(table)))
        return needs

    def _check_step(self, seqs: Sequence[Hashable], num_new: int) -> list[Hashable]:
        """The step's arguments, checked: a non-empty list of distinct known ids."""
        check_seqs(seqs)
        if check_int(num_new, "num_new") <= 0:
            raise ValueError(f"num_new must be positive, got {num_new}")
        if not seqs:
            raise ValueError("a step needs at least one sequence")
        for s in seqs:
            self._check(s)
        if len(set(seqs)) != len(seqs):
            raise ValueError(f"a sequence appears twice in one step: {list(seqs)}")
        return list(seqs)

    def _raise_if_short(self, needs: list[tuple[Hashable, bool, int]], num_new: int) -> None:
        total = sum(cow + new for _, cow, new in needs)
        if total > self.allocator.num_free:
            raise CacheFullError(
                f"KV cache out of blocks: {num_new} new token(s) for {len(needs)} "
                f"sequence(s) need {total} free block(s), have {self.allocator.num_free} "
                f"of {self.num_blocks} (block_size={self.block_size})"
            )

    def update_layer(self, layer: int, kv_pool: mx.array) -> None:
        """Install a layer's pool after a cache-write op (ops return new arrays)."""
        layer = check_int(layer, "layer")
        if not 0 <= layer < len(self.kv):
            raise IndexError(f"layer {layer} is outside [0, {len(self.kv)})")
        old = self.kv[layer]
        if not isinstance(kv_pool, mx.array):
            raise TypeError(f"kv_pool must be an mx.array, got {type(kv_pool).__name__}")
        if kv_pool.shape != old.shape or kv_pool.dtype != old.dtype:
            raise ValueError(
                f"layer {layer}: kv_pool is {kv_pool.shape} {kv_pool.dtype}, the pool is "
                f"{old.shape} {old.dtype}"
            )
        self.kv[layer] = kv_pool

    def _copy_last_block(self, table: list[int]) -> None:
        shared = table[-1]
        (fresh,) = self.allocator.allocate(1)
        for pool in self.kv:
            pool[fresh] = pool[shared]
        self.allocator.decref(shared)
        table[-1] = fresh

    def _check(self, seq: Hashable, name: str = "sequence id") -> Hashable:
        if check_id(seq, name) not in self._tables:
            raise KeyError(f"unknown sequence {seq!r}")
        return seq
