"""The CUDA/Metal source of the paged prefill attention kernel, and its builder.

T >= 1 new query tokens per sequence attend over the sequence's paged K/V cache,
which already holds their own keys and values (chunked prefill: a chunk of a
prompt after earlier chunks, or after a shared prefix). Same contract as
``impl.kernels.paged_attention.paged_attention_ops``: the query at absolute position p
sees the keys at positions 0..p that are also below the sequence's context_len.
One algorithm, one kernel body, compiled by MLX for CUDA (``mx.fast.cuda_kernel``)
or Metal (``mx.fast.metal_kernel``); ``impl.kernels.backend`` supplies the few
per-backend lines. ``impl.kernels.paged_prefill`` builds the kernel object once and
launches it (``paged_prefill_attention``).

Shapes:
  q             (B, n_heads, T, D), already rotated, float16/bfloat16/float32
  kv_pool       (num_blocks, block_size, 2, n_kv_heads, D), q's dtype: each row a
                token's K heads then its V heads; already holds the T new tokens
  block_tables  (B, max_blocks) int32; entries past ceil(context_len / block_size)
                are never read
  context_lens  (B,) int32: cached tokens including the T new ones, >= 1
  positions     (B, T) int32: absolute position of each query token
  returns       (B, n_heads, T, D) in q's dtype

Algorithm (the decode kernel's, ``impl.kernels.paged_decode_source``, with query rows
added along T; one thread group of N_WARPS warps per (KV head, sequence, query tile)):
  * A group serves the GROUP_SIZE = n_heads / n_kv_heads query heads of one KV
    head for Q_TILE consecutive query tokens: ROWS = GROUP_SIZE * Q_TILE query rows
    (row r = head g * Q_TILE + token i), whose scaled queries sit in shared memory.
    Each K/V row is read once per tile for all of them; KV heads are never repeated.
  * Row r sees keys [0, lim_i) with lim_i = min(position_i + 1, context_len). The
    group walks keys [0, max_i lim_i) only: nothing past context_len is read (the
    suites fill those slots with NaN), and a tile stops at its last visible key.
  * Each warp walks 32 consecutive keys at a time through the block table. Scores:
    one key per lane, the lane reading its K row with 16-byte loads and dotting it
    with every query row. Keys a row may not see are masked per row (causality and
    context) before the softmax.
  * Online softmax in float32 per row: a warp-wide running max m (a finite NEG
    stands for minus infinity, so masked keys give exp(NEG - m) == 0, never NaN),
    the lane's share of the normaliser l, and an accumulator rescaled by
    exp(m_old - m_new) as the max grows. The output is rounded once, at the end.
  * P.V: lanes over head_dim (coalesced V reads); each key's pool row and
    probabilities are broadcast from its lane with a warp shuffle.
  * The warps' (m, l, acc) are merged through shared memory and the group writes
    the normalised rows of its tile's tokens that exist (the last tile of a chunk
    may be partial).

Register pressure grows with ROWS * HEAD_DIM / 32 (the accumulators), so
``impl.kernels.paged_prefill`` picks Q_TILE to keep ROWS near 32 for head_dim 64 and
near 16 for head_dim 128 (a group size above that keeps Q_TILE = 1).
"""

from __future__ import annotations

from conform_mlx.impl.kernels.backend import Backend, kernel_source, make_kernel

SOURCE = kernel_source("paged_prefill")  # kernels/paged_prefill.inc

INPUTS = ["q", "kv_pool", "block_tables", "context_lens", "positions"]

# Template constants: T (dtype), HEAD_DIM, GROUP_SIZE, KV_BLOCK (tokens per cache
# block), Q_TILE (query tokens per group), N_WARPS, SCALE_BITS (the softmax scale,
# ``impl.kernels.backend.float_bits``). Everything else (batch, T,
# max_blocks, n_kv_heads) comes from the input shapes at run time, so a new chunk
# length or a growing block table never triggers a recompile.
_BODY = SOURCE["body"]


def build_kernels(backend: Backend) -> object:
    """The prefill kernel object for ``backend`` (construction compiles nothing)."""
    return make_kernel(backend, "paged_prefill_attention", INPUTS, ["out"], _BODY)
