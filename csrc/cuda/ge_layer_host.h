// Host side of the CUDA GE-layer ops: argument checks, output allocation, launch plan and
// dispatch over dtype, GEMM kind and outputs per thread. The launch itself is the
// Launcher's (ge_layer.cu: a CUDA kernel launch; tests/cuda_emulation: the blocks run on
// CPU threads), which has a static member
//   template <int kStride, typename scalar_t, int kOut, Gemm kGemm>
//   void run(const GeLaunch&, const GeParams<scalar_t>&)
// running ge_layer_block<kStride, scalar_t, kOut, kGemm> over the launch's grid.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>

#include <climits>
#include <type_traits>
#include <utility>

#include "common/cudnn_tf32.h"
#include "common/ge_layer_checks.h"
#include "cuda/ge_layer_block.cuh"

namespace bisenet_fast {
namespace ge_cuda {

template <typename scalar_t>
GeParams<scalar_t> make_params(const at::Tensor& x, const at::Tensor& y, at::Tensor& out, const GeLaunch& launch,
                               int64_t mid, int64_t cout) {
  GeParams<scalar_t> p{};
  p.x = x.const_data_ptr<scalar_t>();
  p.y = y.const_data_ptr<scalar_t>();
  p.out = out.mutable_data_ptr<scalar_t>();
  p.height = static_cast<int>(x.size(2));
  p.width = static_cast<int>(x.size(3));
  p.out_height = static_cast<int>(out.size(2));
  p.out_width = static_cast<int>(out.size(3));
  p.cin = static_cast<int>(x.size(1));
  p.mid = static_cast<int>(mid);
  p.ratio = static_cast<int>(mid / x.size(1));
  p.cout = static_cast<int>(cout);
  p.tiles_h = static_cast<int>(ceil_div(p.out_height, kTileH));
  p.tiles_w = static_cast<int>(ceil_div(p.out_width, kTileW));
  p.halo_channels = launch.halo_channels;
  p.cout_tiles = launch.cout_tiles;
  p.k_splits = launch.k_splits;
  p.tiles = launch.tiles;
  return p;
}

// A split K loop's partial sums and per-tile arrival counts (kept alive by the caller
// until the launch has been queued; the caching allocator orders their reuse after it).
struct SplitWorkspace {
  at::Tensor partial, arrivals;

  SplitWorkspace(const GeLaunch& launch, const at::Tensor& like) {
    if (launch.k_splits == 1) return;
    const int64_t tiles = launch.tiles * launch.cout_tiles;
    const int64_t tile_floats = int64_t(kTilePixels) * kOutGroups * launch.out_per_thread;
    partial = at::empty({launch.k_splits * tiles * tile_floats}, like.options().dtype(at::kFloat));
    arrivals = at::zeros({tiles}, like.options().dtype(at::kInt));
  }

  template <typename scalar_t>
  void attach(GeParams<scalar_t>& p) {
    p.partial = partial.defined() ? partial.mutable_data_ptr<float>() : nullptr;
    p.arrivals = arrivals.defined() ? arrivals.mutable_data_ptr<int>() : nullptr;
  }
};

// Calls f(scalar_t{}) for the call's dtype (float, at::Half or at::BFloat16).
template <typename F>
void dispatch_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kHalf: return f(at::Half{});
    case at::kBFloat16: return f(at::BFloat16{});
    default: TORCH_CHECK(false, "ge_layer: unsupported dtype ", dtype);
  }
}

// What the GPU offers the kernels.
struct DeviceCaps {
  int sm_count;
  bool tensor_cores;  // wmma with bfloat16 and TF32 operands: compute capability 8.0+
};

// float16/bfloat16 multiply on tensor cores (their products are exact in float32, and the
// expanded values are rounded to the input dtype, as eager's intermediate tensors are);
// float32 too, in TF32, where cuDNN's convs may use TF32 (torch.backends.cudnn.allow_tf32 or
// torch.backends.cudnn.conv.fp32_precision, TF32 by PyTorch's default, so the fused layer
// rounds like the eager one); else float32 FMAs.
inline Gemm choose_gemm(const char* op, at::ScalarType dtype, const DeviceCaps& caps) {
  if (dtype != at::kFloat) {
    TORCH_CHECK(caps.tensor_cores, op, " (cuda): float16 and bfloat16 need a GPU of compute capability 8.0 or newer");
    return Gemm::kTensorCores;
  }
  return caps.tensor_cores && cudnn_conv_allows_tf32() ? Gemm::kTensorCores : Gemm::kFma;
}

inline int operand_bytes(at::ScalarType dtype, Gemm gemm) {
  return gemm == Gemm::kTensorCores && dtype != at::kFloat ? 2 : 4;
}

template <typename Launcher, int kStride, Gemm kGemm, typename scalar_t>
void launch_gemm(const GeLaunch& launch, const GeParams<scalar_t>& p) {
  switch (launch.out_per_thread) {
    case 2: return Launcher::template run<kStride, scalar_t, 2, kGemm>(launch, p);
    case 4: return Launcher::template run<kStride, scalar_t, 4, kGemm>(launch, p);
    default: return Launcher::template run<kStride, scalar_t, 8, kGemm>(launch, p);
  }
}

