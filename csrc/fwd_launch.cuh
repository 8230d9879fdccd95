// Host side of one instantiation: TMA descriptors for this call's tensors, kernel
// parameters, launch on the caller's stream. Inputs are validated in forward.cu.
#pragma once
#include <cuda_runtime.h>

#include <cmath>
#include <stdexcept>
#include <string>

#include "fwd_kernel.cuh"
#include "split_vote.cuh"

namespace liteattn {

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("liteattn: ") + what + ": " + cudaGetErrorString(err));
}

// A size-1 dimension's stride is irrelevant to addressing but still goes into the TMA
// descriptor, which wants multiples of 16 bytes: give it a harmless valid one.
inline int64_t tma_stride(int64_t stride, int size, int64_t fallback) { return size == 1 ? fallback : stride; }

template <DType kDType, int kHeadDim, bool kSkip, int kVariant, bool kInt8>
void run_fwd(const FwdArgs& a) {
  using namespace cute;
  using Tr = FwdTraits<kDType, kHeadDim, kSkip, kVariant, kInt8>;
  using Element = typename Tr::Element;
  using ElementQK = typename Tr::ElementQK;  // int8 in INT8 mode: q and k are the pre-pass's int8 buffers
  constexpr int64_t kD = kHeadDim;

  auto rows = [&](const void* ptr, const std::array<int64_t, 3>& st, int seqlen) {
    return make_tensor(make_gmem_ptr(static_cast<ElementQK const*>(ptr)),
                       make_layout(make_shape(int32_t(seqlen), int32_t(kD), int32_t(a.heads), int32_t(a.batch)),
                                   make_stride(tma_stride(st[2], seqlen, kD), _1{}, tma_stride(st[1], a.heads, kD),
                                               tma_stride(st[0], a.batch, kD))));
  };
  auto q = rows(a.q, a.q_stride, a.seqlen_q);
  auto k = rows(a.k, a.k_stride, a.seqlen_k);
  auto vt = make_tensor(make_gmem_ptr(static_cast<Element const*>(a.v)),
                        make_layout(make_shape(int32_t(kD), int32_t(a.seqlen_k), int32_t(a.heads), int32_t(a.batch)),
                                    make_stride(_1{}, tma_stride(a.v_stride[2], a.seqlen_k, kD),
                                                tma_stride(a.v_stride[1], a.heads, kD),
                                                tma_stride(a.v_stride[0], a.batch, kD))));

  typename Tr::Params p{
      make_tma_copy(SM90_TMA_LOAD{}, q, typename Tr::SmemLayoutQ{}),
      make_tma_copy(SM90_TMA_LOAD{}, k, typename Tr::SmemLayoutKStage{}),
      make_tma_copy(SM90_TMA_LOAD{}, vt, typename Tr::SmemLayoutVtStage{}),
  };
  p.out = static_cast<Element*>(a.out);
  p.out_stride_b = a.out_stride[0];
  p.out_stride_h = a.out_stride[1];
  p.out_stride_s = a.out_stride[2];
  p.lse = a.lse;
  p.batch = a.batch;
  p.heads = a.heads;
  p.seqlen_q = a.seqlen_q;
  p.seqlen_k = a.seqlen_k;
  p.num_m_tiles = (a.seqlen_q + Tr::kBM - 1) / Tr::kBM;
  p.num_n_tiles = (a.seqlen_k + Tr::kBN - 1) / Tr::kBN;
  p.num_state_words = (p.num_n_tiles + 31) / 32;
  const double log2e = 1.0 / std::log(2.0);
  p.scale_log2 = static_cast<float>(double(a.scale) * log2e);
  p.ln2 = static_cast<float>(std::log(2.0));
  p.state = a.state;
  p.threshold = a.threshold;
  p.must_do = a.must_do;
  p.num_must_do = a.num_must_do;
  p.must_skip = a.must_skip;
  p.num_must_skip = a.num_must_skip;
  p.q_scale = a.q_scale;
  p.k_scale = a.k_scale;
  p.q_mu = a.q_mu;
  const ScheduleScope scope = schedule_scope(a.batch, a.heads, p.num_m_tiles, a.seqlen_k, kHeadDim);
  // The persistent skip kernel's row counter starts at 0: zeroed by the schedule kernel where one runs (a launch
  // fewer per call), else by a memset.
  int32_t* const counter = Tr::kPersistentSkip ? a.work_counter : nullptr;
  if (kSkip && a.schedule != nullptr && scope != ScheduleScope::kNone) {
    const bool global = scope == ScheduleScope::kGlobal;
    launch_lpt_schedule(a.state, global ? 1 : a.batch * a.heads, global ? a.batch * a.heads * p.num_m_tiles : p.num_m_tiles,
                        p.num_state_words, p.num_n_tiles, a.schedule, counter, a.stream);
    check_cuda(cudaGetLastError(), "schedule kernel launch");
    p.schedule = a.schedule;
  } else if (counter != nullptr) {
    check_cuda(cudaMemsetAsync(counter, 0, sizeof(int32_t), static_cast<cudaStream_t>(a.stream)),
               "cudaMemsetAsync(work counter)");
  }
  p.work_counter = counter;

  auto kernel = fwd_kernel<Tr>;
  // Per call, not once per process: the attribute is per device (a host-side call, allowed
  // during CUDA-graph capture).
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes),
             "cudaFuncSetAttribute(max dynamic shared memory)");
  dim3 grid(p.num_m_tiles, a.heads, a.batch);
  [[maybe_unused]] const int64_t tiles = int64_t(p.num_m_tiles) * a.heads * a.batch;
  if constexpr (Tr::kPersistent || Tr::kPersistentSkip) {
    // At most one CTA per SM (one fits: __launch_bounds__(kThreads, 1) and the shared memory).
    const int sms = device_sm_count();
    grid = dim3(unsigned(tiles < sms ? tiles : sms));
  }
  // The split wave tail (SplitTailPlan): the dense path's last round of query tiles, or the skip path's last round
  // of the work list (G = SMs rows at a time: one CTA per SM on both skip grids), cut into key ranges / chunks of the
  // visit lists, when the caller's scratch holds them; the skip path's votes of those rows in split_vote_kernel.
  SplitTailPlan split;
  if constexpr (Tr::kSplitTail || Tr::kSplitSkip) {
    split = split_tail_plan(tiles, device_sm_count(), p.num_n_tiles);
    const int64_t floats = split_workspace_floats(split, Tr::kBM, kHeadDim, Tr::kSplitSkip, p.num_n_tiles);
    if (split.chunks >= 2 && a.split_workspace != nullptr && floats <= a.split_workspace_size) {
      p.split_chunks = split.chunks;
      p.split_whole = split.whole;
      p.split_units = split.units;
      p.split_o = a.split_workspace;
      p.split_lse = a.split_workspace + int64_t(split.units) * Tr::kBM * kHeadDim;
      if constexpr (Tr::kSplitSkip) p.split_records = p.split_lse + int64_t(split.units) * Tr::kBM;
      // The one-tile skip grid: a 1-D grid of the work list's items (fwd_kernel.cuh).
      grid = Tr::kSkip && !Tr::kPersistentSkip ? dim3(unsigned(split.whole + split.units)) : dim3(unsigned(split.grid));
    } else {
      split = SplitTailPlan{};
    }
  }
  if constexpr (Tr::kTimeline) {
    const int64_t ctas = int64_t(grid.x) * grid.y * grid.z;
    if (a.timeline != nullptr && ctas > a.timeline_ctas)
      throw std::invalid_argument("timeline: this call runs " + std::to_string(ctas) + " CTAs, the buffer holds " +
                                  std::to_string(a.timeline_ctas));
    p.timeline = a.timeline;
    p.timeline_rows = a.timeline_rows;
  }
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, static_cast<cudaStream_t>(a.stream)>>>(p);
  check_cuda(cudaGetLastError(), "forward kernel launch");
  if (split.chunks >= 2) {
    SplitCombineArgs c;
    c.partial_o = p.split_o;
    c.partial_lse = p.split_lse;
    c.out = a.out;
    c.lse = a.lse;
    c.dtype = kDType;
    c.out_stride_b = a.out_stride[0];
    c.out_stride_h = a.out_stride[1];
    c.out_stride_s = a.out_stride[2];
    c.heads = a.heads;
    c.seqlen_q = a.seqlen_q;
    c.num_m_tiles = p.num_m_tiles;
    c.bm = Tr::kBM;
    c.head_dim = kHeadDim;
    c.whole = split.whole;
    c.units = split.units;
    c.chunks = split.chunks;
    c.schedule = Tr::kSkip ? p.schedule : nullptr;
    c.stream = a.stream;
    launch_split_combine(c);
    check_cuda(cudaGetLastError(), "split-tail combine kernel launch");
    if constexpr (Tr::kSplitSkip) {
      auto vote_kernel = split_vote_kernel<Tr>;
      const int smem = split_vote_smem_bytes<Tr>(p.num_state_words);
      check_cuda(cudaFuncSetAttribute(vote_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
                 "cudaFuncSetAttribute(split vote shared memory)");
      prefer_forward_carveout(reinterpret_cast<const void*>(vote_kernel));
      vote_kernel<<<unsigned(split.units / split.chunks), Tr::kBM, smem, static_cast<cudaStream_t>(a.stream)>>>(p);
      check_cuda(cudaGetLastError(), "split-tail vote kernel launch");
    }
  }
}

}  // namespace liteattn

