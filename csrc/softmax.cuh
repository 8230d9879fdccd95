// Softmax stage: the online softmax over the wgmma accumulator of one consumer warpgroup
// (64 rows): tile row max, running max and sum, probabilities, O rescale. A score policy says how
// the accumulator values map to log2 units: RawScores here (bf16/fp16 Q K^T: s * scale * log2 e),
// Int8Scores in int8_scores.cuh (INT8 mode).
// Fragment layout of a 64xN fp32 wgmma accumulator (and of the 16-bit A operand built
// from it): value i of a thread sits at row  warp*16 + lane/4 + 8*((i>>1)&1),
// column (i>>2)*8 + 2*(lane%4) + (i&1). So each thread holds two rows, and a row's
// values are spread over the 4 lanes of a quad.
#pragma once
#include <cute/tensor.hpp>
#include <cfloat>
#include <cmath>

namespace liteattn {

__device__ __forceinline__ int frag_row_half(int i) { return (i >> 1) & 1; }
__device__ __forceinline__ int frag_col(int i, int lane) { return (i >> 2) * 8 + 2 * (lane & 3) + (i & 1); }

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Score policy of the bf16/fp16 path: the accumulator holds q.k; log2 units are s * scale_log2.
struct RawScores {
  float scale_log2;
  __device__ __forceinline__ float max_to_log2(float max) const { return max * scale_log2; }
  __device__ __forceinline__ float exp_scale() const { return scale_log2; }
  __device__ __forceinline__ float exp_bias(float row_max) const { return -row_max; }
};

// Running state of the two rows a thread owns. `row_max` is the running max in log2 units
// (score * scale * log2 e): the skip test's r. `row_sum` is this thread's partial sum (quad-reduced only
// at the end), relative to ref_max(): the max the exponentials are taken against, which is row_max
// itself, or with kLazy (FlashAttention-4's conditional rescale) the last max at which the warp
// rescaled: a warp rescales O and its sums only when some row's max has grown by more than
// kLazyRescaleLog2 since, so P stays below 2^kLazyRescaleLog2 and O, the sums and the LSE
// (ref_max + log2 sum) are the same numbers up to rounding; the rescale is skipped on almost every
// tile after the first few.
constexpr float kLazyRescaleLog2 = 8.f;

// The max the exponentials are taken against is never -inf: while a row has seen only -inf scores (a row, or a
// split chunk, whose first visited tiles have every score -inf: -inf keys, overflowing q.k), kNoMax stands in
// for it, so those scores give exp2(-inf - kNoMax) = 0 instead of exp2(-inf + inf) = NaN and the row goes on as
// the reference's does. fmaxf(x, kNoMax) == x for every finite x, so finite rows keep their bits.
constexpr float kNoMax = -FLT_MAX;

// kTreeMax: the tile's row max over 4 independent chains per row (11-deep at BN 176) instead of one
// (44-deep): the max is exact in any order, so the same bits, sooner.
template <bool kLazy, bool kTreeMax = false>
struct OnlineSoftmax {
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};
  float lazy_max[2] = {kNoMax, kNoMax};  // kLazy only (dead otherwise)

  // The LSE's max (epilogue.cuh; used only where the row sum is > 0, so never kNoMax there).
  __device__ __forceinline__ float ref_max(int r) const { return kLazy ? lazy_max[r] : row_max[r]; }
  // The max the exponentials are taken against: ref_max, with kNoMax for -inf.
  __device__ __forceinline__ float exp_max(int r) const { return kLazy ? lazy_max[r] : fmaxf(row_max[r], kNoMax); }

  // With kMask, masks columns >= valid_cols when valid_cols < BN (a partial last tile);
  // returns the per-row tile max in log2 units.
  template <bool kMask, class Scores, class Frag>
  __device__ __forceinline__ void tile_max(Frag& s, int lane, int valid_cols, Scores const& scores,
                                           float (&tile_max_log2)[2]) {
    constexpr int kN = decltype(cute::size(s))::value;
    if (kMask && valid_cols < 2 * kN) {  // BN = 2 * kN columns
#pragma unroll
      for (int i = 0; i < kN; ++i)
        if (frag_col(i, lane) >= valid_cols) s(i) = -INFINITY;
    }
    // Values i of one row half come in column groups of 2 (i >> 2); chain c takes the groups g with g % kChains == c.
    constexpr int kChains = kTreeMax ? 4 : 1;
    float mx[2][kChains];
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int c = 0; c < kChains; ++c) mx[r][c] = -INFINITY;
#pragma unroll
    for (int i = 0; i < kN; ++i) {
      float& m = mx[frag_row_half(i)][(i >> 2) % kChains];
      m = fmaxf(m, s(i));
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
#pragma unroll
      for (int width = kChains / 2; width > 0; width /= 2)
#pragma unroll
        for (int c = 0; c < width; ++c) mx[r][c] = fmaxf(mx[r][c], mx[r][c + width]);
      tile_max_log2[r] = scores.max_to_log2(quad_max(mx[r][0]));
    }
  }

  // Updates the running max with the tile max, turns s into probabilities
  // exp2(s*scale_log2 - ref_max) (RawScores) and, when it returns true, the factor that rescales the
  // old O (always true without kLazy; warp-uniform with it).
  template <class Scores, class Frag>
  __device__ __forceinline__ bool update(Frag& s, const float (&tile_max_log2)[2], Scores const& scores,
                                         float (&correction)[2]) {
    constexpr int kN = decltype(cute::size(s))::value;
    bool rescale = true;
    if constexpr (kLazy) {
      float new_max[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) new_max[r] = fmaxf(row_max[r], tile_max_log2[r]);
      // kNoMax + 8 = kNoMax: the first tile with a finite max always rescales (O and the sums are 0 then); a
      // tile of -inf scores before it does not, and its exponentials are 0 against kNoMax.
      rescale = __any_sync(0xffffffffu, (new_max[0] > lazy_max[0] + kLazyRescaleLog2) |
                                            (new_max[1] > lazy_max[1] + kLazyRescaleLog2));
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        row_max[r] = new_max[r];
        if (rescale) {
          correction[r] = exp2f(lazy_max[r] - new_max[r]);
          lazy_max[r] = new_max[r];
          row_sum[r] *= correction[r];
        }
      }
    } else {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float old_max = row_max[r];
        row_max[r] = fmaxf(old_max, tile_max_log2[r]);
        correction[r] = exp2f(old_max - exp_max(r));  // 0 while old_max is -inf
        row_sum[r] *= correction[r];
      }
    }
    const float bias[2] = {scores.exp_bias(exp_max(0)), scores.exp_bias(exp_max(1))};
#pragma unroll
    for (int i = 0; i < kN; ++i) {
      const int r = frag_row_half(i);
      s(i) = exp2f(fmaf(s(i), scores.exp_scale(), bias[r]));
      row_sum[r] += s(i);
    }
    return rescale;
  }
};

// O *= correction, row by row.
template <class Frag>
__device__ __forceinline__ void rescale_rows(Frag& o, const float (&correction)[2]) {
  constexpr int kN = decltype(cute::size(o))::value;
#pragma unroll
  for (int i = 0; i < kN; ++i) o(i) *= correction[frag_row_half(i)];
}

}  // namespace liteattn
