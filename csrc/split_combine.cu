// The split tail's merge (SplitTailPlan, liteattn.h): each tail tile's `chunks` key ranges were computed by
// different CTAs into float32 scratch, O normalised by the range's own row sum and the range's LSE (natural
// log). Row i's result is sum_c w_c O_c with w_c = exp(lse_c - lse), lse = log sum_c exp(lse_c): a range whose
// row sum was 0 has lse -inf and weight 0, and a row with no weight at all gets LSE = -inf, as the forward
// kernel writes such a row. A range whose row sum was NaN (NaN scores) stored lse NaN: the row gets O = NaN and
// LSE = -inf, what the unsplit kernel writes for a NaN row sum. Host launch on the forward's stream, right after it.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "dependent_launch.cuh"
#include "liteattn.h"

namespace liteattn {
namespace {

constexpr int kCombineWarps = 8;  // rows per CTA

template <class Element>
__device__ __forceinline__ Element to_element(float x);
template <>
__device__ __forceinline__ __nv_bfloat16 to_element<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half to_element<__half>(float x) { return __float2half_rn(x); }
__device__ __forceinline__ uint32_t element_bits(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }
__device__ __forceinline__ uint32_t element_bits(__half x) { return __half_as_ushort(x); }
// Two elements in one 32-bit word, the first in the low half (little-endian memory order).
template <class Element>
__device__ __forceinline__ uint32_t pack2(float first, float second) {
  return element_bits(to_element<Element>(first)) | (element_bits(to_element<Element>(second)) << 16);
}

// One warp per row of a tail tile: grid (tail tiles, ceil(BM / kCombineWarps)); lane l takes columns 4l..4l+3 (and
// + 128, ...) as float4, several chunks' loads in flight at once (wave 20 measured the previous form, one scalar load
// per chunk and column at a time, at 16 us for 36 tail tiles of 3 chunks at head dim 128; NOTES.md wave 21).
template <class Element>
__global__ void __launch_bounds__(32 * kCombineWarps) split_combine_kernel(const SplitCombineArgs a) {
  allow_dependent_launch();    // the vote kernel (skip path) may start
  wait_for_previous_kernel();  // the forward kernel's partial results (a dependent launch: dependent_launch.cuh)
  const int tail_tile = blockIdx.x;
  const int local = blockIdx.y * kCombineWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  // The tile's state row (b * H + h) * Mt + m: the dense path's linear order, or the skip path's schedule.
  const int bh_m = a.schedule != nullptr ? a.schedule[a.whole + tail_tile] : a.whole + tail_tile;
  const int m = bh_m % a.num_m_tiles, bh = bh_m / a.num_m_tiles;
  const int row = m * a.bm + local;
  if (local >= a.bm || row >= a.seqlen_q) return;
  const int unit0 = tail_tile * a.chunks;
  const float* lse = a.partial_lse + int64_t(unit0) * a.bm + local;  // chunk c's: lse[c * bm]
  float lse_max = -INFINITY;
  bool nan_sum = false;
#pragma unroll 4
  for (int c = 0; c < a.chunks; ++c) {
    const float l = lse[c * a.bm];
    nan_sum |= isnan(l);
    lse_max = fmaxf(lse_max, l);
  }
  // Chunk c's weight exp(lse_c - lse_max): 0 for an empty chunk (-inf) or a NaN one, and for every chunk of a row
  // with no finite LSE.
  auto weight = [&](float l) { return lse_max == -INFINITY || !(l > -INFINITY) ? 0.f : expf(l - lse_max); };
  float total = 0.f;
#pragma unroll 4
  for (int c = 0; c < a.chunks; ++c) total += weight(lse[c * a.bm]);
  const float scale = nan_sum ? NAN : total > 0.f ? 1.f / total : 0.f;
  Element* out = static_cast<Element*>(a.out) + int64_t(bh / a.heads) * a.out_stride_b +
                 int64_t(bh % a.heads) * a.out_stride_h + int64_t(row) * a.out_stride_s;
  const float* partial = a.partial_o + (int64_t(unit0) * a.bm + local) * a.head_dim;
  const int64_t chunk_stride = int64_t(a.bm) * a.head_dim;
  // float4 loads need 16-byte rows (head_dim % 4 == 0; the scratch is allocated aligned) and the 4-element stores
  // 8-byte ones; any other output view takes the element-wise loop. The chunks go kGroup at a time, all of a
  // group's loads issued before the first is used.
  constexpr int kGroup = 4;
  const bool vector = a.head_dim % 4 == 0 && reinterpret_cast<uintptr_t>(out) % (4 * sizeof(Element)) == 0 &&
                      reinterpret_cast<uintptr_t>(partial) % 16 == 0;
  if (vector) {
    for (int d = 4 * lane; d < a.head_dim; d += 128) {
      float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
      for (int c0 = 0; c0 < a.chunks; c0 += kGroup) {
        float4 part[kGroup];
        float w[kGroup];
#pragma unroll
        for (int i = 0; i < kGroup; ++i) {
          const bool in = c0 + i < a.chunks;
          part[i] = in ? *reinterpret_cast<const float4*>(partial + (c0 + i) * chunk_stride + d)
                       : make_float4(0.f, 0.f, 0.f, 0.f);
          w[i] = in ? weight(lse[(c0 + i) * a.bm]) : 0.f;
        }
#pragma unroll
        for (int i = 0; i < kGroup; ++i) {
          o.x += w[i] * part[i].x;
          o.y += w[i] * part[i].y;
          o.z += w[i] * part[i].z;
          o.w += w[i] * part[i].w;
        }
      }
      *reinterpret_cast<uint2*>(out + d) =
          make_uint2(pack2<Element>(o.x * scale, o.y * scale), pack2<Element>(o.z * scale, o.w * scale));
    }
  } else {
    for (int d = lane; d < a.head_dim; d += 32) {
      float o = 0.f;
      for (int c = 0; c < a.chunks; ++c) o += weight(lse[c * a.bm]) * partial[c * chunk_stride + d];
      out[d] = to_element<Element>(o * scale);
    }
  }
  if (lane == 0)
    a.lse[int64_t(bh) * a.seqlen_q + row] = total > 0.f && !nan_sum ? lse_max + logf(total) : -INFINITY;
}

}  // namespace

void launch_split_combine(const SplitCombineArgs& a) {
  const dim3 grid(unsigned(a.units / a.chunks), unsigned((a.bm + kCombineWarps - 1) / kCombineWarps));
  auto kernel = a.dtype == DType::kBFloat16 ? split_combine_kernel<__nv_bfloat16> : split_combine_kernel<__half>;
  prefer_forward_carveout(reinterpret_cast<const void*>(kernel));
  // A dependent of the forward kernel launched just before it (dependent_launch.cuh); errors: the caller's
  // cudaGetLastError.
  (void)launch_maybe_dependent(true, kernel, grid, dim3(32 * kCombineWarps), 0, static_cast<cudaStream_t>(a.stream), a);
}

}  // namespace liteattn
