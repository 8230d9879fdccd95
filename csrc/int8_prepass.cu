// INT8 Q/K pre-pass (out/INT8_SPEC.md steps 1-2): K's per-channel mean over the sequence, then Q per BM-row
// block and K - mean per BN-row block quantized to int8 with one float32 scale per block. Two kernels on the
// caller's stream, no host synchronisation (CUDA-graph capturable), every rounding pinned by ieee_f32.cuh:
//   kmean_partial_kernel  grid (splits, H, B): column sums of K over one slice of rows -> partial[b, h, split, :]
//   quantize_kernel       grid (B*H*Mt + B*H*Nt): one Q block or K block per CTA, held in registers between the
//                         amax pass and the quantization pass (each input byte is read once). Every CTA first
//                         adds the partial sums of its (b, h) in split order (deterministic) into mu; a K block
//                         subtracts it, a Q block writes q[i] . mu per row (the LSE correction, see liteattn.h).
// Bandwidth: q and k are read once more than the kernel reads them (k twice), int8 q8/k8 written once:
// 32760 x 12 x 128 bf16 moves ~0.4 GB, ~0.1 ms at 4 TB/s (~1 % of the attention).
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "ieee_f32.cuh"
#include "liteattn.h"
#include "liteattn_kernels.h"  // generated: LITEATTN_FOR_EACH_KERNEL

namespace liteattn {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// The mean kernel aims at about this many CTAs (a few per SM), each summing at least kMeanMinRows rows.
constexpr int kMeanTargetCtas = 512;
constexpr int kMeanMinRows = 256;

// A thread handles vectors of 8 consecutive channels of one row (16 bytes of input); a pass of the CTA covers
// kRowsPerPass rows, and every thread keeps the same 8 channels in every pass.
template <int kD>
struct RowVectors {
  static_assert(kD % 8 == 0 && kThreads % (kD / 8) == 0);
  static constexpr int kVecsPerRow = kD / 8;
  static constexpr int kRowsPerPass = kThreads / kVecsPerRow;
};

// 8 elements (16 bytes) -> float32, exactly.
template <DType kDType>
__device__ __forceinline__ void widen8(uint4 raw, float (&x)[8]) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (kDType == DType::kBFloat16) {
      x[2 * i] = __uint_as_float(w[i] << 16);
      x[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    } else {
      float lo, hi;
      asm("cvt.f32.f16 %0, %1;" : "=f"(lo) : "h"(uint16_t(w[i] & 0xffffu)));
      asm("cvt.f32.f16 %0, %1;" : "=f"(hi) : "h"(uint16_t(w[i] >> 16)));
      x[2 * i] = lo;
      x[2 * i + 1] = hi;
    }
  }
}

template <DType kDType>
__device__ __forceinline__ float round_to_input(float x) {
  if constexpr (kDType == DType::kBFloat16) return ieee::round_to_bf16(x);
  else return ieee::round_to_fp16(x);
}

__device__ __forceinline__ uint4 load16(const uint16_t* ptr) { return __ldg(reinterpret_cast<const uint4*>(ptr)); }

// Column sums of k[b, h, rows of this split, :] in float32 -> partial[((b * H + h) * kInt8MeanMaxSplits + split) * D].
template <DType kDType, int kD>
__global__ void __launch_bounds__(kThreads) kmean_partial_kernel(const uint16_t* __restrict__ k, int64_t stride_b,
                                                                 int64_t stride_h, int64_t stride_s, int seqlen_k,
                                                                 int rows_per_split, float* __restrict__ partial) {
  using V = RowVectors<kD>;
  __shared__ float column_sums[V::kRowsPerPass][kD];
  const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int cg = threadIdx.x % V::kVecsPerRow, r0 = threadIdx.x / V::kVecsPerRow;
  const int row_begin = split * rows_per_split;
  const int row_end = min(seqlen_k, row_begin + rows_per_split);
  const uint16_t* base = k + b * stride_b + h * stride_h + cg * 8;

  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  auto add_row = [&](uint4 raw) {
    float x[8];
    widen8<kDType>(raw, x);
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[j] = ieee::add(acc[j], x[j]);
  };
  constexpr int kUnroll = 4;  // rows in flight per thread
  int row = row_begin + r0;
  for (; row + (kUnroll - 1) * V::kRowsPerPass < row_end; row += kUnroll * V::kRowsPerPass) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) raw[u] = load16(base + int64_t(row + u * V::kRowsPerPass) * stride_s);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) add_row(raw[u]);
  }
  for (; row < row_end; row += V::kRowsPerPass) add_row(load16(base + int64_t(row) * stride_s));

