"""The CUDA/Metal source of the paged prefill attention kernel, and its builder.

T >= 1 new query tokens per sequence attend over the sequence's paged K/V cache,
which already holds their own keys and values (chunked prefill: a chunk of a
prompt after earlier chunks, or after a shared prefix). Same contract as
``kernels.paged_attention.paged_attention_ops``: the query at absolute position p
sees the keys at positions 0..p that are also below the sequence's context_len.
One algorithm, one kernel body, compiled by MLX for CUDA (``mx.fast.cuda_kernel``)
or Metal (``mx.fast.metal_kernel``); ``kernels.backend`` supplies the few
per-backend lines. ``kernels.paged_prefill`` builds the kernel object once and
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

Algorithm (the decode kernel's, ``kernels.paged_decode_source``, with query rows
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
``kernels.paged_prefill`` picks Q_TILE to keep ROWS near 32 for head_dim 64 and
near 16 for head_dim 128 (a group size above that keeps Q_TILE = 1).
"""

from __future__ import annotations

from kernels.backend import Backend, make_kernel

INPUTS = ["q", "kv_pool", "block_tables", "context_lens", "positions"]

# Template constants: T (dtype), HEAD_DIM, GROUP_SIZE, KV_BLOCK (tokens per cache
# block), Q_TILE (query tokens per group), N_WARPS, SCALE_BITS (the softmax scale,
# ``kernels.backend.float_bits``). Everything else (batch, T,
# max_blocks, n_kv_heads) comes from the input shapes at run time, so a new chunk
# length or a growing block table never triggers a recompile.
_BODY = """
  constexpr int ROWS = GROUP_SIZE * Q_TILE;  // row r: head r / Q_TILE, token r % Q_TILE
  constexpr int DPL = HEAD_DIM / 32;  // V elements per lane in P.V: lane + 32 * i
  constexpr float NEG = -1.0e30f;     // finite "minus infinity": exp(NEG - m) == 0, no NaN
  constexpr int VROWS = 8;            // V rows loaded before any is used
  // Metal wants thread-group arrays at the top scope of the kernel. sm_buf holds the
  // group's scaled queries during the walk, then the merged accumulator.
  KSHARED float sm_buf[ROWS * HEAD_DIM];
  KSHARED float sm_m[N_WARPS * ROWS];
  KSHARED float sm_l[N_WARPS * ROWS];
  const int batch = context_lens_shape[0];
  const int n_kv = kv_pool_shape[3];
  const int max_blocks = block_tables_shape[1];
  const int n_new = q_shape[2];  // T, the new query tokens per sequence
  const int n_tiles = (n_new + Q_TILE - 1) / Q_TILE;
  const int seq = group_z / n_tiles;
  const int q0 = (group_z - seq * n_tiles) * Q_TILE;  // the tile's first query token
  const int kvh = group_y;
  // The grid is exact, but a group past the data must not touch memory. The test is
  // uniform over the group, so returning here cannot strand a barrier.
  if (seq >= batch || kvh >= n_kv) return;
  const int n_heads = n_kv * GROUP_SIZE;
  const int ctx = context_lens[seq];
  const int n_tok = kmini(Q_TILE, n_new - q0);  // tokens of this tile that exist
  const size_t head0 = static_cast<size_t>(seq) * n_heads + kvh * GROUP_SIZE;

  // Token i of the tile sees keys [0, lim[i]); the group walks keys [0, t_end).
  // A token past the chunk (a partial last tile) sees nothing and is not written.
  int lim[Q_TILE];
  int t_end = 0;
  for (int i = 0; i < Q_TILE; ++i) {
    lim[i] = i < n_tok ? kmini(positions[seq * n_new + q0 + i] + 1, ctx) : 0;
    t_end = lim[i] > t_end ? lim[i] : t_end;
  }

  // Row r's query is q[seq, kvh * GROUP_SIZE + r / Q_TILE, q0 + r % Q_TILE, :].
  const float sc = kfloat_bits(SCALE_BITS);
  for (int j = tid; j < ROWS * HEAD_DIM; j += N_WARPS * 32) {
    const int r = j / HEAD_DIM;
    const int g = r / Q_TILE;
    const int i = r - g * Q_TILE;
    const size_t at = ((head0 + g) * n_new + q0 + i) * HEAD_DIM + j % HEAD_DIM;
    sm_buf[j] = i < n_tok ? sc * kload(q[at]) : 0.0f;
  }
  ksync();

  float m[ROWS];  // running max, the same in every lane
  float l[ROWS];  // this lane's share of the softmax denominator
  float acc[ROWS][DPL];
  for (int r = 0; r < ROWS; ++r) {
    m[r] = NEG;
    l[r] = 0.0f;
    for (int i = 0; i < DPL; ++i) acc[r][i] = 0.0f;
  }

  // Each warp takes 32 consecutive keys at a time, one per lane.
  for (int base = warp * 32; base < t_end; base += N_WARPS * 32) {
    const int n_valid = kmini(32, t_end - base);  // warp-uniform
    const bool mine = lane < n_valid;  // lanes past t_end read nothing
    const int t = base + lane;
    int row = 0;  // pool row (block * KV_BLOCK + offset) of this lane's key
    float s[ROWS];  // scores, then probabilities, of this lane's key
    for (int r = 0; r < ROWS; ++r) s[r] = 0.0f;
    if (mine) {
      row = block_tables[seq * max_blocks + t / KV_BLOCK] * KV_BLOCK + t % KV_BLOCK;
      const size_t k_off = (static_cast<size_t>(row) * 2 * n_kv + kvh) * HEAD_DIM;
      for (int d0 = 0; d0 < HEAD_DIM; d0 += 8) {
        float kf[8];
        kload8(kv_pool + k_off + d0, kf);  // one wide load per 8 elements
        for (int r = 0; r < ROWS; ++r) {
          for (int j = 0; j < 8; ++j) s[r] += sm_buf[r * HEAD_DIM + d0 + j] * kf[j];
        }
      }
    }
    for (int r = 0; r < ROWS; ++r) {
      // Causal and context mask of row r: lim <= t_end, so a visible key is also mine.
      const bool vis = t < lim[r % Q_TILE];
      const float m_new = kmax(m[r], kwarp_max(vis ? s[r] : NEG));
      const float corr = kexp(m[r] - m_new);
      s[r] = vis ? kexp(s[r] - m_new) : 0.0f;
      l[r] = l[r] * corr + s[r];
      for (int i = 0; i < DPL; ++i) acc[r][i] *= corr;
      m[r] = m_new;
    }
    // P.V with lanes over head_dim: key u's pool row and probabilities come from
    // lane u, so each V row is one coalesced read shared by every query row. Rows
    // are fetched VROWS at a time so their loads are in flight together; a V row is
    // read only for u < n_valid, i.e. below t_end <= context_len.
    for (int u0 = 0; u0 < n_valid; u0 += VROWS) {
      float vr[VROWS][DPL];
      for (int k = 0; k < VROWS; ++k) {
        const int src = kshfl(row, u0 + k);  // u0 + k < 32: n_valid <= 32, VROWS | 32
        const size_t v_off = ((static_cast<size_t>(src) * 2 + 1) * n_kv + kvh) * HEAD_DIM + lane;
        for (int i = 0; i < DPL; ++i) {
          vr[k][i] = u0 + k < n_valid ? kload(kv_pool[v_off + 32 * i]) : 0.0f;
        }
      }
      for (int k = 0; k < VROWS; ++k) {
        for (int r = 0; r < ROWS; ++r) {
          const float p = kshfl(s[r], u0 + k);  // 0 for keys row r may not see
          for (int i = 0; i < DPL; ++i) acc[r][i] += p * vr[k][i];
        }
      }
    }
  }

  // Merge the warps: rescale each to the group-wide max, then sum through shared
  // memory one warp at a time (no float atomics needed on either backend).
  for (int r = 0; r < ROWS; ++r) l[r] = kwarp_sum(l[r]);
  if (lane == 0) {
    for (int r = 0; r < ROWS; ++r) {
      sm_m[warp * ROWS + r] = m[r];
      sm_l[warp * ROWS + r] = l[r];
    }
  }
  ksync();  // every warp is past its walk: sm_buf's queries may be overwritten
  for (int r = 0; r < ROWS; ++r) {
    float top = NEG;
    for (int w = 0; w < N_WARPS; ++w) top = kmax(top, sm_m[w * ROWS + r]);
    const float f = kexp(m[r] - top);
    for (int i = 0; i < DPL; ++i) acc[r][i] *= f;
  }
  for (int w = 0; w < N_WARPS; ++w) {
    if (warp == w) {
      for (int r = 0; r < ROWS; ++r) {
        for (int i = 0; i < DPL; ++i) {
          const int j = r * HEAD_DIM + lane + 32 * i;
          sm_buf[j] = (w == 0 ? 0.0f : sm_buf[j]) + acc[r][i];
        }
      }
    }
    ksync();
  }
  // Per row, the group's max and denominator into sm_m[r], sm_l[r]: thread r reads
  // and writes column r alone, so in place is safe.
  for (int r = tid; r < ROWS; r += N_WARPS * 32) {
    float top = NEG;
    for (int w = 0; w < N_WARPS; ++w) top = kmax(top, sm_m[w * ROWS + r]);
    float den = 0.0f;
    for (int w = 0; w < N_WARPS; ++w) den += sm_l[w * ROWS + r] * kexp(sm_m[w * ROWS + r] - top);
    sm_m[r] = top;
    sm_l[r] = den;
  }
  ksync();

  // Normalise and write the rows of the tile's existing tokens.
  for (int j = tid; j < ROWS * HEAD_DIM; j += N_WARPS * 32) {
    const int r = j / HEAD_DIM;
    const int g = r / Q_TILE;
    const int i = r - g * Q_TILE;
    if (i < n_tok) {
      const float den = sm_l[r];
      const size_t at = ((head0 + g) * n_new + q0 + i) * HEAD_DIM + j % HEAD_DIM;
      out[at] = kstore<T>(den > 0.0f ? sm_buf[j] / den : 0.0f);
    }
  }
"""


def build_kernels(backend: Backend) -> object:
    """The prefill kernel object for ``backend`` (construction compiles nothing)."""
    return make_kernel(backend, "paged_prefill_attention", INPUTS, ["out"], _BODY)
