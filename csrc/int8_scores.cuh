// INT8 Q/K mode, consumer side (out/INT8_SPEC.md step 3): the s8 x s8 -> s32 accumulator of S = Q8 K8^T becomes
// scores in log2 units, s_log2 = float(x) * c with c = (q_scale[m] * k_scale[n]) * scale_log2.
//
// The accumulator x is exact (|x| <= 127 * 127 * 128 < 2^22), so it is turned into a float without I2F (a
// quarter-rate conversion on sm_90, as slow as the exponentials): the int32 x + 0x4B400000 read as a float is
// exactly kMagic + x with kMagic = 1.5 * 2^23 (one IADD per element). Then
// - the row max of a tile is taken on these floats (their order is x's), and the spec's l = max_j round(x_j * c)
//   is computed as round((max - kMagic) * c): rounding is monotone, so for c >= 0 the two are equal bit for bit,
//   and the skip decisions equal the CPU emulation's;
// - the exponent of P is one FFMA, f * c + (-(kMagic * c) - row_max), as the bf16 path's s * scale_log2 - row_max.
//   Its rounding differs from round(x * c) - row_max by at most ~ulp(kMagic * c) (~1e-4 log2 units for N(0,1)
//   inputs), far below the bf16/fp16 rounding of P itself; P is not part of the bitwise contract.
// c = 0 (an all-zero Q or K block) makes every valid score 0; the exponentials then use c = FLT_MIN (x * FLT_MIN
// is ~1e-31: the same P) so that a masked column (f = -inf) still gives exp2(-inf) = 0 and not NaN. c = NaN (a
// block with an inf or NaN) makes every score NaN, as the spec says. c = +inf (|q| * |k| beyond ~1e42) is not
// reproduced bit for bit.
#pragma once
#include <cfloat>
#include <cstdint>

#include <cute/tensor.hpp>

#include "ieee_f32.cuh"

namespace liteattn {

constexpr float kInt8Magic = 12582912.0f;  // 1.5 * 2^23
constexpr int32_t kInt8MagicBits = 0x4B400000;

// In place: every int32 accumulator value x becomes the bits of the float kInt8Magic + x.
template <class Frag>
__device__ __forceinline__ void int8_accumulator_to_magic(Frag& acc) {
  constexpr int kN = decltype(cute::size(acc))::value;
#pragma unroll
  for (int i = 0; i < kN; ++i) acc(i) += kInt8MagicBits;
}

// The OnlineSoftmax score policy of one (query tile, key tile) pair in INT8 mode (softmax.cuh: RawScores is the
// bf16/fp16 one).
struct Int8Scores {
  float c;           // the spec's multiplier
  float exp_c;       // c for the exponentials (>= FLT_MIN unless NaN)
  float exp_offset;  // -(kInt8Magic * exp_c)

  __device__ __forceinline__ static Int8Scores make(float q_scale, float k_scale, float scale_log2) {
    Int8Scores s;
    s.c = ieee::mul(ieee::mul(q_scale, k_scale), scale_log2);
    s.exp_c = s.c < FLT_MIN ? FLT_MIN : s.c;  // NaN stays NaN
    s.exp_offset = -(kInt8Magic * s.exp_c);
    return s;
  }
  // Row max of the magic floats -> the row max of the scores in log2 units (exact, see above).
  __device__ __forceinline__ float max_to_log2(float max) const { return ieee::mul(ieee::sub(max, kInt8Magic), c); }
  __device__ __forceinline__ float exp_scale() const { return exp_c; }
  __device__ __forceinline__ float exp_bias(float row_max) const { return exp_offset - row_max; }
};

// The k_scale of each visited key tile, from global memory (B*H*Nt floats: L2-resident, and every consumer thread
// reads the same address, so one broadcast load per warp). Read directly rather than handed over by the producer
// with the K tile: no shared-memory slot to hand over (the v5/v6 lesson: an mbarrier-ordered hand-off is correct
// but racecheck cannot follow it), and the load is issued one tile ahead, so its latency hides under a GEMM.
// The dense-mode specialisation does nothing.
template <bool kInt8>
struct KScaleReader {
  template <class Params, class Tile>
  __device__ KScaleReader(Params const&, Tile const&) {}
  __device__ __forceinline__ float load(int) const { return 0.f; }
};

template <>
struct KScaleReader<true> {
  const float* row;
  template <class Params, class Tile>
  __device__ KScaleReader(Params const& p, Tile const& tile)
      : row(p.k_scale + (int64_t(tile.b) * p.heads + tile.h) * p.num_n_tiles) {}
  // n < 0 (the dense visit order is done): any valid tile, the value is not used.
  __device__ __forceinline__ float load(int n) const { return __ldg(row + (n < 0 ? 0 : n)); }
};

}  // namespace liteattn
