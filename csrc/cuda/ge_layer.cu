// Gather-and-Expansion layer, inference form, on CUDA (schema and formula in csrc/ops.cpp):
// the kernels wrap the block code of ge_layer_block.cuh (how a block computes its tile)
// and are launched by ge_layer_host.h's checks and plan.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/cuda_launcher.h"
#include "cuda/ge_layer_block.cuh"
#include "cuda/ge_layer_host.h"

namespace bisenet_fast {
namespace {

using ge_cuda::GeLaunch;
using ge_cuda::GeParams;
using ge_cuda::Gemm;
using ge_cuda::kThreads;

// The tensor-core variants exist from sm_80 on (bfloat16 and TF32 wmma); the host launches
// them only there (ge_cuda::DeviceCaps), so older architectures compile them as a trap.
template <int kStride, typename scalar_t, int kOut, Gemm kGemm>
__global__ void __launch_bounds__(kThreads) ge_layer_kernel(const GeParams<scalar_t> p) {
  extern __shared__ __align__(128) unsigned char shared[];
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  if constexpr (kGemm == Gemm::kTensorCores) {
    __trap();
  } else
#endif
  {
    ge_cuda::ge_layer_block<kStride, scalar_t, kOut, kGemm>(shared, p);
  }
}

struct GeCudaLauncher {
  template <int kStride, typename scalar_t, int kOut, Gemm kGemm>
  static void run(const GeLaunch& plan, const GeParams<scalar_t>& p) {
    auto* kernel = ge_layer_kernel<kStride, scalar_t, kOut, kGemm>;
    opt_in_shared_bytes(kernel, plan.shared_bytes, "ge_layer (cuda)");
    const dim3 grid(static_cast<unsigned>(plan.tiles), static_cast<unsigned>(plan.cout_tiles),
                    static_cast<unsigned>(plan.k_splits));
    kernel<<<grid, kThreads, plan.shared_bytes, at::cuda::getCurrentCUDAStream()>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

ge_cuda::DeviceCaps device_caps() {
  const auto* props = at::cuda::getCurrentDeviceProperties();
  return {props->multiProcessorCount, props->major >= 8};
}

// x picks the device guard, so it is checked before the guard is made: the dispatcher sends a
// call here when any argument is a CUDA tensor, and a guard on an undefined x (None in a direct
// torch.ops call) or on a CPU x would fail naming nothing ("tensor does not have a device",
// "CUDAGuardImpl initialized with non-CUDA DeviceType"). The other arguments are checked
// against x by check_ge_stride1/2.
void check_x_on_gpu(const char* op, const at::Tensor& x) {
  check_defined(op, {{"x", &x}});
  TORCH_CHECK_VALUE(x.is_cuda(), op, ": x must be a CUDA tensor for this kernel, got ", x.device());
}

at::Tensor ge_layer_stride1_cuda(const at::Tensor& x, const at::Tensor& y, const at::Tensor& dw_weight,
                                 const at::Tensor& dw_bias, const at::Tensor& pw_weight, const at::Tensor& pw_bias) {
  check_x_on_gpu("ge_layer_stride1", x);
  const c10::cuda::CUDAGuard guard(x.device());
  return ge_cuda::ge_layer_stride1<GeCudaLauncher>(x, y, dw_weight, dw_bias, pw_weight, pw_bias, device_caps());
}

at::Tensor ge_layer_stride2_cuda(const at::Tensor& x, const at::Tensor& y, const at::Tensor& dw0_weight,
                                 const at::Tensor& dw0_bias, const at::Tensor& dw1_weight, const at::Tensor& dw1_bias,
                                 const at::Tensor& pw_weight, const at::Tensor& pw_bias,
                                 const at::Tensor& sc_dw_weight, const at::Tensor& sc_dw_bias,
                                 const at::Tensor& sc_pw_weight, const at::Tensor& sc_pw_bias) {
  check_x_on_gpu("ge_layer_stride2", x);
  const c10::cuda::CUDAGuard guard(x.device());
  return ge_cuda::ge_layer_stride2<GeCudaLauncher>(x, y, dw0_weight, dw0_bias, dw1_weight, dw1_bias, pw_weight,
                                                   pw_bias, sc_dw_weight, sc_dw_bias, sc_pw_weight, sc_pw_bias,
                                                   device_caps());
}

}  // namespace

TORCH_LIBRARY_IMPL(bisenet_fast, CUDA, m) {
  m.impl("ge_layer_stride1", &ge_layer_stride1_cuda);
  m.impl("ge_layer_stride2", &ge_layer_stride2_cuda);
}

}  // namespace bisenet_fast
