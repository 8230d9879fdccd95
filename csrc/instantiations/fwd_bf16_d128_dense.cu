// One (dtype, head dim, skip) instantiation per file, so the build parallelises.
#include "fwd_launch.cuh"
LITEATTN_INSTANTIATE_FWD(kBFloat16, 128, false)
