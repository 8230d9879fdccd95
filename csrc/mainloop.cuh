// Mainloop stage: the producer's TMA loads (Q once, K/V tiles through a kStages-deep ring of
// shared-memory buffers) and the consumer warpgroups' GEMMs over the visited tiles, with the
// softmax (softmax.cuh) and the skip vote (skip_state.cuh) in between.
#pragma once
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/numeric_conversion.h>

#include "cta_timeline.cuh"
#include "fwd_traits.cuh"
#include "int8_scores.cuh"
#include "named_barriers.cuh"
#include "skip_state.cuh"
#include "softmax.cuh"
#include "tile_scheduler.cuh"

namespace liteattn {

// Position in a kStages-deep ring of buffers: stage index and mbarrier phase parity.
struct PipelineState {
  int stage = 0;
  uint32_t phase = 0;
  __device__ __forceinline__ void advance(int stages) {
    if (++stage == stages) { stage = 0; phase ^= 1; }
  }
};

// A consumer warp is done with a buffer: one arrival per warp on its "empty" barrier.
__device__ __forceinline__ void release(cutlass::arch::ClusterBarrier& empty, int lane) {
  __syncwarp();
  if (lane == 0) empty.arrive();
}

// C (+)= A * B on one warpgroup: fence, issue every k block, commit. The caller waits.
template <bool kZeroInit, bool kRegisterA, class TiledMma, class TA, class TB, class TC>
__device__ __forceinline__ void warpgroup_gemm(TiledMma& mma, TA& a, TB const& b, TC& c) {
  using namespace cute;
  if constexpr (kRegisterA) warpgroup_fence_operand(a);
  warpgroup_fence_operand(c);
  warpgroup_arrive();
  if constexpr (kZeroInit) mma.accumulate_ = GMMA::ScaleOut::Zero;
  CUTLASS_PRAGMA_UNROLL
  for (int kb = 0; kb < size<2>(a); ++kb) {
    cute::gemm(mma, a(_, _, kb), b(_, _, kb), c);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  warpgroup_fence_operand(c);
  if constexpr (kRegisterA) warpgroup_fence_operand(a);
}

// Float fragment -> 16-bit fragment with the same value order (packed conversions).
template <class Element, class Src, class Dst>
__device__ __forceinline__ void convert_fragment(Src const& src, Dst& dst) {
  constexpr int kN = decltype(cute::size(src))::value;
  static_assert(kN == decltype(cute::size(dst))::value);
  cutlass::NumericArrayConverter<Element, float, kN> convert;
  *reinterpret_cast<cutlass::Array<Element, kN>*>(dst.data()) =
      convert(*reinterpret_cast<cutlass::Array<float, kN> const*>(src.data()));
}

// The float fragment the softmax works on: the S accumulator itself (float), or a float view of the int32
// accumulator's registers (INT8 mode, after int8_accumulator_to_magic).
template <class Frag>
__device__ __forceinline__ decltype(auto) float_scores(Frag& acc) {
  if constexpr (std::is_same_v<typename Frag::value_type, float>) return (acc);
  else return cute::recast<float>(acc);
}

// The key tiles a CTA visits for `tile`, in order: the skip path's visit list, the dense path's visit order from
// n0 (every tile once), or with the split tail `tile.key_count` of them from position `tile.key_begin` (all when
// key_count is 0: a whole tile); the skip path's split tail (kSplitSkip): chunk key_begin of key_count chunks of
// the visit list (key_count 0: all of it). The producer and the consumers build the same one.
template <class Tr>
__device__ __forceinline__ auto visit_order(StateBuffer const& state, QueryTile const& tile, int n0, int num_tiles) {
  if constexpr (Tr::kSplitTail)
    return TileRange(n0, num_tiles, tile.key_begin, tile.key_count ? tile.key_count : num_tiles);
  else if constexpr (Tr::kSplitSkip)
    return TileOrder<true>(state.visit(), state.order, num_tiles, tile.key_begin, tile.key_count ? tile.key_count : 1);
  else if constexpr (Tr::kSkip)
    return TileOrder<true>(state.visit(), state.order, num_tiles);  // n0 is in the list's order already
  else
    return TileOrder<false>(nullptr, nullptr, n0, num_tiles);
}

// Producer (one thread): Q of query tile m, then K and V^T of each visited tile, in the order of
// the contract, into the ring. `iteration` is the CTA's tile count so far (TileSequence) and `write` the
// ring position, kept across the tiles of a persistent CTA: Q is reloaded once every consumer warp has
// released it (after the last S GEMM of the previous tile), and the ring runs on into the next tile.
// `state`: the skip path's visit list of this tile (unused on the dense path).
template <class Tr>
__device__ __forceinline__ void producer_load(typename Tr::Params const& p, typename Tr::SharedStorage& ss,
                                              QueryTile tile, int iteration, PipelineState& write,
                                              StateBuffer state) {
  using namespace cute;
  constexpr int kBM = Tr::kBM, kBN = Tr::kBN, kD = Tr::kD;
  Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), typename Tr::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename Tr::SmemLayoutK{});
  Tensor sVt = make_tensor(make_smem_ptr(ss.v.data()), typename Tr::SmemLayoutVt{});
  Tensor mQ = p.tma_q.get_tma_tensor(make_shape(p.seqlen_q, int32_t(kD), p.heads, p.batch));
  Tensor mK = p.tma_k.get_tma_tensor(make_shape(p.seqlen_k, int32_t(kD), p.heads, p.batch));
  Tensor mVt = p.tma_vt.get_tma_tensor(make_shape(int32_t(kD), p.seqlen_k, p.heads, p.batch));
  Tensor gQ = local_tile(mQ(_, _, tile.h, tile.b), Shape<Int<kBM>, Int<kD>>{}, make_coord(tile.m, 0));  // (BM, D)
  Tensor gK = local_tile(mK(_, _, tile.h, tile.b), Shape<Int<kBN>, Int<kD>>{}, make_coord(_, 0));       // (BN, D, Nt)
  Tensor gVt = local_tile(mVt(_, _, tile.h, tile.b), Shape<Int<kD>, Int<kBN>>{}, make_coord(0, _));     // (D, BN, Nt)
  auto [tQg, tQs] = tma_partition(p.tma_q, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sQ), group_modes<0, 2>(gQ));
  auto [tKg, tKs] = tma_partition(p.tma_k, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gK));
  auto [tVg, tVs] = tma_partition(p.tma_vt, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sVt), group_modes<0, 2>(gVt));

  ss.q_empty.wait((iteration & 1) ^ 1);  // the first tile's wait returns at once
  ss.q_full.arrive_and_expect_tx(Tr::kQBytes);
  copy(p.tma_q.with(reinterpret_cast<uint64_t&>(ss.q_full)), tQg, tQs);

  const int n0 = first_tile(tile.m, kBM, kBN, p.seqlen_q, p.seqlen_k, p.num_n_tiles);
  for (auto tiles = visit_order<Tr>(state, tile, n0, p.num_n_tiles); tiles.more(); tiles.advance()) {
    const int n = tiles.current();
    ss.k_empty[write.stage].wait(write.phase ^ 1);
    ss.k_full[write.stage].arrive_and_expect_tx(Tr::kKStageBytes);
    copy(p.tma_k.with(reinterpret_cast<uint64_t&>(ss.k_full[write.stage])), tKg(_, n), tKs(_, write.stage));
    ss.v_empty[write.stage].wait(write.phase ^ 1);
    ss.v_full[write.stage].arrive_and_expect_tx(Tr::kVStageBytes);
    copy(p.tma_vt.with(reinterpret_cast<uint64_t&>(ss.v_full[write.stage])), tVg(_, n), tVs(_, write.stage));
    write.advance(Tr::kStages);
  }
}

