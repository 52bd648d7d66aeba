// The CUDA GE-layer ops (csrc/cuda/ge_layer_host.h and ge_layer_block.cuh, the code
// ge_layer.cu launches) with their blocks run on CPU threads by shim.h; and the launch
// plan, for tests of its choices.
#include <torch/csrc/utils/pybind.h>  // pybind11 and its at::Tensor caster: half the build time of torch/extension.h

#include "cuda_emulation/shim.h"
#include "cuda/ge_layer_host.h"

namespace {

using namespace bisenet_fast::ge_cuda;

struct GeEmulatedLauncher {
  template <int kStride, typename scalar_t, int kOut, Gemm kGemm>
  static void run(const GeLaunch& plan, const GeParams<scalar_t>& p) {
    cuda_emulation::run_grid(plan.tiles, plan.cout_tiles, plan.k_splits, kThreads, plan.shared_bytes,
                             [&](unsigned char* shared) { ge_layer_block<kStride, scalar_t, kOut, kGemm>(shared, p); });
  }
};

// A GPU with sm_count SMs, with or without tensor cores (compute capability 8.0+).
DeviceCaps caps(int64_t sm_count, bool tensor_cores) { return {static_cast<int>(sm_count), tensor_cores}; }

at::Tensor stride1(const at::Tensor& x, const at::Tensor& y, const at::Tensor& dw_weight, const at::Tensor& dw_bias,
                   const at::Tensor& pw_weight, const at::Tensor& pw_bias, int64_t sm_count, bool tensor_cores) {
  return ge_layer_stride1<GeEmulatedLauncher>(x, y, dw_weight, dw_bias, pw_weight, pw_bias,
                                              caps(sm_count, tensor_cores));
}

at::Tensor stride2(const at::Tensor& x, const at::Tensor& y, const at::Tensor& dw0_weight, const at::Tensor& dw0_bias,
                   const at::Tensor& dw1_weight, const at::Tensor& dw1_bias, const at::Tensor& pw_weight,
                   const at::Tensor& pw_bias, const at::Tensor& sc_dw_weight, const at::Tensor& sc_dw_bias,
                   const at::Tensor& sc_pw_weight, const at::Tensor& sc_pw_bias, int64_t sm_count, bool tensor_cores) {
  return ge_layer_stride2<GeEmulatedLauncher>(x, y, dw0_weight, dw0_bias, dw1_weight, dw1_bias, pw_weight, pw_bias,
                                              sc_dw_weight, sc_dw_bias, sc_pw_weight, sc_pw_bias,
                                              caps(sm_count, tensor_cores));
}

pybind11::dict plan(int64_t stride, int64_t batch, int64_t out_height, int64_t out_width, int64_t cin, int64_t ratio,
                    int64_t cout, int64_t sm_count, bool tensor_cores, int64_t operand_bytes) {
  const GeLaunch launch = plan_launch(static_cast<int>(stride), batch, out_height, out_width, cin, ratio, cout,
                                      static_cast<int>(sm_count), tensor_cores ? Gemm::kTensorCores : Gemm::kFma,
                                      static_cast<int>(operand_bytes));
  pybind11::dict d;
  d["tiles"] = launch.tiles;
  d["cout_tiles"] = launch.cout_tiles;
  d["k_splits"] = launch.k_splits;
  d["out_per_thread"] = launch.out_per_thread;
  d["halo_channels"] = launch.halo_channels;
  d["tensor_cores"] = launch.gemm == Gemm::kTensorCores;
  d["shared_bytes"] = launch.shared_bytes;
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("ge_layer_stride1", &stride1);
  m.def("ge_layer_stride2", &stride2);
  m.def("plan", &plan, "The CUDA GE kernels' launch plan (bisenet_fast::ge_cuda::plan_launch).");
}
