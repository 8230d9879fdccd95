// The device-side longest-processing-time schedule of the skip path (tile_scheduler.cuh).
#include <cuda_runtime.h>

#include "liteattn.h"
#include "tile_scheduler.cuh"

namespace liteattn {

// Grid (segments, slices): CTA (s, c) ranks rows [c * slice_rows, (c + 1) * slice_rows) of segment s. Every CTA of a
// segment counts the live tiles of all its rows (a rank needs them all; cheap for the segments that are sliced:
// at most kMaxSlicedSegmentRows rows of a few words), then one warp per row sums its compares over the lanes:
// the O(rows^2) compares are spread over rows / slice_rows CTAs and all their warps instead of one CTA's threads
// (one CTA ranking 384 rows took ~7.5 us, latency-bound on the broadcast shared loads of its 12 warps).
__global__ void lpt_schedule_kernel(const int32_t* __restrict__ state, int segment_rows, int slice_rows,
                                    int num_state_words, int num_n_tiles, int32_t* __restrict__ schedule,
                                    int32_t* __restrict__ work_counter) {
  extern __shared__ uint16_t live_count[];  // segment_rows entries; counts <= Nt <= 2^14
  if (work_counter != nullptr && blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0) *work_counter = 0;
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
  const int lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const int slice_begin = blockIdx.y * slice_rows;
  const int slice_end = min(slice_begin + slice_rows, segment_rows);
  for (int i = slice_begin + int(threadIdx.x) / 32; i < slice_end; i += warps) {
    const int count = live_count[i];
    int rank = 0;  // rows before i in the order: heavier, or as heavy and lower
    for (int j = lane; j < segment_rows; j += 32) {
      const int other = live_count[j];
      rank += (other > count) | ((other == count) & (j < i));
    }
    rank = __reduce_add_sync(0xffffffffu, rank);
    if (lane == 0) out[rank] = int32_t(first_row + i);
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
                         int num_n_tiles, int32_t* schedule, int32_t* work_counter, void* stream) {
  // Segments of up to kMaxSlicedSegmentRows rows (the global scope, the heads of every realistic shape) are
  // ranked in slices of kSliceRows rows; longer ones by one CTA (recounting them per slice would cost more).
  constexpr int kThreads = 1024, kSliceRows = 64, kMaxSlicedSegmentRows = 4096;
  const int slice_rows = segment_rows <= kMaxSlicedSegmentRows ? kSliceRows : segment_rows;
  const dim3 grid(segments, (segment_rows + slice_rows - 1) / slice_rows);
  prefer_forward_carveout(reinterpret_cast<const void*>(lpt_schedule_kernel));
  lpt_schedule_kernel<<<grid, kThreads, segment_rows * sizeof(uint16_t), static_cast<cudaStream_t>(stream)>>>(
      state, segment_rows, slice_rows, num_state_words, num_n_tiles, schedule, work_counter);
}

}  // namespace liteattn
