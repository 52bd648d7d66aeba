// Bilateral Guided Aggregation on the CPU, forward and backward.
//
// Every map is walked as planes of pixel rows (BgaLayout in common/bga_checks.h), so NCHW
// and channels_last run the same row pipeline natively (no transposes): for one
// high-resolution row, blend vertically the two low-resolution rows it reads, upsampled
// horizontally (once per low-res row, cached), then apply the gate. Bilinear taps come from common/bilinear.h (the same
// taps as F.interpolate), the pointwise math from common/bga_math.h (shared with CUDA).
//
// The backward is deterministic and independent of the thread count: the transposes of
// the upsample are computed per band of low-resolution rows; each band walks the
// high-resolution rows that read it in increasing order and adds their contributions,
// still at high-res width, to its rows in that order, then transposes the horizontal
// upsample once per row, so every low-resolution value is the same sum in the same order
// whatever the banding.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#include "common/bga_checks.h"
#include "common/bilinear.h"
#include "cpu/bga_rows.h"
#include "cpu/huge_pages.h"

namespace bisenet_fast {
namespace {

template <typename scalar_t>
void forward_kernel(const Geometry& g, const scalar_t* detail, const at::opmath_type<scalar_t>* semantic,
                    const at::opmath_type<scalar_t>* gated_down, scalar_t* out) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto row_taps = axis_taps<opmath_t>(g.low_rows, g.high_rows);
  const auto col_taps = axis_taps<opmath_t>(g.low_cols, g.high_cols);
  const int64_t low_len = g.low_row_len(), high_len = g.high_row_len();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, high_len));
  at::parallel_for(0, g.planes * g.high_rows, grain, [&](int64_t begin, int64_t end) {
    UpsampledRows<opmath_t> semantic_rows(col_taps, g.inner), gated_rows(col_taps, g.inner);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t plane = r / g.high_rows, y = r % g.high_rows;
      const auto& t = row_taps[y];
      const int64_t low_base = plane * g.low_rows;
      const auto [hs0, hs1] =
          semantic_rows.get(semantic + (low_base + t.i0) * low_len, semantic + (low_base + t.i1) * low_len);
      const auto [hp0, hp1] =
          gated_rows.get(gated_down + (low_base + t.i0) * low_len, gated_down + (low_base + t.i1) * low_len);
      forward_row<scalar_t>(t, hs0, hs1, hp0, hp1, high_len, detail + r * high_len, out + r * high_len);
    }
  });
}

template <typename scalar_t>
void backward_kernel(const Geometry& g, const scalar_t* grad_out, const scalar_t* detail,
                     const at::opmath_type<scalar_t>* semantic, const scalar_t* detail_down,
                     const scalar_t* semantic_down, scalar_t* grad_detail, scalar_t* grad_semantic,
                     scalar_t* grad_detail_down, scalar_t* grad_semantic_down) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto row_taps = axis_taps<opmath_t>(g.low_rows, g.high_rows);
  const auto col_taps = axis_taps<opmath_t>(g.low_cols, g.high_cols);
  const opmath_t row_scale = linear_scale<opmath_t>(g.low_rows, g.high_rows);
  const int64_t low_len = g.low_row_len(), high_len = g.high_row_len();
  // Enough tasks to keep every thread busy; bands only cost the re-walk of the few
  // high-res rows two bands share, and never change the result.
  const int64_t wanted_tasks = 4 * static_cast<int64_t>(at::get_num_threads());
  const int64_t bands_wanted =
      g.planes >= wanted_tasks ? 1 : std::min(g.low_rows, (wanted_tasks + g.planes - 1) / g.planes);
  const int64_t band_rows = (g.low_rows + bands_wanted - 1) / bands_wanted;
  const int64_t bands = (g.low_rows + band_rows - 1) / band_rows;

  at::parallel_for(0, g.planes * bands, 1, [&](int64_t begin, int64_t end) {
    // The band's low-res rows' contributions, still at high-res width.
    std::vector<opmath_t> acc_sem(band_rows * high_len), acc_up(band_rows * high_len);
    std::vector<opmath_t> row_sem(low_len), row_up(low_len);
    UpsampledRows<opmath_t> semantic_rows(col_taps, g.inner);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t plane = task / bands, band = task % bands;
      const int64_t i_begin = band * band_rows, i_end = std::min(g.low_rows, i_begin + band_rows);
      const int64_t y_begin = dst_range_reading(i_begin, g.low_rows, g.high_rows, row_scale).begin;
      const int64_t y_end = dst_range_reading(i_end - 1, g.low_rows, g.high_rows, row_scale).end;
      std::fill(acc_sem.begin(), acc_sem.end(), opmath_t(0));
      std::fill(acc_up.begin(), acc_up.end(), opmath_t(0));
      const int64_t low_base = plane * g.low_rows;
      for (int64_t y = y_begin; y < y_end; ++y) {
        const auto& t = row_taps[y];
        const int64_t offset = (plane * g.high_rows + y) * high_len;
        // The band holding tap i0 of row y writes that row's grad_detail: exactly one band.
        const bool owns_row = t.i0 >= i_begin && t.i0 < i_end;
        const auto [hs0, hs1] =
            semantic_rows.get(semantic + (low_base + t.i0) * low_len, semantic + (low_base + t.i1) * low_len);
        LowRowAccumulators<opmath_t> acc{};
        const int64_t taps_i[2] = {t.i0, t.i1};
        for (int k = 0; k < 2; ++k) {
          if (taps_i[k] < i_begin || taps_i[k] >= i_end) continue;
          const int64_t local = (taps_i[k] - i_begin) * high_len;
          acc.semantic[k] = acc_sem.data() + local;
          acc.gated[k] = acc_up.data() + local;
        }
        backward_row<scalar_t>(t, hs0, hs1, high_len, grad_out + offset, detail + offset,
                               owns_row ? grad_detail + offset : nullptr, acc);
      }
      for (int64_t i = i_begin; i < i_end; ++i) {
        const int64_t local = (i - i_begin) * high_len;
        transpose_upsampled_row(acc_sem.data() + local, col_taps, g.inner, row_sem.data(), low_len);
        transpose_upsampled_row(acc_up.data() + local, col_taps, g.inner, row_up.data(), low_len);
        const int64_t low_offset = (low_base + i) * low_len;
        for (int64_t q = 0; q < low_len; ++q) {
          const auto lg = bga_low_grad<opmath_t>(row_up[q], static_cast<opmath_t>(detail_down[low_offset + q]),
                                                 static_cast<opmath_t>(semantic_down[low_offset + q]));
          grad_semantic[low_offset + q] = static_cast<scalar_t>(row_sem[q]);
          grad_detail_down[low_offset + q] = static_cast<scalar_t>(lg.detail_down);
          grad_semantic_down[low_offset + q] = static_cast<scalar_t>(lg.semantic_down);
        }
      }
    }
  });
}

