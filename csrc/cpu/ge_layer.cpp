// Gather-and-Expansion layer, inference form, on the CPU (schema and formula in
// csrc/ops.cpp). Works on channels_last (NHWC) data: one task per tile of output pixels
// computes the expanded (mid-channel) activations of its pixels into a small per-thread
// buffer, projects them with one GEMM on that buffer (bias as the GEMM's addend), and
// writes relu(projection + residual). The expanded tensor never exists in full.
//
// Expanded channels are held in expansion-major order (m' = r * cin + c for the r-th of
// the `ratio` outputs of input channel c; the weights are permuted to match, once per
// call), so every tap of the grouped conv is a run of contiguous multiply-adds over the
// input channels, which vectorise; in PyTorch's order (m = c * ratio + r) the input value
// would have to be repeated `ratio` times first. The per-pixel loops are compiled for
// AVX2+FMA besides the baseline ISA and picked at load time, as in the BGA kernels.
//
// Stride 2 needs dw1 (3x3 on dw0's output) around each output pixel, so a tile of
// kTileH x kTileW outputs first computes dw0 on its (kTileH+2) x (kTileW+2) halo
// (recomputed by neighbouring tiles rather than shared). The shortcut's depthwise output
// is appended to the expanded buffer as `cin` extra columns, so the shortcut's 1x1 conv
// rides in the same GEMM (weights [pw | sc_pw], bias pw_bias + sc_pw_bias).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "common/ge_layer_checks.h"
#include "common/macros.h"
#include "cpu/huge_pages.h"

namespace bisenet_fast {
namespace {

constexpr int64_t kStride1TileW = 64;  // output pixels of one row per task
constexpr int64_t kStride2TileH = 4;
constexpr int64_t kStride2TileW = 16;

// A tensor over the mid channels (dim 0, length cin * ratio) from PyTorch's order
// (c * ratio + r) to expansion-major order (r * cin + c); other dims are kept.
at::Tensor expansion_major(const at::Tensor& t, int64_t cin) {
  const int64_t ratio = t.size(0) / cin;
  auto sizes = t.sizes().vec();
  std::vector<int64_t> split{cin, ratio};
  split.insert(split.end(), sizes.begin() + 1, sizes.end());
  return t.reshape(split).transpose(0, 1).reshape(sizes);
}

// 3x3 weights (k, 1, 3, 3) as [tap][k] in the accumulation type, so the inner loops run
// over contiguous channels; k = cin * ratio channels in expansion-major order.
at::Tensor taps_major(const at::Tensor& weight, at::ScalarType acc, int64_t cin) {
  return expansion_major(weight.reshape({weight.size(0), 9}), cin).t().to(acc).contiguous();
}

void check_cpu(const char* op, const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), op, ": x must be a CPU tensor for this kernel, got ", x.device());
}

// acc[r * cin + c] += v[c] * w[r * cin + c]: one tap of the grouped conv at one pixel, in
// expansion-major order (contiguous runs over c).
template <typename scalar_t, typename acc_t>
inline void grouped_tap(const scalar_t* v, const acc_t* w, acc_t* acc, int64_t cin, int64_t ratio) {
  for (int64_t r = 0; r < ratio; ++r) {
    const acc_t* wr = w + r * cin;
    acc_t* ar = acc + r * cin;
    for (int64_t c = 0; c < cin; ++c) ar[c] += static_cast<acc_t>(v[c]) * wr[c];
  }
}

// acc = bias + the grouped 3x3 conv at one pixel: taps[k] is the input pixel (cin values)
// under tap k, or null where the tap falls in the zero padding; w is [tap][cin * ratio].
template <typename scalar_t, typename acc_t>
BF_CPU_CLONES void grouped_conv_pixel(const scalar_t* const* taps, const acc_t* w, const acc_t* bias, acc_t* acc,
                                        int64_t cin, int64_t ratio) {
  const int64_t mid = cin * ratio;
  std::copy(bias, bias + mid, acc);
  for (int k = 0; k < 9; ++k)
    if (taps[k] != nullptr) grouped_tap(taps[k], w + k * mid, acc, cin, ratio);
}

