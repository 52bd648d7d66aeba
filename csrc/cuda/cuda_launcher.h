// The launcher of the kernels whose host code (csrc/cuda/*_host.h) is shared with
// tests/cuda_emulation: a CUDA launch on the current stream.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cstddef>
#include <utility>

#include "cuda/launch_grid.h"

namespace bisenet_fast {

struct CudaLauncher {
  template <typename... KernelArgs, typename... Args>
  static void launch(void (*kernel)(KernelArgs...), Grid grid, int threads, size_t shared_bytes, Args&&... args) {
    // The limit is raised to the device's whole opt-in, the same value for every launch: a
    // limit set to each launch's own size could be lowered by another host thread between
    // this thread's set and its launch, which would then fail.
    if (shared_bytes > kDefaultSharedBytes)
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin)));
    kernel<<<dim3(grid.x, grid.y, grid.z), threads, shared_bytes, at::cuda::getCurrentCUDAStream()>>>(
        std::forward<Args>(args)...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace bisenet_fast
