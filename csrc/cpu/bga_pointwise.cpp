// Bilateral Guided Aggregation fused after the 1x1 conv of detail_dwconv, on the CPU
// (inference only):
//   out = (pw_weight @ detail_dw + pw_bias) * sigmoid(up(semantic))
//         + up(detail_down * sigmoid(semantic_down))
// The image is walked in chunks of a few pixel rows: the conv's output for a chunk is one
// GEMM (C x C by C x rows*W) into a cache-sized tile, which the aggregation's row pipeline
// (cpu/bga_rows.h, the same code as bga.cpp) then gates straight into `out`, row by row in
// parallel. The conv's output map is never materialised.
//
// The tile holds the conv's output in the input dtype, as F.conv2d would return it, so
// the result equals conv2d followed by bga_aggregate up to the GEMM's summation order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/bga_checks.h"
#include "common/bilinear.h"
#include "common/inference_only.h"
#include "cpu/bga_rows.h"
#include "cpu/huge_pages.h"

namespace bisenet_fast {
namespace {

// Elements of the conv-output tile, 4 MB in float32: small enough to stay in the last-level
// cache between the GEMM that writes it and the gating that reads it, large enough that
// the parallel regions (one per tile) are few: on a loaded machine every region's join
// waits for its slowest thread (1 MB tiles ran 6x slower at the median with two threads
// shared with other processes, measured).
constexpr int64_t kTileElements = 1 << 20;

template <typename scalar_t>
void pointwise_forward_kernel(const Geometry& g, bool channels_last, const at::Tensor& detail,
                              const at::Tensor& weight, const at::Tensor& bias,
                              const at::opmath_type<scalar_t>* semantic, const at::opmath_type<scalar_t>* gated_down,
                              scalar_t* out) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t batch = detail.size(0), channels = detail.size(1), width = g.high_cols;
  const int64_t low_len = g.low_row_len(), high_len = g.high_row_len();
  const auto row_taps = axis_taps<opmath_t>(g.low_rows, g.high_rows);
  const auto col_taps = axis_taps<opmath_t>(g.low_cols, g.high_cols);
  // channels_last: tile (R*W, C) = x (R*W, C) @ weight^T; NCHW: tile (C, R*W) = weight @ x (C, R*W).
  // weight^T materialised: addmm with a transposed view as mat2 took a path ~60x slower
  // than with a contiguous one at these sizes (measured, 64x128 @ 128x128).
  const auto weight_t = weight.t().contiguous();
  const auto bias_col = bias.unsqueeze(1);
  const int64_t chunk_rows = std::min(g.high_rows, std::max<int64_t>(1, kTileElements / (channels * width)));
  auto tile = at::empty({channels * chunk_rows * width}, detail.options().memory_format(at::MemoryFormat::Contiguous));
  const scalar_t* tile_ptr = tile.const_data_ptr<scalar_t>();
  for (int64_t n = 0; n < batch; ++n) {
    for (int64_t y0 = 0; y0 < g.high_rows; y0 += chunk_rows) {
      const int64_t rows = std::min(chunk_rows, g.high_rows - y0);
      const auto x = detail.select(0, n).narrow(1, y0, rows);  // (C, R, W)
      // The GEMM runs here, outside the parallel region, with ATen's own threading: BLAS
      // calls from inside at::parallel_for slowed down 20x with two threads (measured).
      if (channels_last) {
        auto tile_rows = tile.narrow(0, 0, rows * width * channels).view({rows * width, channels});
        at::addmm_out(tile_rows, bias, x.permute({1, 2, 0}).reshape({rows * width, channels}), weight_t);
      } else {
        auto tile_rows = tile.narrow(0, 0, channels * rows * width).view({channels, rows * width});
        at::addmm_out(tile_rows, bias_col, weight, x.reshape({channels, rows * width}));
      }
      // Gate the tile's rows (channels_last) or its (channel, row) rows (NCHW).
      const int64_t planes_per_image = channels_last ? 1 : channels;
      at::parallel_for(0, planes_per_image * rows, 1, [&](int64_t begin, int64_t end) {
            UpsampledRows<opmath_t> semantic_rows(col_taps, g.inner), gated_rows(col_taps, g.inner);
        for (int64_t task = begin; task < end; ++task) {
          const int64_t c = task / rows, y = y0 + task % rows;
          const int64_t plane = n * planes_per_image + c, low_base = plane * g.low_rows;
          const auto& t = row_taps[y];
          const auto [hs0, hs1] =
              semantic_rows.get(semantic + (low_base + t.i0) * low_len, semantic + (low_base + t.i1) * low_len);
          const auto [hp0, hp1] =
              gated_rows.get(gated_down + (low_base + t.i0) * low_len, gated_down + (low_base + t.i1) * low_len);
          forward_row<scalar_t>(t, hs0, hs1, hp0, hp1, high_len, tile_ptr + task * high_len,
                                out + (plane * g.high_rows + y) * high_len);
        }
      });
    }
  }
}

at::Tensor bga_pointwise_aggregate_cpu(const at::Tensor& detail_dw, const at::Tensor& pw_weight,
                                       const at::Tensor& pw_bias, const at::Tensor& semantic,
                                       const at::Tensor& detail_down, const at::Tensor& semantic_down) {
  check_bga_inputs("bga_pointwise_aggregate", detail_dw, semantic, detail_down, semantic_down, "detail_dw");
  check_bga_pointwise_weights(detail_dw, pw_weight, pw_bias);
  check_inference_only("bga_pointwise_aggregate",
                       {{"detail_dw", &detail_dw}, {"pw_weight", &pw_weight}, {"pw_bias", &pw_bias},
                        {"semantic", &semantic}, {"detail_down", &detail_down}, {"semantic_down", &semantic_down}});
  const BgaLayout layout = bga_layout(detail_dw);
  const Geometry g = geometry(layout, detail_dw, semantic);
  const auto d = detail_dw.contiguous(layout.format);
  auto out = at::empty_like(d, d.options(), layout.format);
  advise_huge_pages(out);
  if (out.numel() == 0) return out;
  const LowResOperands low = low_res_operands(semantic, detail_down, semantic_down, layout);
  const bool channels_last = layout.format == at::MemoryFormat::ChannelsLast;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, detail_dw.scalar_type(), "bga_pointwise_aggregate_cpu",
                                  [&] {
                                    using opmath_t = at::opmath_type<scalar_t>;
                                    pointwise_forward_kernel<scalar_t>(
                                        g, channels_last, d, pw_weight.contiguous(), pw_bias.contiguous(),
                                        low.semantic.const_data_ptr<opmath_t>(),
                                        low.gated_down.const_data_ptr<opmath_t>(), out.mutable_data_ptr<scalar_t>());
                                  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bisenet_fast, CPU, m) {
  m.impl("bga_pointwise_aggregate", &bga_pointwise_aggregate_cpu);
}

}  // namespace bisenet_fast
