// The one schema block of the bisenet_fast operator library, and the Python module that
// exposes what was compiled. Kernels live in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu and
// register themselves with TORCH_LIBRARY_IMPL; fake kernels and autograd are registered in
// Python (bisenet_fast/ops/).
#include <torch/extension.h>

#include "common/cudnn_tf32.h"

#ifndef BISENET_FAST_CUDA_ARCHS
#define BISENET_FAST_CUDA_ARCHS ""
#endif
#ifndef BISENET_FAST_TORCH_VERSION
#define BISENET_FAST_TORCH_VERSION "unknown"
#endif

TORCH_LIBRARY(bisenet_fast, m) {
  // OHEM top-k cross-entropy on logits upsampled in-kernel to the target's size.
  // thresh=None: plain cross-entropy. Returns the loss (0-dim float32) and the
  // probability threshold used (0-dim float32, +inf without OHEM), saved for backward;
  // both float64 for float64 logits (CPU), where the threshold compares float64 probabilities.
  // check_labels=False lets the CUDA kernel skip its one host synchronisation (the label
  // check); a label outside [0, C) other than ignore_index then makes the loss NaN.
  m.def(
      "ohem_cross_entropy_forward(Tensor logits, Tensor target, float? thresh, int min_kept, "
      "int ignore_index, bool check_labels=True) -> (Tensor loss, Tensor threshold)");
  // Gradient w.r.t. the head-resolution logits (same shape and dtype as logits).
  m.def(
      "ohem_cross_entropy_backward(Tensor grad_loss, Tensor logits, Tensor target, "
      "Tensor threshold, int ignore_index) -> Tensor");

  // Bilateral Guided Aggregation:
  //   detail * sigmoid(up(semantic)) + up(detail_down * sigmoid(semantic_down))
  // detail (N,C,H,W); semantic, detail_down, semantic_down (N,C,h,w); up = bilinear to (H,W).
  m.def("bga_aggregate(Tensor detail, Tensor semantic, Tensor detail_down, Tensor semantic_down) -> Tensor");
  // Gradients to (detail, semantic, detail_down, semantic_down).
  m.def(
      "bga_aggregate_backward(Tensor grad_out, Tensor detail, Tensor semantic, Tensor detail_down, "
      "Tensor semantic_down) -> (Tensor, Tensor, Tensor, Tensor)");
  // The aggregation with the 1x1 conv of detail_dwconv folded in, inference only (no backward):
  //   (pw_weight @ detail_dw + pw_bias) * sigmoid(up(semantic)) + up(detail_down * sigmoid(semantic_down))
  // detail_dw (N,C,H,W); pw_weight (C,C); pw_bias (C); the rest as bga_aggregate.
  m.def(
      "bga_pointwise_aggregate(Tensor detail_dw, Tensor pw_weight, Tensor pw_bias, Tensor semantic, "
      "Tensor detail_down, Tensor semantic_down) -> Tensor");

  // Gather-and-Expansion layer, inference form (BN folded into every conv; y = conv1(x)):
  //   stride 1: relu(x + pw(relu(dw(y))))   dw 3x3 groups=cin, cin->mid; pw (cin, mid)
  //   stride 2: relu(pw(relu(dw1(dw0(y)))) + sc_pw(sc_dw(x)))
  //             dw0 3x3 s2 groups=cin cin->mid; dw1 3x3 depthwise on mid; sc_dw 3x3 s2
  //             depthwise on x; pw (cout, mid); sc_pw (cout, cin).
  // Every conv has its (folded) bias; outputs are channels_last. No backward.
  m.def(
      "ge_layer_stride1(Tensor x, Tensor y, Tensor dw_weight, Tensor dw_bias, Tensor pw_weight, "
      "Tensor pw_bias) -> Tensor");
  m.def(
      "ge_layer_stride2(Tensor x, Tensor y, Tensor dw0_weight, Tensor dw0_bias, Tensor dw1_weight, "
      "Tensor dw1_bias, Tensor pw_weight, Tensor pw_bias, Tensor sc_dw_weight, Tensor sc_dw_bias, "
      "Tensor sc_pw_weight, Tensor sc_pw_bias) -> Tensor");

  // Dense 3x3 conv, stride 1, padding 1, + bias, then ReLU if `relu`, by Winograd F(m x m, 3x3);
  // inference only, CPU. packed_weight ((m+2)^2, cin, cout), 16 for m = 2 or 36 for m = 4, is
  // the Winograd-domain weight G w G^T (bisenet_fast.ops.winograd_weight); x (N, cin, H, W);
  // output channels_last.
  m.def("conv3x3_winograd(Tensor x, Tensor packed_weight, Tensor bias, bool relu) -> Tensor");

  // Bilinear resize of (N, C, h, w) to (N, C, size[0], size[1]), align_corners=False, as
  // F.interpolate(x, size, mode="bilinear"); inference only, CPU; output NCHW-contiguous.
  m.def("resize_bilinear(Tensor x, SymInt[2] size) -> Tensor");

  // GE expansion, training form: grouped 3x3 conv (groups = cin, weight (k*cin, 1, 3, 3),
  // stride 1 or 2, padding 1, no bias) -> BatchNorm with this batch's statistics -> ReLU if
  // `relu`. Returns the output (NCHW) and the per-channel batch mean and biased variance
  // (float32; float64 for float64 x) for the running-stat update and for backward, which
  // recomputes the conv output from x instead of keeping it.
  m.def(
      "ge_expand_train(Tensor x, Tensor weight, Tensor bn_weight, Tensor bn_bias, int stride, bool relu, "
      "float eps) -> (Tensor out, Tensor mean, Tensor var)");
  // Gradients to (x, weight, bn_weight, bn_bias).
  m.def(
      "ge_expand_train_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor bn_weight, Tensor bn_bias, "
      "Tensor mean, Tensor var, int stride, bool relu, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
#ifdef BISENET_FAST_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["cuda_archs"] = std::string(BISENET_FAST_CUDA_ARCHS);
  info["compiled_with_torch"] = std::string(BISENET_FAST_TORCH_VERSION);
  info["parallel"] = at::get_parallel_info();
  // Whether at::parallel_for in these kernels can use more than one thread (torch's OpenMP
  // backend runs the header's `#pragma omp parallel`, which needs -fopenmp here).
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, module) {
  module.def("build_info", &build_info, "What this build of bisenet_fast._C contains.");
  module.def("cudnn_conv_allows_tf32", &bisenet_fast::cudnn_conv_allows_tf32,
             "Whether cuDNN's convolutions may use TF32 now (the rule the CUDA GE layer follows).");
}
