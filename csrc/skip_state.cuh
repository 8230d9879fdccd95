// Skip-state stage: the skip state of one (b, h, m) row. Read (which KV tiles to visit, in which
// order), vote (each consumer warp's verdict per visited tile) and write-back. Semantics: the README
// "Semantics" section and the header of liteattn_ops/core/reference.py; both sides must agree bit
// for bit.
#pragma once
#include <cmath>
#include <cstdint>

#include <cute/arch/util.hpp>

#include "liteattn.h"

namespace liteattn {

// Bits [lo, hi) of a 32-bit word, 0 <= lo <= hi <= 32.
__device__ __forceinline__ uint32_t bit_range(int lo, int hi) {
  if (lo >= hi) return 0u;
  const uint32_t upper = hi >= 32 ? ~0u : ((1u << hi) - 1u);
  return upper & ~((1u << lo) - 1u);
}

// Bits of word `w` for the tiles in [tile_lo, tile_hi).
__device__ __forceinline__ uint32_t tile_bits(int64_t tile_lo, int64_t tile_hi, int w) {
  const int64_t base = int64_t(w) * 32;
  const int64_t lo = tile_lo > base ? tile_lo - base : 0;
  const int64_t hi = tile_hi < base + 32 ? tile_hi - base : 32;
  return lo < hi ? bit_range(int(lo), int(hi)) : 0u;
}

// Tiles of word w that overlap any [start, end) key range (must-do), or that lie
// entirely inside one (must-skip). Tile n covers keys [n*BN, min((n+1)*BN, S_k)).
// Any range values are safe: they are clamped to [0, S_k) and only build masks.
template <int kBN>
__device__ uint32_t range_bits(const int32_t* ranges, int num_ranges, int w, int seqlen_k, int num_tiles,
                               bool inside) {
  uint32_t bits = 0;
  for (int r = 0; r < num_ranges; ++r) {
    const int64_t start = ranges[2 * r] > 0 ? ranges[2 * r] : 0;
    const int64_t end = ranges[2 * r + 1] < seqlen_k ? ranges[2 * r + 1] : seqlen_k;
    if (start >= end) continue;
    int64_t lo, hi;
    if (inside) {
      lo = (start + kBN - 1) / kBN;                       // first tile starting at or after `start`
      hi = end >= seqlen_k ? num_tiles : end / kBN;       // tiles ending at or before `end`
    } else {
      lo = start / kBN;
      hi = (end + kBN - 1) / kBN;
    }
    bits |= tile_bits(lo, hi, w);
  }
  return bits;
}

// *ptr |= bits where pred holds, as a predicated load / or / store (no branch: a branch here
// splits the softmax into basic blocks the compiler cannot schedule across). Not atomic:
// each warp ORs into words no other warp writes. (A predicated red.shared.or is turned by
// ptxas into a warp-aggregated atomic behind a branch, which is what this avoids.)
__device__ __forceinline__ void shared_or_if(uint32_t* ptr, uint32_t bits, bool pred) {
  asm volatile(
      "{\n .reg .pred p;\n .reg .b32 t;\n setp.ne.b32 p, %2, 0;\n @p ld.shared.b32 t, [%0];\n"
      " or.b32 t, t, %1;\n @p st.shared.b32 [%0], t;\n}\n" ::"r"(cute::cast_smem_ptr_to_uint(ptr)),
      "r"(bits), "r"(int(pred))
      : "memory");
}

// ---------------------------------------------------------------------------------------------
// Read
// ---------------------------------------------------------------------------------------------

// One state row's bookkeeping in shared memory (SharedStorage::state_words / order): visit, keep, then one
// verdict row per consumer warp, `stride` words each; the visit order, 32 * stride tiles.
struct StateBuffer {
  uint32_t* words;
  uint16_t* order;
  int stride;
  __device__ __forceinline__ uint32_t* visit() const { return words; }
  __device__ __forceinline__ uint32_t* keep() const { return words + stride; }
  __device__ __forceinline__ uint32_t* warp_keep(int warp) const { return words + (2 + warp) * stride; }
  // Buffer i of `count` in the shared arrays of `capacity` words per array.
  static __device__ __forceinline__ StateBuffer of(uint32_t* words, uint16_t* order, int capacity, int count, int i,
                                                   int warps) {
    const int stride = capacity / count;
    return {words + i * (2 + warps) * stride, order + i * 32 * stride, stride};
  }
};

// Fills the buffer's visit/keep words for state row `row` and zeroes the consumer warps' verdict words;
// threads `thread` of `num_threads` take part (a barrier over them must follow before build_visit_order).
// visit = (live | do) & ~skip; keep starts as do.
template <int kBN, int kWarps, class Params>
__device__ void load_skip_state(const Params& p, int64_t row, StateBuffer buf, int thread, int num_threads) {
  const int32_t* state = p.state + row * p.num_state_words;
  for (int w = thread; w < p.num_state_words; w += num_threads) {
    const uint32_t valid = tile_bits(0, p.num_n_tiles, w);
    const uint32_t live = static_cast<uint32_t>(state[w]);
    const uint32_t must_do = range_bits<kBN>(p.must_do, p.num_must_do, w, p.seqlen_k, p.num_n_tiles, false);
    const uint32_t must_skip =
        range_bits<kBN>(p.must_skip, p.num_must_skip, w, p.seqlen_k, p.num_n_tiles, true) & ~must_do;
    buf.visit()[w] = (live | must_do) & ~must_skip & valid;
    buf.keep()[w] = must_do & valid;
  }
  for (int i = thread; i < kWarps * p.num_state_words; i += num_threads)
    buf.warp_keep(i / p.num_state_words)[i % p.num_state_words] = 0u;
}

// n0 of the contract, in 64-bit arithmetic.
__device__ __forceinline__ int first_tile(int m, int bm, int bn, int seqlen_q, int seqlen_k, int num_tiles) {
  const int64_t start = (int64_t(m) * bm * seqlen_k) / (int64_t(seqlen_q) * bn);
  return start < num_tiles - 1 ? int(start) : num_tiles - 1;
}

// The fixed visit order of the contract: n0, n0+1, ..., Nt-1, 0, ..., n0-1, visited
// tiles only, with n0 = min(Nt-1, floor(m*BM*S_k / (S_q*BN))).
//
// Skip path: the threads that loaded the state of query tile m write the visited tiles into a list in shared
// memory once (build_visit_order, before the barrier or hand-off its readers wait on), already in that order:
// position 0 holds the first visited tile >= n0 (or, when there is none, the first visited tile). Producer and
// consumers then walk it with one pointer (TileOrder<true>): one shared-memory load per tile, no wrap and no
// search in the loop, and nothing written during it (so no hand-off between the warps to synchronise).
// Dense path: plain arithmetic.
template <int kBM, int kBN, class Params>
__device__ void build_visit_order(const Params& p, StateBuffer buf, int m, int thread, int num_threads) {
  const int n0 = first_tile(m, kBM, kBN, p.seqlen_q, p.seqlen_k, p.num_n_tiles);
  int count = 0, first = 0;  // visited tiles, and those below n0 (they come last)
  for (int v = 0; v < p.num_state_words; ++v) {
    const uint32_t bits = buf.visit()[v];
    count += __popc(bits);
    first += __popc(bits & tile_bits(0, n0, v));
  }
  for (int w = thread; w < p.num_state_words; w += num_threads) {
    int pos = -first;
    for (int v = 0; v < w; ++v) pos += __popc(buf.visit()[v]);
    if (pos < 0) pos += count;
    for (uint32_t bits = buf.visit()[w]; bits != 0u; bits &= bits - 1u) {
      buf.order[pos] = uint16_t(32 * w + __ffs(bits) - 1);
      if (++pos == count) pos = 0;
    }
  }
}

template <bool kSkip>
struct TileOrder;

// chunks > 1 (the skip path's split tail, kSplitSkip): only positions [chunk * C / chunks, (chunk + 1) * C / chunks)
// of the C visited tiles' order, so that the chunks of a row take near-equal numbers of visited tiles.
template <>
struct TileOrder<true> {
  const uint16_t* next;  // into StateBuffer::order (build_visit_order), one past the last: `end`
  const uint16_t* end;
  __device__ TileOrder(const uint32_t* visit, const uint16_t* order, int num_tiles, int chunk = 0, int chunks = 1) {
    int count = 0;
    for (int w = 0; w < (num_tiles + 31) / 32; ++w) count += __popc(visit[w]);
    next = order + chunk * count / chunks;
    end = order + (chunk + 1) * count / chunks;
  }
  __device__ __forceinline__ bool more() const { return next != end; }
  __device__ __forceinline__ int current() const { return *next; }
  __device__ __forceinline__ void advance() { ++next; }
};

template <>
struct TileOrder<false> {
  int n;
  int n0, num_tiles;
  bool wrapped = false;
  __device__ TileOrder(const uint32_t*, const uint16_t*, int n0_, int num_tiles_)
      : n(n0_), n0(n0_), num_tiles(num_tiles_) {}
  __device__ __forceinline__ bool more() const { return n >= 0; }
  __device__ __forceinline__ int current() const { return n; }
  __device__ __forceinline__ void advance() {
    ++n;
    if (n == num_tiles) { n = 0; wrapped = true; }
    if (wrapped && n == n0) n = -1;  // back at n0: done
  }
};

// Dense path with the split tail: `count` tiles of the dense visit order (n0, n0 + 1, ..., wrapping at num_tiles)
// from position `begin` (< num_tiles).
struct TileRange {
  int n, remaining, num_tiles;
  __device__ TileRange(int n0, int num_tiles_, int begin, int count)
      : n(n0 + begin < num_tiles_ ? n0 + begin : n0 + begin - num_tiles_), remaining(count), num_tiles(num_tiles_) {}
  __device__ __forceinline__ bool more() const { return remaining > 0; }
  __device__ __forceinline__ int current() const { return n; }
  __device__ __forceinline__ void advance() {
    --remaining;
    if (++n == num_tiles) n = 0;
  }
};

// ---------------------------------------------------------------------------------------------
// Vote
// ---------------------------------------------------------------------------------------------

// Not +-inf and not NaN: one FSETP with |x| (an ordered compare is false on NaN; nvcc's fast-math does not assume
// finite values). The integer form, (bits & 0x7fffffff) < 0x7f800000, cost a LOP3 and an ISETP per value in the
// vote (NOTES.md "Wave 18").
__device__ __forceinline__ bool is_finite(float x) { return fabsf(x) < __int_as_float(0x7f800000); }

// A valid row finds the tile negligible only when its running max before the tile (r) and the
// tile's row max (l) are both finite and l - r <= threshold (log2 units). A non-finite one (the
// first visited tile: r = -inf; a +inf score; r = +inf after one) never is, so one +inf key cannot
// make every later tile negligible. NaN: fmaxf drops NaN scores from the kernel's maxima, but a NaN
// score makes this thread's row sum NaN from that tile on -- exactly the tiles where the
// reference's l or r (torch.amax / cummax propagate NaN) is NaN -- so a non-finite row sum keeps
// the tile too (the warp's vote ORs the lanes of a row).
__device__ __forceinline__ bool row_keeps_tile(float tile_max, float running_max, float row_sum, float threshold) {
  return !(is_finite(tile_max) & is_finite(running_max) & is_finite(row_sum) & (tile_max - running_max <= threshold));
}

// One consumer thread's vote on the tiles it visits (two rows per thread). Skip path only: the
// dense path instantiates the empty specialisation.
template <bool kSkip>
struct TileVote {
  float threshold;
  bool row_valid[2];
  uint32_t* warp_words;  // this warp's verdict words (StateBuffer::warp_keep(warp))
  int lane;

