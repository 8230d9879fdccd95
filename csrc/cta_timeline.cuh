// KernelVariant::timeline (A/B builds only): %globaltimer marks of each CTA into FwdArgs::timeline (the layout:
// liteattn.h, kTimelineHeader), read by tools/cta_timeline.py -- when a CTA starts, when each of its rows is handed to
// the consumers, gets its first K tile and ends, and when its warps finish. Compiled out of every other variant.
#pragma once
#include <cstdint>

#include "liteattn.h"

namespace liteattn {

// Slot `slot` of this CTA's timeline row := value (no-op without a buffer).
template <class Tr>
__device__ __forceinline__ void timeline_write(typename Tr::Params const& p, int slot, uint64_t value) {
  if (p.timeline == nullptr) return;
  const int64_t cta = (int64_t(blockIdx.z) * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
  p.timeline[cta * (kTimelineHeader + kTimelineMarks * p.timeline_rows) + slot] = value;
}

template <class Tr>
__device__ __forceinline__ void timeline_mark(typename Tr::Params const& p, int slot) {
  if constexpr (Tr::kTimeline) {
    uint64_t ns;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns));
    timeline_write<Tr>(p, slot, ns);
  }
}

// Mark `k` (kTimelineRowHanded, kTimelineRowFirstK, kTimelineRowDone) of the CTA's row `it`; rows past
// timeline_rows are not recorded.
template <class Tr>
__device__ __forceinline__ void timeline_row_mark(typename Tr::Params const& p, int it, int k) {
  if constexpr (Tr::kTimeline)
    if (it < p.timeline_rows) timeline_mark<Tr>(p, kTimelineHeader + kTimelineMarks * it + k);
}

// The header's row count.
template <class Tr>
__device__ __forceinline__ void timeline_rows_done(typename Tr::Params const& p, int rows) {
  if constexpr (Tr::kTimeline) timeline_write<Tr>(p, kTimelineRowCount, uint64_t(rows));
}

}  // namespace liteattn
