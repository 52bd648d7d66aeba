// Argument checks of the OHEM ops shared by the CPU and CUDA kernels (host code only): a
// direct torch.ops call that bypasses the Python front still fails with a clear message.
#pragma once

#include <ATen/ATen.h>

#include <utility>

#include "common/tensor_args.h"

namespace bisenet_fast {

// logits (N, C, h, w) and target (N, H, W), non-empty, on one device; logits float32,
// float16 or bfloat16 (and float64 where `float64` is set: the CPU kernel), target uint8,
// int32 or int64. `kernel` names the implementation in the messages.
inline void check_ohem_tensors(const char* kernel, const at::Tensor& logits, const at::Tensor& target,
                               bool float64) {
  TORCH_CHECK(logits.device() == target.device(), "ohem_cross_entropy (", kernel,
              "): logits and target must be on one device, got ", logits.device(), " and ", target.device());
  TORCH_CHECK(logits.dim() == 4, "ohem_cross_entropy: logits must be 4-D (N, C, h, w), got ", logits.sizes());
  TORCH_CHECK(target.dim() == 3, "ohem_cross_entropy: target must be 3-D (N, H, W), got ", target.sizes());
  TORCH_CHECK(target.size(0) == logits.size(0), "ohem_cross_entropy: target must have the batch size of logits (",
              logits.size(0), "), got ", target.sizes());
  TORCH_CHECK(logits.numel() > 0 && target.numel() > 0, "ohem_cross_entropy: logits and target must be non-empty");
  const auto d = logits.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kHalf || d == at::kBFloat16 || (float64 && d == at::kDouble),
              "ohem_cross_entropy (", kernel, "): logits must be ",
              float64 ? "float32, float16, bfloat16 or float64" : "float32, float16 or bfloat16", ", got ", d);
  const auto t = target.scalar_type();
  TORCH_CHECK(t == at::kByte || t == at::kInt || t == at::kLong,
              "ohem_cross_entropy: target must be uint8, int32 or int64, got ", t);
}

// The backward's grad_loss and threshold: one value each, on the logits' device (the CUDA
// kernel reads them there: a host pointer would be an illegal address).
inline void check_ohem_backward_scalars(const at::Tensor& grad_loss, const at::Tensor& threshold,
                                        const at::Tensor& logits) {
  check_defined("ohem_cross_entropy_backward", {{"grad_loss", &grad_loss}, {"threshold", &threshold}});
  for (const auto& [name, scalar] : {std::pair<const char*, const at::Tensor&>{"grad_loss", grad_loss},
                                     std::pair<const char*, const at::Tensor&>{"threshold", threshold}}) {
    TORCH_CHECK(scalar.numel() == 1, "ohem_cross_entropy_backward: ", name, " must hold one value, got shape ",
                scalar.sizes());
    TORCH_CHECK(scalar.device() == logits.device(), "ohem_cross_entropy_backward: ", name,
                " must be on the logits' device (", logits.device(), "), got ", scalar.device());
  }
}

// thresh: None (plain cross-entropy) or a probability in [kMinOhemThresh, 1]; min_kept >= 0.
// The kernels' float32 exp flushes probabilities below ~1.6e-38 (e^-87) to 0, so a smaller
// threshold would keep other pixels than the reference does (MIN_OHEM_THRESH in bisenet_fast/ops/ohem_cross_entropy.py).
constexpr double kMinOhemThresh = 1e-30;

inline void check_ohem_options(c10::optional<double> thresh, int64_t min_kept) {
  TORCH_CHECK_VALUE(!thresh.has_value() || (*thresh >= kMinOhemThresh && *thresh <= 1.0),
                    "ohem_cross_entropy: thresh must be None or a probability in [1e-30, 1], got ", *thresh);
  TORCH_CHECK_VALUE(min_kept >= 0, "ohem_cross_entropy: min_kept must be >= 0, got ", min_kept);
}

}  // namespace bisenet_fast
