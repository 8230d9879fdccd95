// Tile-scheduler stage: which (b, h, m) query tile a CTA computes.
//
// The grid is (Mt, H, B). The hardware starts CTAs in blockIdx order (x fastest, then y, z)
// whenever an SM frees up: greedy list scheduling. Dense path: CTA (x, h, b) is query tile m = x.
// Skip path with a schedule: CTA number i (linear blockIdx) computes the query tile whose row index
// (b*H + h)*Mt + m is schedule[i]; lpt_schedule_kernel writes the schedule just before the forward
// kernel, on the same stream (no host synchronisation: CUDA-graph capturable), sorted by descending
// live count (longest-processing-time first; ties keep ascending row index), in one of two scopes:
// - global, when the K/V of every head fit in a part of L2 (kGlobalScheduleKVBytes) and the rows
//   are few (kMaxGlobalScheduleRows): the whole grid heaviest first. Small problems of a few waves
//   (4096 x 12 heads: 384 CTAs) need this: a heavy row that starts in the last wave is the tail.
// - per head otherwise: each head's query tiles heaviest first, heads still one after the other, so
//   the CTAs in flight share one or two heads' K/V in L2 as in the natural order (a global order
//   would spread them over many heads and stream K/V from HBM); every head ends with its lightest
//   rows and the grid's last CTAs are the lightest of the last head.
#pragma once
#include <cstdint>

#include "skip_state.cuh"

namespace liteattn {

struct QueryTile {
  int m, h, b;
};

template <class Params>
__device__ __forceinline__ QueryTile scheduled_tile(const Params& p) {
  if (p.schedule == nullptr) return {int(blockIdx.x), int(blockIdx.y), int(blockIdx.z)};
  const int64_t cta = (int64_t(blockIdx.z) * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
  const int row = p.schedule[cta];  // (b * H + h) * Mt + m
  const int bh = row / p.num_m_tiles;
  return {row - bh * p.num_m_tiles, bh % p.heads, bh / p.heads};
}

// One CTA per segment of `segment_rows` consecutive state rows (one head, or all of them): the
// live count of each row (valid bits only), then its rank in the segment by descending count
// (ties: ascending row), O(segment_rows^2 / threads) compares in shared memory -- small next to
// the segment's attention tiles (segment_rows * Nt of them).
__global__ void lpt_schedule_kernel(const int32_t* __restrict__ state, int segment_rows, int num_state_words,
                                    int num_n_tiles, int32_t* __restrict__ schedule);

}  // namespace liteattn
