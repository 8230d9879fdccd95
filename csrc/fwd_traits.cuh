// Compile-time shape of one forward kernel instantiation: tile sizes, warp roles, register
// budgets, shared-memory layouts, the TMA copy types and the kernel parameters. Every stage
// file (mainloop, softmax, skip_state, epilogue, tile_scheduler) takes its sizes from here.
#pragma once
#include <type_traits>

#include <cute/tensor.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/numeric_types.h>

#include "liteattn.h"
#include "softmax.cuh"

namespace liteattn {

template <DType kDType> struct ElementOf;
template <> struct ElementOf<DType::kBFloat16> { using type = cutlass::bfloat16_t; };
template <> struct ElementOf<DType::kFloat16> { using type = cutlass::half_t; };

// The widest K-major wgmma swizzle atom whose row (128, 64 or 32 bytes) divides a row of kRowBytes bytes:
// SW128 for 16-bit rows of 64 or 128 elements and for int8 rows of 128; SW64 for int8 rows of 64.
template <class T, int kRowBytes>
using KMajorAtom = std::conditional_t<
    kRowBytes % 128 == 0, cute::GMMA::Layout_K_SW128_Atom<T>,
    std::conditional_t<kRowBytes % 64 == 0, cute::GMMA::Layout_K_SW64_Atom<T>, cute::GMMA::Layout_K_SW32_Atom<T>>>;

// kVariant: decode_variant (liteattn.h) -- ping-pong (the consumer warpgroups take turns to issue their
// GEMMs, named_barriers.cuh, so one warpgroup's softmax runs while another's GEMMs use the tensor cores),
// lazy / early O rescale, serial softmax, persistent CTAs (dense path only) and a BN other than the table's
// (16-bit dense path only).
// kInt8: INT8 Q/K mode (out/INT8_SPEC.md): Q and K arrive as int8 (the pre-pass, int8_prepass.cu, wrote them
// with per-block scales), S = Q K^T is an s8 x s8 -> s32 wgmma and the scores are scaled per tile pair
// (int8_scores.cuh); V, P, O and everything after the scores are as in the 16-bit mode.
template <DType kDType_, int kHeadDim_, bool kSkip_, int kVariant_, bool kInt8_>
struct FwdTraits {
  static constexpr DType kDType = kDType_;
  static constexpr int kD = kHeadDim_;
  static constexpr bool kSkip = kSkip_;
  static constexpr int kVariant = kVariant_;
  static constexpr KernelVariant kVariantInfo = decode_variant(kVariant_);
  static constexpr bool kPingPong = kVariantInfo.ping_pong;
  static constexpr bool kLazyRescale = kVariantInfo.lazy_rescale;
  static constexpr bool kEarlyRescale = kVariantInfo.early_rescale;
  static constexpr bool kSerialSoftmax = kVariantInfo.serial_softmax;
  // Dense path only (both Q/K modes): the skip path reads and writes one state row per tile with the whole CTA.
  static constexpr bool kPersistent = kVariantInfo.persistent && !kSkip_;
  // The dense path has no vote; the INT8 mode's loop has slack where the vote is, and loses 6-9 % with it late
  // (NOTES.md wave 10 call 2).
  static constexpr bool kLateVote = kVariantInfo.late_vote && kSkip_ && !kInt8_;
  // Skip path only (the dense path's persistence is kPersistent): CTAs take state rows one after another.
  static constexpr bool kPersistentSkip = kVariantInfo.persistent_skip && kSkip_;
  // Dense persistent path only: the last round's query tiles split by key ranges (SplitTailPlan, liteattn.h).
  static constexpr bool kSplitTail = kVariantInfo.split_tail && kPersistent;
  // Skip path (both grids): the last round's rows split by ranges of their visit lists, their votes deferred
  // (split_vote.cuh).
  static constexpr bool kSplitSkip = kVariantInfo.split_skip && kSkip_;
  static constexpr bool kTimeline = kVariantInfo.timeline;
  static constexpr bool kInt8 = kInt8_;
  using Softmax = OnlineSoftmax<kLazyRescale, kVariantInfo.tree_max>;
  using Element = typename ElementOf<kDType>::type;      // V, P, O (and Q, K in the 16-bit mode)
  using ElementQK = std::conditional_t<kInt8, int8_t, Element>;  // Q and K in shared memory
  using AccumQK = std::conditional_t<kInt8, int32_t, float>;     // S = Q K^T accumulator
  static_assert(!kInt8 || kD % 32 == 0, "INT8 mode: the s8 wgmma takes K = 32 per instruction");

