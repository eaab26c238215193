"""The CUDA/Metal source of the paged decode attention kernels, and their builder.

One new query token per sequence attends over its paged K/V cache (decode: the
query sits at position ``context_len - 1``, so every cached token is visible and
no causal mask is needed). One algorithm, one kernel body, compiled by MLX for CUDA
(``mx.fast.cuda_kernel``) or Metal (``mx.fast.metal_kernel``); ``kernels.backend``
supplies the few per-backend lines. ``kernels.paged_attention`` builds the kernel
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
partition), N_WARPS and the partitions from ``kernels.paged_attention.launch_plan``;
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

from kernels.backend import Backend, make_kernel

INPUTS = ["q", "kv_pool", "block_tables", "context_lens"]

# The shared body. Template constants: T (dtype), HEAD_DIM, GROUP_SIZE, KV_BLOCK
# (tokens per cache block), N_WARPS (any count; shared memory grows with it, see
# ``kernels.paged_attention.shared_floats``), SCALE_BITS (the softmax scale, as
# ``kernels.backend.float_bits`` gives it). Sizes read at run time come from the
# input shapes, so a growing block table never triggers a recompile.
_BODY = """
  constexpr int DPL = HEAD_DIM / 32;  // V elements per lane in P.V: lane + 32 * i
  constexpr float NEG = -1.0e30f;     // finite "minus infinity": exp(NEG - m) == 0, no NaN
  constexpr int VROWS = 8;            // V rows loaded before any is used
  // One merge slot: a warp's (acc, l). The merge needs N_WARPS / 2 slots at most.
  constexpr int SLOT = GROUP_SIZE * HEAD_DIM + GROUP_SIZE;
  constexpr int SLOTS = N_WARPS > 1 ? N_WARPS / 2 : 1;
  // Metal wants thread-group arrays at the top scope of the kernel. sm_buf holds the
  // group's scaled queries during the walk, then the merge slots.
  KSHARED float sm_buf[SLOTS * SLOT];
  KSHARED float sm_m[N_WARPS * GROUP_SIZE];
  const int batch = context_lens_shape[0];
  const int n_kv = kv_pool_shape[3];
  const int max_blocks = block_tables_shape[1];
  const int n_parts = groups_z / batch;
  const int seq = group_z / n_parts;
  const int part = group_z - seq * n_parts;
  const int kvh = group_y;
  // The grid is exact, but a group past the data must not touch memory. The test is
  // uniform over the group, so returning here cannot strand a barrier.
  if (seq >= batch || kvh >= n_kv) return;
  const int n_heads = n_kv * GROUP_SIZE;
  // Never past the table's width, whatever context_lens says: no read outside its row.
  const int ctx = kmini(context_lens[seq], max_blocks * KV_BLOCK);
  // Partitions split this sequence's own blocks, not the table's width (a compiled
  // step pads tables to a power of two), so the padding is never walked.
  const int part_blocks = ((ctx + KV_BLOCK - 1) / KV_BLOCK + n_parts - 1) / n_parts;
  const int t_begin = part * part_blocks * KV_BLOCK;
  const int t_end = kmini(ctx, t_begin + part_blocks * KV_BLOCK);
  const size_t head0 = static_cast<size_t>(seq) * n_heads + kvh * GROUP_SIZE;

  // The group's GROUP_SIZE query heads are consecutive rows of q.
  const float sc = kfloat_bits(SCALE_BITS);
  for (int j = tid; j < GROUP_SIZE * HEAD_DIM; j += N_WARPS * 32) {
    sm_buf[j] = sc * kload(q[head0 * HEAD_DIM + j]);
  }
  ksync();

  float m[GROUP_SIZE];  // running max, the same in every lane
  float l[GROUP_SIZE];  // this lane's share of the softmax denominator
  float acc[GROUP_SIZE][DPL];
  for (int g = 0; g < GROUP_SIZE; ++g) {
    m[g] = NEG;
    l[g] = 0.0f;
    for (int i = 0; i < DPL; ++i) acc[g][i] = 0.0f;
  }

  // Each warp takes 32 consecutive tokens at a time, one per lane.
  for (int base = t_begin + warp * 32; base < t_end; base += N_WARPS * 32) {
    const int n_valid = kmini(32, t_end - base);  // warp-uniform
    const bool mine = lane < n_valid;  // lanes past the context read nothing
    const int t = base + lane;
    int row = 0;  // pool row (block * KV_BLOCK + offset) of this lane's token
    float s[GROUP_SIZE];  // scores, then probabilities, of this lane's token
    for (int g = 0; g < GROUP_SIZE; ++g) s[g] = 0.0f;
    if (mine) {
      row = block_tables[seq * max_blocks + t / KV_BLOCK] * KV_BLOCK + t % KV_BLOCK;
      const size_t k_off = (static_cast<size_t>(row) * 2 * n_kv + kvh) * HEAD_DIM;
      for (int d0 = 0; d0 < HEAD_DIM; d0 += 8) {
        float kf[8];
        kload8(kv_pool + k_off + d0, kf);  // one wide load per 8 elements
        for (int g = 0; g < GROUP_SIZE; ++g) {
          for (int j = 0; j < 8; ++j) s[g] += sm_buf[g * HEAD_DIM + d0 + j] * kf[j];
        }
      }
    }
    for (int g = 0; g < GROUP_SIZE; ++g) {
      const float m_new = kmax(m[g], kwarp_max(mine ? s[g] : NEG));
      const float corr = kexp(m[g] - m_new);
      s[g] = mine ? kexp(s[g] - m_new) : 0.0f;
      l[g] = l[g] * corr + s[g];
      for (int i = 0; i < DPL; ++i) acc[g][i] *= corr;
      m[g] = m_new;
    }
    // P.V with lanes over head_dim: token u's pool row and probabilities come from
    // lane u, so each V row is one coalesced read shared by the whole group. Rows are
    // fetched VROWS at a time so their loads are in flight together.
    for (int u0 = 0; u0 < n_valid; u0 += VROWS) {
      float vr[VROWS][DPL];
      for (int k = 0; k < VROWS; ++k) {
        const int r = kshfl(row, u0 + k);  // u0 + k < 32: n_valid <= 32, VROWS | 32
        const size_t v_off = ((static_cast<size_t>(r) * 2 + 1) * n_kv + kvh) * HEAD_DIM + lane;
        for (int i = 0; i < DPL; ++i) {
          vr[k][i] = u0 + k < n_valid ? kload(kv_pool[v_off + 32 * i]) : 0.0f;
        }
      }
      for (int k = 0; k < VROWS; ++k) {
        for (int g = 0; g < GROUP_SIZE; ++g) {
          const float p = kshfl(s[g], u0 + k);  // 0 from lanes past the context
          for (int i = 0; i < DPL; ++i) acc[g][i] += p * vr[k][i];
        }
      }
    }
  }

  // Merge the warps: each rescales its (l, acc) to the group-wide max, then a tree
  // halves the warps holding sums at every round, the upper half handing its sums to
  // the lower half through shared memory, until warp 0 holds the group's (l, acc).
  for (int g = 0; g < GROUP_SIZE; ++g) l[g] = kwarp_sum(l[g]);
  if (lane == 0) {
    for (int g = 0; g < GROUP_SIZE; ++g) sm_m[warp * GROUP_SIZE + g] = m[g];
  }
  ksync();  // every warp is past its walk: sm_buf's queries may be overwritten
  for (int g = 0; g < GROUP_SIZE; ++g) {
    float top = NEG;
    for (int w = 0; w < N_WARPS; ++w) top = kmax(top, sm_m[w * GROUP_SIZE + g]);
    const float f = kexp(m[g] - top);
    m[g] = top;
    l[g] *= f;
    for (int i = 0; i < DPL; ++i) acc[g][i] *= f;
  }
  for (int n = N_WARPS; n > 1; n = (n + 1) / 2) {  // uniform over the group
    const int half = (n + 1) / 2;  // warps [half, n) hand over to warps [0, n - half)
    if (warp >= half && warp < n) {
      const int slot = (warp - half) * SLOT;
      for (int g = 0; g < GROUP_SIZE; ++g) {
        for (int i = 0; i < DPL; ++i) sm_buf[slot + g * HEAD_DIM + lane + 32 * i] = acc[g][i];
        if (lane == 0) sm_buf[slot + GROUP_SIZE * HEAD_DIM + g] = l[g];
      }
    }
    ksync();
    if (warp < n - half) {
      const int slot = warp * SLOT;
      for (int g = 0; g < GROUP_SIZE; ++g) {
        for (int i = 0; i < DPL; ++i) acc[g][i] += sm_buf[slot + g * HEAD_DIM + lane + 32 * i];
        l[g] += sm_buf[slot + GROUP_SIZE * HEAD_DIM + g];
      }
    }
    ksync();  // the slots are read before the next round writes them
  }
