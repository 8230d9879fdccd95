// The skip path's split tail (kSplitSkip, SplitTailPlan in liteattn.h): the skip decisions of the tail's rows.
// A tail row's visit list was cut into chunks computed by different CTAs; a CTA that starts inside the list does
// not know the running max before its first tile, which the vote compares each tile with (skip_state.cuh,
// row_keeps_tile), so the chunks recorded each visited tile's row maxima instead (TileVote::store_records) and
// this kernel votes in the visit order of the contract, with the running max of the whole row: the same float
// maxima, the same fmaxf chain and the same comparisons as the unsplit kernel, so the same bits. A NaN record (the
// row's sum had turned non-finite) keeps that tile and every later one, as a NaN row sum does unsplit. Then the
// row's state is written back as the forward kernel would (store_skip_state). One CTA per tail tile, one thread
// per query row; launched on the forward's stream after it (and after split_combine_kernel, which it does not need).
#pragma once
#include <cstdint>

#include "skip_state.cuh"
#include "tile_scheduler.cuh"

namespace liteattn {

template <class Tr>
constexpr int split_vote_smem_bytes(int num_state_words) {
  return (2 + Tr::kConsumerWarps) * 4 * num_state_words + 32 * 2 * num_state_words;  // StateBuffer: words, order
}

template <class Tr>
__global__ void __launch_bounds__(Tr::kBM) split_vote_kernel(const __grid_constant__ typename Tr::Params p) {
  extern __shared__ __align__(16) char split_vote_smem[];
  constexpr int kBatch = 8;  // records loaded ahead of the (sequential) running max
  const int stride = p.num_state_words;
  const StateBuffer buf{reinterpret_cast<uint32_t*>(split_vote_smem),
                        reinterpret_cast<uint16_t*>(split_vote_smem + (2 + Tr::kConsumerWarps) * 4 * stride), stride};
  const int tail_tile = blockIdx.x;
  int unit;  // the tile's first unit (tile_scheduler.cuh's work list)
  const int row = skip_item_row(p, int64_t(p.split_whole) + int64_t(tail_tile) * p.split_chunks, unit);
  const QueryTile tile = tile_of_row(row, p.num_m_tiles, p.heads);
  load_skip_state<Tr::kBN, Tr::kConsumerWarps>(p, row, buf, threadIdx.x, blockDim.x);
  __syncthreads();
  build_visit_order<Tr::kBM, Tr::kBN>(p, buf, tile.m, threadIdx.x, blockDim.x);
  __syncthreads();

  const int local = threadIdx.x, lane = threadIdx.x % 32;
  const bool valid = tile.m * Tr::kBM + local < p.seqlen_q;
  const float* records = p.split_records + int64_t(tail_tile) * p.num_n_tiles * Tr::kBM + local;
  const float threshold = p.threshold[tile.h];
  uint32_t* warp_words = buf.warp_keep(threadIdx.x / 32);
  TileOrder<true> order(buf.visit(), buf.order, p.num_n_tiles);
  float running = -INFINITY;  // the row max of the tiles before, log2 units (softmax.cuh's row_max)
  bool poisoned = false;      // a record before (or this one) was NaN
  while (order.more()) {
    int n[kBatch];
    float record[kBatch];
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      n[i] = -1;
      if (order.more()) {
        n[i] = order.current();
        record[i] = valid ? records[int64_t(n[i]) * Tr::kBM] : 0.f;
        order.advance();
      }
    }
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      if (n[i] < 0) break;  // CTA-uniform: every thread walks the same list
      const float l = record[i];
      poisoned |= (__float_as_uint(l) & 0x7fffffffu) > 0x7f800000u;  // NaN (a bit test: fast-math proof)
      const bool keep = valid && (poisoned || row_keeps_tile(l, running, 0.f, threshold));
      running = fmaxf(running, l);
      if ((__ballot_sync(0xffffffffu, keep) != 0u) && lane == 0) warp_words[n[i] >> 5] |= 1u << (n[i] & 31);
    }
  }
  __syncthreads();
  store_skip_state<Tr::kConsumerWarps>(p, row, buf, threadIdx.x, blockDim.x);
}

}  // namespace liteattn
