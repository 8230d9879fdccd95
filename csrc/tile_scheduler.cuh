// Tile-scheduler stage: which (b, h, m) query tile a CTA computes.
//
// The grid is (Mt, H, B). The hardware starts CTAs in blockIdx order (x fastest) whenever an SM
// frees up: greedy list scheduling. Dense path: position x of head (b, h) is query tile m = x.
// Skip path with a schedule: position x runs query tile schedule[(b*H + h)*Mt + x], the head's
// query tiles sorted by descending live count (longest-processing-time first within each head;
// ties keep ascending m). So the grid still runs head after head -- the CTAs in flight share
// one or two heads' K/V in L2, as in the natural order -- but every head ends with its lightest
// rows, and the grid's last CTAs are the lightest of the last head: no heavy row runs alone at
// the end. The schedule is computed on the device by lpt_schedule_kernel, launched just before
// the forward kernel on the same stream (no host synchronisation: CUDA-graph capturable).
// A global LPT order over all heads would spread the CTAs in flight over many heads and stream
// their K/V from HBM instead of L2; this one keeps the locality.
#pragma once
#include <cstdint>

#include "skip_state.cuh"

namespace liteattn {

struct QueryTile {
  int m, h, b;
};

template <class Params>
__device__ __forceinline__ QueryTile scheduled_tile(const Params& p) {
  const int h = blockIdx.y, b = blockIdx.z;
  int m = blockIdx.x;
  if (p.schedule != nullptr) m = p.schedule[(int64_t(b) * p.heads + h) * p.num_m_tiles + m];
  return {m, h, b};
}

// One CTA per (b, h): live count of each query tile's state row (valid bits only), then the rank
// of each query tile in descending count (ties: ascending m), O(Mt^2 / threads) compares in
// shared memory -- negligible next to the O(Mt * Nt) attention tiles of the same head.
__global__ void lpt_schedule_kernel(const int32_t* __restrict__ state, int num_m_tiles, int num_state_words,
                                    int num_n_tiles, int32_t* __restrict__ schedule);

}  // namespace liteattn