  // Tile shape: the shared table (liteattn_ops/core/tile_shapes.json) decides.
  static constexpr int kBM = tile_shape(kD, kDType).bm;
  static constexpr int kBN = kVariantInfo.bn ? kVariantInfo.bn : tile_shape(kD, kDType).bn;
  static_assert(kBM > 0 && kBN > 0, "tile_shapes.json has no entry for this (head_dim, dtype)");
  static_assert(!kSkip || kBN == tile_shape(kD, kDType).bn, "the skip state is kept per tile of the table's BN");
  static_assert(!kInt8 || kBN == tile_shape(kD, kDType).bn, "INT8 mode: k_scale is per key block of the table's BN");
  static_assert(kD == 64 || kD == 128, "head dims 64 and 128");
  // One producer warpgroup, then one consumer warpgroup per 64 query rows (2 or 3).
  static_assert(kBM == 128 || kBM == 192, "BM must be 128 or 192 (two or three consumer warpgroups of 64 rows)");
  static_assert(kBN % 16 == 0 && kBN >= 64 && kBN <= 256, "BN must be a wgmma N (multiple of 16, <= 256)");
  static constexpr int kConsumerWarpgroups = kBM / 64;
  static constexpr int kConsumerThreads = 128 * kConsumerWarpgroups;
  static constexpr int kConsumerWarps = kConsumerThreads / 32;
  static constexpr int kThreads = 128 + kConsumerThreads;
  static constexpr int kStateReaderThreads = 32;  // kPersistentSkip: the producer warpgroup's warp 1 (one warp)
  static constexpr int kStages = 2;
  // Where the column mask of a partial last tile goes (measured on the H200, NOTES.md v2/v3):
  // head dim 64 is softmax-bound and runs 3 % faster with the mask on its own branch, taken
  // only for that tile; head dim 128 runs 3 % faster with the mask folded into every tile's
  // max, where the compiler then waits for the previous P V before the exponentials (a side
  // effect that costs 88 FSEL + 44 ISETP per tile at BN 176; the serial + maskbranch variants
  // get the wait without them, NOTES.md "Next experiment").
  static constexpr bool kMaskOnBranch = kD == 64 || kVariantInfo.mask_branch;
  // setmaxnreg budgets. They must add up to at most what the CTA got at launch (65536 / kThreads
  // per thread, rounded down to 8, under __launch_bounds__(kThreads, 1)), otherwise the consumers'
  // setmaxnreg.inc waits forever for registers: 128 * 24 + 256 * 240 = 384 * 168 (two consumer
  // warpgroups), 128 * 24 + 384 * 160 <= 512 * 128 (three).
  static constexpr int kLaunchRegs = 65536 / kThreads / 8 * 8;
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = kConsumerWarpgroups == 2 ? 240 : 160;
  static_assert(128 * kProducerRegs + kConsumerThreads * kConsumerRegs <= kThreads * kLaunchRegs,
                "setmaxnreg budgets exceed the registers the CTA is launched with");

