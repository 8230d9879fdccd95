// Tile-scheduler stage: which (b, h, m) query tiles a CTA computes.
//
// One tile per CTA (skip path; a dense variant without the persist bit): the grid is (Mt, H, B). The hardware
// starts CTAs in blockIdx order (x fastest, then y, z) whenever an SM frees up: greedy list scheduling; CTA
// (x, h, b) is query tile m = x. The dense path of both Q/K modes is persistent (TileSequence<true> below).
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

// The query tile of state row (b * H + h) * Mt + m.
__device__ __forceinline__ QueryTile tile_of_row(int row, int num_m_tiles, int heads) {
  const int bh = row / num_m_tiles;
  return {row - bh * num_m_tiles, bh % heads, bh / heads};
}

template <class Params>
__device__ __forceinline__ QueryTile scheduled_tile(const Params& p) {
  if (p.schedule == nullptr) return {int(blockIdx.x), int(blockIdx.y), int(blockIdx.z)};
  const int64_t cta = (int64_t(blockIdx.z) * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
  return tile_of_row(p.schedule[cta], p.num_m_tiles, p.heads);
}

// The query tiles of one CTA, as a sequence (`for (TileSequence<..> s(p); s.more(); s.advance())`);
// `iteration` counts them (the parity of the Q buffer's barriers, mainloop.cuh).
// - One tile per CTA (TileSequence<false>): scheduled_tile above.
// - Persistent (dense path, KernelVariant::persistent): at most one CTA per SM; CTA c takes
//   the tiles c, c + G, c + 2G, ... of the linear order (m fastest, then h, then b), so the G tiles in
//   flight are neighbours as in the one-tile grid's launch order, and one CTA's next Q and K load
//   while its last P V and epilogue run.
template <bool kPersistent>
struct TileSequence;

template <>
struct TileSequence<false> {
  QueryTile current;
  int iteration = 0;
  template <class Params>
  __device__ explicit TileSequence(const Params& p) : current(scheduled_tile(p)) {}
  __device__ __forceinline__ bool more() const { return iteration == 0; }
  __device__ __forceinline__ void advance() { ++iteration; }
};

template <>
struct TileSequence<true> {
  QueryTile current;
  int iteration = 0;
  int linear, total, num_m_tiles, heads;
  template <class Params>
  __device__ explicit TileSequence(const Params& p)
      : current(tile_of_row(int(blockIdx.x), p.num_m_tiles, p.heads)), linear(int(blockIdx.x)),
        total(p.num_m_tiles * p.heads * p.batch), num_m_tiles(p.num_m_tiles), heads(p.heads) {}
  __device__ __forceinline__ bool more() const { return linear < total; }
  __device__ __forceinline__ void advance() {
    ++iteration;
    linear += int(gridDim.x);
    current = tile_of_row(linear, num_m_tiles, heads);
  }
};

// Segments of `segment_rows` consecutive state rows (one head, or all of them), each ranked by one or
// more CTAs of `slice_rows` rows: the live count of each row (valid bits only), then its rank in the
// segment by descending count (ties: ascending row), O(segment_rows^2) compares in shared memory --
// small next to the segment's attention tiles (segment_rows * Nt of them).
__global__ void lpt_schedule_kernel(const int32_t* __restrict__ state, int segment_rows, int slice_rows,
                                    int num_state_words, int num_n_tiles, int32_t* __restrict__ schedule);

}  // namespace liteattn
