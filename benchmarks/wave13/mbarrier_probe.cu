// Does compute-sanitizer's racecheck see an mbarrier arrive / wait as ordering shared-memory accesses?
// Warp 0 writes 32 words, warp 1 reads them. mode 0: warp 0 arrives on an mbarrier after its writes, warp 1 waits
// on it before its reads (ordered); mode 1: no wait (a real race, the positive control); mode 2: __syncthreads
// (ordered, the negative control); mode 3: warp 1 reads first, then __syncwarp and lane 0 alone arrives, warp 0
// waits and then writes (ordered in the PTX model; the consumers' release of the persistskip state buffer).
// Modes 0-2 ran in wave 13 call 2 (0 / 100 / 0 hazards); mode 3 is in benchmarks/wave14_next/call1.sh
// (through mbarrier_probe.sh).
#include <cstdio>
#include <cstdint>
__global__ void probe(int* out, int mode) {
  __shared__ __align__(8) uint64_t bar;
  __shared__ int data[32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(&bar));
  if (threadIdx.x == 0) asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(addr), "r"(mode == 3 ? 1 : 32));
  if (threadIdx.x < 32) data[lane] = 7;
  __syncthreads();
  if (mode == 3) {
    if (warp == 1) {
      out[lane] = data[lane];
      __syncwarp();
      if (lane == 0) asm volatile("{ .reg .b64 st; mbarrier.arrive.shared::cta.b64 st, [%0]; }" ::"r"(addr) : "memory");
    } else {
      asm volatile("{ .reg .pred p; W: mbarrier.try_wait.parity.shared::cta.b64 p, [%0], 0; @!p bra W; }" ::"r"(addr)
                   : "memory");
      data[lane] = lane;
    }
  } else if (warp == 0) {
    data[lane] = lane * 3 + 1;
    if (mode == 2) __syncthreads();
    else asm volatile("{ .reg .b64 st; mbarrier.arrive.shared::cta.b64 st, [%0]; }" ::"r"(addr) : "memory");
  } else {
    if (mode == 0)
      asm volatile("{ .reg .pred p; W: mbarrier.try_wait.parity.shared::cta.b64 p, [%0], 0; @!p bra W; }" ::"r"(addr)
                   : "memory");
    if (mode == 2) __syncthreads();
    out[lane] = data[lane];
  }
}
int main(int argc, char** argv) {
  const int mode = argc > 1 ? atoi(argv[1]) : 0;
  int* out;
  cudaMalloc(&out, 32 * sizeof(int));
  probe<<<1, 64>>>(out, mode);
  int host[32];
  cudaMemcpy(host, out, sizeof(host), cudaMemcpyDeviceToHost);
  printf("mode %d: out[5] = %d (%s)\n", mode, host[5], cudaGetErrorString(cudaGetLastError()));
  return 0;
}