  // True when one of this thread's valid rows keeps the tile (row_sum: after the tile).
  __device__ __forceinline__ bool keeps(const float (&tile_max)[2], const float (&old_max)[2],
                                        const float (&row_sum)[2]) const {
    return (row_valid[0] & row_keeps_tile(tile_max[0], old_max[0], row_sum[0], threshold)) |
           (row_valid[1] & row_keeps_tile(tile_max[1], old_max[1], row_sum[1], threshold));
  }
  // kSplitSkip, a unit of the split tail: no vote here (the running max before a tile is not known to a CTA
  // that starts inside the row); the tile's row maxima go to `records` (BM floats per key tile, rows of the
  // query tile) and split_vote_kernel votes once every range is in. NaN where the row's sum -- on any lane of
  // its quad -- is not finite after the tile: from that tile on the row keeps every tile (row_keeps_tile).
  float* records = nullptr;
  int record_row = 0;  // this thread's first row within the query tile (the second: + 8)
  int bm = 0;
  __device__ __forceinline__ void store_records(int n, const float (&tile_max)[2], const float (&row_sum)[2]) const {
    int bad[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      bad[r] = !is_finite(row_sum[r]);
      bad[r] |= __shfl_xor_sync(0xffffffffu, bad[r], 1);
      bad[r] |= __shfl_xor_sync(0xffffffffu, bad[r], 2);
    }
    if (lane % 4 == 0) {
      float* column = records + int64_t(n) * bm + record_row;
#pragma unroll
      for (int r = 0; r < 2; ++r)
        if (row_valid[r]) column[8 * r] = bad[r] ? NAN : tile_max[r];
    }
  }
  // The vote on tile n (record below), or in a split-tail unit its records.
  __device__ __forceinline__ void note(int n, const float (&tile_max)[2], const float (&old_max)[2],
                                       const float (&row_sum)[2]) const {
    if (records != nullptr) store_records(n, tile_max, row_sum);
    else record(n, keeps(tile_max, old_max, row_sum));
  }
  // The warp keeps tile n when any of its threads does; lane 0 ORs that into the warp's own
  // word with a predicated ld/or/st (no branch, no atomic). Called after the wait for O += P V:
  // the shared-memory asm is volatile, so were it issued before that wait it would pin the wait
  // behind it, after most of the exponentials (NOTES.md v5). With Tr::kLateVote it is called one tile
  // later instead, after the next GEMMs are issued and before their wait for S (mainloop.cuh).
  __device__ __forceinline__ void record(int n, bool keep) const {
    const bool warp_keeps = __any_sync(0xffffffffu, keep);
    shared_or_if(&warp_words[n >> 5], 1u << (n & 31), warp_keeps & (lane == 0));
  }
};

template <>
struct TileVote<false> {
  __device__ __forceinline__ bool keeps(const float (&)[2], const float (&)[2], const float (&)[2]) const {
    return false;
  }
  __device__ __forceinline__ void record(int, bool) const {}
  __device__ __forceinline__ void note(int, const float (&)[2], const float (&)[2], const float (&)[2]) const {}
};

// ---------------------------------------------------------------------------------------------
// Write-back
// ---------------------------------------------------------------------------------------------

// new word = (old | do) & ~(negligible | skip) on the valid bits, the others unchanged.
// Since visit = (old | do) & ~skip and negligible = visit & ~(do | some warp kept it),
// that is visit & keep.
template <int kWarps, class Params>
__device__ void store_skip_state(const Params& p, int64_t row, StateBuffer buf, int thread, int num_threads) {
  int32_t* state = p.state + row * p.num_state_words;
  for (int w = thread; w < p.num_state_words; w += num_threads) {
    const uint32_t valid = tile_bits(0, p.num_n_tiles, w);
    const uint32_t old = static_cast<uint32_t>(state[w]);
    uint32_t kept = buf.keep()[w];
#pragma unroll
    for (int warp = 0; warp < kWarps; ++warp) kept |= buf.warp_keep(warp)[w];
    state[w] = static_cast<int32_t>((old & ~valid) | (buf.visit()[w] & kept));
  }
}

}  // namespace liteattn