at::Tensor bga_aggregate_cpu(const at::Tensor& detail, const at::Tensor& semantic, const at::Tensor& detail_down,
                             const at::Tensor& semantic_down) {
  check_bga_inputs("bga_aggregate", detail, semantic, detail_down, semantic_down);
  const BgaLayout layout = bga_layout(detail);
  const Geometry g = geometry(layout, detail, semantic);
  const auto d = detail.contiguous(layout.format);
  auto out = at::empty_like(d, d.options(), layout.format);
  advise_huge_pages(out);
  if (out.numel() == 0) return out;
  const LowResOperands low = low_res_operands(semantic, detail_down, semantic_down, layout);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, detail.scalar_type(), "bga_aggregate_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t>(g, d.const_data_ptr<scalar_t>(), low.semantic.const_data_ptr<opmath_t>(),
                             low.gated_down.const_data_ptr<opmath_t>(), out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bga_aggregate_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& detail, const at::Tensor& semantic, const at::Tensor& detail_down,
    const at::Tensor& semantic_down) {
  check_bga_inputs("bga_aggregate_backward", detail, semantic, detail_down, semantic_down);
  check_bga_grad_out(grad_out, detail);
  const BgaLayout layout = bga_layout(detail);
  const Geometry g = geometry(layout, detail, semantic);
  const auto go = grad_out.contiguous(layout.format);
  const auto d = detail.contiguous(layout.format);
  const auto dd = detail_down.contiguous(layout.format);
  const auto sd = semantic_down.contiguous(layout.format);
  const auto semantic_math = semantic.to(at::toOpMathType(detail.scalar_type())).contiguous(layout.format);
  auto grad_detail = at::empty_like(d, d.options(), layout.format);
  advise_huge_pages(grad_detail);
  auto grad_semantic = at::empty_like(dd, dd.options(), layout.format);
  auto grad_detail_down = at::empty_like(dd, dd.options(), layout.format);
  auto grad_semantic_down = at::empty_like(dd, dd.options(), layout.format);
  if (d.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, detail.scalar_type(), "bga_aggregate_backward_cpu", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      backward_kernel<scalar_t>(g, go.const_data_ptr<scalar_t>(), d.const_data_ptr<scalar_t>(),
                                semantic_math.const_data_ptr<opmath_t>(), dd.const_data_ptr<scalar_t>(),
                                sd.const_data_ptr<scalar_t>(), grad_detail.mutable_data_ptr<scalar_t>(),
                                grad_semantic.mutable_data_ptr<scalar_t>(), grad_detail_down.mutable_data_ptr<scalar_t>(),
                                grad_semantic_down.mutable_data_ptr<scalar_t>());
    });
  } else {
    grad_semantic.zero_();
    grad_detail_down.zero_();
    grad_semantic_down.zero_();
  }
  return {grad_detail, grad_semantic, grad_detail_down, grad_semantic_down};
}

}  // namespace

TORCH_LIBRARY_IMPL(bisenet_fast, CPU, m) {
  m.impl("bga_aggregate", &bga_aggregate_cpu);
  m.impl("bga_aggregate_backward", &bga_aggregate_backward_cpu);
}

}  // namespace bisenet_fast
