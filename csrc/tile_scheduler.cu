// The device-side longest-processing-time schedule of the skip path (tile_scheduler.cuh).
#include <cuda_runtime.h>

#include "liteattn.h"
#include "tile_scheduler.cuh"

namespace liteattn {

__global__ void lpt_schedule_kernel(const int32_t* __restrict__ state, int segment_rows, int num_state_words,
                                    int num_n_tiles, int32_t* __restrict__ schedule) {
  extern __shared__ uint16_t live_count[];  // segment_rows entries; counts <= Nt <= 2^14
  const int64_t first_row = int64_t(blockIdx.x) * segment_rows;
  const int32_t* rows = state + first_row * num_state_words;
  for (int i = threadIdx.x; i < segment_rows; i += blockDim.x) {
    int count = 0;
    for (int w = 0; w < num_state_words; ++w)
      count += __popc(static_cast<uint32_t>(rows[int64_t(i) * num_state_words + w]) & tile_bits(0, num_n_tiles, w));
    live_count[i] = uint16_t(count);
  }
  __syncthreads();
  int32_t* out = schedule + first_row;
  for (int i = threadIdx.x; i < segment_rows; i += blockDim.x) {
    const int count = live_count[i];
    int rank = 0;
    for (int j = 0; j < segment_rows; ++j) {
      const int other = live_count[j];
      rank += (other > count) | ((other == count) & (j < i));
    }
    out[rank] = int32_t(first_row + i);
  }
}

ScheduleScope schedule_scope(int batch, int heads, int num_m_tiles, int seqlen_k, int head_dim) {
  const int64_t rows = int64_t(batch) * heads * num_m_tiles;
  const int64_t kv_bytes = int64_t(batch) * heads * seqlen_k * head_dim * 2 /*K and V*/ * 2 /*bytes*/;
  if (rows <= kMaxGlobalScheduleRows && kv_bytes <= kGlobalScheduleKVBytes) return ScheduleScope::kGlobal;
  if (num_m_tiles <= kMaxScheduledMTiles) return ScheduleScope::kPerHead;
  return ScheduleScope::kNone;
}

void launch_lpt_schedule(const int32_t* state, int segments, int segment_rows, int num_state_words,
                         int num_n_tiles, int32_t* schedule, void* stream) {
  constexpr int kThreads = 512;
  lpt_schedule_kernel<<<segments, kThreads, segment_rows * sizeof(uint16_t), static_cast<cudaStream_t>(stream)>>>(
      state, segment_rows, num_state_words, num_n_tiles, schedule);
}

}  // namespace liteattn