  // Shared-memory tiles. Q and K are K-major (head dim contiguous); V is stored
  // transposed, (D, BN) with D contiguous, the MN-major B operand of O += P V.
  using AtomQK = KMajorAtom<ElementQK, kD * int(sizeof(ElementQK))>;
  using SmemLayoutQ = decltype(cute::tile_to_shape(AtomQK{}, cute::Shape<cute::Int<kBM>, cute::Int<kD>>{}));
  using SmemLayoutKStage = decltype(cute::tile_to_shape(AtomQK{}, cute::Shape<cute::Int<kBN>, cute::Int<kD>>{}));
  using SmemLayoutK = decltype(cute::tile_to_shape(AtomQK{},
                                                   cute::Shape<cute::Int<kBN>, cute::Int<kD>, cute::Int<kStages>>{}));
  // V^T's atoms (64 head-dim columns x 8 key rows, 1 KB): without wide_v in head-dim-major order, so a TMA box is
  // one atom, D / 64 * BN / 8 of them per tile (44 at d128, BN 176: ~500 producer instructions a tile, NOTES.md
  // wave 12); wide_v (the d128 default) orders them key-row-major, so a box of 64 columns x BN rows is contiguous.
  using VtAtomOrder = std::conditional_t<kVariantInfo.wide_v, cute::Step<cute::_2, cute::_1, cute::_3>,
                                         cute::Step<cute::_1, cute::_2, cute::_3>>;
  using SmemLayoutVtStage = decltype(cute::tile_to_shape(cute::GMMA::Layout_MN_SW128_Atom<Element>{},
                                                         cute::Shape<cute::Int<kD>, cute::Int<kBN>>{},
                                                         cute::take<0, 2>(VtAtomOrder{})));
  using SmemLayoutVt = decltype(cute::tile_to_shape(cute::GMMA::Layout_MN_SW128_Atom<Element>{},
                                                    cute::Shape<cute::Int<kD>, cute::Int<kBN>, cute::Int<kStages>>{},
                                                    VtAtomOrder{}));

