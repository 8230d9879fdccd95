// The device-side longest-processing-time schedule of the skip path (tile_scheduler.cuh).
#include <cuda_runtime.h>

#include "liteattn.h"
#include "tile_scheduler.cuh"

namespace liteattn {

__global__ void lpt_schedule_kernel(const int32_t* __restrict__ state, int num_m_tiles, int num_state_words,
                                    int num_n_tiles, int32_t* __restrict__ schedule) {
  extern __shared__ uint16_t live_count[];  // num_m_tiles entries; counts <= Nt <= 2^14
  const int64_t segment = blockIdx.x;      // b * H + h
  const int32_t* rows = state + segment * num_m_tiles * num_state_words;
  for (int m = threadIdx.x; m < num_m_tiles; m += blockDim.x) {
    int count = 0;
    for (int w = 0; w < num_state_words; ++w)
      count += __popc(static_cast<uint32_t>(rows[int64_t(m) * num_state_words + w]) & tile_bits(0, num_n_tiles, w));
    live_count[m] = uint16_t(count);
  }
  __syncthreads();
  int32_t* out = schedule + segment * num_m_tiles;
  for (int m = threadIdx.x; m < num_m_tiles; m += blockDim.x) {
    const int count = live_count[m];
    int rank = 0;
    for (int j = 0; j < num_m_tiles; ++j) {
      const int other = live_count[j];
      rank += (other > count) | ((other == count) & (j < m));
    }
    out[rank] = m;
  }
}

void launch_lpt_schedule(const int32_t* state, int segments, int num_m_tiles, int num_state_words,
                         int num_n_tiles, int32_t* schedule, void* stream) {
  constexpr int kThreads = 512;
  lpt_schedule_kernel<<<segments, kThreads, num_m_tiles * sizeof(uint16_t), static_cast<cudaStream_t>(stream)>>>(
      state, num_m_tiles, num_state_words, num_n_tiles, schedule);
}

}  // namespace liteattn
