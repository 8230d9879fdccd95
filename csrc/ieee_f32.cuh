// IEEE float32 arithmetic that no compiler flag changes: round to nearest even, subnormals kept (no .ftz),
// never contracted into an FMA. The INT8 mode (out/INT8_SPEC.md) must round exactly like its CPU emulation
// (liteattn_ops/core/quant.py), and the kernels are built with --use_fast_math; inline PTX pins each rounding.
#pragma once
#include <cstdint>

namespace liteattn {
namespace ieee {

__device__ __forceinline__ float add(float a, float b) {
  float r;
  asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float sub(float a, float b) {
  float r;
  asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float mul(float a, float b) {
  float r;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float div(float a, float b) {
  float r;
  asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
// Round half to even to an integer (NaN -> 0, out of range saturates; callers clamp anyway).
__device__ __forceinline__ int rint(float x) {
  int r;
  asm("cvt.rni.s32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}
// Round to bfloat16 / float16 (nearest even, subnormals kept) and back: exact widening.
__device__ __forceinline__ float round_to_bf16(float x) {
  uint16_t h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(x));
  return __uint_as_float(uint32_t(h) << 16);
}
__device__ __forceinline__ float round_to_fp16(float x) {
  uint16_t h;
  float r;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
  asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(h));
  return r;
}

}  // namespace ieee
}  // namespace liteattn
