// Epilogue stage: O / row sum from the accumulator registers into (B, S, H, D) memory (4-byte
// stores), LSE in natural-log units. Rows past S_q are not written; a row with no visited tile
// gets O = 0 and LSE = -inf. INT8 mode: lse_bias_log2 (log2 units) is added to each row's LSE
// (the smoothing's per-row constant q . mu * scale * log2 e, which softmax ignores). The split tail's key
// ranges go to float32 scratch instead (store_partial).
#pragma once
#include <cute/tensor.hpp>
#include <cutlass/numeric_conversion.h>

#include "softmax.cuh"
#include "tile_scheduler.cuh"

namespace liteattn {

// The split tail (kSplitTail, kSplitSkip): one key range's O (normalised by its own row sum) and LSE, float32, into scratch
// unit tile.unit (rows relative to the tile); split_combine_kernel merges the ranges of a tile.
template <class Tr, class TensorO>
__device__ __forceinline__ void store_partial(typename Tr::Params const& p, QueryTile tile, int row0,
                                              const bool (&row_valid)[2], int lane, const float (&inv_sum)[2],
                                              const float (&lse)[2], TensorO const& tOrO) {
  const int local0 = row0 - tile.m * Tr::kBM;
  float* o = p.split_o + int64_t(tile.unit) * Tr::kBM * Tr::kD;
  constexpr int kO = decltype(cute::size(tOrO))::value;
#pragma unroll
  for (int i = 0; i < kO; i += 2) {
    const int r = frag_row_half(i);
    if (!row_valid[r]) continue;
    *reinterpret_cast<float2*>(o + (local0 + 8 * r) * Tr::kD + frag_col(i, lane)) =
        make_float2(tOrO(i) * inv_sum[r], tOrO(i + 1) * inv_sum[r]);
  }
  if (lane % 4 == 0) {
    float* lse_rows = p.split_lse + int64_t(tile.unit) * Tr::kBM;
#pragma unroll
    for (int r = 0; r < 2; ++r)
      if (row_valid[r]) lse_rows[local0 + 8 * r] = lse[r];
  }
}

template <class Tr, class Softmax, class TensorO>
__device__ __forceinline__ void store_output(typename Tr::Params const& p, QueryTile tile, int row0,
                                             const bool (&row_valid)[2], int lane, Softmax const& softmax,
                                             TensorO const& tOrO, const float (&lse_bias_log2)[2]) {
  using Element = typename Tr::Element;
  float inv_sum[2], lse[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float sum = quad_sum(softmax.row_sum[r]);
    inv_sum[r] = sum > 0.f ? 1.f / sum : 0.f;
    if constexpr (Tr::kInt8) {
      lse[r] = sum > 0.f ? (softmax.ref_max(r) + log2f(sum) + lse_bias_log2[r]) * p.ln2 : -INFINITY;
    } else {
      lse[r] = sum > 0.f ? (softmax.ref_max(r) + log2f(sum)) * p.ln2 : -INFINITY;
    }
  }
  if constexpr (Tr::kSplitTail || Tr::kSplitSkip) {
    if (tile.unit >= 0) {
      // A range whose row sum is NaN marks its LSE NaN: the merged row then gets LSE -inf and O NaN, as the
      // unsplit row does (its sum is NaN too), instead of a finite LSE from the other ranges.
      float partial_lse[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) partial_lse[r] = isnan(quad_sum(softmax.row_sum[r])) ? NAN : lse[r];
      return store_partial<Tr>(p, tile, row0, row_valid, lane, inv_sum, partial_lse, tOrO);
    }
  }
  Element* out = p.out + tile.b * p.out_stride_b + tile.h * p.out_stride_h;
  cutlass::NumericArrayConverter<Element, float, 2> convert_pair;
  constexpr int kO = decltype(cute::size(tOrO))::value;
#pragma unroll
  for (int i = 0; i < kO; i += 2) {
    const int r = frag_row_half(i);
    if (!row_valid[r]) continue;
    const int row = row0 + 8 * r;
    cutlass::Array<float, 2> pair;
    pair[0] = tOrO(i) * inv_sum[r];
    pair[1] = tOrO(i + 1) * inv_sum[r];
    *reinterpret_cast<cutlass::Array<Element, 2>*>(out + row * p.out_stride_s + frag_col(i, lane)) =
        convert_pair(pair);
  }
  if (lane % 4 == 0) {
    float* lse_row = p.lse + (int64_t(tile.b) * p.heads + tile.h) * p.seqlen_q;
#pragma unroll
    for (int r = 0; r < 2; ++r)
      if (row_valid[r]) lse_row[row0 + 8 * r] = lse[r];
  }
}

}  // namespace liteattn
