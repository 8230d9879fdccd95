// The forward kernel: one CTA per (m tile, head, batch). Warpgroup 0 is the producer
// (one thread issues the TMA loads of Q and of the visited K/V tiles into a
// kStages-deep ring); warpgroups 1.. are consumers, each owning 64 query rows: wgmma
// S = Q K^T, online softmax and the skip verdict in registers, wgmma O += P V, then
// the O / LSE epilogue and (skip path) the state write-back.
#pragma once
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_conversion.h>

#include "fwd_traits.cuh"
#include "skip_state.cuh"
#include "softmax.cuh"

namespace liteattn {

// Named barriers (id 0 is __syncthreads).
enum class NamedBarrier : uint32_t { kConsumersDone = 1 };

// C (+)= A * B on one warpgroup: fence, issue every k block, commit. The caller waits.
template <bool kZeroInit, bool kRegisterA, class TiledMma, class TA, class TB, class TC>
__device__ __forceinline__ void warpgroup_gemm(TiledMma& mma, TA& a, TB const& b, TC& c) {
  using namespace cute;
  if constexpr (kRegisterA) warpgroup_fence_operand(a);
  warpgroup_fence_operand(c);
  warpgroup_arrive();
  if constexpr (kZeroInit) mma.accumulate_ = GMMA::ScaleOut::Zero;
  CUTLASS_PRAGMA_UNROLL
  for (int kb = 0; kb < size<2>(a); ++kb) {
    cute::gemm(mma, a(_, _, kb), b(_, _, kb), c);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  warpgroup_fence_operand(c);
  if constexpr (kRegisterA) warpgroup_fence_operand(a);
}

// Float fragment -> 16-bit fragment with the same value order (packed conversions).
template <class Element, class Src, class Dst>
__device__ __forceinline__ void convert_fragment(Src const& src, Dst& dst) {
  constexpr int kN = decltype(cute::size(src))::value;
  static_assert(kN == decltype(cute::size(dst))::value);
  cutlass::NumericArrayConverter<Element, float, kN> convert;
  *reinterpret_cast<cutlass::Array<Element, kN>*>(dst.data()) =
      convert(*reinterpret_cast<cutlass::Array<float, kN> const*>(src.data()));
}

// Position in a kStages-deep ring of buffers: stage index and mbarrier phase parity.
struct PipelineState {
  int stage = 0;
  uint32_t phase = 0;
  __device__ __forceinline__ void advance(int stages) {
    if (++stage == stages) { stage = 0; phase ^= 1; }
  }
};

// A consumer warp is done with a buffer: one arrival per warp on its "empty" barrier.
__device__ __forceinline__ void release(cutlass::arch::ClusterBarrier& empty, int lane) {
  __syncwarp();
  if (lane == 0) empty.arrive();
}

template <class Tr>
__device__ __forceinline__ void producer_loop(typename Tr::Params const& p, typename Tr::SharedStorage& ss,
                                              int m, int h, int b) {
  using namespace cute;
  constexpr int kBM = Tr::kBM, kBN = Tr::kBN, kD = Tr::kD;
  Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), typename Tr::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename Tr::SmemLayoutK{});
  Tensor sVt = make_tensor(make_smem_ptr(ss.v.data()), typename Tr::SmemLayoutVt{});
  Tensor mQ = p.tma_q.get_tma_tensor(make_shape(p.seqlen_q, int32_t(kD), p.heads, p.batch));
  Tensor mK = p.tma_k.get_tma_tensor(make_shape(p.seqlen_k, int32_t(kD), p.heads, p.batch));
  Tensor mVt = p.tma_vt.get_tma_tensor(make_shape(int32_t(kD), p.seqlen_k, p.heads, p.batch));
  Tensor gQ = local_tile(mQ(_, _, h, b), Shape<Int<kBM>, Int<kD>>{}, make_coord(m, 0));    // (BM, D)
  Tensor gK = local_tile(mK(_, _, h, b), Shape<Int<kBN>, Int<kD>>{}, make_coord(_, 0));    // (BN, D, Nt)
  Tensor gVt = local_tile(mVt(_, _, h, b), Shape<Int<kD>, Int<kBN>>{}, make_coord(0, _));  // (D, BN, Nt)
  auto [tQg, tQs] = tma_partition(p.tma_q, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sQ), group_modes<0, 2>(gQ));
  auto [tKg, tKs] = tma_partition(p.tma_k, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gK));
  auto [tVg, tVs] = tma_partition(p.tma_vt, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sVt), group_modes<0, 2>(gVt));

  ss.q_full.arrive_and_expect_tx(Tr::kQBytes);
  copy(p.tma_q.with(reinterpret_cast<uint64_t&>(ss.q_full)), tQg, tQs);

  PipelineState write;
  const int n0 = first_tile(m, kBM, kBN, p.seqlen_q, p.seqlen_k, p.num_n_tiles);
  for (TileOrder<Tr::kSkip> tiles(ss.visit, ss.order, n0, p.num_n_tiles); tiles.more(); tiles.advance()) {
    const int n = tiles.current();
    ss.k_empty[write.stage].wait(write.phase ^ 1);
    ss.k_full[write.stage].arrive_and_expect_tx(Tr::kKVStageBytes);
    copy(p.tma_k.with(reinterpret_cast<uint64_t&>(ss.k_full[write.stage])), tKg(_, n), tKs(_, write.stage));
    ss.v_empty[write.stage].wait(write.phase ^ 1);
    ss.v_full[write.stage].arrive_and_expect_tx(Tr::kKVStageBytes);
    copy(p.tma_vt.with(reinterpret_cast<uint64_t&>(ss.v_full[write.stage])), tVg(_, n), tVs(_, write.stage));
    write.advance(Tr::kStages);
  }
}

