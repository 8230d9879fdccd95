// Named barriers of the forward kernel, and the consumer warpgroups' GEMM turn (ping-pong). The ids
// are cutlass::arch::NamedBarrier user ids (CUTLASS adds its reserved count, 8, so hardware barriers
// 9.. are used; 0 is __syncthreads).
#pragma once
#include <cutlass/arch/barrier.h>

namespace liteattn {

enum class NamedBarrier : uint32_t {
  kConsumersDone = 1,  // all consumer threads: every warp's verdict words are in shared memory
  kMmaTurn0 = 2,       // kMmaTurn0 + w: consumer warpgroup w may issue its GEMMs (ping-pong); w < 3
};

// Ping-pong of the consumer warpgroups around the softmax (FlashAttention-3's "warp scheduler
// barrier"). Warpgroup w waits on barrier kMmaTurn0 + w before it issues the GEMMs of a tile and,
// once they are issued, passes the turn to warpgroup (w + 1) % kWarpgroups. Each barrier counts
// 256 threads: the waiting warpgroup's 128 (bar.sync) and the passing one's 128 (bar.arrive).
// So while warpgroup w runs its softmax on the CUDA cores, the next one's GEMMs have the tensor
// cores. Warpgroup 0 holds the first turn (start()). Every consumer warpgroup of a CTA visits the
// same tiles, so they wait and pass equally often; the last pass stays pending at exit.
template <int kWarpgroups, bool kEnabled>
struct MmaTurn {
  static constexpr uint32_t kCount = 2 * 128;
  static __device__ __forceinline__ uint32_t id(int warpgroup) {
    return static_cast<uint32_t>(NamedBarrier::kMmaTurn0) + uint32_t(warpgroup);
  }
  static __device__ __forceinline__ void start(int warpgroup) {
    if constexpr (kEnabled)
      if (warpgroup == 0) cutlass::arch::NamedBarrier::arrive(kCount, id(0));
  }
  static __device__ __forceinline__ void wait(int warpgroup) {
    if constexpr (kEnabled) cutlass::arch::NamedBarrier::sync(kCount, id(warpgroup));
  }
  static __device__ __forceinline__ void pass(int warpgroup) {
    if constexpr (kEnabled) cutlass::arch::NamedBarrier::arrive(kCount, id((warpgroup + 1) % kWarpgroups));
  }
};

}  // namespace liteattn
