// Host-side API of the liteattn forward kernel. Plain C++: no CUDA or CuTe types, so
// bindings.cpp (compiled by the host compiler) and the .cu files share it.
#pragma once
#include <array>
#include <cstdint>

#include "liteattn_tile_shapes.h"

namespace liteattn {

// Everything one forward call needs. Element strides of (batch, head, seq); the head
// dimension is contiguous. Pointers are device addresses.
struct FwdArgs {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;  // (B, H, S_q) contiguous
  int batch = 0, heads = 0, seqlen_q = 0, seqlen_k = 0, head_dim = 0;
  DType dtype = DType::kBFloat16;
  std::array<int64_t, 3> q_stride{}, k_stride{}, v_stride{}, out_stride{};
  float scale = 0.f;
  int32_t* state = nullptr;          // (B, H, Mt, W) int32; nullptr -> dense path
  const float* threshold = nullptr;  // (H,) float32, log2 units
  const int32_t* must_do = nullptr;  // (R, 2) [start, end) key ranges
  int num_must_do = 0;
  const int32_t* must_skip = nullptr;
  int num_must_skip = 0;
  // Skip path: B*H*Mt int32 of device scratch for the query-tile order (tile_scheduler.cuh),
  // written and read within the call; nullptr -> query tiles in natural order.
  int32_t* schedule = nullptr;
  // Skip path, persistent variant: one int32 of device scratch, the CTAs' shared count of the rows handed
  // out (zeroed on the stream by the launch); nullptr -> each CTA takes the rows c, c + G, c + 2G, ...
  int32_t* work_counter = nullptr;
  // INT8 Q/K mode (out/INT8_SPEC.md): q and k point at the int8 (B, H, S, D) buffers of quantize_qk (strides in
  // elements = bytes), `dtype` is that of v and out; q_scale (B, H, Mt) and k_scale (B, H, Nt) float32.
  // q_mu (B, H, S_q) float32: q[i] . mu of the pre-pass; the kernel adds scale * q_mu to the LSE, so that the
  // LSE is that of the unsmoothed scores (softmax ignores the per-row constant q . mu, the LSE does not).
  bool int8 = false;
  const float* q_scale = nullptr;
  const float* k_scale = nullptr;
  const float* q_mu = nullptr;
  // The split tail (KernelVariant::split_tail on the dense path, split_skip on the skip path): float32 device
  // scratch of split_workspace_floats(...) for the tail's partial results (nullptr: the tail is not split).
  float* split_workspace = nullptr;
  int64_t split_workspace_size = 0;  // its floats; a split that needs more is not taken
  // Per-CTA timeline (KernelVariant::timeline, A/B builds only; tools/cta_timeline.py): uint64 (timeline_ctas,
  // kTimelineHeader + kTimelineMarks * timeline_rows) of %globaltimer nanoseconds (the layout: at kTimelineHeader
  // below). nullptr: none; set without that variant bit: std::invalid_argument.
  uint64_t* timeline = nullptr;
  int timeline_ctas = 0, timeline_rows = 0;
  void* stream = nullptr;            // cudaStream_t
};

// The dense path's wave tail (KernelVariant::split_tail). A persistent grid of G = SMs CTAs takes the T
// query tiles round-robin, so T % G tiles run alone in a last round that leaves the other SMs idle (3072
// tiles at 32760 x 12 x 128: 23 rounds and 36 tiles, 3 % of the time). With the split, the T % G tail
// tiles are cut into `chunks` ranges of the key tiles each (every CTA takes at most one range), each range's
// O (normalised) and LSE go to float32 scratch, and split_combine_kernel merges them by their LSEs.
// chunks < 2: no split.
struct SplitTailPlan {
  int chunks = 0;   // key ranges per tail tile
  int whole = 0;    // query tiles computed whole (a multiple of the grid)
  int units = 0;    // tail tiles x chunks, one per CTA
  int grid = 0;     // CTAs
};
constexpr int kSplitMaxChunks = 16, kSplitMinChunkTiles = 4;
constexpr SplitTailPlan split_tail_plan(int64_t tiles, int sms, int num_n_tiles) {
  SplitTailPlan plan;
  const int64_t rounds = tiles / sms, tail = tiles - rounds * sms;
  if (tail == 0) return plan;
  int64_t chunks = sms / tail;
  if (chunks > num_n_tiles / kSplitMinChunkTiles) chunks = num_n_tiles / kSplitMinChunkTiles;
  if (chunks > kSplitMaxChunks) chunks = kSplitMaxChunks;
  if (chunks < 2) return plan;
  plan.chunks = int(chunks);
  plan.whole = int(rounds * sms);
  plan.units = int(tail * chunks);
  plan.grid = rounds > 0 ? sms : plan.units;
  return plan;
}
// Floats of scratch a split tail needs: units x BM x (D + 1) (each unit's O rows, then every unit's LSE rows);
// on the skip path (KernelVariant::split_skip) also tail tiles x Nt x BM: each visited key tile's row maxima
// (log2 units; NaN where the row's sum had turned non-finite), from which split_vote_kernel takes the skip
// decisions once the whole row is known, in the visit order of the contract.
constexpr int64_t split_workspace_floats(const SplitTailPlan& plan, int bm, int head_dim, bool skip = false,
                                         int num_n_tiles = 0) {
  if (plan.chunks < 2) return 0;
  const int64_t records = skip ? int64_t(plan.units / plan.chunks) * num_n_tiles * bm : 0;
  return int64_t(plan.units) * bm * (head_dim + 1) + records;
}
// The current device's SM count (forward.cu).
int device_sm_count();
// Asks for the largest shared-memory carveout for `kernel` (forward.cu): the small kernels launched next to the
// forward kernel (schedule, split-tail combine and vote), so that the SMs need not change their L1 / shared-memory
// split between them and it (227 KB of shared memory). With the memset's removal the skip call's idle GPU time fell
// from 14.6 to 5.0 us (NOTES.md wave 19; which of the two did it was not measured).
void prefer_forward_carveout(const void* kernel);
// The dense call's scratch (forward.cu: the variant of the call, the device's SM count); 0 when no split.
int64_t dense_split_workspace_floats(int batch, int heads, int seqlen_q, int seqlen_k, int head_dim, DType dtype,
                                     bool int8);
// The skip path's (KernelVariant::split_skip); 0 when no split.
int64_t skip_split_workspace_floats(int batch, int heads, int seqlen_q, int seqlen_k, int head_dim, DType dtype,
                                    bool int8);
// split_combine.cu: each tail tile's rows from its chunks' partial O / LSE (natural log) into out and lse.
struct SplitCombineArgs {
  const float* partial_o = nullptr;    // (units, BM, D)
  const float* partial_lse = nullptr;  // (units, BM)
  void* out = nullptr;
  float* lse = nullptr;
  DType dtype = DType::kBFloat16;
  int64_t out_stride_b = 0, out_stride_h = 0, out_stride_s = 0;
  int heads = 0, seqlen_q = 0, num_m_tiles = 0, bm = 0, head_dim = 0;
  int whole = 0, units = 0, chunks = 0;
  // The skip path's query-tile order (tail tile t is the state row schedule[whole + t]); null: row whole + t.
  const int32_t* schedule = nullptr;
  void* stream = nullptr;
};
void launch_split_combine(const SplitCombineArgs& args);

// Largest number of 32-bit state words per (b, h, m) row the skip kernel keeps in
// shared memory: Nt <= max_state_words(head_dim, dtype) * 32 key tiles. The skip path's per-row
// bookkeeping (visit, keep and one verdict row per consumer warp: 4 bytes per word each; the visit
// order: 2 bytes per tile) shares the 227 KiB with the Q tile and the two-stage K and V rings, so a
// wide key tile leaves room for fewer words: 512 at head dim 64 (192 x 128 tiles), 184 at head dim 128
// (128 x 176 tiles: 1,036,288 keys).
constexpr int kMaxStateWords = 512;
constexpr int max_state_words(int head_dim, DType dtype) {
  const TileShape t = tile_shape(head_dim, dtype);
  const int tile_bytes = (t.bm + 2 * 2 * t.bn) * head_dim * 2;  // Q, 2 K stages, 2 V stages (16-bit elements)
  const int bytes_per_word = 4 * (2 + t.bm / 64 * 4) + 2 * 32;
  const int words = (227 * 1024 - tile_bytes - 256) / bytes_per_word;
  return t.bm == 0 ? 0 : words < kMaxStateWords ? words : kMaxStateWords;
}

// Scope of the heaviest-first query-tile order (tile_scheduler.cuh): the whole grid when the K/V
// of all heads fit in this much of L2 and there are at most this many query-tile rows; else per
// head, when a head has at most kMaxScheduledMTiles query tiles; else natural order.
constexpr int64_t kGlobalScheduleKVBytes = int64_t(32) << 20;
constexpr int kMaxGlobalScheduleRows = 4096;
constexpr int kMaxScheduledMTiles = 16384;
enum class ScheduleScope { kNone, kPerHead, kGlobal };
ScheduleScope schedule_scope(int batch, int heads, int num_m_tiles, int seqlen_k, int head_dim);

// Validates (throws std::invalid_argument naming the argument) and launches.
void forward(const FwdArgs& args);

// True when a (b, h, s) view with these element strides at this address can be read
// by the tensor-memory accelerator without a copy: 16-byte aligned base, every stride
// a multiple of 16 bytes (size-1 dimensions exempt) and below 2^40 bytes.
bool tma_compatible(uint64_t ptr, const std::array<int64_t, 3>& stride,
                    const std::array<int64_t, 3>& sizes, int element_bytes);

// One instantiation per (dtype, head dim, skip, kernel variant, INT8); the files are generated by CMake from
// tile_shapes.json (one per instantiation, so the build parallelises).
template <DType kDType, int kHeadDim, bool kSkip, int kVariant, bool kInt8>
void run_fwd(const FwdArgs& args);

// INT8 Q/K pre-pass (int8_prepass.cu, out/INT8_SPEC.md steps 1-2), on `stream`, no host synchronisation.
// Reads q (B, H, S_q, D) and k (B, H, S_k, D) of `dtype` (element strides of (b, h, s), last dim contiguous,
// 16-byte aligned rows); writes q8, k8: int8 (B, H, S, D) contiguous; q_scale (B, H, Mt), k_scale (B, H, Nt),
// k_mean (B, H, D) float32 (the smoothing mean mu), q_mu (B, H, S_q) float32 (q[i] . mu, float32 products and
// sums in no specified order: the LSE correction, not part of the bitwise contract). `partial`: device scratch
// of B * H * kInt8MeanMaxSplits * D float32 for the mean's column sums.
struct QuantArgs {
  const void* q = nullptr;
  const void* k = nullptr;
  int batch = 0, heads = 0, seqlen_q = 0, seqlen_k = 0, head_dim = 0;
  DType dtype = DType::kBFloat16;
  std::array<int64_t, 3> q_stride{}, k_stride{};
  int8_t* q8 = nullptr;
  int8_t* k8 = nullptr;
  float* q_scale = nullptr;
  float* k_scale = nullptr;
  float* k_mean = nullptr;
  float* q_mu = nullptr;
  float* partial = nullptr;
  void* stream = nullptr;
};
constexpr int kInt8MeanMaxSplits = 16;
void quantize_qk(const QuantArgs& args);

// Kernel variant: the code-path choices of one instantiation that the tile table does not fix, packed
// in an int (a template argument). forward() runs default_variant(head_dim) (NOTES.md has the measurements
// behind it). A/B builds (cmake -DLITEATTN_AB_VARIANTS="id;id;...") also compile the listed variants for
// bf16 (both Q/K modes; a variant that overrides BN only for the 16-bit dense path) and let the environment
// variable LITEATTN_VARIANT pick one per call by name ("pp", "nopp", "lazy", "early", "serial", "maskbranch",
// "persist", "treemax", "latevote", "persistskip", "widev", "splittail", "splitskip", "timeline", "bn176", "nolpt",
// joined by '+').
struct KernelVariant {
  bool ping_pong;      // consumer warpgroups take turns to issue their GEMMs (named_barriers.cuh)
  bool lazy_rescale;   // rescale O only when a row max grows by more than kLazyRescaleLog2 (softmax.cuh)
  bool early_rescale;  // rescale O after issuing S(n+1), just before O += P(n) V(n) (mainloop.cuh)
  int bn;              // key-tile width; 0: the tile table's. Dense path only (the skip state is per table tile)
  bool serial_softmax; // wait for O += P(n-1) V(n-1) too before the softmax of tile n (no overlap inside the
                       // warpgroup; the other warpgroups' GEMMs still overlap it)
  bool mask_branch;    // the partial last tile's column mask on its own branch (always so at head dim 64)
  bool persistent;     // dense path: one CTA per SM walks the query tiles (tile_scheduler.cuh), so the next
                       // tile's Q and K load while this one's last P V and epilogue run
  bool tree_max;       // the tile row max over 4 chains per row (softmax.cuh; the same bits)
  bool late_vote;      // skip path: tile n's vote tested and recorded in tile n+1's step, between the GEMM issue
                       // and the wait for S (where the warp waits anyway), not in the softmax (mainloop.cuh)
  bool persistent_skip;  // skip path: one CTA per SM takes rows from the schedule one after another; the
                         // producer's spare warp reads the next row's state (and write the last one's back)
                         // while the consumers run (fwd_kernel.cuh, tile_scheduler.cuh)
  bool wide_v;         // V^T's shared-memory atoms laid out key-row-major, so that one TMA box per 64 head-dim
                       // columns loads a whole V tile (D / 64 boxes instead of D / 64 * BN / 8; fwd_traits.cuh)
  bool split_tail;     // dense path, persistent: the last round's query tiles split by key ranges (SplitTailPlan)
  bool split_skip;     // skip path: the same for the last round's rows, by ranges of their visit lists; the votes
                       // of those rows deferred to split_vote_kernel (split_vote.cuh)
  bool timeline;       // records each CTA's timeline (FwdArgs::timeline): a measuring instrument, never a default
};
// The timeline's layout per CTA: a header of kTimelineHeader slots (the CTA's entry, its consumers' last row done,
// its producer thread's last load issued, the rows recorded), then per row i < timeline_rows kTimelineMarks marks
// from kTimelineHeader + kTimelineMarks * i (the row handed to the consumers, its first K tile arrived, its epilogue
// done; consumer warpgroup 0, thread 0).
constexpr int kTimelineEntry = 0, kTimelineConsumersDone = 1, kTimelineProducerDone = 2, kTimelineRowCount = 3,
              kTimelineHeader = 4;
constexpr int kTimelineRowHanded = 0, kTimelineRowFirstK = 1, kTimelineRowDone = 2, kTimelineMarks = 3;
constexpr int kVariantPingPong = 1, kVariantLazyRescale = 2, kVariantEarlyRescale = 4, kVariantBnShift = 3,
              kVariantSerialSoftmax = 256, kVariantMaskBranch = 512, kVariantPersistent = 1024, kVariantTreeMax = 2048,
              kVariantLateVote = 4096, kVariantPersistSkip = 8192,
              kVariantWideV = 16384, kVariantSplitTail = 32768, kVariantSplitSkip = 65536, kVariantTimeline = 131072;
// Bits 12-16 held the measured and removed poly / prewait / mmasum / pin / rowlazy / rowstores / peelmask variants
// (NOTES.md); bits 12-16 are now latevote, persistskip, widev, splittail and splitskip; bit 17 (wave 19's measured
// and removed quietreader) is the timeline.
constexpr KernelVariant decode_variant(int id) {
  return {(id & kVariantPingPong) != 0, (id & kVariantLazyRescale) != 0, (id & kVariantEarlyRescale) != 0,
          16 * ((id >> kVariantBnShift) & 31), (id & kVariantSerialSoftmax) != 0, (id & kVariantMaskBranch) != 0,
          (id & kVariantPersistent) != 0, (id & kVariantTreeMax) != 0, (id & kVariantLateVote) != 0,
          (id & kVariantPersistSkip) != 0, (id & kVariantWideV) != 0, (id & kVariantSplitTail) != 0,
          (id & kVariantSplitSkip) != 0, (id & kVariantTimeline) != 0};
}
// Head dim 128: lazy rescale (+1-5 % dense with BN 192, NOTES.md v9); head dim 64 (softmax-bound, BM 192): not.
// Both: persistent CTAs on the dense path (NOTES.md v10; the INT8 mode's: v11).
// Both: the 16-bit skip path's vote one tile late (NOTES.md wave 10; the INT8 mode keeps it in the softmax).
// Head dim 128: V^T loaded in 2 TMA boxes a tile, not 44 (NOTES.md wave 12; at 64 both layouts are one box).
// Head dim 128: persistent CTAs on the skip path too (NOTES.md waves 11-14: racecheck-clean since wave 13's
// hand-off fixes; f = 1 level, the structured case 10 % faster). Not at 64: f = 1 2-2.5 % slower and the demo
// DiT's structured case level (wave 14 call 2).
// Both: the dense path's last round split by key ranges where it leaves SMs idle (NOTES.md wave 15).
// Head dim 128: the skip path's last round split too (NOTES.md waves 16-18: f = 1 -2.1 % at 32760x12x128 by the clock
// probe, racecheck / synccheck clean). Not at 64: no gain there (wave 17).
constexpr int default_variant(int head_dim) {
  return head_dim == 128  ? kVariantPingPong | kVariantLazyRescale | kVariantPersistent | kVariantTreeMax | kVariantLateVote |
                                kVariantWideV | kVariantPersistSkip | kVariantSplitTail | kVariantSplitSkip
         : head_dim == 64 ? kVariantPingPong | kVariantPersistent | kVariantTreeMax | kVariantLateVote | kVariantSplitTail
                          : 0;
}

// tile_scheduler.cu: the heaviest-first order of each segment of `segment_rows` consecutive
// query-tile rows (a head, or all of them), on the device.
// work_counter (nullable): zeroed by the kernel, so that the persistent skip kernel's counter needs no memset.
void launch_lpt_schedule(const int32_t* state, int segments, int segment_rows, int num_state_words,
                         int num_n_tiles, int32_t* schedule, int32_t* work_counter, void* stream);

}  // namespace liteattn