template <class Tr>
__device__ __forceinline__ void consumer_loop(typename Tr::Params const& p, typename Tr::SharedStorage& ss,
                                              int m, int h, int b, int warpgroup, int thread) {
  using namespace cute;
  using Element = typename Tr::Element;
  constexpr int kBM = Tr::kBM, kBN = Tr::kBN, kD = Tr::kD;
  const int t = thread % 128;  // thread in this warpgroup
  const int lane = t % 32;

  Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), typename Tr::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename Tr::SmemLayoutK{});
  Tensor sVt = make_tensor(make_smem_ptr(ss.v.data()), typename Tr::SmemLayoutVt{});
  Tensor sQw = local_tile(sQ, Shape<_64, Int<kD>>{}, make_coord(warpgroup, 0));  // this warpgroup's rows

  typename Tr::TiledMmaQK mma_qk;
  typename Tr::TiledMmaPV mma_pv;
  auto thr_qk = mma_qk.get_thread_slice(t);
  auto thr_pv = mma_pv.get_thread_slice(t);
  Tensor tSrQ = thr_qk.partition_fragment_A(sQw);  // smem descriptors
  Tensor tSrK = thr_qk.partition_fragment_B(sK);   // (MMA, N, K, stage)
  Tensor tOrVt = thr_pv.partition_fragment_B(sVt);  // (MMA, N, K, stage)
  Tensor tOrO = partition_fragment_C(mma_pv, Shape<_64, Int<kD>>{});
  clear(tOrO);

  OnlineSoftmax softmax;
  const int row0 = m * kBM + warpgroup * 64 + (t / 32) * 16 + lane / 4;  // and row0 + 8
  const bool row_valid[2] = {row0 < p.seqlen_q, row0 + 8 < p.seqlen_q};
  float threshold = 0.f;
  if constexpr (Tr::kSkip) threshold = p.threshold[h];

  // One tile's softmax step on S (in registers): mask, tile max, running max and sum,
  // probabilities in place. Returns the factor that rescales the old O and (skip path) this
  // thread's verdict: true when one of its valid rows finds the tile not negligible, i.e.
  // the row's tile max beats its running max before this tile by more than the threshold
  // (always true on the first tile: -inf before). Only the last tile of a sequence whose
  // length is not a multiple of BN needs the mask.
  const int masked_tile = p.seqlen_k % kBN ? p.num_n_tiles - 1 : -1;
  auto softmax_step = [&](auto& tSrS, int n, float (&correction)[2]) {
    float tile_max[2];
    if constexpr (Tr::kMaskOnBranch) {
      if (n == masked_tile) {
        softmax.template tile_max</*kMask=*/true>(tSrS, lane, p.seqlen_k - n * kBN, p.scale_log2, tile_max);
      } else {
        softmax.template tile_max</*kMask=*/false>(tSrS, lane, kBN, p.scale_log2, tile_max);
      }
    } else {
      softmax.template tile_max</*kMask=*/true>(tSrS, lane, p.seqlen_k - n * kBN, p.scale_log2, tile_max);
    }
    [[maybe_unused]] const float old_max[2] = {softmax.row_max[0], softmax.row_max[1]};
    softmax.update(tSrS, tile_max, p.scale_log2, correction);
    return Tr::kSkip && ((row_valid[0] & (tile_max[0] - old_max[0] > threshold)) |
                         (row_valid[1] & (tile_max[1] - old_max[1] > threshold)));
  };
  // Skip path: the warp's vote on tile n goes into its own verdict words. Called after the
  // wait for O += P V: the shared-memory asm is volatile, so were it issued before that wait
  // it would pin the wait behind it, after most of the exponentials (NOTES.md v5); the dense
  // loop waits before them and interleaves the O rescale with the exponentials.
  auto record_verdict = [&](int n, bool keep) {
    if constexpr (Tr::kSkip) {
      const bool warp_keeps = __any_sync(0xffffffffu, keep);
      shared_or_if(&ss.warp_keep[thread / 32][n >> 5], 1u << (n & 31), warp_keeps & (lane == 0));
    }
  };

  // Software pipeline inside the warpgroup: while the tensor cores run S(n) = Q K(n)^T and
  // O += P(n-1) V(n-1), this warpgroup waits only for S(n) and does its softmax.
  Tensor tSrS = partition_fragment_C(mma_qk, Shape<_64, Int<kBN>>{});
  Tensor tOrP = make_tensor<Element>(Layout<Shape<Shape<_2, _2, _2>, _1, Int<kBN / 16>>>{});
  PipelineState k_read, v_read;
  ss.q_full.wait(0);
  TileOrder<Tr::kSkip> tiles(ss.visit, ss.order, first_tile(m, kBM, kBN, p.seqlen_q, p.seqlen_k, p.num_n_tiles),
                             p.num_n_tiles);
  if (tiles.more()) {
    ss.k_full[k_read.stage].wait(k_read.phase);
    int n = tiles.current();
    tiles.advance();
    warpgroup_gemm</*kZeroInit=*/true, /*kRegisterA=*/false>(mma_qk, tSrQ, tSrK(_, _, _, k_read.stage), tSrS);
    warpgroup_wait<0>();
    warpgroup_fence_operand(tSrS);
    release(ss.k_empty[k_read.stage], lane);
    k_read.advance(Tr::kStages);
    float correction[2];
    record_verdict(n, softmax_step(tSrS, n, correction));
    convert_fragment<Element>(tSrS, tOrP);
    while (tiles.more()) {
      ss.k_full[k_read.stage].wait(k_read.phase);
      n = tiles.current();
      warpgroup_gemm</*kZeroInit=*/true, /*kRegisterA=*/false>(mma_qk, tSrQ, tSrK(_, _, _, k_read.stage), tSrS);
      ss.v_full[v_read.stage].wait(v_read.phase);
      warpgroup_gemm</*kZeroInit=*/false, /*kRegisterA=*/true>(mma_pv, tOrP, tOrVt(_, _, _, v_read.stage), tOrO);
      tiles.advance();  // dense: the next tile's arithmetic runs while the tensor cores work
      warpgroup_wait<1>();  // S(n) is ready; O += P V may still run
      warpgroup_fence_operand(tSrS);
      release(ss.k_empty[k_read.stage], lane);
      k_read.advance(Tr::kStages);
      const bool keep = softmax_step(tSrS, n, correction);
      warpgroup_wait<0>();
      warpgroup_fence_operand(tOrO);
      warpgroup_fence_operand(tOrP);
      release(ss.v_empty[v_read.stage], lane);
      v_read.advance(Tr::kStages);
      rescale_rows(tOrO, correction);
      convert_fragment<Element>(tSrS, tOrP);
      record_verdict(n, keep);
    }
    ss.v_full[v_read.stage].wait(v_read.phase);
    warpgroup_gemm</*kZeroInit=*/false, /*kRegisterA=*/true>(mma_pv, tOrP, tOrVt(_, _, _, v_read.stage), tOrO);
    warpgroup_wait<0>();
    warpgroup_fence_operand(tOrO);
    release(ss.v_empty[v_read.stage], lane);
  }

  // Epilogue: O / row sum into (B, S, H, D) memory, LSE in natural-log units. A row
  // with no visited tile gets O = 0 and LSE = -inf.
  float inv_sum[2], lse[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float sum = quad_sum(softmax.row_sum[r]);
    inv_sum[r] = sum > 0.f ? 1.f / sum : 0.f;
    lse[r] = sum > 0.f ? (softmax.row_max[r] + log2f(sum)) * p.ln2 : -INFINITY;
  }
  Element* out = p.out + b * p.out_stride_b + h * p.out_stride_h;
  cutlass::NumericArrayConverter<Element, float, 2> convert_pair;
  constexpr int kO = decltype(size(tOrO))::value;
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
    float* lse_row = p.lse + (int64_t(b) * p.heads + h) * p.seqlen_q;
