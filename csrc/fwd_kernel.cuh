// The forward kernel: one CTA per query tile, or (persistent: the dense path, and the skip path's
// persistskip variant) at most one CTA per SM walking several (tile_scheduler.cuh picks which). Warpgroup 0 is the producer (one thread
// issues the TMA loads, mainloop.cuh); warpgroups 1.. are consumers of 64 query rows each: GEMMs,
// softmax and skip vote (mainloop.cuh, softmax.cuh, skip_state.cuh), then the O / LSE epilogue
// (epilogue.cuh) and, on the skip path, the state write-back (skip_state.cuh).
#pragma once
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include "cta_timeline.cuh"
#include "epilogue.cuh"
#include "fwd_traits.cuh"
#include "mainloop.cuh"
#include "named_barriers.cuh"
#include "skip_state.cuh"
#include "softmax.cuh"
#include "tile_scheduler.cuh"

namespace liteattn {

// The state row of query tile (b, h, m).
template <class Params>
__device__ __forceinline__ int64_t state_row_of(const Params& p, QueryTile tile) {
  return (int64_t(tile.b) * p.heads + tile.h) * p.num_m_tiles + tile.m;
}

// One query tile of one consumer warpgroup. `state`: the skip path's buffer of the tile's row. `state_done`
// (kPersistentSkip): where each thread reports its last vote recorded; the state reader writes the row back.
template <class Tr>
__device__ __forceinline__ void consumer_warpgroup(typename Tr::Params const& p, typename Tr::SharedStorage& ss,
                                                   StateBuffer state, cutlass::arch::ClusterBarrier* state_done,
                                                   QueryTile tile, int iteration, PipelineState& k_read,
                                                   PipelineState& v_read, int warpgroup, int thread) {
  using namespace cute;
  const int t = thread % 128;  // thread in this warpgroup
  const int lane = t % 32;
  const int row0 = tile.m * Tr::kBM + warpgroup * 64 + (t / 32) * 16 + lane / 4;  // and row0 + 8
  const bool row_valid[2] = {row0 < p.seqlen_q, row0 + 8 < p.seqlen_q};

  TileVote<Tr::kSkip> vote;
  if constexpr (Tr::kSkip) vote = {p.threshold[tile.h], {row_valid[0], row_valid[1]}, state.warp_keep(thread / 32), lane};
  if constexpr (Tr::kSplitSkip) {
    if (tile.unit >= 0) {  // a unit of the split tail: records instead of votes (skip_state.cuh, TileVote)
      vote.records = p.split_records + int64_t(tile.unit / p.split_chunks) * p.num_n_tiles * Tr::kBM;
      vote.record_row = row0 - tile.m * Tr::kBM;
      vote.bm = Tr::kBM;
    }
  }

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
  consumer_mainloop<Tr>(p, ss, state, tile, iteration, warpgroup, t, k_read, v_read, softmax, vote, tOrO);
  // Every vote of this tile is recorded (the last one after the last P V issue): the buffer goes back before the
  // epilogue, which needs only registers. Every thread arrives (each read the row and its visit list), not one
  // per warp after a __syncwarp: racecheck flagged that form's reads of the row (NOTES.md wave 13).
  if constexpr (Tr::kPersistentSkip) release_buffer(*state_done);
  store_output<Tr>(p, tile, row0, row_valid, lane, softmax, tOrO, lse_bias_log2);

  if constexpr (Tr::kSkip && !Tr::kPersistentSkip) {
    if constexpr (Tr::kSplitSkip)
      if (tile.unit >= 0) return;  // split_vote_kernel writes a split row's state
    // Every consumer warp's verdicts are in the buffer (CUTLASS's bar.sync has no memory clobber).
    cutlass::arch::NamedBarrier::sync(Tr::kConsumerThreads, static_cast<uint32_t>(NamedBarrier::kConsumersDone));
    asm volatile("" ::: "memory");
    store_skip_state<Tr::kConsumerWarps>(p, state_row_of(p, tile), state, thread, Tr::kConsumerThreads);
  }
}

template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads, 1) fwd_kernel(const __grid_constant__ typename Tr::Params p) {
  extern __shared__ __align__(1024) char smem_raw[];
  auto& ss = *reinterpret_cast<typename Tr::SharedStorage*>(smem_raw);
  const int warpgroup = cutlass::canonical_warp_group_idx();
  static_assert(!(Tr::kPersistent && Tr::kSkip), "kPersistent is the dense path's (the skip path's: kPersistentSkip)");
  constexpr bool kOneTileSkip = Tr::kSkip && !Tr::kPersistentSkip;
  if (threadIdx.x == 0) timeline_mark<Tr>(p, kTimelineEntry);  // Tr::kTimeline only (cta_timeline.cuh)

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
    if constexpr (Tr::kPersistentSkip) {
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        ss.state_full[s].init(Tr::kStateReaderThreads);
        ss.state_empty[s].init(Tr::kConsumerThreads + 1);  // and the TMA thread
      }
    }
    cutlass::arch::fence_barrier_init();
  }
  // One tile per CTA on the skip path: the whole CTA reads its row's state first.
  QueryTile tile{0, 0, 0};
  if constexpr (kOneTileSkip) {
    if (Tr::kSplitSkip && p.split_chunks >= 2) {  // a 1-D grid of the work list's items (tile_scheduler.cuh)
      int unit;
      const int row = skip_item_row(p, blockIdx.x, unit);
      tile = with_unit(tile_of_row(row, p.num_m_tiles, p.heads), unit, p.split_chunks);
    } else {
      tile = scheduled_tile(p);
    }
  }
  const StateBuffer one_buffer = StateBuffer::of(ss.state_words, ss.order, Tr::kStateWords, 1, 0, Tr::kConsumerWarps);
  if constexpr (kOneTileSkip)
    load_skip_state<Tr::kBN, Tr::kConsumerWarps>(p, state_row_of(p, tile), one_buffer, threadIdx.x, blockDim.x);
  __syncthreads();
  if constexpr (kOneTileSkip) {
    build_visit_order<Tr::kBM, Tr::kBN>(p, one_buffer, tile.m, threadIdx.x, blockDim.x);
    __syncthreads();
  }

  if (warpgroup == 0) {
    cutlass::arch::warpgroup_reg_dealloc<Tr::kProducerRegs>();
    if (threadIdx.x == 0) {
      cute::prefetch_tma_descriptor(p.tma_k.get_tma_descriptor());
      cute::prefetch_tma_descriptor(p.tma_vt.get_tma_descriptor());
      PipelineState write;
      if constexpr (Tr::kPersistentSkip) {
        const RowHandOff<Tr> rows(ss, p);
        for (int it = 0;; ++it) {
          const int row = rows.wait_row(it);
          if (row < 0) break;
          producer_load<Tr>(p, ss, rows.tile(it, row, p), it, write, rows.buffer(it));
          // Done with the buffer. Not implied by the consumers' arrivals: a row with no visited tile has no K load
          // between this thread's read of its visit words and the consumers' release.
          release_buffer(*rows.done_barrier(it));
        }
      } else if constexpr (kOneTileSkip && Tr::kSplitSkip) {  // the tile of the work list (above)
        producer_load<Tr>(p, ss, tile, 0, write, one_buffer);
      } else {
        for (TileSequence<Tr::kPersistent, Tr::kSplitTail> seq(p); seq.more(); seq.advance())
          producer_load<Tr>(p, ss, seq.current, seq.iteration, write, one_buffer);
      }
      timeline_mark<Tr>(p, kTimelineProducerDone);
    } else if constexpr (Tr::kPersistentSkip) {
      if (threadIdx.x >= 32 && threadIdx.x < 64) state_reader_loop<Tr>(p, ss, int(threadIdx.x) - 32);
    }
  } else {
    cutlass::arch::warpgroup_reg_alloc<Tr::kConsumerRegs>();
    MmaTurn<Tr::kConsumerWarpgroups, Tr::kPingPong>::start(warpgroup - 1);
    PipelineState k_read, v_read;
    const bool marks = threadIdx.x == 128;  // Tr::kTimeline: consumer warpgroup 0's thread 0 marks the rows
    [[maybe_unused]] int rows_done = 0;
    if constexpr (Tr::kPersistentSkip) {
      const RowHandOff<Tr> rows(ss, p);
      for (int it = 0;; ++it) {
        const int row = rows.wait_row(it);
        if (row < 0) break;
        if (marks) timeline_row_mark<Tr>(p, it, kTimelineRowHanded);
        consumer_warpgroup<Tr>(p, ss, rows.buffer(it), rows.done_barrier(it), rows.tile(it, row, p), it, k_read,
                               v_read, warpgroup - 1, threadIdx.x - 128);
        if (marks) timeline_row_mark<Tr>(p, it, kTimelineRowDone);
        rows_done = it + 1;
      }
    } else if constexpr (kOneTileSkip && Tr::kSplitSkip) {  // the tile of the work list (above)
      if (marks) timeline_row_mark<Tr>(p, 0, kTimelineRowHanded);
      consumer_warpgroup<Tr>(p, ss, one_buffer, nullptr, tile, 0, k_read, v_read, warpgroup - 1, threadIdx.x - 128);
      if (marks) timeline_row_mark<Tr>(p, 0, kTimelineRowDone);
      rows_done = 1;
    } else {
      for (TileSequence<Tr::kPersistent, Tr::kSplitTail> seq(p); seq.more(); seq.advance()) {
        if (marks) timeline_row_mark<Tr>(p, seq.iteration, kTimelineRowHanded);
        consumer_warpgroup<Tr>(p, ss, one_buffer, nullptr, seq.current, seq.iteration, k_read, v_read, warpgroup - 1,
                               threadIdx.x - 128);
        if (marks) timeline_row_mark<Tr>(p, seq.iteration, kTimelineRowDone);
        rows_done = seq.iteration + 1;
      }
    }
    if (marks) {
      timeline_mark<Tr>(p, kTimelineConsumersDone);
      timeline_rows_done<Tr>(p, rows_done);
    }
  }
}

}  // namespace liteattn
