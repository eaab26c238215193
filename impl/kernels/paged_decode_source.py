"""The CUDA/Metal source of the paged decode attention kernels, and their builder.

One new query token per sequence attends over its paged K/V cache (decode: the
query sits at position ``context_len - 1``, so every cached token is visible and
no causal mask is needed). One algorithm, one kernel body, compiled by MLX for CUDA
(``mx.fast.cuda_kernel``) or Metal (``mx.fast.metal_kernel``); ``impl.kernels.backend``
supplies the few per-backend lines. ``impl.kernels.paged_attention`` builds the kernel
objects once, launches them (``paged_decode_attention``) and holds their ops twin.

Shapes:
  q             (B, n_heads, 1, D), already rotated, float16/bfloat16/float32
  kv_pool       (num_blocks, block_size, 2, n_kv_heads, D), q's dtype: a token's
                K heads then its V heads, one pool row (one scatter writes both)
  block_tables  (B, max_blocks) int32; entries past ceil(context_len / block_size)
                are never read
  context_lens  (B,) int32, >= 1
  returns       (B, n_heads, 1, D) in q's dtype

Algorithm (one thread group of N_WARPS warps per (sequence, KV head, context
partition), N_WARPS and the partitions from ``impl.kernels.paged_attention.launch_plan``;
Apple's simdgroups are 32 lanes wide too):
  * GQA: the GROUP_SIZE = n_heads / n_kv_heads query heads of a KV head are served
    by one group, so each K/V row is read once for all of them; KV heads are never
    repeated. Their scaled queries sit in shared memory.
  * Each warp walks 32 consecutive tokens at a time through the block table. Scores:
    one token per lane, the lane reading its K row with 16-byte loads and dotting
    it with every query head. Only slots < context_len are read; slots past it may
    hold anything (the suites fill them with NaN).
  * Online softmax in float32: per query head a warp-wide running max m, the
    lane's share of the normaliser l, and an accumulator rescaled by
    exp(m_old - m_new) as the max grows. Inputs are widened to float32 on load and
    the output is rounded once, at the end.
  * P.V: lanes over head_dim (coalesced V reads); each token's pool row and
    probabilities are broadcast from its lane with a warp shuffle.
  * The warps rescale their (l, acc) to the group's max and merge in a tree
    through shared memory: each round the upper half of the warps still holding
    sums hands them to the lower half, until warp 0 holds the group's. With one
    partition warp 0 writes the normalised output. When the batch alone cannot fill
    the GPU, each sequence's own blocks (not its table's padded width) are cut into
    block-aligned partitions (split-K); each writes its unnormalised (m, l, acc) and
    a small third kernel merges them.
"""

from __future__ import annotations

from conform_mlx.impl.kernels.backend import Backend, kernel_source, make_kernel

SOURCE = kernel_source("paged_decode")  # kernels/paged_decode.inc

INPUTS = ["q", "kv_pool", "block_tables", "context_lens"]

# The shared body. Template constants: T (dtype), HEAD_DIM, GROUP_SIZE, KV_BLOCK
# (tokens per cache block), N_WARPS (any count; shared memory grows with it, see
# ``impl.kernels.paged_attention.shared_floats``), SCALE_BITS (the softmax scale, as
# ``impl.kernels.backend.float_bits`` gives it). Sizes read at run time come from the
# input shapes, so a growing block table never triggers a recompile.
_BODY = SOURCE["body"]

# Epilogue of the one-partition kernel: warp 0 normalises and writes (B, n_heads, 1, D).
_FINAL = SOURCE["final"]

# Epilogue of the split kernel: this partition's (acc, [m, l]) relative to its own
# max m, as float32 (B, n_heads, P, D) and (B, n_heads, P, 2). An empty partition
# writes m = NEG, l = 0, acc = 0, which the combine weighs by exp(NEG - M) == 0.
_PARTIAL = SOURCE["partial"]

# Merge the partitions, one thread per output element (seq, head, d) =
# (group_z, group_y, tid): out = sum_p e^(m_p - M) acc_p / sum_p e^(m_p - M) l_p.
_COMBINE = SOURCE["combine"]


def build_kernels(backend: Backend) -> tuple[object, object, object]:
    """(one-partition, split-K, combine) kernel objects for ``backend`` (construction
    compiles nothing)."""
    parts = ["part_acc", "part_ml"]
    return (
        make_kernel(backend, "paged_decode_attention", INPUTS, ["out"], _BODY + _FINAL),
        make_kernel(backend, "paged_decode_attention_split", INPUTS, parts, _BODY + _PARTIAL),
        make_kernel(backend, "paged_decode_attention_combine", parts, ["out"], _COMBINE),
    )
