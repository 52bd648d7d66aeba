// OHEM cross-entropy on logits upsampled on the fly, on CUDA: the kernels
// (ohem_cross_entropy_kernels.cuh, which describes the algorithm) launched on the current
// stream in the order ohem_cross_entropy_host.h gives.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/cuda_launcher.h"
#include "cuda/ohem_cross_entropy_host.h"

namespace bisenet_fast {
namespace {

void check_on_gpu(const at::Tensor& logits, const at::Tensor& target) {
  check_defined("ohem_cross_entropy", {{"logits", &logits}, {"target", &target}});
  TORCH_CHECK(logits.is_cuda() && target.is_cuda(), "ohem_cross_entropy (CUDA kernel): logits and target must be ",
              "CUDA tensors, got ", logits.device(), " and ", target.device());
}

ohem_cuda::DeviceCaps device_caps() {
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  return {props->multiProcessorCount, props->sharedMemPerBlockOptin};
}

std::tuple<at::Tensor, at::Tensor> ohem_cross_entropy_forward_cuda(const at::Tensor& logits, const at::Tensor& target,
                                                                   c10::optional<double> thresh, int64_t min_kept,
                                                                   int64_t ignore_index, bool check_labels) {
  check_on_gpu(logits, target);
  const c10::cuda::CUDAGuard guard(logits.device());
  return ohem_cuda::forward<CudaLauncher>(logits, target, thresh, min_kept, ignore_index, check_labels);
}

at::Tensor ohem_cross_entropy_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& logits,
                                            const at::Tensor& target, const at::Tensor& threshold,
                                            int64_t ignore_index) {
  check_on_gpu(logits, target);
  const c10::cuda::CUDAGuard guard(logits.device());
  return ohem_cuda::backward<CudaLauncher>(grad_loss, logits, target, threshold, ignore_index, device_caps());
}

}  // namespace

TORCH_LIBRARY_IMPL(bisenet_fast, CUDA, m) {
  m.impl("ohem_cross_entropy_forward", &ohem_cross_entropy_forward_cuda);
  m.impl("ohem_cross_entropy_backward", &ohem_cross_entropy_backward_cuda);
}

}  // namespace bisenet_fast
