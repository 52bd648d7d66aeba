// Bilateral Guided Aggregation fused after the 1x1 conv of detail_dwconv, on the CPU
// (inference only):
//   out = (pw_weight @ detail_dw + pw_bias) * sigmoid(up(semantic))
//         + up(detail_down * sigmoid(semantic_down))
// One task per high-resolution pixel row (n, y): the conv's output for that row is one GEMM
// (C x C by C x W) into a row-sized tile, which the aggregation's row pipeline
// (cpu/bga_rows.h, the same code as bga.cpp) gates straight into `out`. The conv's output
// map is never materialised; the tile stays in cache.
//
// The tile holds the conv's output in the input dtype, as F.conv2d would return it, so
// the result equals conv2d followed by bga_aggregate up to the GEMM's summation order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "common/bga_checks.h"
#include "common/bilinear.h"
#include "cpu/bga_rows.h"

namespace bisenet_fast {
namespace {

template <typename scalar_t>
void pointwise_forward_kernel(const Geometry& g, bool channels_last, const at::Tensor& detail,
                              const at::Tensor& weight, const at::Tensor& bias,
                              const at::opmath_type<scalar_t>* semantic, const at::opmath_type<scalar_t>* gated_down,
                              scalar_t* out) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t batch = detail.size(0), channels = detail.size(1);
  const int64_t low_len = g.low_row_len(), high_len = g.high_row_len();
  const auto row_taps = axis_taps(g.low_rows, g.high_rows);
  const auto col_taps = axis_taps(g.low_cols, g.high_cols);
  // channels_last: tile (W, C) = x (W, C) @ weight^T; NCHW: tile (C, W) = weight @ x (C, W).
  // weight^T materialised: addmm with a transposed view as mat2 takes a path ~60x slower
  // than with a contiguous one at these sizes (measured, 64x128 @ 128x128).
  const auto weight_t = weight.t().contiguous();
  const auto bias_col = bias.unsqueeze(1);
  at::parallel_for(0, batch * g.high_rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> low_s(low_len), low_p(low_len), high_s(high_len), high_p(high_len);
    // Created on the thread that fills it, so it is an ordinary tensor for that thread's
    // autograd/inference-mode state.
    auto tile = at::empty({channels * g.high_cols}, detail.options().memory_format(at::MemoryFormat::Contiguous));
    scalar_t* tile_ptr = tile.mutable_data_ptr<scalar_t>();
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / g.high_rows, y = r % g.high_rows;
      const LinearTap& t = row_taps[y];
      const auto x = detail.select(0, n).select(1, y);  // (C, W)
      if (channels_last) {
        auto tile_rows = tile.view({g.high_cols, channels});
        at::addmm_out(tile_rows, bias, x.t(), weight_t);
        const int64_t low_base = n * g.low_rows;
        forward_row<scalar_t>(t, semantic + (low_base + t.i0) * low_len, semantic + (low_base + t.i1) * low_len,
                              gated_down + (low_base + t.i0) * low_len, gated_down + (low_base + t.i1) * low_len,
                              col_taps, g.inner, low_len, tile_ptr, out + r * high_len, low_s.data(), low_p.data(),
                              high_s.data(), high_p.data());
      } else {
        auto tile_rows = tile.view({channels, g.high_cols});
        at::addmm_out(tile_rows, bias_col, weight, x);
        for (int64_t c = 0; c < channels; ++c) {
          const int64_t plane = n * channels + c, low_base = plane * g.low_rows;
          forward_row<scalar_t>(t, semantic + (low_base + t.i0) * low_len, semantic + (low_base + t.i1) * low_len,
                                gated_down + (low_base + t.i0) * low_len, gated_down + (low_base + t.i1) * low_len,
                                col_taps, g.inner, low_len, tile_ptr + c * g.high_cols,
                                out + (plane * g.high_rows + y) * high_len, low_s.data(), low_p.data(), high_s.data(),
                                high_p.data());
        }
      }
    }
  });
}

at::Tensor bga_pointwise_aggregate_cpu(const at::Tensor& detail_dw, const at::Tensor& pw_weight,
                                       const at::Tensor& pw_bias, const at::Tensor& semantic,
                                       const at::Tensor& detail_down, const at::Tensor& semantic_down) {
  check_bga_inputs("bga_pointwise_aggregate", detail_dw, semantic, detail_down, semantic_down);
  check_bga_pointwise_weights(detail_dw, pw_weight, pw_bias);
  const BgaLayout layout = bga_layout(detail_dw);
  const Geometry g = geometry(layout, detail_dw, semantic);
  // Detached: the GEMMs run on worker threads whose grad mode is on, where an out= call
  // refuses inputs that require grad (which the checks allow under no_grad).
  const auto d = detail_dw.detach().contiguous(layout.format);
  auto out = at::empty_like(d, d.options(), layout.format);
  if (out.numel() == 0) return out;
  const auto opmath = at::toOpMathType(detail_dw.scalar_type());
  // As in bga.cpp: the low-resolution operands once in the math type.
  const auto semantic_math = semantic.to(opmath).contiguous(layout.format);
  const auto gated_down = (detail_down.to(opmath) * at::sigmoid(semantic_down.to(opmath))).contiguous(layout.format);
  const bool channels_last = layout.format == at::MemoryFormat::ChannelsLast;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, detail_dw.scalar_type(), "bga_pointwise_aggregate_cpu",
                                  [&] {
                                    using opmath_t = at::opmath_type<scalar_t>;
                                    pointwise_forward_kernel<scalar_t>(
                                        g, channels_last, d, pw_weight.detach().contiguous(), pw_bias.detach().contiguous(),
                                        semantic_math.const_data_ptr<opmath_t>(),
                                        gated_down.const_data_ptr<opmath_t>(), out.mutable_data_ptr<scalar_t>());
                                  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bisenet_fast, CPU, m) {
  m.impl("bga_pointwise_aggregate", &bga_pointwise_aggregate_cpu);
}

}  // namespace bisenet_fast
