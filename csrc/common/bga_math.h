// Pointwise arithmetic of Bilateral Guided Aggregation, shared by the CPU and CUDA kernels
// so both compute the same values:
//   out = detail * sigmoid(up(semantic)) + up(detail_down * sigmoid(semantic_down))
// T is the math type (float for float/half/bfloat16 inputs, double for double).
#pragma once

#include <cmath>
#include <type_traits>

#include "common/macros.h"

namespace bisenet_fast {

template <typename T>
BF_HOST_DEVICE T bga_sigmoid(T x) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, float>) {
    // The SFU's exp and an approximate division (relative error ~1e-6): the accurate expf
    // and IEEE division took about half of the sm_90 forward kernel's instructions per
    // value, which kept it well below memory speed.
    return __fdividef(1.f, 1.f + __expf(-x));
  } else {
    return T(1) / (T(1) + ::exp(-x));
  }
#else
  return T(1) / (T(1) + std::exp(-x));
#endif
}

// One output value from the detail value, gate = sigmoid(up(semantic)) there (the CPU
// kernel computes sigmoids a row at a time, vectorised) and the upsampled gated
// low-resolution branch.
template <typename T>
BF_HOST_DEVICE T bga_output(T detail, T gate, T gated_down_up) {
  return detail * gate + gated_down_up;
}

// The low-resolution branch before upsampling: detail_down * sigmoid(semantic_down).
template <typename T>
BF_HOST_DEVICE T bga_gated_down(T detail_down, T semantic_down) {
  return detail_down * bga_sigmoid(semantic_down);
}

// Gradients at one high-resolution point for upstream gradient g and gate s = sigmoid(up(semantic)):
//   d out / d detail = s, and d out / d up(semantic) = detail * s * (1 - s).
template <typename T>
struct BgaHighGrad {
  T detail;       // g * s
  T semantic_up;  // g * detail * s * (1 - s), still to be transposed through `up`
};

template <typename T>
BF_HOST_DEVICE BgaHighGrad<T> bga_high_grad(T g, T detail, T s) {
  return BgaHighGrad<T>{g * s, g * detail * s * (T(1) - s)};
}

// Gradients at one low-resolution point of the gated branch, from m = up^T(g) there.
template <typename T>
struct BgaLowGrad {
  T detail_down;    // m * sigmoid(semantic_down)
  T semantic_down;  // m * detail_down * sig * (1 - sig)
};

template <typename T>
BF_HOST_DEVICE BgaLowGrad<T> bga_low_grad(T m, T detail_down, T semantic_down) {
  const T s = bga_sigmoid(semantic_down);
  return BgaLowGrad<T>{m * s, m * detail_down * s * (T(1) - s)};
}

}  // namespace bisenet_fast
