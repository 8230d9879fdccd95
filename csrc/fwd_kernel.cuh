// The forward kernel: one CTA per query tile, or (persistent, the dense path) at most one CTA
// per SM walking several (tile_scheduler.cuh picks which). Warpgroup 0 is the producer (one thread
// issues the TMA loads, mainloop.cuh); warpgroups 1.. are consumers of 64 query rows each: GEMMs,
// softmax and skip vote (mainloop.cuh, softmax.cuh, skip_state.cuh), then the O / LSE epilogue
// (epilogue.cuh) and, on the skip path, the state write-back (skip_state.cuh).
#pragma once
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include "epilogue.cuh"
#include "fwd_traits.cuh"
#include "mainloop.cuh"
#include "named_barriers.cuh"
#include "skip_state.cuh"
#include "softmax.cuh"
#include "tile_scheduler.cuh"

namespace liteattn {

template <class Tr>
__device__ __forceinline__ void consumer_warpgroup(typename Tr::Params const& p, typename Tr::SharedStorage& ss,
                                                   QueryTile tile, int iteration, PipelineState& k_read,
                                                   PipelineState& v_read, int warpgroup, int thread) {
  using namespace cute;
  const int t = thread % 128;  // thread in this warpgroup
  const int lane = t % 32;
  const int row0 = tile.m * Tr::kBM + warpgroup * 64 + (t / 32) * 16 + lane / 4;  // and row0 + 8
  const bool row_valid[2] = {row0 < p.seqlen_q, row0 + 8 < p.seqlen_q};

  TileVote<Tr::kSkip> vote;
  if constexpr (Tr::kSkip) vote = {p.threshold[tile.h], {row_valid[0], row_valid[1]}, ss.warp_keep[thread / 32], lane};

  // INT8 mode: the LSE correction of this thread's two rows, loaded before the mainloop (its latency hides there).
  float lse_bias_log2[2] = {0.f, 0.f};
  if constexpr (Tr::kInt8) {
    const float* q_mu = p.q_mu + (int64_t(tile.b) * p.heads + tile.h) * p.seqlen_q;
#pragma unroll
    for (int r = 0; r < 2; ++r)
      if (row_valid[r]) lse_bias_log2[r] = q_mu[row0 + 8 * r] * p.scale_log2;
  }

  typename Tr::TiledMmaPV mma_pv;
  Tensor tOrO = partition_fragment_C(mma_pv, Shape<_64, Int<Tr::kD>>{});
  clear(tOrO);
  typename Tr::Softmax softmax;
  consumer_mainloop<Tr>(p, ss, tile, iteration, warpgroup, t, k_read, v_read, softmax, vote, tOrO);
  store_output<Tr>(p, tile, row0, row_valid, lane, softmax, tOrO, lse_bias_log2);

  if constexpr (Tr::kSkip) {
    // Every consumer warp's verdicts are in ss.warp_keep (CUTLASS's bar.sync has no memory clobber).
    cutlass::arch::NamedBarrier::sync(Tr::kConsumerThreads, static_cast<uint32_t>(NamedBarrier::kConsumersDone));
    asm volatile("" ::: "memory");
    store_skip_state<Tr::kConsumerWarps>(p, tile.b, tile.h, tile.m, ss.visit, ss.keep, ss.warp_keep, thread,
                                         Tr::kConsumerThreads);
  }
}

template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads, 1) fwd_kernel(const __grid_constant__ typename Tr::Params p) {
  extern __shared__ __align__(1024) char smem_raw[];
  auto& ss = *reinterpret_cast<typename Tr::SharedStorage*>(smem_raw);
  const int warpgroup = cutlass::canonical_warp_group_idx();
  static_assert(!(Tr::kPersistent && Tr::kSkip), "the skip path's state row is read per CTA (one tile per CTA)");
  const QueryTile tile = scheduled_tile(p);  // the skip path's (only) tile

  if (threadIdx.x == 0) {
    ss.q_full.init(1);
    ss.q_empty.init(Tr::kConsumerWarps);  // one arrival per consumer warp
#pragma unroll
    for (int s = 0; s < Tr::kStages; ++s) {
      ss.k_full[s].init(1);
      ss.v_full[s].init(1);
      ss.k_empty[s].init(Tr::kConsumerWarps);  // one arrival per consumer warp
      ss.v_empty[s].init(Tr::kConsumerWarps);
    }
    cutlass::arch::fence_barrier_init();
  }
  if constexpr (Tr::kSkip)
    load_skip_state<Tr::kBN, Tr::kConsumerWarps>(p, tile.b, tile.h, tile.m, ss.visit, ss.keep, ss.warp_keep);
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
      PipelineState write;
      for (TileSequence<Tr::kPersistent> seq(p); seq.more(); seq.advance())
        producer_load<Tr>(p, ss, seq.current, seq.iteration, write);
    }
  } else {
    cutlass::arch::warpgroup_reg_alloc<Tr::kConsumerRegs>();
    MmaTurn<Tr::kConsumerWarpgroups, Tr::kPingPong>::start(warpgroup - 1);
    PipelineState k_read, v_read;
    for (TileSequence<Tr::kPersistent> seq(p); seq.more(); seq.advance())
      consumer_warpgroup<Tr>(p, ss, seq.current, seq.iteration, k_read, v_read, warpgroup - 1, threadIdx.x - 128);
  }
}

}  // namespace liteattn
