// Argument checks of the BGA ops, shared by the CPU and CUDA kernels (host code only): a
// direct torch.ops call that bypasses the Python front still fails with a clear message.
#pragma once

#include <ATen/ATen.h>

#include <utility>

#include "common/tensor_args.h"

namespace bisenet_fast {

// detail_name: what the op calls its high-resolution input (bga_pointwise_aggregate: detail_dw).
inline void check_bga_inputs(const char* op, const at::Tensor& detail, const at::Tensor& semantic,
                             const at::Tensor& detail_down, const at::Tensor& semantic_down,
                             const char* detail_name = "detail") {
  check_defined(op, {{detail_name, &detail},
                     {"semantic", &semantic},
                     {"detail_down", &detail_down},
                     {"semantic_down", &semantic_down}});
  TORCH_CHECK(detail.dim() == 4, op, ": ", detail_name, " must be 4-D (N, C, H, W), got ", detail.sizes());
  TORCH_CHECK(at::isFloatingType(detail.scalar_type()), op, ": ", detail_name, " must be floating point, got ",
              detail.scalar_type());
  const std::pair<const char*, const at::Tensor*> lows[] = {
      {"semantic", &semantic}, {"detail_down", &detail_down}, {"semantic_down", &semantic_down}};
  for (const auto& [name, t] : lows) {
    TORCH_CHECK(t->dim() == 4, op, ": ", name, " must be 4-D (N, C, h, w), got ", t->sizes());
    TORCH_CHECK(t->device() == detail.device(), op, ": ", name, " must be on ", detail.device(), " like ",
                detail_name, ", got ", t->device());
    TORCH_CHECK(t->scalar_type() == detail.scalar_type(), op, ": ", name, " must have dtype ", detail.scalar_type(),
                " like ", detail_name, ", got ", t->scalar_type());
    TORCH_CHECK(t->size(0) == detail.size(0) && t->size(1) == detail.size(1), op, ": ", name,
                " must have batch and channels (", detail.size(0), ", ", detail.size(1), ") like ", detail_name,
                ", got ", t->sizes());
    TORCH_CHECK(t->size(2) == semantic.size(2) && t->size(3) == semantic.size(3), op, ": ", name,
                " must have the spatial size of semantic ", semantic.sizes().slice(2), ", got ", t->sizes());
  }
  TORCH_CHECK(detail.size(2) > 0 && detail.size(3) > 0 && semantic.size(2) > 0 && semantic.size(3) > 0, op,
              ": spatial sizes must be non-empty, got ", detail_name, " ", detail.sizes(), " and semantic ",
              semantic.sizes());
}

// The 1x1 conv folded before the aggregation (bga_pointwise_aggregate): weight (C, C) and
// bias (C) for detail's C channels, in detail's dtype and device.
inline void check_bga_pointwise_weights(const at::Tensor& detail, const at::Tensor& pw_weight,
                                        const at::Tensor& pw_bias) {
  check_defined("bga_pointwise_aggregate", {{"pw_weight", &pw_weight}, {"pw_bias", &pw_bias}});
  const int64_t c = detail.size(1);
  TORCH_CHECK(pw_weight.dim() == 2 && pw_weight.size(0) == c && pw_weight.size(1) == c,
              "bga_pointwise_aggregate: pw_weight must be (", c, ", ", c, ") for detail_dw's ", c,
              " channels, got ", pw_weight.sizes());
  TORCH_CHECK(pw_bias.dim() == 1 && pw_bias.size(0) == c, "bga_pointwise_aggregate: pw_bias must be (", c,
              "), got ", pw_bias.sizes());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"pw_weight", &pw_weight},
                                std::pair<const char*, const at::Tensor*>{"pw_bias", &pw_bias}}) {
    TORCH_CHECK(t->scalar_type() == detail.scalar_type() && t->device() == detail.device(),
                "bga_pointwise_aggregate: ", name, " must have dtype ", detail.scalar_type(), " and device ",
                detail.device(), " like detail_dw, got ", t->scalar_type(), " on ", t->device());
  }
}

inline void check_bga_grad_out(const at::Tensor& grad_out, const at::Tensor& detail) {
  check_defined("bga_aggregate_backward", {{"grad_out", &grad_out}});
  TORCH_CHECK(grad_out.sizes() == detail.sizes(), "bga_aggregate_backward: grad_out must have the shape of detail ",
              detail.sizes(), ", got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == detail.scalar_type() && grad_out.device() == detail.device(),
              "bga_aggregate_backward: grad_out must have dtype ", detail.scalar_type(), " and device ",
              detail.device(), " like detail, got ", grad_out.scalar_type(), " on ", grad_out.device());
}

// The layout every tensor of one call runs in: channels_last detail runs channels_last
// natively; anything else runs as NCHW. Either way a map is `planes` planes of rows x cols
// pixels of `inner` consecutive values (NCHW: N*C planes, inner 1; channels_last: N, C).
struct BgaLayout {
  at::MemoryFormat format;
  int64_t planes;
  int64_t inner;
};

inline BgaLayout bga_layout(const at::Tensor& detail) {
  if (detail.suggest_memory_format() == at::MemoryFormat::ChannelsLast) {
    return {at::MemoryFormat::ChannelsLast, detail.size(0), detail.size(1)};
  }
  return {at::MemoryFormat::Contiguous, detail.size(0) * detail.size(1), 1};
}

}  // namespace bisenet_fast