#pragma unroll
  for (int j = 0; j < 8; ++j) column_sums[r0][cg * 8 + j] = acc[j];
  __syncthreads();
  if (threadIdx.x < kD) {
    float sum = 0.f;
    for (int r = 0; r < V::kRowsPerPass; ++r) sum = ieee::add(sum, column_sums[r][threadIdx.x]);
    partial[((int64_t(b) * gridDim.y + h) * kInt8MeanMaxSplits + split) * kD + threadIdx.x] = sum;
  }
}

struct QuantizeParams {
  const uint16_t* q;
  const uint16_t* k;
  int64_t q_stride[3], k_stride[3];
  int heads, seqlen_q, seqlen_k, num_m_tiles, num_n_tiles, mean_splits;
  int64_t q_blocks;  // B * H * Mt: the CTAs that take Q blocks
  int8_t* q8;
  int8_t* k8;
  float* q_scale;
  float* k_scale;
  float* k_mean;
  float* q_mu;
  const float* partial;
};

// One block of one (b, h): CTAs [0, B*H*Mt) take the Q blocks, the rest the K blocks.
template <DType kDType, int kD>
__global__ void __launch_bounds__(kThreads) quantize_kernel(const __grid_constant__ QuantizeParams p) {
  using V = RowVectors<kD>;
  constexpr TileShape kTile = tile_shape(kD, kDType);
  constexpr int kMaxRows = kTile.bm > kTile.bn ? kTile.bm : kTile.bn;
  constexpr int kPasses = (kMaxRows + V::kRowsPerPass - 1) / V::kRowsPerPass;
  __shared__ float mu_s[kD];
  __shared__ uint32_t warp_amax[kWarps];

  const bool is_k = int64_t(blockIdx.x) >= p.q_blocks;  // uniform per CTA
  const int64_t index = is_k ? int64_t(blockIdx.x) - p.q_blocks : int64_t(blockIdx.x);
  const int tiles = is_k ? p.num_n_tiles : p.num_m_tiles;
  const int block_rows = is_k ? kTile.bn : kTile.bm;
  const int seqlen = is_k ? p.seqlen_k : p.seqlen_q;
  const int64_t bh = index / tiles;
  const int t = int(index - bh * tiles);
  const int b = int(bh / p.heads), h = int(bh - int64_t(b) * p.heads);
  const int row_begin = t * block_rows;
  const int rows = min(seqlen - row_begin, block_rows);
  const int64_t* stride = is_k ? p.k_stride : p.q_stride;
  const uint16_t* src = (is_k ? p.k : p.q) + b * stride[0] + h * stride[1] + int64_t(row_begin) * stride[2];
  const int cg = threadIdx.x % V::kVecsPerRow, r0 = threadIdx.x / V::kVecsPerRow;

  // The block's rows, loaded once (every load in flight before the first use).
  uint4 raw[kPasses];
#pragma unroll
  for (int pass = 0; pass < kPasses; ++pass) {
    const int r = pass * V::kRowsPerPass + r0;
    raw[pass] = r < rows ? load16(src + int64_t(r) * stride[2] + cg * 8) : make_uint4(0u, 0u, 0u, 0u);
  }

  // mu = round_to_input(sum of the splits' column sums, in split order, / S_k): the same bits in every CTA.
  if (threadIdx.x < kD) {
    const float* col = p.partial + bh * kInt8MeanMaxSplits * kD + threadIdx.x;
    float sum = 0.f;
    for (int s = 0; s < p.mean_splits; ++s) sum = ieee::add(sum, col[s * kD]);
    const float mean = round_to_input<kDType>(ieee::div(sum, float(p.seqlen_k)));
    mu_s[threadIdx.x] = mean;
    if (is_k && t == 0) p.k_mean[bh * kD + threadIdx.x] = mean;
  }
  __syncthreads();
  float mu[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) mu[j] = mu_s[cg * 8 + j];

  if (!is_k) {
    // q[i] . mu for each row (the lanes of a row are kVecsPerRow consecutive lanes of one warp); then Q is
    // quantized as it is (mu = 0 below).
#pragma unroll
    for (int pass = 0; pass < kPasses; ++pass) {
      const int r = pass * V::kRowsPerPass + r0;
      float x[8];
      widen8<kDType>(raw[pass], x);
      float dot = 0.f;
#pragma unroll
      for (int j = 0; j < 8; ++j) dot = fmaf(x[j], mu[j], dot);
#pragma unroll
      for (int lanes = 1; lanes < V::kVecsPerRow; lanes *= 2) dot += __shfl_xor_sync(0xffffffffu, dot, lanes);
      if (cg == 0 && r < rows) p.q_mu[bh * seqlen + row_begin + r] = dot;
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) mu[j] = 0.f;
  }

  // amax over |x| as the bits of non-negative floats (their order is the values' order; inf and NaN sort last).
  uint32_t amax_bits = 0;
#pragma unroll
  for (int pass = 0; pass < kPasses; ++pass) {
    if (pass * V::kRowsPerPass + r0 < rows) {
      float x[8];
      widen8<kDType>(raw[pass], x);
#pragma unroll
      for (int j = 0; j < 8; ++j) amax_bits = max(amax_bits, __float_as_uint(ieee::sub(x[j], mu[j])) & 0x7fffffffu);
    }
  }
  amax_bits = __reduce_max_sync(0xffffffffu, amax_bits);
  if (threadIdx.x % 32 == 0) warp_amax[threadIdx.x / 32] = amax_bits;
  __syncthreads();
#pragma unroll
  for (int w = 0; w < kWarps; ++w) amax_bits = max(amax_bits, warp_amax[w]);
  const float amax = __uint_as_float(amax_bits);
  const bool finite = amax_bits < 0x7f800000u;
  const bool usable = finite && amax_bits != 0u;  // else every int8 value is 0
  const float inv = usable ? ieee::div(127.f, amax) : 0.f;

  int8_t* dst = (is_k ? p.k8 : p.q8) + (bh * seqlen + row_begin) * kD + cg * 8;
#pragma unroll
  for (int pass = 0; pass < kPasses; ++pass) {
    const int r = pass * V::kRowsPerPass + r0;
    if (r < rows) {
      float x[8];
      widen8<kDType>(raw[pass], x);
      uint32_t packed[2] = {0u, 0u};
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        int v = ieee::rint(ieee::mul(ieee::sub(x[j], mu[j]), inv));
        v = usable ? min(127, max(-127, v)) : 0;
        packed[j / 4] |= (uint32_t(v) & 0xffu) << (8 * (j % 4));
      }
      *reinterpret_cast<uint2*>(dst + int64_t(r) * kD) = make_uint2(packed[0], packed[1]);
    }
  }
  if (threadIdx.x == 0) {
    float* scale = is_k ? p.k_scale : p.q_scale;
    scale[bh * tiles + t] = finite ? ieee::div(amax, 127.f) : __uint_as_float(0x7fc00000u);
  }
}