// Consumer warpgroup (64 query rows): for each visited tile n, S = Q K(n)^T, the softmax step and
// the vote, O += P(n) V(n). Software-pipelined inside the warpgroup: S(n) and O += P(n-1) V(n-1)
// are issued back to back and the warpgroup waits only for S(n) before its softmax, so that softmax
// runs while the tensor cores still work on P(n-1) V(n-1). With Tr::kPingPong the warpgroups also
// take turns to issue (MmaTurn): one warpgroup's softmax overlaps another's GEMMs. O is rescaled by the
// softmax step's correction after the wait for P(n-1) V(n-1) or, with Tr::kEarlyRescale, after S(n+1) is
// issued (the tensor cores start on S(n+1) sooner); with Tr::kLazyRescale only when the step asks for it.
// On return tOrO holds the unnormalised O of the visited tiles and `softmax` its row max / sum, and every
// warp has released Q (before the last P V, so that a persistent CTA's next Q loads under it and the
// epilogue). k_read / v_read: the ring positions, kept across a persistent CTA's tiles like the producer's.
// `state`: the skip path's visit list of this tile (the vote writes through `vote`).
template <class Tr, class TensorO>
__device__ __forceinline__ void consumer_mainloop(typename Tr::Params const& p, typename Tr::SharedStorage& ss,
                                                  StateBuffer state, QueryTile tile, int iteration, int warpgroup,
                                                  int t,
                                                  PipelineState& k_read, PipelineState& v_read,
                                                  typename Tr::Softmax& softmax,
                                                  TileVote<Tr::kSkip> const& vote, TensorO& tOrO) {
  using namespace cute;
  using Element = typename Tr::Element;
  using Turn = MmaTurn<Tr::kConsumerWarpgroups, Tr::kPingPong>;
  constexpr int kBM = Tr::kBM, kBN = Tr::kBN, kD = Tr::kD;
  const int lane = t % 32;

  Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), typename Tr::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename Tr::SmemLayoutK{});
  Tensor sVt = make_tensor(make_smem_ptr(ss.v.data()), typename Tr::SmemLayoutVt{});
  Tensor sQw = local_tile(sQ, Shape<_64, Int<kD>>{}, make_coord(warpgroup, 0));  // this warpgroup's rows

  typename Tr::TiledMmaQK mma_qk;
  typename Tr::TiledMmaPV mma_pv;
  auto thr_qk = mma_qk.get_thread_slice(t);
  auto thr_pv = mma_pv.get_thread_slice(t);
  Tensor tSrQ = thr_qk.partition_fragment_A(sQw);   // smem descriptors
  Tensor tSrK = thr_qk.partition_fragment_B(sK);    // (MMA, N, K, stage)
  Tensor tOrVt = thr_pv.partition_fragment_B(sVt);  // (MMA, N, K, stage)

  // INT8 mode: the multiplier of tile n's scores is (q_scale[m] * k_scale[n]) * scale_log2 (int8_scores.cuh);
  // k_scale is loaded one tile ahead. The 16-bit mode's policy is the constant scale_log2.
  KScaleReader<Tr::kInt8> k_scales(p, tile);
  float q_scale = 0.f;
  if constexpr (Tr::kInt8) q_scale = p.q_scale[(int64_t(tile.b) * p.heads + tile.h) * p.num_m_tiles + tile.m];
  auto scores_of = [&](float k_scale) {
    if constexpr (Tr::kInt8) return Int8Scores::make(q_scale, k_scale, p.scale_log2);
    else return RawScores{p.scale_log2};
  };

  // S accumulator (float, or int32 in INT8 mode) and the float fragment the softmax works on: the accumulator
  // itself, or in INT8 mode a float view of its registers (after int8_accumulator_to_magic).
  Tensor tSrS = partition_fragment_C(mma_qk, Shape<_64, Int<kBN>>{});
  auto&& tSrSf = float_scores(tSrS);

  // One tile's softmax step on S (in registers): mask, tile max, running max and sum,
  // probabilities in place. Returns this thread's vote (skip path); sets `rescale` and the factor that
  // rescales the old O. Only the last tile of a sequence whose length is not a multiple of BN needs the mask.
  // `pending` gets the vote's inputs of tile n: with Tr::kLateVote they are tested and recorded during the next
  // tile's step (record_pending), between its GEMM issue and its wait for S, where the warp would only wait --
  // not on the softmax's instruction stream, which is the skip path's critical path (NOTES.md, wave 10).
  const int masked_tile = p.seqlen_k % kBN ? p.num_n_tiles - 1 : -1;
  struct PendingVote {
    int n;
    float tile_max[2], old_max[2];
  } pending;
  auto record_pending = [&] {
    if constexpr (Tr::kLateVote) {
      if constexpr (Tr::kSplitSkip) vote.note(pending.n, pending.tile_max, pending.old_max, softmax.row_sum);
      else vote.record(pending.n, vote.keeps(pending.tile_max, pending.old_max, softmax.row_sum));
    }
  };
  // The vote (or kSplitSkip's records) in the softmax, without kLateVote.
  auto record_now = [&](int tile_n, bool keep) {
    if constexpr (!Tr::kLateVote) {
      if constexpr (Tr::kSplitSkip) vote.note(tile_n, pending.tile_max, pending.old_max, softmax.row_sum);
      else vote.record(tile_n, keep);
    }
  };
  auto softmax_step = [&](int n, auto const& scores, float (&correction)[2], bool& rescale) {
    if constexpr (Tr::kInt8) int8_accumulator_to_magic(tSrS);
    float tile_max[2];
    if constexpr (Tr::kMaskOnBranch) {
      if (n == masked_tile) {
        softmax.template tile_max</*kMask=*/true>(tSrSf, lane, p.seqlen_k - n * kBN, scores, tile_max);
      } else {
        softmax.template tile_max</*kMask=*/false>(tSrSf, lane, kBN, scores, tile_max);
      }
    } else {
      softmax.template tile_max</*kMask=*/true>(tSrSf, lane, p.seqlen_k - n * kBN, scores, tile_max);
    }
    const float old_max[2] = {softmax.row_max[0], softmax.row_max[1]};
    rescale = softmax.update(tSrSf, tile_max, scores, correction);
    pending = {n, {tile_max[0], tile_max[1]}, {old_max[0], old_max[1]}};
    return vote.keeps(tile_max, old_max, softmax.row_sum);
  };

  Tensor tOrP = make_tensor<Element>(Layout<Shape<Shape<_2, _2, _2>, _1, Int<kBN / 16>>>{});
  ss.q_full.wait(iteration & 1);
  auto tiles = visit_order<Tr>(state, tile, first_tile(tile.m, kBM, kBN, p.seqlen_q, p.seqlen_k, p.num_n_tiles),
                               p.num_n_tiles);
  if (!tiles.more()) {
    release(ss.q_empty, lane);
    return;
  }

  // First tile: S only.
  ss.k_full[k_read.stage].wait(k_read.phase);
  if (warpgroup == 0 && t == 0) timeline_row_mark<Tr>(p, iteration, kTimelineRowFirstK);  // Tr::kTimeline only
  int n = tiles.current();
  float k_scale = k_scales.load(n);
  tiles.advance();
  Turn::wait(warpgroup);
  warpgroup_gemm</*kZeroInit=*/true, /*kRegisterA=*/false>(mma_qk, tSrQ, tSrK(_, _, _, k_read.stage), tSrS);
  Turn::pass(warpgroup);
  float k_scale_next = k_scales.load(tiles.more() ? tiles.current() : n);
  warpgroup_wait<0>();
  warpgroup_fence_operand(tSrS);
  release(ss.k_empty[k_read.stage], lane);
  k_read.advance(Tr::kStages);
  float correction[2];
  bool rescale = false;
  const bool first_keep = softmax_step(n, scores_of(k_scale), correction, rescale);
  record_now(n, first_keep);
  rescale = false;  // O is still 0
  convert_fragment<Element>(tSrSf, tOrP);

  // Steady state: S(n) and O += P(n-1) V(n-1).
  while (tiles.more()) {
    ss.k_full[k_read.stage].wait(k_read.phase);
    n = tiles.current();
    k_scale = k_scale_next;
    Turn::wait(warpgroup);
    warpgroup_gemm</*kZeroInit=*/true, /*kRegisterA=*/false>(mma_qk, tSrQ, tSrK(_, _, _, k_read.stage), tSrS);
    if constexpr (Tr::kEarlyRescale)
      if (rescale) rescale_rows(tOrO, correction);
    ss.v_full[v_read.stage].wait(v_read.phase);
    warpgroup_gemm</*kZeroInit=*/false, /*kRegisterA=*/true>(mma_pv, tOrP, tOrVt(_, _, _, v_read.stage), tOrO);
    Turn::pass(warpgroup);
    tiles.advance();  // the next tile's arithmetic runs while the tensor cores work
    k_scale_next = k_scales.load(tiles.more() ? tiles.current() : n);
    record_pending();  // Tr::kLateVote: the previous tile's vote
    // S(n) is ready; O += P V may still run (Tr::kSerialSoftmax: it is done too).
    if constexpr (Tr::kSerialSoftmax) warpgroup_wait<0>();
    else warpgroup_wait<1>();
    warpgroup_fence_operand(tSrS);
    release(ss.k_empty[k_read.stage], lane);
    k_read.advance(Tr::kStages);
    const bool keep = softmax_step(n, scores_of(k_scale), correction, rescale);
    warpgroup_wait<0>();
    warpgroup_fence_operand(tOrO);
    warpgroup_fence_operand(tOrP);
    release(ss.v_empty[v_read.stage], lane);
    v_read.advance(Tr::kStages);
    if constexpr (!Tr::kEarlyRescale)
      if (rescale) rescale_rows(tOrO, correction);
    convert_fragment<Element>(tSrSf, tOrP);
    record_now(n, keep);
  }

  // Every S GEMM has completed (the waits above): Q is free for the next tile.
  release(ss.q_empty, lane);

  // Last tile: O += P V only.
  if constexpr (Tr::kEarlyRescale)
    if (rescale) rescale_rows(tOrO, correction);
  ss.v_full[v_read.stage].wait(v_read.phase);
  warpgroup_gemm</*kZeroInit=*/false, /*kRegisterA=*/true>(mma_pv, tOrP, tOrVt(_, _, _, v_read.stage), tOrO);
  record_pending();  // Tr::kLateVote: the last tile's vote
  warpgroup_wait<0>();
  warpgroup_fence_operand(tOrO);
  release(ss.v_empty[v_read.stage], lane);
  v_read.advance(Tr::kStages);  // the ring position carries into a persistent CTA's next tile
}

}  // namespace liteattn
