// Argument checks of the GE-layer ops, shared by the CPU and CUDA kernels (host code only):
// a direct torch.ops call that bypasses the Python front fails with the same clear message
// on either, before any kernel reads a weight or bias of the wrong size.
#pragma once

#include <ATen/ATen.h>

#include <climits>
#include <utility>

#include "common/inference_only.h"

namespace bisenet_fast {

// x, y and every weight: one device and dtype (float32/float16/bfloat16, float64 where the
// kernel takes it), 4-D inputs of one shape with channels and pixels, none requiring grad.
inline void check_ge_inputs(const char* op, const at::Tensor& x, const at::Tensor& y, NamedTensors weights,
                            bool allow_float64) {
  check_defined(op, {{"x", &x}, {"y", &y}});
  check_defined(op, weights);
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be 4-D (N, C, H, W), got ", x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 ||
                       (allow_float64 && dtype == at::kDouble),
                   op, ": x must be float32, float16 or bfloat16", allow_float64 ? " (or float64)" : "", ", got ",
                   dtype);
  TORCH_CHECK_VALUE(y.sizes() == x.sizes(), op, ": y (conv1's output) must have x's shape ", x.sizes(), ", got ",
                    y.sizes());
  auto check_like_x = [&](const char* name, const at::Tensor& t) {
    TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " must be on x's device ", x.device(), ", got ",
                      t.device());
    TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": ", name, " must have x's dtype ", dtype, ", got ",
                     t.scalar_type());
  };
  check_like_x("y", y);
  for (const auto& [name, t] : weights) check_like_x(name, *t);
  check_inference_only(op, {{"x", &x}, {"y", &y}});
  check_inference_only(op, weights);
  TORCH_CHECK_VALUE(x.size(1) > 0, op, ": x must have at least one channel, got ", x.sizes());
  TORCH_CHECK_VALUE(x.size(2) > 0 && x.size(3) > 0, op, ": x must have a non-empty spatial size, got ", x.sizes());
  // The CUDA kernels compute tile origins and halo rows in int.
  TORCH_CHECK_VALUE(x.size(2) < INT_MAX / 4 && x.size(3) < INT_MAX / 4, op, ": x's spatial size is too large");
}

// t must have exactly `shape` (`expected` spells it with the names of its sizes).
inline void check_ge_shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape,
                           const char* expected) {
  TORCH_CHECK_VALUE(t.sizes() == shape, op, ": ", name, " must have shape ", expected, " = ", shape, ", got ",
                    t.sizes());
}

// Stride 1's arguments (the inputs as check_ge_inputs, the weights for x's cin channels);
// returns mid (= ratio * cin).
inline int64_t check_ge_stride1(const char* op, const at::Tensor& x, const at::Tensor& y, const at::Tensor& dw_weight,
                                const at::Tensor& dw_bias, const at::Tensor& pw_weight, const at::Tensor& pw_bias,
                                bool allow_float64) {
  check_ge_inputs(op, x, y,
                  {{"dw_weight", &dw_weight}, {"dw_bias", &dw_bias}, {"pw_weight", &pw_weight}, {"pw_bias", &pw_bias}},
                  allow_float64);
  const int64_t cin = x.size(1), mid = dw_weight.dim() == 4 ? dw_weight.size(0) : 0;
  TORCH_CHECK_VALUE(mid > 0 && mid % cin == 0, op, ": dw_weight must be (k*cin, 1, 3, 3) for x's ", cin,
                    " channels, got ", dw_weight.sizes());
  check_ge_shape(op, "dw_weight", dw_weight, {mid, 1, 3, 3}, "(k*cin, 1, 3, 3)");
  check_ge_shape(op, "dw_bias", dw_bias, {mid}, "(mid)");
  check_ge_shape(op, "pw_weight", pw_weight, {cin, mid}, "(cin, mid) (the residual needs cout == cin)");
  check_ge_shape(op, "pw_bias", pw_bias, {cin}, "(cin)");
  return mid;
}

// Stride 2's arguments, likewise; returns {mid, cout}.
inline std::pair<int64_t, int64_t> check_ge_stride2(
    const char* op, const at::Tensor& x, const at::Tensor& y, const at::Tensor& dw0_weight, const at::Tensor& dw0_bias,
    const at::Tensor& dw1_weight, const at::Tensor& dw1_bias, const at::Tensor& pw_weight, const at::Tensor& pw_bias,
    const at::Tensor& sc_dw_weight, const at::Tensor& sc_dw_bias, const at::Tensor& sc_pw_weight,
    const at::Tensor& sc_pw_bias, bool allow_float64) {
  check_ge_inputs(op, x, y,
                  {{"dw0_weight", &dw0_weight}, {"dw0_bias", &dw0_bias}, {"dw1_weight", &dw1_weight},
                   {"dw1_bias", &dw1_bias}, {"pw_weight", &pw_weight}, {"pw_bias", &pw_bias},
                   {"sc_dw_weight", &sc_dw_weight}, {"sc_dw_bias", &sc_dw_bias}, {"sc_pw_weight", &sc_pw_weight},
                   {"sc_pw_bias", &sc_pw_bias}},
                  allow_float64);
  const int64_t cin = x.size(1), mid = dw0_weight.dim() == 4 ? dw0_weight.size(0) : 0;
  TORCH_CHECK_VALUE(mid > 0 && mid % cin == 0, op, ": dw0_weight must be (k*cin, 1, 3, 3) for x's ", cin,
                    " channels, got ", dw0_weight.sizes());
  check_ge_shape(op, "dw0_weight", dw0_weight, {mid, 1, 3, 3}, "(k*cin, 1, 3, 3)");
  check_ge_shape(op, "dw0_bias", dw0_bias, {mid}, "(mid)");
  check_ge_shape(op, "dw1_weight", dw1_weight, {mid, 1, 3, 3}, "(mid, 1, 3, 3)");
  check_ge_shape(op, "dw1_bias", dw1_bias, {mid}, "(mid)");
  TORCH_CHECK_VALUE(pw_weight.dim() == 2 && pw_weight.size(1) == mid && pw_weight.size(0) > 0, op,
                    ": pw_weight must be (cout, mid) with mid = ", mid, ", got ", pw_weight.sizes());
  const int64_t cout = pw_weight.size(0);
  check_ge_shape(op, "pw_bias", pw_bias, {cout}, "(cout)");
  check_ge_shape(op, "sc_dw_weight", sc_dw_weight, {cin, 1, 3, 3}, "(cin, 1, 3, 3)");
  check_ge_shape(op, "sc_dw_bias", sc_dw_bias, {cin}, "(cin)");
  check_ge_shape(op, "sc_pw_weight", sc_pw_weight, {cout, cin}, "(cout, cin)");
  check_ge_shape(op, "sc_pw_bias", sc_pw_bias, {cout}, "(cout)");
  return {mid, cout};
}

}  // namespace bisenet_fast