"""

# Epilogue of the one-partition kernel: warp 0 normalises and writes (B, n_heads, 1, D).
_FINAL = """
  if (warp == 0) {
    for (int g = 0; g < GROUP_SIZE; ++g) {
      for (int i = 0; i < DPL; ++i) {
        const float v = l[g] > 0.0f ? acc[g][i] / l[g] : 0.0f;
        out[(head0 + g) * HEAD_DIM + lane + 32 * i] = kstore<T>(v);
      }
    }
  }
"""

# Epilogue of the split kernel: this partition's (acc, [m, l]) relative to its own
# max m, as float32 (B, n_heads, P, D) and (B, n_heads, P, 2). An empty partition
# writes m = NEG, l = 0, acc = 0, which the combine weighs by exp(NEG - M) == 0.
_PARTIAL = """
  if (warp == 0) {
    for (int g = 0; g < GROUP_SIZE; ++g) {
      const size_t h = (head0 + g) * n_parts + part;
      for (int i = 0; i < DPL; ++i) part_acc[h * HEAD_DIM + lane + 32 * i] = acc[g][i];
      if (lane == 0) {
        part_ml[h * 2] = m[g];
        part_ml[h * 2 + 1] = l[g];
      }
    }
  }
"""

# Merge the partitions, one thread per output element (seq, head, d) =
# (group_z, group_y, tid): out = sum_p e^(m_p - M) acc_p / sum_p e^(m_p - M) l_p.
_COMBINE = """
  constexpr float NEG = -1.0e30f;
  const int n_heads = part_ml_shape[1];
  const int n_parts = part_ml_shape[2];
  if (group_z >= part_ml_shape[0] || group_y >= n_heads || tid >= HEAD_DIM) return;
  const size_t head = static_cast<size_t>(group_z) * n_heads + group_y;
  float top = NEG;
  for (int p = 0; p < n_parts; ++p) top = kmax(top, part_ml[(head * n_parts + p) * 2]);
  float num = 0.0f;
  float den = 0.0f;
  for (int p = 0; p < n_parts; ++p) {
    const float w = kexp(part_ml[(head * n_parts + p) * 2] - top);
    den += w * part_ml[(head * n_parts + p) * 2 + 1];
    num += w * part_acc[(head * n_parts + p) * HEAD_DIM + tid];
  }
  out[head * HEAD_DIM + tid] = kstore<T>(den > 0.0f ? num / den : 0.0f);
"""


def build_kernels(backend: Backend) -> tuple[object, object, object]:
    """(one-partition, split-K, combine) kernel objects for ``backend`` (construction
    compiles nothing)."""
    parts = ["part_acc", "part_ml"]
    return (
        make_kernel(backend, "paged_decode_attention", INPUTS, ["out"], _BODY + _FINAL),
        make_kernel(backend, "paged_decode_attention_split", INPUTS, parts, _BODY + _PARTIAL),
        make_kernel(backend, "paged_decode_attention_combine", parts, ["out"], _COMBINE),
    )
