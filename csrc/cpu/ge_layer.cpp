// Gather-and-Expansion layer, inference form, on the CPU (schema and formula in
// csrc/ops.cpp). Works on channels_last (NHWC) data: one task per tile of output pixels
// computes the expanded (mid-channel) activations of its pixels into a small per-thread
// buffer, projects them with one GEMM on that buffer (bias as the GEMM's addend), and
// writes relu(projection + residual). The expanded tensor never exists in full.
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
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace bisenet_fast {
namespace {

constexpr int64_t kStride1TileW = 64;  // output pixels of one row per task
constexpr int64_t kStride2TileH = 4;
constexpr int64_t kStride2TileW = 16;

// 3x3 weights (k, 1, 3, 3) as [tap][k] in the accumulation type, so the inner loops run
// over contiguous channels.
at::Tensor taps_major(const at::Tensor& weight, at::ScalarType acc) {
  return weight.reshape({weight.size(0), 9}).t().to(acc).contiguous();
}

void check_cpu_inputs(const char* op, std::initializer_list<std::pair<const char*, const at::Tensor*>> tensors,
                      const at::Tensor& x) {
  for (const auto& [name, t] : tensors) {
    TORCH_CHECK(t->device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t->device());
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype ", x.scalar_type(),
                ", got ", t->scalar_type());
  }
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (N, C, H, W), got ", x.sizes());
}

template <int64_t kRatio, typename scalar_t, typename acc_t>
inline void grouped_tap_fixed(const scalar_t* v, const acc_t* w, acc_t* acc, int64_t cin) {
  for (int64_t c = 0; c < cin; ++c) {
    const acc_t value = static_cast<acc_t>(v[c]);
    for (int64_t r = 0; r < kRatio; ++r) acc[c * kRatio + r] += value * w[c * kRatio + r];
  }
}

// acc[c*ratio + r] += v[c] * w[c*ratio + r]: one tap of the grouped conv for one pixel.
// BiSeNetV2's ratios (6 for the expansion, 1 for the shortcut's depthwise conv) get
// unrolled inner loops; any other ratio runs the same arithmetic with a runtime bound.
template <typename scalar_t, typename acc_t>
inline void grouped_tap(const scalar_t* v, const acc_t* w, acc_t* acc, int64_t cin, int64_t ratio) {
  if (ratio == 6) return grouped_tap_fixed<6>(v, w, acc, cin);
  if (ratio == 1) return grouped_tap_fixed<1>(v, w, acc, cin);
  for (int64_t c = 0; c < cin; ++c) {
    const acc_t value = static_cast<acc_t>(v[c]);
    const acc_t* wc = w + c * ratio;
    acc_t* ac = acc + c * ratio;
    for (int64_t r = 0; r < ratio; ++r) ac[r] += value * wc[r];
  }
}

at::Tensor ge_layer_stride1_cpu(const at::Tensor& x, const at::Tensor& y, const at::Tensor& dw_weight,
                                const at::Tensor& dw_bias, const at::Tensor& pw_weight, const at::Tensor& pw_bias) {
  // The tile GEMMs below call ATen: keep them out of autograd (this op has no backward).
  c10::InferenceMode inference_guard;
  check_cpu_inputs("ge_layer_stride1",
                   {{"x", &x}, {"y", &y}, {"dw_weight", &dw_weight}, {"dw_bias", &dw_bias}, {"pw_weight", &pw_weight},
                    {"pw_bias", &pw_bias}},
                   x);
  TORCH_CHECK(y.sizes() == x.sizes(), "ge_layer_stride1: y must have x's shape");
  const int64_t n_batch = x.size(0), cin = x.size(1), height = x.size(2), width = x.size(3);
  const int64_t mid = dw_weight.size(0);
  TORCH_CHECK(mid % cin == 0 && dw_weight.numel() == mid * 9, "ge_layer_stride1: dw_weight must be (k*cin, 1, 3, 3)");
  TORCH_CHECK(pw_weight.dim() == 2 && pw_weight.size(0) == cin && pw_weight.size(1) == mid,
              "ge_layer_stride1: pw_weight must be (cin, mid)");
  const int64_t ratio = mid / cin, cout = cin;

  const auto xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  const auto yc = y.contiguous(at::MemoryFormat::ChannelsLast);
  auto out = at::empty({n_batch, cout, height, width}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ge_layer_stride1_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const auto w_dw = taps_major(dw_weight, acc_type);
    const auto b_dw = dw_bias.to(acc_type).contiguous();
    const auto w_pw_t = pw_weight.to(acc_type).t().contiguous();  // [mid][cout]
    const auto b_pw = pw_bias.to(acc_type).contiguous();
    const acc_t* wdw = w_dw.data_ptr<acc_t>();
    const acc_t* bdw = b_dw.data_ptr<acc_t>();
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const scalar_t* yp = yc.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t tiles_w = (width + kStride1TileW - 1) / kStride1TileW;

    at::parallel_for(0, n_batch * height * tiles_w, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> expanded(kStride1TileW * mid), projected(kStride1TileW * cout);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t tw = task % tiles_w, h = (task / tiles_w) % height, n = task / (tiles_w * height);
        const int64_t w0 = tw * kStride1TileW, pixels = std::min(kStride1TileW, width - w0);
        for (int64_t p = 0; p < pixels; ++p) std::copy(bdw, bdw + mid, expanded.data() + p * mid);
        for (int64_t ky = 0; ky < 3; ++ky) {
          const int64_t ih = h + ky - 1;
          if (ih < 0 || ih >= height) continue;
          for (int64_t kx = 0; kx < 3; ++kx) {
            const acc_t* wk = wdw + (ky * 3 + kx) * mid;
            for (int64_t p = 0; p < pixels; ++p) {
              const int64_t iw = w0 + p + kx - 1;
              if (iw < 0 || iw >= width) continue;
              grouped_tap(yp + ((n * height + ih) * width + iw) * cin, wk, expanded.data() + p * mid, cin, ratio);
            }
          }
        }
        for (int64_t i = 0; i < pixels * mid; ++i) expanded[i] = std::max(expanded[i], acc_t(0));
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
  // The tile GEMMs below call ATen: keep them out of autograd (this op has no backward).
  c10::InferenceMode inference_guard;
  check_cpu_inputs("ge_layer_stride2",
                   {{"x", &x}, {"y", &y}, {"dw0_weight", &dw0_weight}, {"dw0_bias", &dw0_bias},
                    {"dw1_weight", &dw1_weight}, {"dw1_bias", &dw1_bias}, {"pw_weight", &pw_weight},
                    {"pw_bias", &pw_bias}, {"sc_dw_weight", &sc_dw_weight}, {"sc_dw_bias", &sc_dw_bias},
                    {"sc_pw_weight", &sc_pw_weight}, {"sc_pw_bias", &sc_pw_bias}},
                   x);
  TORCH_CHECK(y.sizes() == x.sizes(), "ge_layer_stride2: y must have x's shape");
  const int64_t n_batch = x.size(0), cin = x.size(1), height = x.size(2), width = x.size(3);
  const int64_t mid = dw0_weight.size(0), cout = pw_weight.size(0);
  TORCH_CHECK(mid % cin == 0 && dw0_weight.numel() == mid * 9, "ge_layer_stride2: dw0_weight must be (k*cin, 1, 3, 3)");
  TORCH_CHECK(dw1_weight.numel() == mid * 9 && sc_dw_weight.numel() == cin * 9,
              "ge_layer_stride2: dw1_weight must be (mid, 1, 3, 3) and sc_dw_weight (cin, 1, 3, 3)");
  TORCH_CHECK(pw_weight.dim() == 2 && pw_weight.size(1) == mid && sc_pw_weight.dim() == 2 &&
                  sc_pw_weight.size(0) == cout && sc_pw_weight.size(1) == cin,
              "ge_layer_stride2: pw_weight must be (cout, mid) and sc_pw_weight (cout, cin)");
  const int64_t ratio = mid / cin, depth = mid + cin;  // GEMM depth: expanded + shortcut columns
  const int64_t out_h = (height - 1) / 2 + 1, out_w = (width - 1) / 2 + 1;

  const auto xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  const auto yc = y.contiguous(at::MemoryFormat::ChannelsLast);
  auto out = at::empty({n_batch, cout, out_h, out_w}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ge_layer_stride2_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const auto w_dw0 = taps_major(dw0_weight, acc_type), w_dw1 = taps_major(dw1_weight, acc_type);
    const auto w_sc = taps_major(sc_dw_weight, acc_type);
    const auto b_dw0 = dw0_bias.to(acc_type).contiguous(), b_dw1 = dw1_bias.to(acc_type).contiguous();
    const auto b_sc = sc_dw_bias.to(acc_type).contiguous();
    const auto w_proj_t = at::cat({pw_weight, sc_pw_weight}, 1).to(acc_type).t().contiguous();  // [depth][cout]
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
            std::copy(bd0, bd0 + mid, f);
            for (int64_t ky = 0; ky < 3; ++ky) {
              const int64_t ih = 2 * qh + ky - 1;
              if (ih < 0 || ih >= height) continue;
              for (int64_t kx = 0; kx < 3; ++kx) {
                const int64_t iw = 2 * qw + kx - 1;
                if (iw < 0 || iw >= width) continue;
                grouped_tap(yp + ((n * height + ih) * width + iw) * cin, wd0 + (ky * 3 + kx) * mid, f, cin, ratio);
              }
            }
          }
        }
        for (int64_t i = 0; i < rows; ++i) {
          for (int64_t j = 0; j < cols; ++j) {
            acc_t* e = expanded.data() + (i * cols + j) * depth;
            // dw1 (depthwise, stride 1) + ReLU on the halo buffer.
            std::copy(bd1, bd1 + mid, e);
            for (int64_t ky = 0; ky < 3; ++ky) {
              for (int64_t kx = 0; kx < 3; ++kx) {
                const acc_t* f = first.data() + ((i + ky) * halo_w + j + kx) * mid;
                const acc_t* wk = wd1 + (ky * 3 + kx) * mid;
                for (int64_t m = 0; m < mid; ++m) e[m] += f[m] * wk[m];
              }
            }
            for (int64_t m = 0; m < mid; ++m) e[m] = std::max(e[m], acc_t(0));
            // Shortcut depthwise (stride 2, no ReLU) on x into the extra columns.
            acc_t* s = e + mid;
            std::copy(bsc, bsc + cin, s);
            const int64_t oh = oh0 + i, ow = ow0 + j;
            for (int64_t ky = 0; ky < 3; ++ky) {
              const int64_t ih = 2 * oh + ky - 1;
              if (ih < 0 || ih >= height) continue;
              for (int64_t kx = 0; kx < 3; ++kx) {
                const int64_t iw = 2 * ow + kx - 1;
                if (iw < 0 || iw >= width) continue;
                grouped_tap(xp + ((n * height + ih) * width + iw) * cin, wsc + (ky * 3 + kx) * cin, s, cin, int64_t(1));
              }
            }
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
