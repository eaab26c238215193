// Just enough of the Metal Shading Language, as C++, to parse MLX's generated kernel
// text with clang (see suites/metal_check.py). Declarations only: nothing here
// is compiled to code. It stands in for <metal_stdlib> and MLX's Metal utils,
// which Apple's compiler sees in front of a custom kernel.
//
// Keep it strict: declare a function with the argument types Metal accepts, so a
// call the real compiler would reject (wrong arity, mixed types) fails here too.
#pragma once

// Address spaces carry no meaning for a syntax check.
#define device
#define constant
#define threadgroup
#define thread

typedef decltype(sizeof(0)) size_t;
typedef unsigned int uint;
typedef unsigned short ushort;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long int64_t;

struct uint2 {
  uint x, y;
};
struct uint3 {
  uint x, y, z;
};

// half and bfloat are arithmetic types in Metal; kernels here only convert them
// to and from float, which is all these declare.
struct half {
  half() = default;
  half(float);
  operator float() const;
};
typedef half float16_t;
struct bfloat16_t {
  bfloat16_t() = default;
  bfloat16_t(float);
  operator float() const;
};

namespace metal {
enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
void threadgroup_barrier(mem_flags);
void simdgroup_barrier(mem_flags);

// Templates, as in Metal: both arguments must have the same type.
template <typename T> T max(T, T);
template <typename T> T min(T, T);
template <typename T> T simd_sum(T);
template <typename T> T simd_max(T);
template <typename T> T simd_shuffle(T, ushort);
template <typename T> T simd_shuffle_xor(T, ushort);

// Reinterprets the bits of its argument as T (same size).
template <typename T, typename U> T as_type(U);

float exp(float);
float fast_exp(float);
float sqrt(float);
float rsqrt(float);
namespace precise {
float rsqrt(float);
}
}  // namespace metal
