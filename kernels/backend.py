"""Which GPU backend MLX runs on, and the few lines that let one kernel body serve both.

A kernel body in ``kernels/`` is written once, in the common subset of CUDA C++ and
the Metal Shading Language, against these names:

  lane, warp, tid      thread's lane in its 32-wide warp/simdgroup, warp index, index
                       in the thread group (1-D groups only)
  group_y, group_z     the thread group's position in the grid
  groups_z             number of thread groups along z
  KSHARED              qualifier of a thread-group (shared memory) array
  KALIGN16             aligns such an array to 16 bytes, for CUDA's ``kload8`` from it
                       (Metal's loads element by element: empty there)
  ksync()              barrier across the thread group, shared memory visible after it
  kwarp_sum(x)         sum of x over the 32 lanes, the same value in every lane
  kwarp_max(x)         max of x over the 32 lanes, likewise
  kshfl(x, src)        lane src's x (float or int), in every lane
  kexp(x), kmax(a, b)  float32 exp and max
  krsqrt(x)            float32 1 / sqrt(x)
  kfloat_bits(b)       the float32 whose bits are the int b (``float_bits``' inverse)
  kmini(a, b)          int min (CUDA's and Metal's spellings differ)
  kload(x)             one element of any input dtype widened to float32
  kload8(p, out)       out[0..8) = p[0..8) widened to float32; p 16-byte aligned
  kstore<T>(x)         float32 narrowed to the output dtype T

Index names go in the ``source`` prologue, not the header, because MLX's Metal
wrapper adds an attribute such as ``thread_index_in_simdgroup`` as a kernel
parameter only when its name appears in ``source``. Both Apple simdgroups and
NVIDIA warps are 32 lanes wide, so the same lane arithmetic holds on both.
"""

from __future__ import annotations

import struct
from typing import Literal

import mlx.core as mx

Backend = Literal["metal", "cuda", "cpu"]
WARP = 32  # lanes per NVIDIA warp and per Apple simdgroup


def float_bits(x: float) -> int:
    """``x`` rounded to float32, its bits as an int: how a float constant (an
    attention scale, a norm's epsilon) reaches a kernel as a template argument, which
    MLX takes as int, bool or dtype only; ``kfloat_bits`` turns it back in the kernel.

    A template constant costs the kernel nothing at run time. The same value passed
    as a one-element input array sits in MLX's small pool in host memory, which the
    GPU reads over the bus: on an H200 the decode attention kernel waited about 4 us
    a call on such reads (results/gpu/README.md)."""
    return struct.unpack("<i", struct.pack("<f", x))[0]


def active_backend() -> Backend:
    """The backend MLX's GPU stream would run on; ``"cpu"`` when there is no GPU."""
    if mx.metal.is_available():
        return "metal"
    if mx.cuda.is_available():
        return "cuda"
    return "cpu"


# Helpers live in the header, outside the kernel function. MLX puts the CUDA header
# before its own namespace and defines a macro named ``inf``: no identifier here
# may be called that.
CUDA_HEADER = """
#define KSHARED __shared__
#define KALIGN16 __align__(16)
__device__ inline void ksync() { __syncthreads(); }
__device__ inline float kwarp_sum(float x) {
  // Butterfly: every lane adds the same two operands at each step, so all 32
  // lanes end with bit-identical sums and the softmax state stays warp-uniform.
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
__device__ inline float kwarp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ inline float kshfl(float x, int src) { return __shfl_sync(0xffffffffu, x, src); }
__device__ inline int kshfl(int x, int src) { return __shfl_sync(0xffffffffu, x, src); }
__device__ inline float kexp(float x) { return expf(x); }
__device__ inline float kmax(float a, float b) { return fmaxf(a, b); }
__device__ inline float krsqrt(float x) { return rsqrtf(x); }
__device__ inline float kfloat_bits(int b) { return __int_as_float(b); }
__device__ inline int kmini(int a, int b) { return a < b ? a : b; }
__device__ inline float kload(float x) { return x; }
__device__ inline float kload(__half x) { return __half2float(x); }
__device__ inline float kload(__nv_bfloat16 x) { return __bfloat162float(x); }
// Wide loads: one 16-byte transaction per 8 half-precision elements.
struct alignas(16) kh8 { __half2 h[4]; };
struct alignas(16) kb8 { __nv_bfloat162 h[4]; };
struct alignas(16) kf4 { float f[4]; };
__device__ inline void kload8(const __half* p, float* out) {
  const kh8 v = *reinterpret_cast<const kh8*>(p);
  for (int j = 0; j < 4; ++j) {
    const float2 f = __half22float2(v.h[j]);
    out[2 * j] = f.x;
    out[2 * j + 1] = f.y;
  }
}
__device__ inline void kload8(const __nv_bfloat16* p, float* out) {
  const kb8 v = *reinterpret_cast<const kb8*>(p);
  for (int j = 0; j < 4; ++j) {
    const float2 f = __bfloat1622float2(v.h[j]);
    out[2 * j] = f.x;
    out[2 * j + 1] = f.y;
  }
}
__device__ inline void kload8(const float* p, float* out) {
  const kf4 a = *reinterpret_cast<const kf4*>(p);
  const kf4 b = *reinterpret_cast<const kf4*>(p + 4);
  for (int j = 0; j < 4; ++j) {
    out[j] = a.f[j];
    out[4 + j] = b.f[j];
  }
}
template <typename U> __device__ inline U kstore(float x);
template <> __device__ inline float kstore<float>(float x) { return x; }
template <> __device__ inline __half kstore<__half>(float x) { return __float2half(x); }
template <> __device__ inline __nv_bfloat16 kstore<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}
"""

