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
  void* stream = nullptr;            // cudaStream_t
};

// Largest number of 32-bit state words per (b, h, m) row the skip kernel keeps in
// shared memory: Nt <= kMaxStateWords * 32 key tiles.
constexpr int kMaxStateWords = 512;

// Validates (throws std::invalid_argument naming the argument) and launches.
void forward(const FwdArgs& args);

// True when a (b, h, s) view with these element strides at this address can be read
// by the tensor-memory accelerator without a copy: 16-byte aligned base, every stride
// a multiple of 16 bytes (size-1 dimensions exempt) and below 2^40 bytes.
bool tma_compatible(uint64_t ptr, const std::array<int64_t, 3>& stride,
                    const std::array<int64_t, 3>& sizes, int element_bytes);

// One instantiation per (dtype, head dim, skip); defined in csrc/instantiations/.
template <DType kDType, int kHeadDim, bool kSkip>
void run_fwd(const FwdArgs& args);

}  // namespace liteattn