void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument("liteattn._C.quantize_qk: " + message);
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("liteattn: ") + what + ": " + cudaGetErrorString(err));
}

template <DType kDType, int kD>
void launch(const QuantArgs& a) {
  constexpr TileShape kTile = tile_shape(kD, kDType);
  const int bh = a.batch * a.heads;
  const int num_m_tiles = (a.seqlen_q + kTile.bm - 1) / kTile.bm;
  const int num_n_tiles = (a.seqlen_k + kTile.bn - 1) / kTile.bn;
  auto stream = static_cast<cudaStream_t>(a.stream);

  // Mean: enough splits for ~kMeanTargetCtas CTAs, at most kInt8MeanMaxSplits, at least kMeanMinRows rows each.
  int splits = (kMeanTargetCtas + bh - 1) / bh;
  splits = splits < kInt8MeanMaxSplits ? splits : kInt8MeanMaxSplits;
  const int max_splits_by_rows = (a.seqlen_k + kMeanMinRows - 1) / kMeanMinRows;
  splits = splits < max_splits_by_rows ? splits : max_splits_by_rows;
  constexpr int kRowQuantum = RowVectors<kD>::kRowsPerPass;
  int rows_per_split = (a.seqlen_k + splits - 1) / splits;
  rows_per_split = (rows_per_split + kRowQuantum - 1) / kRowQuantum * kRowQuantum;
  splits = (a.seqlen_k + rows_per_split - 1) / rows_per_split;  // none empty
  kmean_partial_kernel<kDType, kD><<<dim3(splits, a.heads, a.batch), kThreads, 0, stream>>>(
      static_cast<const uint16_t*>(a.k), a.k_stride[0], a.k_stride[1], a.k_stride[2], a.seqlen_k, rows_per_split,
      a.partial);
  check(cudaGetLastError(), "INT8 mean kernel launch");

  QuantizeParams p{};
  p.q = static_cast<const uint16_t*>(a.q);
  p.k = static_cast<const uint16_t*>(a.k);
  for (int i = 0; i < 3; ++i) {
    p.q_stride[i] = a.q_stride[i];
    p.k_stride[i] = a.k_stride[i];
  }
  p.heads = a.heads;
  p.seqlen_q = a.seqlen_q;
  p.seqlen_k = a.seqlen_k;
  p.num_m_tiles = num_m_tiles;
  p.num_n_tiles = num_n_tiles;
  p.mean_splits = splits;
  p.q_blocks = int64_t(bh) * num_m_tiles;
  p.q8 = a.q8;
  p.k8 = a.k8;
  p.q_scale = a.q_scale;
  p.k_scale = a.k_scale;
  p.k_mean = a.k_mean;
  p.q_mu = a.q_mu;
  p.partial = a.partial;
  const int64_t blocks = int64_t(bh) * (num_m_tiles + num_n_tiles);
  require(blocks < (int64_t(1) << 31), "too many blocks");
  quantize_kernel<kDType, kD><<<unsigned(blocks), kThreads, 0, stream>>>(p);
  check(cudaGetLastError(), "INT8 quantize kernel launch");
}

