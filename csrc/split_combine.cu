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

// One warp per row of a tail tile: grid (tail tiles, ceil(BM / kCombineWarps)); lane l takes columns l, l + 32, ...
template <class Element>
__global__ void __launch_bounds__(32 * kCombineWarps) split_combine_kernel(const SplitCombineArgs a) {
  const int tail_tile = blockIdx.x;
  const int local = blockIdx.y * kCombineWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  // The tile's state row (b * H + h) * Mt + m: the dense path's linear order, or the skip path's schedule.
  const int bh_m = a.schedule != nullptr ? a.schedule[a.whole + tail_tile] : a.whole + tail_tile;
  const int m = bh_m % a.num_m_tiles, bh = bh_m / a.num_m_tiles;
  const int row = m * a.bm + local;
  if (local >= a.bm || row >= a.seqlen_q) return;
  const int unit0 = tail_tile * a.chunks;
  float lse_max = -INFINITY;
  bool nan_sum = false;
  for (int c = 0; c < a.chunks; ++c) {
    const float l = a.partial_lse[int64_t(unit0 + c) * a.bm + local];
    nan_sum |= isnan(l);
    lse_max = fmaxf(lse_max, l);
  }
  float weight[kSplitMaxChunks], total = 0.f;
#pragma unroll
  for (int c = 0; c < kSplitMaxChunks; ++c) {
    const float l = c < a.chunks ? a.partial_lse[int64_t(unit0 + c) * a.bm + local] : -INFINITY;
    weight[c] = lse_max == -INFINITY || !(l > -INFINITY) ? 0.f : expf(l - lse_max);
    total += weight[c];
  }
  const float inv_total = total > 0.f ? 1.f / total : 0.f;
  Element* out = static_cast<Element*>(a.out) + int64_t(bh / a.heads) * a.out_stride_b +
                 int64_t(bh % a.heads) * a.out_stride_h + int64_t(row) * a.out_stride_s;
  for (int d = lane; d < a.head_dim; d += 32) {
    float o = 0.f;
#pragma unroll
    for (int c = 0; c < kSplitMaxChunks; ++c)
      if (c < a.chunks) o += weight[c] * a.partial_o[(int64_t(unit0 + c) * a.bm + local) * a.head_dim + d];
    out[d] = to_element<Element>(nan_sum ? NAN : o * inv_total);
  }
  if (lane == 0)
    a.lse[int64_t(bh) * a.seqlen_q + row] = total > 0.f && !nan_sum ? lse_max + logf(total) : -INFINITY;
}

}  // namespace

void launch_split_combine(const SplitCombineArgs& a) {
  const dim3 grid(unsigned(a.units / a.chunks), unsigned((a.bm + kCombineWarps - 1) / kCombineWarps));
  auto stream = static_cast<cudaStream_t>(a.stream);
  if (a.dtype == DType::kBFloat16) {
    prefer_forward_carveout(reinterpret_cast<const void*>(split_combine_kernel<__nv_bfloat16>));
    split_combine_kernel<__nv_bfloat16><<<grid, 32 * kCombineWarps, 0, stream>>>(a);
  } else {
    prefer_forward_carveout(reinterpret_cast<const void*>(split_combine_kernel<__half>));
    split_combine_kernel<__half><<<grid, 32 * kCombineWarps, 0, stream>>>(a);
  }
}

}  // namespace liteattn
