// Ops without a backward refuse inputs that require grad while grad mode is on, as their
// Python fronts do: through PyTorch's autograd fallback a direct torch.ops call would
// otherwise return an output whose gradients silently never arrive.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include "common/tensor_args.h"

namespace bisenet_fast {

inline void check_inference_only(const char* op, NamedTensors tensors) {
  if (!at::GradMode::is_enabled()) return;
  for (const auto& [name, t] : tensors) {
    TORCH_CHECK(!t->requires_grad(), op, " is inference-only (no backward), but ", name,
                " requires grad: call it under torch.no_grad() or torch.inference_mode()");
  }
}

}  // namespace bisenet_fast