template <typename Launcher, int kStride, typename scalar_t>
void launch_block(const GeLaunch& launch, const GeParams<scalar_t>& p) {
  if (launch.gemm == Gemm::kTensorCores) return launch_gemm<Launcher, kStride, Gemm::kTensorCores>(launch, p);
  if constexpr (std::is_same_v<scalar_t, float>) {
    launch_gemm<Launcher, kStride, Gemm::kFma>(launch, p);
  } else {
    TORCH_CHECK(false, "ge_layer: 16-bit inputs take the tensor-core kernels");
  }
}

// A layer's weights, contiguous, in GeParams' order (stride 1 leaves dw1 and the shortcut
// undefined).
struct LayerWeights {
  at::Tensor dw_weight, dw_bias, dw1_weight, dw1_bias, pw_weight, pw_bias, sc_dw_weight, sc_dw_bias, sc_pw_weight,
      sc_pw_bias;

  template <typename scalar_t>
  void attach(GeParams<scalar_t>& p) const {
    auto data = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr; };
    p.dw_weight = data(dw_weight), p.dw_bias = data(dw_bias);
    p.dw1_weight = data(dw1_weight), p.dw1_bias = data(dw1_bias);
    p.pw_weight = data(pw_weight), p.pw_bias = data(pw_bias);
    p.sc_dw_weight = data(sc_dw_weight), p.sc_dw_bias = data(sc_dw_bias);
    p.sc_pw_weight = data(sc_pw_weight), p.sc_pw_bias = data(sc_pw_bias);
  }
};

// The layer's output (channels_last), computed by the launcher: after the checks.
template <typename Launcher, int kStride>
at::Tensor run_layer(const char* op, const at::Tensor& x, const at::Tensor& y, const LayerWeights& weights,
                     int64_t mid, int64_t cout, const DeviceCaps& caps) {
  const int64_t cin = x.size(1);
  const int64_t out_h = (x.size(2) - 1) / kStride + 1, out_w = (x.size(3) - 1) / kStride + 1;
  const auto xc = x.contiguous(at::MemoryFormat::ChannelsLast), yc = y.contiguous(at::MemoryFormat::ChannelsLast);
  auto out = at::empty({x.size(0), cout, out_h, out_w}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;
  const Gemm gemm = choose_gemm(op, x.scalar_type(), caps);
  const GeLaunch launch = plan_launch(kStride, x.size(0), out_h, out_w, cin, mid / cin, cout, caps.sm_count, gemm,
                                      operand_bytes(x.scalar_type(), gemm));
  TORCH_CHECK_VALUE(launch.tiles <= INT_MAX, op, ": too many pixels for one launch");
  SplitWorkspace workspace(launch, x);
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    auto p = make_params<scalar_t>(xc, yc, out, launch, mid, cout);
    workspace.attach(p);
    weights.attach(p);
    launch_block<Launcher, kStride>(launch, p);
  });
  return out;
}

template <typename Launcher>
at::Tensor ge_layer_stride1(const at::Tensor& x, const at::Tensor& y, const at::Tensor& dw_weight,
                            const at::Tensor& dw_bias, const at::Tensor& pw_weight, const at::Tensor& pw_bias,
                            const DeviceCaps& caps) {
  constexpr const char* op = "ge_layer_stride1";
  const int64_t mid = check_ge_stride1(op, x, y, dw_weight, dw_bias, pw_weight, pw_bias, /*allow_float64=*/false);
  const int64_t cin = x.size(1);
  LayerWeights weights;
  weights.dw_weight = dw_weight.contiguous(), weights.dw_bias = dw_bias.contiguous();
  weights.pw_weight = pw_weight.contiguous(), weights.pw_bias = pw_bias.contiguous();
  return run_layer<Launcher, 1>(op, x, y, weights, mid, cin, caps);
}

template <typename Launcher>
at::Tensor ge_layer_stride2(const at::Tensor& x, const at::Tensor& y, const at::Tensor& dw0_weight,
                            const at::Tensor& dw0_bias, const at::Tensor& dw1_weight, const at::Tensor& dw1_bias,
                            const at::Tensor& pw_weight, const at::Tensor& pw_bias, const at::Tensor& sc_dw_weight,
                            const at::Tensor& sc_dw_bias, const at::Tensor& sc_pw_weight, const at::Tensor& sc_pw_bias,
                            const DeviceCaps& caps) {
  constexpr const char* op = "ge_layer_stride2";
  const std::pair<int64_t, int64_t> mid_cout =
      check_ge_stride2(op, x, y, dw0_weight, dw0_bias, dw1_weight, dw1_bias, pw_weight, pw_bias, sc_dw_weight,
                       sc_dw_bias, sc_pw_weight, sc_pw_bias, /*allow_float64=*/false);
  const int64_t mid = mid_cout.first, cout = mid_cout.second;
  const LayerWeights weights{dw0_weight.contiguous(),   dw0_bias.contiguous(),     dw1_weight.contiguous(),
                             dw1_bias.contiguous(),     pw_weight.contiguous(),    pw_bias.contiguous(),
                             sc_dw_weight.contiguous(), sc_dw_bias.contiguous(),   sc_pw_weight.contiguous(),
                             sc_pw_bias.contiguous()};
  return run_layer<Launcher, 2>(op, x, y, weights, mid, cout, caps);
}

}  // namespace ge_cuda
}  // namespace bisenet_fast