// The generated instantiation files (CMakeLists.txt) use these: the default variant of the head dim, and
// (A/B builds) a listed variant id; INT8 is true for the INT8 Q/K mode.
#define LITEATTN_INSTANTIATE_FWD(DTYPE, HEAD_DIM, SKIP, VARIANT, INT8) \
  template void liteattn::run_fwd<liteattn::DType::DTYPE, HEAD_DIM, SKIP, VARIANT, INT8>(const liteattn::FwdArgs&);
#define LITEATTN_INSTANTIATE_FWD_DEFAULT(DTYPE, HEAD_DIM, SKIP, INT8) \
  LITEATTN_INSTANTIATE_FWD(DTYPE, HEAD_DIM, SKIP, liteattn::default_variant(HEAD_DIM), INT8)
// A listed A/B id: never the default itself (that kernel is built anyway; a second explicit instantiation of it in
// the same compile unit would not compile).
#define LITEATTN_INSTANTIATE_FWD_AB(DTYPE, HEAD_DIM, SKIP, VARIANT, INT8)                                      \
  static_assert(VARIANT != liteattn::default_variant(HEAD_DIM),                                                \
                "LITEATTN_AB_VARIANTS: id " #VARIANT " is the default variant of head dim " #HEAD_DIM          \
                " (csrc/liteattn.h default_variant); list other ids");                                         \
  LITEATTN_INSTANTIATE_FWD(DTYPE, HEAD_DIM, SKIP, VARIANT, INT8)
