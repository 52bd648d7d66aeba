// Bilinear resize (align_corners=False, size-based: F.interpolate's taps, common/bilinear.h)
// of NCHW planes on the CPU, inference only. The fused model's last step resizes the
// decode head's logits (19 channels) to the input size: 10 M output values at 512x1024,
// which ATen's upsample_bilinear2d took ~19 ms for on 2 cores, most of the time the whole
// network spends outside convolutions. Here each low-resolution row is upsampled
// horizontally once (UpsampledRows) and every output row is one vectorised blend of two
// such rows, so the cost is close to writing the output.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>

#include "common/inference_only.h"
#include "cpu/bga_rows.h"
#include "cpu/huge_pages.h"

namespace bisenet_fast {
namespace {

// out[q] = w0 * a[q] + w1 * b[q], rounded to the output type.
template <typename scalar_t, typename opmath_t>
BF_CPU_CLONES void blend_output_row(const opmath_t* a, const opmath_t* b, float w0, float w1, scalar_t* out,
                                    int64_t n) {
  const opmath_t v0 = static_cast<opmath_t>(w0), v1 = static_cast<opmath_t>(w1);
  for (int64_t q = 0; q < n; ++q) out[q] = static_cast<scalar_t>(v0 * a[q] + v1 * b[q]);
}

// size is SymInt[2] in the schema, so that torch.compile and torch.export keep the output
// size symbolic; a kernel only ever gets concrete values.
at::Tensor resize_bilinear_cpu(const at::Tensor& x, c10::SymIntArrayRef sym_size) {
  const at::IntArrayRef size = C10_AS_INTARRAYREF_SLOW(sym_size);
  check_inference_only("resize_bilinear", {{"x", &x}});
  TORCH_CHECK(x.device().is_cpu(), "resize_bilinear: x must be a CPU tensor, got ", x.device());
  // No float64: the taps are computed in float, as ATen does for float32 inputs only.
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "resize_bilinear: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 4 && x.numel() > 0, "resize_bilinear: x must be a non-empty 4-D (N, C, h, w) tensor, got ",
              x.sizes());
  TORCH_CHECK(size.size() == 2 && size[0] > 0 && size[1] > 0,
              "resize_bilinear: size must be two positive integers (H, W), got ", size);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // no backward: ATen calls skip autograd
  const int64_t planes = x.size(0) * x.size(1), low_rows = x.size(2), low_cols = x.size(3);
  const int64_t high_rows = size[0], high_cols = size[1];
  auto out = at::empty({x.size(0), x.size(1), high_rows, high_cols}, x.options());
  advise_huge_pages(out);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "resize_bilinear", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    // The low-res planes in the math type: 1/64 of the output's size at the model's 8x.
    const auto input = x.to(at::toOpMathType(x.scalar_type())).contiguous();
    const opmath_t* in = input.data_ptr<opmath_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const auto row_taps = axis_taps<opmath_t>(low_rows, high_rows);
    const auto col_taps = axis_taps<opmath_t>(low_cols, high_cols);
    const int64_t grain = std::max<int64_t>(1, 16384 / high_cols);
    at::parallel_for(0, planes * high_rows, grain, [&](int64_t begin, int64_t end) {
      UpsampledRows<opmath_t> rows(col_taps, 1);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t plane = r / high_rows;
        const auto& t = row_taps[r % high_rows];
        const opmath_t* low = in + plane * low_rows * low_cols;
        const auto [h0, h1] = rows.get(low + t.i0 * low_cols, low + t.i1 * low_cols);
        blend_output_row(h0, h1, t.w0, t.w1, op + r * high_cols, high_cols);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bisenet_fast, CPU, m) {
  m.impl("resize_bilinear", &resize_bilinear_cpu);
}

}  // namespace bisenet_fast
