// The launcher of the kernels whose host code (csrc/cuda/*_host.h) is shared with
// tests/cuda_emulation: a CUDA launch on the current stream.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <cstddef>
#include <utility>

#include "cuda/launch_grid.h"

namespace bisenet_fast {

// Dynamic shared memory a block of `kernel` may have once it opts in: the device's opt-in
// less the kernel's static __shared__ variables (CUDA bounds their sum, and refuses to raise
// the dynamic limit past it).
template <typename... KernelArgs>
size_t max_dynamic_shared_bytes(void (*kernel)(KernelArgs...)) {
  cudaFuncAttributes attributes;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  return at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin - attributes.sharedSizeBytes;
}

// Lets `kernel` launch with `shared_bytes` of dynamic shared memory (`what` names it in the
// error when the device cannot give that much).
template <typename... KernelArgs>
void opt_in_shared_bytes(void (*kernel)(KernelArgs...), size_t shared_bytes, const char* what) {
  if (shared_bytes <= kDefaultSharedBytes) return;
  const size_t limit = max_dynamic_shared_bytes(kernel);
  TORCH_CHECK(shared_bytes <= limit, what, ": a block needs ", shared_bytes,
              " bytes of shared memory, this GPU allows ", limit);
  // The limit is raised to all the kernel may have, the same value for every launch: a
  // limit set to each launch's own size could be lowered by another host thread between
  // this thread's set and its launch, which would then fail.
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(limit)));
}

struct CudaLauncher {
  template <typename... KernelArgs, typename... Args>
  static void launch(void (*kernel)(KernelArgs...), Grid grid, int threads, size_t shared_bytes, Args&&... args) {
    opt_in_shared_bytes(kernel, shared_bytes, "bisenet_fast (CUDA kernel)");
    kernel<<<dim3(grid.x, grid.y, grid.z), threads, shared_bytes, at::cuda::getCurrentCUDAStream()>>>(
        std::forward<Args>(args)...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace bisenet_fast
