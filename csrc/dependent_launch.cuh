// Programmatic dependent launch (Hopper): the small kernels around the forward kernel (the LPT schedule before it,
// the split tail's combine and vote after it) are chained so that a kernel's CTAs start while the previous kernel
// of the call still runs, and wait on the device (griddepcontrol.wait) only where they read what it writes. This
// takes the launch gap between them off the GPU's timeline (NOTES.md wave 21).
//
// Rules that keep it correct:
// - A kernel is launched as a dependent (launch_maybe_dependent) only right after another kernel of the same call,
//   never after a kernel of the caller's: whatever ran before the call's first kernel has completed when that
//   kernel starts, so its writes (Q, K, V, the state) are visible to every later kernel of the call; only the
//   writes of the call's own previous kernel need the wait.
// - Every dependent kernel waits (wait_for_previous_kernel) before it reads the previous kernel's output, and in
//   every path before it writes anything a later kernel reads, so kernels still complete in stream order.
// - A kernel lets its dependent start (allow_dependent_launch) at its own start: the dependent's CTAs then take SMs
//   as this kernel's CTAs leave them, and block in their wait; they can never hold an SM that one of this kernel's
//   CTAs still needs, because the dependent launches only once every CTA of this kernel has started.
// Without the launch attribute (PDL off, or a kernel launched plainly) both instructions are no-ops.
#pragma once
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <utility>

namespace liteattn {

__device__ __forceinline__ void wait_for_previous_kernel() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void allow_dependent_launch() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }

// Whether the chain uses programmatic dependent launch: the environment's LITEATTN_PDL (1 on, 0 off; read at every
// launch, so that one process can time both), else kDependentLaunchByDefault.
constexpr bool kDependentLaunchByDefault = false;  // until measured on a GPU (NOTES.md wave 21)
inline bool dependent_launch_enabled() {
  const char* env = std::getenv("LITEATTN_PDL");
  if (env == nullptr || *env == '\0') return kDependentLaunchByDefault;
  return std::strcmp(env, "0") != 0;
}

// kernel<<<grid, block, smem, stream>>>(args...), as a programmatic dependent of the stream's previous kernel when
// `dependent` (and dependent_launch_enabled()).
template <class... Params, class... Args>
cudaError_t launch_maybe_dependent(bool dependent, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                                   cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = dependent && dependent_launch_enabled() ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

}  // namespace liteattn
