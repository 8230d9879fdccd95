// Validation and runtime -> template dispatch of the forward kernel. Host code only.
#include <cmath>
#include <stdexcept>
#include <string>

#include "liteattn.h"

namespace liteattn {
namespace {

void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument("liteattn._C.forward: " + message);
}

int element_bytes(DType) { return 2; }

}  // namespace

bool tma_compatible(uint64_t ptr, const std::array<int64_t, 3>& stride, const std::array<int64_t, 3>& sizes,
                    int elem_bytes) {
  if (ptr % 16 != 0) return false;
  for (int i = 0; i < 3; ++i) {
    if (sizes[i] == 1) continue;
    const int64_t bytes = stride[i] * elem_bytes;
    if (stride[i] <= 0 || bytes % 16 != 0 || bytes >= (int64_t(1) << 40)) return false;
  }
  return true;
}

void forward(const FwdArgs& a) {
  require(a.batch >= 1, "batch must be >= 1, got " + std::to_string(a.batch));
  require(a.heads >= 1, "heads must be >= 1, got " + std::to_string(a.heads));
  require(a.batch <= 65535 && a.heads <= 65535, "batch and heads must each be <= 65535");
  require(a.seqlen_q >= 1, "seqlen_q must be >= 1, got " + std::to_string(a.seqlen_q));
  require(a.seqlen_k >= 1, "seqlen_k must be >= 1, got " + std::to_string(a.seqlen_k));
  require(a.head_dim == 64 || a.head_dim == 128, "head_dim must be 64 or 128, got " + std::to_string(a.head_dim));
  require(std::isfinite(a.scale) && a.scale > 0.f, "scale must be a positive finite number");
  require(a.q && a.k && a.v && a.out && a.lse, "q, k, v, out and lse must be non-null device pointers");
  const int eb = element_bytes(a.dtype);
  const std::array<int64_t, 3> q_sizes{a.batch, a.heads, a.seqlen_q}, k_sizes{a.batch, a.heads, a.seqlen_k};
  require(tma_compatible(reinterpret_cast<uint64_t>(a.q), a.q_stride, q_sizes, eb),
          "q must have a 16-byte aligned address and (b, h, s) strides that are positive multiples of 8 "
          "elements (TMA); copy it to contiguous memory");
  require(tma_compatible(reinterpret_cast<uint64_t>(a.k), a.k_stride, k_sizes, eb),
          "k must have a 16-byte aligned address and (b, h, s) strides that are positive multiples of 8 "
          "elements (TMA); copy it to contiguous memory");
  require(tma_compatible(reinterpret_cast<uint64_t>(a.v), a.v_stride, k_sizes, eb),
          "v must have a 16-byte aligned address and (b, h, s) strides that are positive multiples of 8 "
          "elements (TMA); copy it to contiguous memory");
  require(reinterpret_cast<uint64_t>(a.out) % 4 == 0 && a.out_stride[0] % 2 == 0 && a.out_stride[1] % 2 == 0 &&
              a.out_stride[2] % 2 == 0,
          "out must have a 4-byte aligned address and even (b, h, s) strides");
  require(reinterpret_cast<uint64_t>(a.lse) % 4 == 0, "lse must be 4-byte aligned float32");
  if (a.state) {
    const auto tile = tile_shape(a.head_dim, a.dtype);
    const int64_t num_n_tiles = (int64_t(a.seqlen_k) + tile.bn - 1) / tile.bn;
    require(num_n_tiles <= int64_t(kMaxStateWords) * 32,
            "seqlen_k too long for the skip state: at most " + std::to_string(int64_t(kMaxStateWords) * 32 * tile.bn) +
                " keys");
    require(reinterpret_cast<uint64_t>(a.state) % 4 == 0, "state must be 4-byte aligned int32");
    require(a.threshold != nullptr, "threshold must be a non-null float32 (H,) device pointer with a state");
    require(a.num_must_do >= 0 && (a.num_must_do == 0 || a.must_do),
            "must_do must be a non-null (R, 2) int32 device pointer when num_must_do > 0");
    require(a.num_must_skip >= 0 && (a.num_must_skip == 0 || a.must_skip),
            "must_skip must be a non-null (R, 2) int32 device pointer when num_must_skip > 0");
  }

#define LITEATTN_DISPATCH_SKIP(DT, D)            \
  if (a.state) {                                 \
    run_fwd<DT, D, true>(a);                     \
  } else {                                       \
    run_fwd<DT, D, false>(a);                    \
  }
  const bool bf16 = a.dtype == DType::kBFloat16;
  if (a.head_dim == 64) {
    if (bf16) { LITEATTN_DISPATCH_SKIP(DType::kBFloat16, 64) } else { LITEATTN_DISPATCH_SKIP(DType::kFloat16, 64) }
  } else {
    if (bf16) { LITEATTN_DISPATCH_SKIP(DType::kBFloat16, 128) } else { LITEATTN_DISPATCH_SKIP(DType::kFloat16, 128) }
  }
#undef LITEATTN_DISPATCH_SKIP
}

}  // namespace liteattn
