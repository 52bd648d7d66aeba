// The launcher of csrc/cuda/*_host.h on the CPU: the kernel's blocks run by shim.h.
#pragma once

#include <cstddef>

#include "cuda/launch_grid.h"
#include "cuda_emulation/shim.h"

namespace cuda_emulation {

struct EmulatedLauncher {
  template <typename... KernelArgs, typename... Args>
  static void launch(void (*kernel)(KernelArgs...), bisenet_fast::Grid grid, int threads, std::size_t shared_bytes,
                     Args&&... args) {
    run_grid(grid.x, grid.y, grid.z, threads, shared_bytes, [&](unsigned char*) { kernel(args...); });
  }
};

}  // namespace cuda_emulation