// e = relu(bias + depthwise 3x3 around one pixel): f[k] is the pixel under tap k (mid
// values; the halo buffer holds zeros where dw1's padding is).
template <typename acc_t>
BF_CPU_CLONES void depthwise_relu_pixel(const acc_t* const* f, const acc_t* w, const acc_t* bias, acc_t* e,
                                          int64_t mid) {
  std::copy(bias, bias + mid, e);
  for (int k = 0; k < 9; ++k) {
    const acc_t* fk = f[k];
    const acc_t* wk = w + k * mid;
    for (int64_t m = 0; m < mid; ++m) e[m] += fk[m] * wk[m];
  }
  for (int64_t m = 0; m < mid; ++m) e[m] = std::max(e[m], acc_t(0));
}

template <typename acc_t>
BF_CPU_CLONES void relu_inplace(acc_t* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) v[i] = std::max(v[i], acc_t(0));
}

at::Tensor ge_layer_stride1_cpu(const at::Tensor& x, const at::Tensor& y, const at::Tensor& dw_weight,
                                const at::Tensor& dw_bias, const at::Tensor& pw_weight, const at::Tensor& pw_bias) {
  constexpr const char* op = "ge_layer_stride1";
  const int64_t mid = check_ge_stride1(op, x, y, dw_weight, dw_bias, pw_weight, pw_bias, /*allow_float64=*/true);
  check_cpu(op, x);
  // The tile GEMMs below call ATen: keep them below autograd (this op has no backward).
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t n_batch = x.size(0), cin = x.size(1), height = x.size(2), width = x.size(3);
  const int64_t ratio = mid / cin, cout = cin;

  const auto xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  const auto yc = y.contiguous(at::MemoryFormat::ChannelsLast);
  auto out = at::empty({n_batch, cout, height, width}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  advise_huge_pages(out);
  if (out.numel() == 0) return out;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ge_layer_stride1_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const auto w_dw = taps_major(dw_weight, acc_type, cin);
    const auto b_dw = expansion_major(dw_bias, cin).to(acc_type).contiguous();
    const auto w_pw_t = expansion_major(pw_weight.t(), cin).to(acc_type).contiguous();  // [mid][cout]
    const auto b_pw = pw_bias.to(acc_type).contiguous();
    const acc_t* wdw = w_dw.data_ptr<acc_t>();
    const acc_t* bdw = b_dw.data_ptr<acc_t>();
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const scalar_t* yp = yc.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t tiles_w = (width + kStride1TileW - 1) / kStride1TileW;

    at::parallel_for(0, n_batch * height * tiles_w, 1, [&](int64_t begin, int64_t end) {
      // The caller's AutoDispatchBelowADInplaceOrView is thread-local: parallel_for's OpenMP
      // workers do not inherit it, so without this guard their GEMMs went through autograd
      // and raised ("functions with out=... arguments don't support automatic
      // differentiation") for a weight that requires grad, under no_grad/inference_mode too,
      // but only with more than one thread.
      const at::AutoDispatchBelowADInplaceOrView below_autograd_here;
      std::vector<acc_t> expanded(kStride1TileW * mid), projected(kStride1TileW * cout);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t tw = task % tiles_w, h = (task / tiles_w) % height, n = task / (tiles_w * height);
        const int64_t w0 = tw * kStride1TileW, pixels = std::min(kStride1TileW, width - w0);
        for (int64_t p = 0; p < pixels; ++p) {
          const scalar_t* taps[9];
          for (int64_t k = 0; k < 9; ++k) {
            const int64_t ih = h + k / 3 - 1, iw = w0 + p + k % 3 - 1;
            const bool inside = ih >= 0 && ih < height && iw >= 0 && iw < width;
            taps[k] = inside ? yp + ((n * height + ih) * width + iw) * cin : nullptr;
          }
          grouped_conv_pixel(taps, wdw, bdw, expanded.data() + p * mid, cin, ratio);
        }
        relu_inplace(expanded.data(), pixels * mid);
        auto e = at::from_blob(expanded.data(), {pixels, mid}, at::TensorOptions().dtype(acc_type));
        auto acc = at::from_blob(projected.data(), {pixels, cout}, at::TensorOptions().dtype(acc_type));
        at::addmm_out(acc, b_pw, e, w_pw_t);
        const int64_t base = ((n * height + h) * width + w0) * cout;
        for (int64_t i = 0; i < pixels * cout; ++i) {
          op[base + i] = static_cast<scalar_t>(std::max(projected[i] + static_cast<acc_t>(xp[base + i]), acc_t(0)));
        }
      }
    });
  });
  return out;
}

