// The CUDA BGA ops (csrc/cuda/bga_host.h and bga_kernels.cuh, the code bga.cu launches) with
// their blocks run on the CPU by shim.h, on a GPU of sm_count SMs (which sizes the
// grid-stride loops' grids).
#include <torch/csrc/utils/pybind.h>  // pybind11 and its at::Tensor caster: half the build time of torch/extension.h

#include "common/bga_checks.h"
#include "cuda_emulation/launcher.h"
#include "cuda/bga_host.h"

namespace {

using cuda_emulation::EmulatedLauncher;

at::Tensor emulated_forward(const at::Tensor& detail, const at::Tensor& semantic, const at::Tensor& detail_down,
                            const at::Tensor& semantic_down, int64_t sm_count) {
  bisenet_fast::check_bga_inputs("bga_aggregate", detail, semantic, detail_down, semantic_down);
  return bisenet_fast::bga_cuda::forward<EmulatedLauncher>(detail, semantic, detail_down, semantic_down,
                                                           static_cast<int>(sm_count));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> emulated_backward(
    const at::Tensor& grad_out, const at::Tensor& detail, const at::Tensor& semantic, const at::Tensor& detail_down,
    const at::Tensor& semantic_down, int64_t sm_count) {
  bisenet_fast::check_bga_inputs("bga_aggregate_backward", detail, semantic, detail_down, semantic_down);
  bisenet_fast::check_bga_grad_out(grad_out, detail);
  return bisenet_fast::bga_cuda::backward<EmulatedLauncher>(grad_out, detail, semantic, detail_down, semantic_down,
                                                            static_cast<int>(sm_count));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &emulated_forward, "bga_aggregate");
  m.def("backward", &emulated_backward, "bga_aggregate_backward: the four inputs' gradients");
}
