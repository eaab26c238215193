"""Paged KV cache of the K/V heads only (GQA): per layer a pool of blocks, a row holding one
token's K heads then its V heads; per sequence a block table; a fork shares its parent's
blocks until it writes into a shared one (copy on write).

Token accounting (the rule the suites test exactly): tokens(seq) == tokens fed through
the model for ``seq``. ``generate`` never feeds back its last token, so after P prompt
and G generated tokens, tokens == P + G - 1 (the seed's "9 cached after 5 generated").

Invariants (asserted in suites/):
  blocks_used(seq) == ceil(tokens(seq) / block_size)
  num_free + num_used == num_blocks        (used: refcount > 0)
  refcount(b) == number of block tables that list b
  nbytes == 2 * layers * kv_heads * head_dim * itemsize * num_blocks * block_size
  copies(b) == w if r > w else w - 1   (w of a step's sequences write into shared block b
  of refcount r: as one at a time would); a step needs sum(copies) + new blocks free.

All-or-nothing: every public method checks its arguments (counts are ints, never bool or
float) and the room it needs before it changes anything.
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
    """``value`` as an int (Python or numpy, not bool or float), else TypeError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def check_seqs(seqs: object) -> None:
    """TypeError unless ``seqs`` is a sequence of ids, not a string ("ab" is not two ids)."""
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
        self._free = list(range(num_blocks - 1, -1, -1))  # popped: block 0 first
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
        block = check_int(block, "block")
        if not 0 <= block < self.num_blocks:  # a negative index reads another's count
            raise IndexError(f"block {block} is outside the pool [0, {self.num_blocks})")
        return block


# Host-made arrays up to this size sit in MLX CUDA's GPU-mapped pool; larger ones migrate.
SMALL_POOL_BYTES = 8


def step_fields(fields: list[list[int]]) -> list[mx.array]:
    """A step's int32 fields as MLX arrays: one array each while all fit the small pool, else
    views of one packed array (measured: docs/kernel-notes.md#step-fields)."""
    if all(len(f) * 4 <= SMALL_POOL_BYTES for f in fields):
        return [mx.array(f, mx.int32) for f in fields]
    packed = mx.array([v for f in fields for v in f], mx.int32)
    views, start = [], 0
    for f in fields:
        views.append(packed[start : start + len(f)])
        start += len(f)
    return views


class TableArrays:
    """A step's block tables as an array, reused while unchanged (a new one migrates a page)."""

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
    """Where a step's new tokens go (``PagedKVCache.plan``): B sequences append T each."""

    positions: mx.array  # (B, T) int32, absolute position of each new token
    slots: mx.array  # (B * T,) int32, pool row = block * block_size + offset
    blocks: mx.array  # (B * T,) int32, slots // block_size
    offsets: mx.array  # (B * T,) int32, slots % block_size
    block_tables: mx.array  # (B, max_blocks) int32, padded with 0 past each table
    context_lens: mx.array  # (B,) int32, tokens cached after this step
    fresh: bool = False  # every sequence was empty: the new tokens are the whole context
    # A chunk of more than one token of one sequence over its cache: its context length
    # after the step (a static shape for causal attention); 0 otherwise.
    chunk_context: int = 0


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
        # One pool a layer, keys at [:, :, 0], values at [:, :, 1]; KV heads only.
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
        """Forget the last ``n`` tokens of ``seq`` (all if fewer); returns how many. Blocks past
        ``ceil(tokens / block_size)`` lose this sequence's reference."""
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
        """``child`` starts as ``parent``, sharing its blocks (copy on write, see ``plan``)."""
        table = self._tables[self._check(parent, "parent")]
        if check_id(child, "child") in self._tables:
            raise KeyError(f"sequence {child!r} already exists")
        for b in table:
            self.allocator.incref(b)
        self._tables[child] = list(table)
        self._tokens[child] = self._tokens[parent]

    def plan(
        self,
        seqs: Sequence[Hashable],
        num_new: int,
        table_width: Callable[[int], int] | None = None,
    ) -> StepPlan:
        """Reserve room for ``num_new`` tokens in each of ``seqs`` and count them cached. Tables
        are as wide as the longest, or ``table_width`` of that, padded with block 0. Arguments
        and room (``block_needs``) are checked first; exactly the blocks counted are taken."""
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
            chunk_context=context_lens[0] if len(seqs) == 1 and num_new > 1 and not fresh else 0,
        )

    def ensure_room(self, seqs: Sequence[Hashable], num_new: int) -> None:
        """Raise CacheFullError unless ``num_new`` more tokens fit in each of ``seqs``."""
        seqs = self._check_step(seqs, num_new)
        self._raise_if_short(self.block_needs(seqs, num_new), num_new)

    def block_needs(
        self, seqs: Sequence[Hashable], num_new: int
    ) -> list[tuple[Hashable, bool, int]]:
        """What ``plan`` allocates, per sequence: (seq, copies its shared partial last block,
        new blocks), counted as in the module docstring. Public: the suites plant bad counts."""
        seqs = self._check_step(seqs, num_new)
        bs = self.block_size
        # Holders left of each written block: a writer that copies lets go of it.
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
