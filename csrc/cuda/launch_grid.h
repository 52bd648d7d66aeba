// What kernel headers share with their launchers, on the GPU and in tests/cuda_emulation
// (which compiles those headers for the CPU; its shim.h defines dynamic_shared_memory there).
#pragma once

#include <cstddef>

namespace bisenet_fast {

// Dynamic shared memory a block may have without its kernel opting in.
constexpr size_t kDefaultSharedBytes = 48 * 1024;

// A launch's grid (dim3 without CUDA's headers).
struct Grid {
  unsigned x = 1, y = 1, z = 1;
};

#if defined(__CUDACC__)
// The block's dynamic shared memory, 128-byte aligned as tests/cuda_emulation gives it (wmma
// tiles in it need 32 bytes; a kernel's static __shared__ variables come before it).
__device__ __forceinline__ unsigned char* dynamic_shared_memory() {
  extern __shared__ __align__(128) unsigned char shared[];
  return shared;
}
#endif

}  // namespace bisenet_fast
