// Host side of the CUDA BGA ops (kernels in bga_kernels.cuh): layouts, buffers, the choice
// of vector width and grid, and the launches, through a Launcher (bga.cu: CUDA launches on
// the current stream; tests/cuda_emulation: the blocks run on CPU threads) with
//   template <typename... KernelArgs, typename... Args>
//   static void launch(void (*kernel)(KernelArgs...), Grid grid, int threads, size_t shared_bytes, Args&&...)
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "common/bga_checks.h"
#include "cuda/bga_kernels.cuh"

namespace bisenet_fast {
namespace bga_cuda {

inline Geometry geometry(const BgaLayout& layout, const at::Tensor& detail, const at::Tensor& semantic) {
  const int64_t H = detail.size(2), W = detail.size(3), h = semantic.size(2), w = semantic.size(3);
  return {layout.inner, H, W, h, w, linear_scale(h, H), linear_scale(w, W)};
}

// A grid for a grid-stride loop over `total` values (the loop covers any remainder): 32
// blocks per SM at most.
inline Grid grid_stride_blocks(int64_t total, int sm_count) {
  const int64_t wanted = (total + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(sm_count) * 32;
  return {static_cast<unsigned int>(std::max<int64_t>(1, std::min(wanted, cap)))};
}

template <typename Launcher>
at::Tensor forward(const at::Tensor& detail, const at::Tensor& semantic, const at::Tensor& detail_down,
                   const at::Tensor& semantic_down, int sm_count) {
  const BgaLayout layout = bga_layout(detail);
  const Geometry g = geometry(layout, detail, semantic);
  const auto d = detail.contiguous(layout.format);
  const auto s = semantic.contiguous(layout.format);
  const auto dd = detail_down.contiguous(layout.format);
  const auto sd = semantic_down.contiguous(layout.format);
  auto out = at::empty_like(d, d.options(), layout.format);
  const int64_t total = out.numel();
  if (total == 0) return out;
  const int64_t row_len = g.high_cols * g.inner;
  TORCH_CHECK(row_len < (int64_t{1} << 31) && g.high_rows <= 65535,
              "bga_aggregate (CUDA kernel): detail rows must hold < 2^31 values and be <= 65535, got ",
              detail.sizes());
  const bool channels_last = layout.format == at::MemoryFormat::ChannelsLast;
  auto gated = at::empty_like(dd, dd.options().dtype(at::toOpMathType(dd.scalar_type())), layout.format);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, detail.scalar_type(), "bga_aggregate_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    Launcher::launch(bga_gated_down_kernel<scalar_t>, grid_stride_blocks(gated.numel(), sm_count), kThreads, 0,
                     dd.const_data_ptr<scalar_t>(), sd.const_data_ptr<scalar_t>(), gated.mutable_data_ptr<opmath_t>(),
                     gated.numel());
    // 16-byte accesses where every thread's values share a row (channels_last: a pixel) and
    // the tensors are aligned; else one value per thread.
    constexpr int kWide = 16 / sizeof(scalar_t);
    const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
    const bool wide = (channels_last ? g.inner % kWide == 0 : row_len % kWide == 0) && aligned(d.const_data_ptr()) &&
                      aligned(s.const_data_ptr()) && aligned(out.const_data_ptr());
    const int vec = wide ? kWide : 1;
    const int64_t row_threads = row_len / vec;
    // Row chunks of one warp multiple (a 128-wide NCHW row fills half a 256-thread block).
    const int threads = static_cast<int>(std::min<int64_t>(kThreads, (row_threads + 31) / 32 * 32));
    const Grid grid{static_cast<unsigned>((row_threads + threads - 1) / threads), static_cast<unsigned>(g.high_rows),
                    static_cast<unsigned>(std::min<int64_t>(layout.planes, 65535))};
    const auto kernel =
        channels_last ? (wide ? bga_forward_kernel<scalar_t, true, kWide> : bga_forward_kernel<scalar_t, true, 1>)
                      : (wide ? bga_forward_kernel<scalar_t, false, kWide> : bga_forward_kernel<scalar_t, false, 1>);
    Launcher::launch(kernel, grid, threads, 0, d.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(),
                     gated.const_data_ptr<opmath_t>(), out.mutable_data_ptr<scalar_t>(), g, layout.planes);
  });
  return out;
}

template <typename Launcher>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_out,
                                                                    const at::Tensor& detail,
                                                                    const at::Tensor& semantic,
                                                                    const at::Tensor& detail_down,
                                                                    const at::Tensor& semantic_down, int sm_count) {
  const BgaLayout layout = bga_layout(detail);
  const Geometry g = geometry(layout, detail, semantic);
  const auto go = grad_out.contiguous(layout.format);
  const auto d = detail.contiguous(layout.format);
  const auto s = semantic.contiguous(layout.format);
  const auto dd = detail_down.contiguous(layout.format);
  const auto sd = semantic_down.contiguous(layout.format);
  auto grad_detail = at::empty_like(d, d.options(), layout.format);
  auto grad_semantic = at::empty_like(dd, dd.options(), layout.format);
  auto grad_detail_down = at::empty_like(dd, dd.options(), layout.format);
  auto grad_semantic_down = at::empty_like(dd, dd.options(), layout.format);
  const int64_t total = dd.numel();
  if (total == 0 || d.numel() == 0) {
    // Nothing reads or is read: every gradient is empty or zero.
    return {grad_detail.zero_(), grad_semantic.zero_(), grad_detail_down.zero_(), grad_semantic_down.zero_()};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, detail.scalar_type(), "bga_aggregate_backward_cuda", [&] {
    Launcher::launch(bga_backward_kernel<scalar_t>, grid_stride_blocks(total, sm_count), kThreads, 0,
                     go.const_data_ptr<scalar_t>(), d.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(),
                     dd.const_data_ptr<scalar_t>(), sd.const_data_ptr<scalar_t>(),
                     grad_detail.mutable_data_ptr<scalar_t>(), grad_semantic.mutable_data_ptr<scalar_t>(),
                     grad_detail_down.mutable_data_ptr<scalar_t>(), grad_semantic_down.mutable_data_ptr<scalar_t>(),
                     g, total);
  });
  return {grad_detail, grad_semantic, grad_detail_down, grad_semantic_down};
}

}  // namespace bga_cuda
}  // namespace bisenet_fast