bool vector_loadable(const void* ptr, const std::array<int64_t, 3>& stride, const std::array<int64_t, 3>& sizes) {
  return tma_compatible(reinterpret_cast<uint64_t>(ptr), stride, sizes, 2);
}

}  // namespace

void quantize_qk(const QuantArgs& a) {
  require(a.batch >= 1 && a.heads >= 1 && a.seqlen_q >= 1 && a.seqlen_k >= 1, "batch, heads and lengths must be >= 1");
  require(a.batch <= 65535 && a.heads <= 65535, "batch and heads must each be <= 65535");
  require(tile_shape(a.head_dim, a.dtype).bm > 0, "no kernel for this (head_dim, dtype)");
  require(a.q && a.k && a.q8 && a.k8 && a.q_scale && a.k_scale && a.k_mean && a.q_mu && a.partial,
          "every pointer must be a non-null device address");
  require(vector_loadable(a.q, a.q_stride, {a.batch, a.heads, a.seqlen_q}) &&
              vector_loadable(a.k, a.k_stride, {a.batch, a.heads, a.seqlen_k}),
          "q and k must have 16-byte aligned addresses and (b, h, s) strides that are positive multiples of 8 "
          "elements");
  require(reinterpret_cast<uint64_t>(a.q8) % 16 == 0 && reinterpret_cast<uint64_t>(a.k8) % 16 == 0,
          "q8 and k8 must be 16-byte aligned");
#define LITEATTN_QUANTIZE_CASE(HEAD_DIM, DTYPE) \
  if (a.head_dim == HEAD_DIM && a.dtype == DType::DTYPE) return launch<DType::DTYPE, HEAD_DIM>(a);
  LITEATTN_FOR_EACH_KERNEL(LITEATTN_QUANTIZE_CASE)
#undef LITEATTN_QUANTIZE_CASE
  require(false, "no kernel for this (head_dim, dtype)");
}

}  // namespace liteattn
