// Tensor arguments named for error messages, and the check that each was given: a direct
// torch.ops call with None for a Tensor argument passes an undefined tensor, which would
// otherwise fail later with "tensor does not have a device", naming nothing.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <utility>

namespace bisenet_fast {

using NamedTensors = std::initializer_list<std::pair<const char*, const at::Tensor*>>;

inline void check_defined(const char* op, NamedTensors tensors) {
  for (const auto& [name, t] : tensors) {
    TORCH_CHECK_TYPE(t->defined(), op, ": ", name, " must be a tensor, got None");
  }
}

}  // namespace bisenet_fast