CUDA_PROLOGUE = """
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int group_y = blockIdx.y;
  const int group_z = blockIdx.z;
  const int groups_z = gridDim.z;
"""

METAL_HEADER = """
#define KSHARED threadgroup
#define KALIGN16
inline void ksync() { metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup); }
inline float kwarp_sum(float x) { return metal::simd_sum(x); }
inline float kwarp_max(float x) { return metal::simd_max(x); }
inline float kshfl(float x, int src) { return metal::simd_shuffle(x, static_cast<ushort>(src)); }
inline int kshfl(int x, int src) { return metal::simd_shuffle(x, static_cast<ushort>(src)); }
inline float kexp(float x) { return metal::exp(x); }
inline float kmax(float a, float b) { return metal::max(a, b); }
inline float krsqrt(float x) { return metal::precise::rsqrt(x); }
inline float kfloat_bits(int b) { return metal::as_type<float>(b); }
inline int kmini(int a, int b) { return a < b ? a : b; }
template <typename U> inline float kload(U x) { return static_cast<float>(x); }
template <typename U> inline U kstore(float x) { return static_cast<U>(x); }
// Generic over the pointer so it takes device and constant inputs alike; the
// compiler merges the 8 adjacent loads.
template <typename P> inline void kload8(P p, thread float* out) {
  for (int j = 0; j < 8; ++j) out[j] = static_cast<float>(p[j]);
}
"""

METAL_PROLOGUE = """
  const int tid = static_cast<int>(thread_position_in_threadgroup.x);
  const int lane = static_cast<int>(thread_index_in_simdgroup);
  const int warp = static_cast<int>(simdgroup_index_in_threadgroup);
  const int group_y = static_cast<int>(threadgroup_position_in_grid.y);
  const int group_z = static_cast<int>(threadgroup_position_in_grid.z);
  const int groups_z = static_cast<int>(threadgroups_per_grid.z);
"""


def header(backend: Backend) -> str:
    """Helper functions and qualifiers for ``backend`` (``"cuda"`` or ``"metal"``)."""
    return {"cuda": CUDA_HEADER, "metal": METAL_HEADER}[backend]


def prologue(backend: Backend) -> str:
    """The index lines every kernel body starts with, for ``backend``."""
    return {"cuda": CUDA_PROLOGUE, "metal": METAL_PROLOGUE}[backend]


def compact(source: str) -> str:
    """``source`` without ``//`` comments, indentation or blank lines; line breaks
    kept (preprocessor lines need them). The kernels carry no string literals, so
    every ``//`` starts a comment.

    MLX's CUDA backend hashes a custom kernel's whole source text at every launch
    it encodes: on an H200 a kernel with 9 KB of source cost 2.3 us more host time
    a launch than one with a single line, and a batch-1 decode step launches 66
    custom kernels. Comments in the kernel text would also make MLX pass shape
    arguments for every input they name (it looks for ``<input>_shape``)."""
    lines = [line.split("//", 1)[0].strip() for line in source.splitlines()]
    if any('"' in line for line in lines):
        raise ValueError("kernel source holds a string literal: compact() could cut it")
    return "\n".join(line for line in lines if line)


def make_kernel(
    backend: Backend, name: str, inputs: list[str], outputs: list[str], body: str
) -> object:
    """An MLX custom kernel for ``backend`` from a shared ``body``: the backend's
    prologue goes in front of it and its helpers into the header, both ``compact``ed.
    Construction compiles nothing (MLX compiles on first call, per template) and
    works for Metal on any platform, which ``suites.metal_check`` relies on."""
    make = {"cuda": mx.fast.cuda_kernel, "metal": mx.fast.metal_kernel}[backend]
    return make(
        name=name,
        input_names=inputs,
        output_names=outputs,
        source=compact(prologue(backend) + body),
        header=compact(header(backend)),
    )
