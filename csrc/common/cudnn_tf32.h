// Whether cuDNN's convolutions may use TF32, for kernels that round float32 GEMMs as the
// eager layer's cuDNN convs do (the CUDA GE layer here; the Triton GE and BGA-pointwise
// kernels through bisenet_fast._C.cudnn_conv_allows_tf32, so both read one rule).
#pragma once

#include <ATen/Context.h>

#include <optional>
#include <string>

namespace bisenet_fast {

// Asked as cuDNN's conv asks it. Context's
// allowTF32CuDNN was () up to torch 2.7, then (const std::string& op), then
// (std::optional<Float32Op> op); picked by its type, so every supported torch compiles this.
// Asked without the op, torch >= 2.8 raises when the conv and RNN flags differ, as they do
// after torch.backends.cudnn.conv.fp32_precision = "ieee" (its new API, set alone).
template <typename Method>
struct CudnnConvTf32;
template <typename C>
struct CudnnConvTf32<bool (C::*)() const> {
  static bool get(const C& context) { return context.allowTF32CuDNN(); }
};
template <typename C>
struct CudnnConvTf32<bool (C::*)(const std::string&) const> {
  static bool get(const C& context) { return context.allowTF32CuDNN("conv"); }
};
template <typename C, typename Op>
struct CudnnConvTf32<bool (C::*)(std::optional<Op>) const> {
  static bool get(const C& context) { return context.allowTF32CuDNN(Op::CONV); }
};

inline bool cudnn_conv_allows_tf32() {
  return CudnnConvTf32<decltype(&at::Context::allowTF32CuDNN)>::get(at::globalContext());
}

}  // namespace bisenet_fast
