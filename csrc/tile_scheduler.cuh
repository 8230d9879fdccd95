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

#include <cutlass/arch/barrier.h>

#include "named_barriers.cuh"
#include "skip_state.cuh"

namespace liteattn {

struct QueryTile {
  int m, h, b;
  // The split tail (kSplitTail): this CTA's part of the tile, `key_count` tiles of the dense visit order from
  // position `key_begin`, its partial result going to scratch unit `unit`. unit < 0: the whole tile.
  int key_begin = 0, key_count = 0, unit = -1;
};

// The query tile of state row (b * H + h) * Mt + m.
__device__ __forceinline__ QueryTile tile_of_row(int row, int num_m_tiles, int heads) {
  const int bh = row / num_m_tiles;
  return {row - bh * num_m_tiles, bh % heads, bh / heads};
}

// The skip path's split tail (kSplitSkip, split_chunks >= 2): unit u is chunk u % chunks of its row's visit list
// (TileOrder<true>'s chunk key_begin of key_count).
__device__ __forceinline__ QueryTile with_unit(QueryTile t, int unit, int chunks) {
  if (unit >= 0) {
    t.key_begin = unit % chunks;
    t.key_count = chunks;
    t.unit = unit;
  }
  return t;
}

// The skip path's work list: item k < split_whole is the row at position k of the order (the schedule, or the
// natural order); with a split tail, item split_whole + u is unit u: a chunk of the row at position
// split_whole + u / chunks. Without a split, item k is the row at position k. Sets `unit` (-1: a whole row).
template <class Params>
__device__ __forceinline__ int skip_item_row(const Params& p, int64_t k, int& unit) {
  int64_t position = k;
  unit = -1;
  if (p.split_chunks >= 2 && k >= p.split_whole) {
    unit = int(k - p.split_whole);
    position = p.split_whole + unit / p.split_chunks;
  }
  return p.schedule != nullptr ? p.schedule[position] : int(position);
}
// Items on the list: the rows, or (split tail) the whole rows and the units.
template <class Params>
__device__ __forceinline__ int64_t skip_items(const Params& p) {
  return p.split_chunks >= 2 ? int64_t(p.split_whole) + p.split_units : int64_t(p.num_m_tiles) * p.heads * p.batch;
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
template <bool kPersistent, bool kSplitTail = false>
struct TileSequence;

template <>
struct TileSequence<false, false> {
  QueryTile current;
  int iteration = 0;
  template <class Params>
  __device__ explicit TileSequence(const Params& p) : current(scheduled_tile(p)) {}
  __device__ __forceinline__ bool more() const { return iteration == 0; }
  __device__ __forceinline__ void advance() { ++iteration; }
};

template <>
struct TileSequence<true, false> {
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

// Persistent with the split tail (KernelVariant::split_tail; SplitTailPlan in liteattn.h): the tiles below
// p.split_whole (a multiple of the grid) as above, then CTA c takes unit c of the tail when c < p.split_units:
// tile split_whole + c / chunks, key range c % chunks of `chunks` near-equal ranges of the visit order.
// split_chunks < 2 (no split this call): whole = total, no units.
template <>
struct TileSequence<true, true> {
  QueryTile current;
  int iteration = 0;
  int linear, whole, end, num_m_tiles, heads, chunks, num_n_tiles;
  template <class Params>
  __device__ explicit TileSequence(const Params& p)
      : linear(int(blockIdx.x)),
        whole(p.split_chunks >= 2 ? p.split_whole : p.num_m_tiles * p.heads * p.batch),
        end(p.split_chunks >= 2 ? p.split_whole + p.split_units : whole),
        num_m_tiles(p.num_m_tiles), heads(p.heads), chunks(p.split_chunks), num_n_tiles(p.num_n_tiles) {
    locate();
  }
  __device__ __forceinline__ bool more() const { return linear < end; }
  __device__ __forceinline__ void advance() {
    ++iteration;
    linear += int(gridDim.x);
    locate();
  }
  __device__ __forceinline__ void locate() {
    if (linear < whole) {
      current = tile_of_row(linear, num_m_tiles, heads);
    } else if (linear < end) {
      const int unit = linear - whole, chunk = unit % chunks;
      current = tile_of_row(whole + unit / chunks, num_m_tiles, heads);
      current.key_begin = chunk * num_n_tiles / chunks;
      current.key_count = (chunk + 1) * num_n_tiles / chunks - current.key_begin;
      current.unit = unit;
    }
  }
};

// Skip path, persistent (KernelVariant::persistent_skip): at most one CTA per SM; one spare warp of the
// producer warpgroup (the state reader) takes the CTA's next row -- the next entry of the schedule (or of the
// natural order), handed out by one atomic counter shared by the CTAs, so that the CTAs that finish first take
// the next heaviest rows as the one-tile grid's hardware launch does -- read its state into a shared-memory
// buffer and build its visit list while the consumers still run the previous row. Two buffers (one when a row
// takes more than half of the space), each passed on through an mbarrier pair: state_full (the reader's 32
// arrivals: the TMA thread and the consumers may read it) and state_empty (one arrival per consumer thread after
// its last vote and one by the TMA thread after its last load: the reader writes the row's state back and refills
// the buffer). Row -1: no rows left.
// The reader waits with a suspend-time hint (sleeping_wait). It still polls: the warp wakes at every barrier event
// of the CTA, ~36 times a tile, 3.5 % of the skip kernel's instructions; a named-barrier wait that issues nothing
// measured no gain (NOTES.md wave 19). (Wave 11's 12-15 % loss at head dim 128 was not the readers' polling but the
// producer thread's 44 V boxes a tile, NOTES.md wave 12; widev removes it.)
// CUTLASS's ClusterBarrier arrive and wait carry no "memory" clobber, so the compiler could move plain
// shared-memory accesses across them; the state buffers' hand-off (RowHandOff) passes them through these.
__device__ __forceinline__ void release_buffer(cutlass::arch::ClusterBarrier& barrier) {
  asm volatile("" ::: "memory");
  barrier.arrive();
}
__device__ __forceinline__ void acquire_buffer(cutlass::arch::ClusterBarrier& barrier, uint32_t parity) {
  barrier.wait(parity);
  asm volatile("" ::: "memory");
}

template <class Tr>
struct RowHandOff {
  typename Tr::SharedStorage& ss;
  int count;  // buffers in use: 2, or 1
  template <class Params>
  __device__ RowHandOff(typename Tr::SharedStorage& ss_, const Params& p)
      : ss(ss_), count(2 * p.num_state_words <= Tr::kStateWords ? 2 : 1) {}
  __device__ __forceinline__ int slot(int it) const { return count == 2 ? it & 1 : 0; }
  __device__ __forceinline__ uint32_t parity(int it) const { return uint32_t(count == 2 ? it >> 1 : it) & 1u; }
  __device__ __forceinline__ StateBuffer buffer(int it) const {
    return StateBuffer::of(ss.state_words, ss.order, Tr::kStateWords, count, slot(it), Tr::kConsumerWarps);
  }
  // The TMA thread and the consumers: the state row of the CTA's it-th tile, once its buffer is filled; -1: done.
  __device__ __forceinline__ int wait_row(int it) const {
    acquire_buffer(ss.state_full[slot(it)], parity(it));
    return ss.state_row[slot(it)];
  }
  // The query tile of the it-th row (after wait_row returned row >= 0): kSplitSkip's unit too.
  template <class Params>
  __device__ __forceinline__ QueryTile tile(int it, int row, const Params& p) const {
    const QueryTile t = tile_of_row(row, p.num_m_tiles, p.heads);
    if constexpr (Tr::kSplitSkip) return with_unit(t, ss.state_unit[slot(it)], p.split_chunks);
    else return t;
  }
  __device__ __forceinline__ cutlass::arch::ClusterBarrier* done_barrier(int it) const {
    return &ss.state_empty[slot(it)];
  }
};

// Wait for the phase of `parity` to complete, the warp suspended in between (up to the hint, then again).
__device__ __forceinline__ void sleeping_wait(cutlass::arch::ClusterBarrier& barrier, uint32_t parity) {
  constexpr uint32_t kSuspendHintNs = 10000000u;  // an upper bound: the phase's completion wakes the warp sooner
  const uint32_t addr = cute::cast_smem_ptr_to_uint(&barrier);
  asm volatile(
      "{\n .reg .pred done;\n WAIT:\n mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1, %2;\n"
      " @!done bra WAIT;\n}\n" ::"r"(addr), "r"(parity), "r"(kSuspendHintNs)
      : "memory");
}

// The state reader's loop (the kStateReaderThreads = 32 lanes of the producer's warp 1; see RowHandOff).
template <class Tr>
__device__ void state_reader_loop(typename Tr::Params const& p, typename Tr::SharedStorage& ss, int thread) {
  constexpr int kThreads = Tr::kStateReaderThreads;
  static_assert(kThreads == 32, "one warp: __syncwarp orders its shared-memory words");
  const RowHandOff<Tr> rows(ss, p);
  const int64_t total = Tr::kSplitSkip ? skip_items(p) : int64_t(p.num_m_tiles) * p.heads * p.batch;
  // The row in each buffer (registers: the slot is 0 or 1); held_whole: not a unit of the split tail, whose
  // state split_vote_kernel writes.
  int held[2] = {-1, -1};
  bool held_whole[2] = {true, true};
  int it = 0;
  for (;; ++it) {
    const int slot = rows.slot(it);
    if (it >= rows.count) {  // the buffer's previous row: its last vote is in; write it back
      sleeping_wait(ss.state_empty[slot], rows.parity(it) ^ 1u);
      if (slot ? held_whole[1] : held_whole[0])
        store_skip_state<Tr::kConsumerWarps>(p, slot ? held[1] : held[0], rows.buffer(it), thread, kThreads);
    }
    int next = 0, unit = -1;
    if (thread == 0) {
      const int64_t k = p.work_counter != nullptr ? int64_t(atomicAdd(p.work_counter, 1))
                                                  : int64_t(blockIdx.x) + int64_t(it) * gridDim.x;
      if constexpr (Tr::kSplitSkip) next = k < total ? skip_item_row(p, k, unit) : -1;
      else next = k < total ? (p.schedule != nullptr ? p.schedule[k] : int(k)) : -1;
      ss.state_row[slot] = next;  // for the TMA thread and the consumers (thread 0's state_full arrival releases it)
      if constexpr (Tr::kSplitSkip) ss.state_unit[slot] = unit;
    }
    __syncwarp();  // this warp's accesses to the buffer so far come before the refill below
    // The lanes take the row from lane 0's register, not from shared memory: one access fewer to order against the
    // next refill of state_row.
    const int row = __shfl_sync(0xffffffffu, next, 0);
    const bool whole_row = __shfl_sync(0xffffffffu, unit, 0) < 0;
    if (slot) held[1] = row, held_whole[1] = whole_row;
    else held[0] = row, held_whole[0] = whole_row;
    if (row >= 0) {
      const StateBuffer buf = rows.buffer(it);
      load_skip_state<Tr::kBN, Tr::kConsumerWarps>(p, row, buf, thread, kThreads);
      __syncwarp();  // every visit word is in
      build_visit_order<Tr::kBM, Tr::kBN>(p, buf, tile_of_row(row, p.num_m_tiles, p.heads).m, thread, kThreads);
    }
    release_buffer(ss.state_full[slot]);  // this thread's words (and the row) are visible to the waiters
    if (row < 0) break;
  }
  // The rows still held (the last count - 1 iterations before the -1).
  for (int j = it - rows.count + 1 > 0 ? it - rows.count + 1 : 0; j < it; ++j) {
    sleeping_wait(ss.state_empty[rows.slot(j)], rows.parity(j));
    if (rows.slot(j) ? held_whole[1] : held_whole[0])
      store_skip_state<Tr::kConsumerWarps>(p, rows.slot(j) ? held[1] : held[0], rows.buffer(j), thread, kThreads);
  }
}

// Segments of `segment_rows` consecutive state rows (one head, or all of them), each ranked by one or
// more CTAs of `slice_rows` rows: the live count of each row (valid bits only), then its rank in the
// segment by descending count (ties: ascending row), O(segment_rows^2) compares in shared memory --
// small next to the segment's attention tiles (segment_rows * Nt of them).
// work_counter (nullable): set to 0 (the persistent skip kernel's row counter; launch_lpt_schedule).
__global__ void lpt_schedule_kernel(const int32_t* __restrict__ state, int segment_rows, int slice_rows,
                                    int num_state_words, int num_n_tiles, int32_t* __restrict__ schedule,
                                    int32_t* __restrict__ work_counter);

}  // namespace liteattn