#pragma unroll
    for (int r = 0; r < 2; ++r)
      if (row_valid[r]) lse_row[row0 + 8 * r] = lse[r];
  }

  if constexpr (Tr::kSkip) {
    // Every consumer warp's verdicts are in ss.warp_keep (CUTLASS's bar.sync has no memory clobber).
    cutlass::arch::NamedBarrier::sync(Tr::kConsumerThreads, static_cast<uint32_t>(NamedBarrier::kConsumersDone));
    asm volatile("" ::: "memory");
    store_skip_state<Tr::kConsumerThreads / 32>(p, b, h, m, ss.visit, ss.keep, ss.warp_keep, thread,
                                                Tr::kConsumerThreads);
  }
}

template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads, 1) fwd_kernel(const __grid_constant__ typename Tr::Params p) {
  extern __shared__ __align__(1024) char smem_raw[];
  auto& ss = *reinterpret_cast<typename Tr::SharedStorage*>(smem_raw);
  const int m = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int warpgroup = cutlass::canonical_warp_group_idx();

  if (threadIdx.x == 0) {
    ss.q_full.init(1);
#pragma unroll
    for (int s = 0; s < Tr::kStages; ++s) {
      ss.k_full[s].init(1);
      ss.v_full[s].init(1);
      ss.k_empty[s].init(Tr::kConsumerThreads / 32);  // one arrival per consumer warp
      ss.v_empty[s].init(Tr::kConsumerThreads / 32);
    }
    cutlass::arch::fence_barrier_init();
  }
  if constexpr (Tr::kSkip)
    load_skip_state<Tr::kBN, Tr::kConsumerThreads / 32>(p, b, h, m, ss.visit, ss.keep, ss.warp_keep);
  __syncthreads();
  if constexpr (Tr::kSkip) {
    build_visit_order(p, ss.visit, ss.order);
    __syncthreads();
  }

  if (warpgroup == 0) {
    cutlass::arch::warpgroup_reg_dealloc<Tr::kProducerRegs>();
    if (threadIdx.x == 0) {
      cute::prefetch_tma_descriptor(p.tma_k.get_tma_descriptor());
      cute::prefetch_tma_descriptor(p.tma_vt.get_tma_descriptor());
      producer_loop<Tr>(p, ss, m, h, b);
    }
  } else {
    cutlass::arch::warpgroup_reg_alloc<Tr::kConsumerRegs>();
    consumer_loop<Tr>(p, ss, m, h, b, warpgroup - 1, threadIdx.x - 128);
  }
}

}  // namespace liteattn
