// Bilateral Guided Aggregation on CUDA, forward and backward: the kernels (bga_kernels.cuh,
// which describes them) launched on the current stream as bga_host.h plans them.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "common/bga_checks.h"
#include "cuda/bga_host.h"
#include "cuda/cuda_launcher.h"

namespace bisenet_fast {
namespace {

int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

at::Tensor bga_aggregate_cuda(const at::Tensor& detail, const at::Tensor& semantic, const at::Tensor& detail_down,
                              const at::Tensor& semantic_down) {
  check_bga_inputs("bga_aggregate", detail, semantic, detail_down, semantic_down);
  TORCH_CHECK(detail.is_cuda(), "bga_aggregate: detail must be a CUDA tensor for this kernel, got ", detail.device());
  const c10::cuda::CUDAGuard guard(detail.device());
  return bga_cuda::forward<CudaLauncher>(detail, semantic, detail_down, semantic_down, sm_count());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bga_aggregate_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& detail, const at::Tensor& semantic, const at::Tensor& detail_down,
    const at::Tensor& semantic_down) {
  check_bga_inputs("bga_aggregate_backward", detail, semantic, detail_down, semantic_down);
  check_bga_grad_out(grad_out, detail);
  TORCH_CHECK(detail.is_cuda(), "bga_aggregate_backward: detail must be a CUDA tensor for this kernel, got ",
              detail.device());
  const c10::cuda::CUDAGuard guard(detail.device());
  return bga_cuda::backward<CudaLauncher>(grad_out, detail, semantic, detail_down, semantic_down, sm_count());
}

}  // namespace

TORCH_LIBRARY_IMPL(bisenet_fast, CUDA, m) {
  m.impl("bga_aggregate", &bga_aggregate_cuda);
  m.impl("bga_aggregate_backward", &bga_aggregate_backward_cuda);
}

}  // namespace bisenet_fast