at::Tensor ge_layer_stride2_cpu(const at::Tensor& x, const at::Tensor& y, const at::Tensor& dw0_weight,
                                const at::Tensor& dw0_bias, const at::Tensor& dw1_weight, const at::Tensor& dw1_bias,
                                const at::Tensor& pw_weight, const at::Tensor& pw_bias, const at::Tensor& sc_dw_weight,
                                const at::Tensor& sc_dw_bias, const at::Tensor& sc_pw_weight,
                                const at::Tensor& sc_pw_bias) {
  constexpr const char* op = "ge_layer_stride2";
  const std::pair<int64_t, int64_t> mid_cout =
      check_ge_stride2(op, x, y, dw0_weight, dw0_bias, dw1_weight, dw1_bias, pw_weight, pw_bias, sc_dw_weight,
                       sc_dw_bias, sc_pw_weight, sc_pw_bias, /*allow_float64=*/true);
  check_cpu(op, x);
  const int64_t mid = mid_cout.first, cout = mid_cout.second;
  // The tile GEMMs below call ATen: keep them below autograd (this op has no backward).
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t n_batch = x.size(0), cin = x.size(1), height = x.size(2), width = x.size(3);
  const int64_t ratio = mid / cin, depth = mid + cin;  // GEMM depth: expanded + shortcut columns
  const int64_t out_h = (height - 1) / 2 + 1, out_w = (width - 1) / 2 + 1;

  const auto xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  const auto yc = y.contiguous(at::MemoryFormat::ChannelsLast);
  auto out = at::empty({n_batch, cout, out_h, out_w}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  advise_huge_pages(out);
  if (out.numel() == 0) return out;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ge_layer_stride2_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const auto w_dw0 = taps_major(dw0_weight, acc_type, cin), w_dw1 = taps_major(dw1_weight, acc_type, cin);
    const auto w_sc = taps_major(sc_dw_weight, acc_type, cin);
    const auto b_dw0 = expansion_major(dw0_bias, cin).to(acc_type).contiguous();
    const auto b_dw1 = expansion_major(dw1_bias, cin).to(acc_type).contiguous();
    const auto b_sc = sc_dw_bias.to(acc_type).contiguous();
    // [depth][cout]: the expanded channels (expansion-major), then the shortcut's.
    const auto w_proj_t = at::cat({expansion_major(pw_weight.t(), cin), sc_pw_weight.t()}, 0).to(acc_type).contiguous();
    const auto b_proj = (pw_bias.to(acc_type) + sc_pw_bias.to(acc_type)).contiguous();
    const acc_t *wd0 = w_dw0.data_ptr<acc_t>(), *wd1 = w_dw1.data_ptr<acc_t>(), *wsc = w_sc.data_ptr<acc_t>();
    const acc_t *bd0 = b_dw0.data_ptr<acc_t>(), *bd1 = b_dw1.data_ptr<acc_t>(), *bsc = b_sc.data_ptr<acc_t>();
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const scalar_t* yp = yc.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t tiles_h = (out_h + kStride2TileH - 1) / kStride2TileH;
    const int64_t tiles_w = (out_w + kStride2TileW - 1) / kStride2TileW;
    constexpr int64_t halo_w = kStride2TileW + 2;

    at::parallel_for(0, n_batch * tiles_h * tiles_w, 1, [&](int64_t begin, int64_t end) {
      // In each worker thread, as in ge_layer_stride1_cpu (the caller's guard is thread-local).
      const at::AutoDispatchBelowADInplaceOrView below_autograd_here;
      std::vector<acc_t> first((kStride2TileH + 2) * halo_w * mid);  // dw0 output on the tile's halo
      std::vector<acc_t> expanded(kStride2TileH * kStride2TileW * depth), projected(kStride2TileH * kStride2TileW * cout);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t tw = task % tiles_w, th = (task / tiles_w) % tiles_h, n = task / (tiles_w * tiles_h);
        const int64_t oh0 = th * kStride2TileH, ow0 = tw * kStride2TileW;
        const int64_t rows = std::min(kStride2TileH, out_h - oh0), cols = std::min(kStride2TileW, out_w - ow0);
        // dw0 (stride 2, no ReLU) at dw0-output positions oh0-1..oh0+rows, ow0-1..ow0+cols;
        // positions outside the map are dw1's zero padding.
        for (int64_t i = 0; i < rows + 2; ++i) {
          const int64_t qh = oh0 - 1 + i;
          for (int64_t j = 0; j < cols + 2; ++j) {
            const int64_t qw = ow0 - 1 + j;
            acc_t* f = first.data() + (i * halo_w + j) * mid;
            if (qh < 0 || qh >= out_h || qw < 0 || qw >= out_w) {
              std::fill(f, f + mid, acc_t(0));
              continue;
            }
            const scalar_t* taps[9];
            for (int64_t k = 0; k < 9; ++k) {
              const int64_t ih = 2 * qh + k / 3 - 1, iw = 2 * qw + k % 3 - 1;
              const bool inside = ih >= 0 && ih < height && iw >= 0 && iw < width;
              taps[k] = inside ? yp + ((n * height + ih) * width + iw) * cin : nullptr;
            }
            grouped_conv_pixel(taps, wd0, bd0, f, cin, ratio);
          }
        }
        for (int64_t i = 0; i < rows; ++i) {
          for (int64_t j = 0; j < cols; ++j) {
            acc_t* e = expanded.data() + (i * cols + j) * depth;
            // dw1 (depthwise, stride 1) + ReLU on the halo buffer.
            const acc_t* halo[9];
            for (int64_t k = 0; k < 9; ++k) halo[k] = first.data() + ((i + k / 3) * halo_w + j + k % 3) * mid;
            depthwise_relu_pixel(halo, wd1, bd1, e, mid);
            // Shortcut depthwise (stride 2, no ReLU) on x into the extra columns.
            const int64_t oh = oh0 + i, ow = ow0 + j;
            const scalar_t* taps[9];
            for (int64_t k = 0; k < 9; ++k) {
              const int64_t ih = 2 * oh + k / 3 - 1, iw = 2 * ow + k % 3 - 1;
              const bool inside = ih >= 0 && ih < height && iw >= 0 && iw < width;
              taps[k] = inside ? xp + ((n * height + ih) * width + iw) * cin : nullptr;
            }
            grouped_conv_pixel(taps, wsc, bsc, e + mid, cin, int64_t(1));
          }
        }
        const int64_t pixels = rows * cols;
        auto e = at::from_blob(expanded.data(), {pixels, depth}, at::TensorOptions().dtype(acc_type));
        auto acc = at::from_blob(projected.data(), {pixels, cout}, at::TensorOptions().dtype(acc_type));
        at::addmm_out(acc, b_proj, e, w_proj_t);
        for (int64_t i = 0; i < rows; ++i) {
          scalar_t* orow = op + ((n * out_h + oh0 + i) * out_w + ow0) * cout;
          const acc_t* prow = projected.data() + i * cols * cout;
          for (int64_t k = 0; k < cols * cout; ++k) orow[k] = static_cast<scalar_t>(std::max(prow[k], acc_t(0)));
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bisenet_fast, CPU, m) {
  m.impl("ge_layer_stride1", &ge_layer_stride1_cpu);
  m.impl("ge_layer_stride2", &ge_layer_stride2_cpu);
}

}  // namespace bisenet_fast