  // Per-warpgroup GEMMs: S = Q K^T (64 x BN, both operands in smem; s8 x s8 -> s32 in INT8 mode) and
  // O += P V (64 x D, P from registers).
  using TiledMmaQK = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<ElementQK, ElementQK, AccumQK, cute::Shape<cute::_64, cute::Int<kBN>, cute::Int<kD>>>()));
  using TiledMmaPV = decltype(cute::make_tiled_mma(
      cute::GMMA::rs_op_selector<Element, Element, float, cute::Shape<cute::_64, cute::Int<kD>, cute::Int<kBN>>,
                                 cute::GMMA::Major::K, cute::GMMA::Major::MN>()));

  // Global views handed to TMA: (S, D, H, B) for Q and K, (D, S, H, B) for V^T.
  using GmemLayoutRowMajor = cute::Layout<cute::Shape<int32_t, int32_t, int32_t, int32_t>,
                                          cute::Stride<int64_t, cute::_1, int64_t, int64_t>>;
  using GmemLayoutColMajor = cute::Layout<cute::Shape<int32_t, int32_t, int32_t, int32_t>,
                                          cute::Stride<cute::_1, int64_t, int64_t, int64_t>>;
  using GmemPtr = decltype(cute::make_gmem_ptr(static_cast<Element const*>(nullptr)));
  using GmemPtrQK = decltype(cute::make_gmem_ptr(static_cast<ElementQK const*>(nullptr)));
  using TmaQ = decltype(cute::make_tma_copy(cute::SM90_TMA_LOAD{},
                                            cute::make_tensor(GmemPtrQK{}, GmemLayoutRowMajor{}), SmemLayoutQ{}));
  using TmaK = decltype(cute::make_tma_copy(cute::SM90_TMA_LOAD{},
                                            cute::make_tensor(GmemPtrQK{}, GmemLayoutRowMajor{}), SmemLayoutKStage{}));
  using TmaVt = decltype(cute::make_tma_copy(cute::SM90_TMA_LOAD{},
                                             cute::make_tensor(GmemPtr{}, GmemLayoutColMajor{}), SmemLayoutVtStage{}));

  // Bytes each TMA load lands (the transaction counts of the *_full barriers; out-of-bounds rows count too).
  static constexpr uint32_t kQBytes = cute::cosize_v<SmemLayoutQ> * sizeof(ElementQK);
  static constexpr uint32_t kKStageBytes = cute::cosize_v<SmemLayoutKStage> * sizeof(ElementQK);
  static constexpr uint32_t kVStageBytes = cute::cosize_v<SmemLayoutVtStage> * sizeof(Element);
  static_assert(kQBytes == uint32_t(kBM) * kD * sizeof(ElementQK) && kKStageBytes == uint32_t(kBN) * kD * sizeof(ElementQK) &&
                    kVStageBytes == uint32_t(kBN) * kD * sizeof(Element),
                "a TMA box is exactly one tile");
  static constexpr int kStateWords = kSkip ? max_state_words(kD, kDType) : 1;

  struct SharedStorage {
    cute::array_aligned<ElementQK, cute::cosize_v<SmemLayoutQ>, 1024> q;
    cute::array_aligned<ElementQK, cute::cosize_v<SmemLayoutK>, 1024> k;
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutVt>, 1024> v;
    // Pipeline barriers (mainloop.cuh): *_full complete when TMA has landed the bytes,
    // *_empty when every consumer warp is done reading the stage.
    cutlass::arch::ClusterTransactionBarrier q_full;
    cutlass::arch::ClusterBarrier q_empty;  // every consumer warp is done with Q (the persistent kernel's next tile)
    cutlass::arch::ClusterTransactionBarrier k_full[kStages];
    cutlass::arch::ClusterTransactionBarrier v_full[kStages];
    cutlass::arch::ClusterBarrier k_empty[kStages];
    cutlass::arch::ClusterBarrier v_empty[kStages];
    // Skip state of the CTA's (b, h, m) row(s) (skip_state.cuh, StateBuffer): tiles to visit, must-do tiles,
    // per consumer warp the visited tiles some row of that warp found non-negligible (each warp writes only its
    // own words: no atomics in the loop), and the visited tiles in visit order (build_visit_order). One buffer of
    // kStateWords words per array, or (kPersistentSkip, when a row has at most kStateWords / 2 words) two of half the
    // size.
    uint32_t state_words[kSkip ? (2 + kConsumerWarps) * kStateWords : 1];
    uint16_t order[kSkip ? kStateWords * 32 : 1];
    // kPersistentSkip: the state row each buffer holds (-1: no more rows), and its hand-off barriers:
    // state_full when the producer's reader warp has filled it, state_empty when every consumer thread has
    // recorded its last vote in it and the TMA thread has read its last visit-list entry.
    int32_t state_row[2];
    int32_t state_unit[2];  // kSplitSkip: the row's split-tail unit (SplitTailPlan), -1: the whole row
    cutlass::arch::ClusterBarrier state_full[2];
    cutlass::arch::ClusterBarrier state_empty[2];
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage));
  static_assert(kSmemBytes <= 227 * 1024, "shared memory over the sm_90 limit");

  struct Params {
    TmaQ tma_q;
    TmaK tma_k;
    TmaVt tma_vt;
    Element* out = nullptr;
    int64_t out_stride_b = 0, out_stride_h = 0, out_stride_s = 0;
    float* lse = nullptr;
    int batch = 0, heads = 0, seqlen_q = 0, seqlen_k = 0;
    int num_m_tiles = 0, num_n_tiles = 0, num_state_words = 0;
    float scale_log2 = 0.f;  // scale * log2(e): scores to log2 units
    float ln2 = 0.f;         // log2 units back to natural log for the LSE
    int32_t* state = nullptr;
    const float* threshold = nullptr;
    const int32_t* must_do = nullptr;
    int num_must_do = 0;
    const int32_t* must_skip = nullptr;
    int num_must_skip = 0;
    const int32_t* schedule = nullptr;  // tile_scheduler.cuh: (B, H, Mt) query-tile order, or null
    int32_t* work_counter = nullptr;    // kPersistentSkip: rows handed out so far (zeroed by the launch), or null
    const float* q_scale = nullptr;     // INT8 mode: (B, H, Mt) per query block
    const float* k_scale = nullptr;     // INT8 mode: (B, H, Nt) per key block
    const float* q_mu = nullptr;        // INT8 mode: (B, H, S_q) q[i] . mu, added (x scale) to the LSE
    // kSplitTail / kSplitSkip (SplitTailPlan, liteattn.h): split_chunks >= 2 when this call's tail is split; the
    // tail's partial O (split_units, BM, D) and LSE (split_units, BM), float32 scratch merged by
    // split_combine_kernel; kSplitSkip: the tail tiles' row maxima (split_units / split_chunks, Nt, BM) for
    // split_vote_kernel.
    int split_chunks = 0, split_whole = 0, split_units = 0;
    float* split_o = nullptr;
    float* split_lse = nullptr;
    float* split_records = nullptr;
    // kTimeline (KernelVariant::timeline): FwdArgs::timeline, or null.
    uint64_t* timeline = nullptr;
    int timeline_rows = 0;
  };
};

}  // namespace liteattn
