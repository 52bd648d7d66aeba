// Bilateral Guided Aggregation on the CPU, forward and backward.
//
// Every map is walked as planes of pixel rows (BgaLayout in common/bga_checks.h), so NCHW
// and channels_last run the same row pipeline natively (no transposes): for one
// high-resolution row, interpolate the two low-resolution rows it reads vertically, then
// horizontally, then apply the gate. Bilinear taps come from common/bilinear.h (the same
// taps as F.interpolate), the pointwise math from common/bga_math.h (shared with CUDA).
//
// The backward is deterministic and independent of the thread count: the transposes of
// the upsample are computed per band of low-resolution rows; each band walks the
// high-resolution rows that read it in increasing order and adds their contributions to
// its rows in that order, so every low-resolution value is the same sum in the same order
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

// Everything up to the row functions, bga_math.h included, may assume floating-point
// comparisons do not trap (see vectorisable_exp); GCC inlines only across equal options.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#endif
#include "common/bga_math.h"

namespace bisenet_fast {
namespace {

// The per-row work is compiled twice, for AVX2+FMA (x86-64-v3) and for the baseline ISA,
// and picked when the library loads (GCC function multiversioning): the build flags are
// the baseline's, and ATen's own kernels run with AVX2/AVX-512 on the same machines.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define BGA_ROW_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define BGA_ROW_CLONES
#endif

// exp(x) for float in a form GCC auto-vectorises (libm's expf is a call per element, and
// sigmoid is most of the arithmetic here): Cody-Waite range reduction x = n ln2 + r, a
// degree-6 polynomial for exp(r) (Cephes' expf coefficients, ~2 ulp), times 2^n built in
// the exponent bits. Inputs are clamped to where 2^n stays a normal float; floor(t) is
// truncation after a shift that keeps t positive. The clamps only if-convert (and so
// vectorise) when the compiler may assume comparisons do not trap, which is true here
// (nothing reads the floating-point exception flags); the option (set above the namespace)
// covers the row functions below and the pointwise math of bga_math.h they call.
inline float vectorisable_exp(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const int32_t n = static_cast<int32_t>(x * 1.44269504088896341f + 128.5f) - 128;
  const float nf = static_cast<float>(n);
  const float r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// out[q] = sigmoid(in[q]); float through vectorisable_exp, double through libm (the
// float64 path exists for gradcheck, not speed).
inline void sigmoid_row(const float* in, float* out, int64_t n) {
  for (int64_t q = 0; q < n; ++q) out[q] = 1.0f / (1.0f + vectorisable_exp(-in[q]));
}

inline void sigmoid_row(const double* in, double* out, int64_t n) {
  for (int64_t q = 0; q < n; ++q) out[q] = bga_sigmoid(in[q]);
}

std::vector<LinearTap> axis_taps(int64_t in_size, int64_t out_size) {
  const float scale = linear_scale(in_size, out_size);
  std::vector<LinearTap> taps(out_size);
  for (int64_t dst = 0; dst < out_size; ++dst) taps[dst] = linear_tap(dst, in_size, scale);
  return taps;
}

// out[q] = w0 * a[q] + w1 * b[q]
template <typename T>
void blend_rows(const T* a, const T* b, float w0, float w1, T* out, int64_t n) {
  const T v0 = static_cast<T>(w0), v1 = static_cast<T>(w1);
  for (int64_t q = 0; q < n; ++q) out[q] = v0 * a[q] + v1 * b[q];
}

// acc[q] += w * row[q]
template <typename T>
void add_scaled_row(const T* row, float w, T* acc, int64_t n) {
  const T v = static_cast<T>(w);
  for (int64_t q = 0; q < n; ++q) acc[q] += v * row[q];
}

// Horizontal upsample of one row of pixels: out[x] = w0 * row[i0] + w1 * row[i1] (each
// pixel `inner` values wide).
template <typename T>
void upsample_row(const T* row, const std::vector<LinearTap>& taps, int64_t inner, T* out) {
  const int64_t width = static_cast<int64_t>(taps.size());
  if (inner == 1) {
    for (int64_t x = 0; x < width; ++x) {
      const LinearTap& t = taps[x];
      out[x] = static_cast<T>(t.w0) * row[t.i0] + static_cast<T>(t.w1) * row[t.i1];
    }
    return;
  }
  for (int64_t x = 0; x < width; ++x) {
    const LinearTap& t = taps[x];
    blend_rows(row + t.i0 * inner, row + t.i1 * inner, t.w0, t.w1, out + x * inner, inner);
  }
}

// Transpose of upsample_row, added into acc in increasing x (acc is the low-res row).
template <typename T>
void upsample_row_transposed(const T* row, const std::vector<LinearTap>& taps, int64_t inner, T* acc) {
  const int64_t width = static_cast<int64_t>(taps.size());
  if (inner == 1) {
    for (int64_t x = 0; x < width; ++x) {
      const LinearTap& t = taps[x];
      acc[t.i0] += static_cast<T>(t.w0) * row[x];
      acc[t.i1] += static_cast<T>(t.w1) * row[x];
    }
    return;
  }
  for (int64_t x = 0; x < width; ++x) {
    const LinearTap& t = taps[x];
    add_scaled_row(row + x * inner, t.w0, acc + t.i0 * inner, inner);
    add_scaled_row(row + x * inner, t.w1, acc + t.i1 * inner, inner);
  }
}

struct Geometry {
  int64_t planes, inner, high_rows, high_cols, low_rows, low_cols;
  int64_t high_row_len() const { return high_cols * inner; }
  int64_t low_row_len() const { return low_cols * inner; }
};

Geometry geometry(const BgaLayout& layout, const at::Tensor& detail, const at::Tensor& semantic) {
  return {layout.planes, layout.inner, detail.size(2), detail.size(3), semantic.size(2), semantic.size(3)};
}

// One high-res row of the forward: the two low-res rows it reads (s0/s1 of semantic,
// p0/p1 of detail_down * sigmoid(semantic_down)) blended vertically, upsampled, gated.
template <typename scalar_t>
BGA_ROW_CLONES void forward_row(const LinearTap& t, const at::opmath_type<scalar_t>* s0,
                                const at::opmath_type<scalar_t>* s1, const at::opmath_type<scalar_t>* p0,
                                const at::opmath_type<scalar_t>* p1, const std::vector<LinearTap>& col_taps,
                                int64_t inner, int64_t low_len, const scalar_t* detail, scalar_t* out,
                                at::opmath_type<scalar_t>* low_s, at::opmath_type<scalar_t>* low_p,
                                at::opmath_type<scalar_t>* high_s, at::opmath_type<scalar_t>* high_p) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t high_len = static_cast<int64_t>(col_taps.size()) * inner;
  blend_rows(s0, s1, t.w0, t.w1, low_s, low_len);
  blend_rows(p0, p1, t.w0, t.w1, low_p, low_len);
  upsample_row(low_s, col_taps, inner, high_s);
  upsample_row(low_p, col_taps, inner, high_p);
  sigmoid_row(high_s, high_s, high_len);
  for (int64_t q = 0; q < high_len; ++q) {
    out[q] = static_cast<scalar_t>(bga_output<opmath_t>(static_cast<opmath_t>(detail[q]), high_s[q], high_p[q]));
  }
}

// One high-res row of the backward: writes its grad_detail when `grad_detail` is not null
// and leaves in row_sem / row_up its contributions g * detail * s * (1 - s) and g
// transposed through the horizontal upsample (low-res row length); the caller adds them
// into the low-res rows the high-res row reads.
template <typename scalar_t>
BGA_ROW_CLONES void backward_row(const LinearTap& t, const at::opmath_type<scalar_t>* s0,
                                 const at::opmath_type<scalar_t>* s1, const std::vector<LinearTap>& col_taps,
                                 int64_t inner, int64_t low_len, const scalar_t* grad_out, const scalar_t* detail,
                                 scalar_t* grad_detail, at::opmath_type<scalar_t>* low_s,
                                 at::opmath_type<scalar_t>* high_s, at::opmath_type<scalar_t>* high_tsem,
                                 at::opmath_type<scalar_t>* high_g, at::opmath_type<scalar_t>* row_sem,
                                 at::opmath_type<scalar_t>* row_up) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t high_len = static_cast<int64_t>(col_taps.size()) * inner;
  blend_rows(s0, s1, t.w0, t.w1, low_s, low_len);
  upsample_row(low_s, col_taps, inner, high_s);
  sigmoid_row(high_s, high_s, high_len);
  // high_s: up(semantic), then its sigmoid, then grad_detail's row.
  for (int64_t q = 0; q < high_len; ++q) {
    const opmath_t gq = static_cast<opmath_t>(grad_out[q]);
    const auto hg = bga_high_grad<opmath_t>(gq, static_cast<opmath_t>(detail[q]), high_s[q]);
    high_tsem[q] = hg.semantic_up;
    high_g[q] = gq;
    high_s[q] = hg.detail;
  }
  if (grad_detail != nullptr) {
    for (int64_t q = 0; q < high_len; ++q) grad_detail[q] = static_cast<scalar_t>(high_s[q]);
  }
  std::fill(row_sem, row_sem + low_len, opmath_t(0));
  std::fill(row_up, row_up + low_len, opmath_t(0));
  upsample_row_transposed(high_tsem, col_taps, inner, row_sem);
  upsample_row_transposed(high_g, col_taps, inner, row_up);
}

template <typename T>
BGA_ROW_CLONES void add_scaled_low_row(const T* row, float w, T* acc, int64_t n) {
  add_scaled_row(row, w, acc, n);
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

template <typename scalar_t>
void forward_kernel(const Geometry& g, const scalar_t* detail, const at::opmath_type<scalar_t>* semantic,
                    const at::opmath_type<scalar_t>* gated_down, scalar_t* out) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto row_taps = axis_taps(g.low_rows, g.high_rows);
  const auto col_taps = axis_taps(g.low_cols, g.high_cols);
  const int64_t low_len = g.low_row_len(), high_len = g.high_row_len();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, high_len));
  at::parallel_for(0, g.planes * g.high_rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> low_s(low_len), low_p(low_len), high_s(high_len), high_p(high_len);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t plane = r / g.high_rows, y = r % g.high_rows;
      const LinearTap& t = row_taps[y];
      const int64_t low_base = plane * g.low_rows;
      forward_row<scalar_t>(t, semantic + (low_base + t.i0) * low_len, semantic + (low_base + t.i1) * low_len,
                            gated_down + (low_base + t.i0) * low_len, gated_down + (low_base + t.i1) * low_len,
                            col_taps, g.inner, low_len, detail + r * high_len, out + r * high_len, low_s.data(),
                            low_p.data(), high_s.data(), high_p.data());
    }
  });
}

template <typename scalar_t>
void backward_kernel(const Geometry& g, const scalar_t* grad_out, const scalar_t* detail,
                     const at::opmath_type<scalar_t>* semantic, const scalar_t* detail_down,
                     const scalar_t* semantic_down, scalar_t* grad_detail, scalar_t* grad_semantic,
                     scalar_t* grad_detail_down, scalar_t* grad_semantic_down) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto row_taps = axis_taps(g.low_rows, g.high_rows);
  const auto col_taps = axis_taps(g.low_cols, g.high_cols);
  const float row_scale = linear_scale(g.low_rows, g.high_rows);
  const int64_t low_len = g.low_row_len(), high_len = g.high_row_len();
  // Enough tasks to keep every thread busy; bands only cost the re-walk of the few
  // high-res rows two bands share, and never change the result.
  const int64_t wanted_tasks = 4 * static_cast<int64_t>(at::get_num_threads());
  const int64_t bands_wanted =
      g.planes >= wanted_tasks ? 1 : std::min(g.low_rows, (wanted_tasks + g.planes - 1) / g.planes);
  const int64_t band_rows = (g.low_rows + bands_wanted - 1) / bands_wanted;
  const int64_t bands = (g.low_rows + band_rows - 1) / band_rows;

  at::parallel_for(0, g.planes * bands, 1, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> acc_sem(band_rows * low_len), acc_up(band_rows * low_len);
    std::vector<opmath_t> low_s(low_len), high_s(high_len), high_tsem(high_len), high_g(high_len);
    std::vector<opmath_t> row_sem(low_len), row_up(low_len);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t plane = task / bands, band = task % bands;
      const int64_t i_begin = band * band_rows, i_end = std::min(g.low_rows, i_begin + band_rows);
      const int64_t y_begin = dst_range_reading(i_begin, g.low_rows, g.high_rows, row_scale).begin;
      const int64_t y_end = dst_range_reading(i_end - 1, g.low_rows, g.high_rows, row_scale).end;
      std::fill(acc_sem.begin(), acc_sem.end(), opmath_t(0));
      std::fill(acc_up.begin(), acc_up.end(), opmath_t(0));
      const int64_t low_base = plane * g.low_rows;
      for (int64_t y = y_begin; y < y_end; ++y) {
        const LinearTap& t = row_taps[y];
        const int64_t offset = (plane * g.high_rows + y) * high_len;
        // The band holding tap i0 of row y writes that row's grad_detail: exactly one band.
        const bool owns_row = t.i0 >= i_begin && t.i0 < i_end;
        backward_row<scalar_t>(t, semantic + (low_base + t.i0) * low_len, semantic + (low_base + t.i1) * low_len,
                               col_taps, g.inner, low_len, grad_out + offset, detail + offset,
                               owns_row ? grad_detail + offset : nullptr, low_s.data(), high_s.data(),
                               high_tsem.data(), high_g.data(), row_sem.data(), row_up.data());
        const int64_t taps_i[2] = {t.i0, t.i1};
        const float taps_w[2] = {t.w0, t.w1};
        for (int k = 0; k < 2; ++k) {
          if (taps_i[k] < i_begin || taps_i[k] >= i_end) continue;
          const int64_t local = (taps_i[k] - i_begin) * low_len;
          add_scaled_low_row(row_sem.data(), taps_w[k], acc_sem.data() + local, low_len);
          add_scaled_low_row(row_up.data(), taps_w[k], acc_up.data() + local, low_len);
        }
      }
      const int64_t low_offset = (low_base + i_begin) * low_len;
      const int64_t count = (i_end - i_begin) * low_len;
      for (int64_t q = 0; q < count; ++q) {
        const auto lg = bga_low_grad<opmath_t>(acc_up[q], static_cast<opmath_t>(detail_down[low_offset + q]),
                                               static_cast<opmath_t>(semantic_down[low_offset + q]));
        grad_semantic[low_offset + q] = static_cast<scalar_t>(acc_sem[q]);
        grad_detail_down[low_offset + q] = static_cast<scalar_t>(lg.detail_down);
        grad_semantic_down[low_offset + q] = static_cast<scalar_t>(lg.semantic_down);
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
  if (out.numel() == 0) return out;
  const auto opmath = at::toOpMathType(detail.scalar_type());
  // The low-resolution operands in the math type: 1/16 of the high-res traffic at the
  // model's sizes, so forming sigmoid(semantic_down) * detail_down once here is cheaper
  // than per tap.
  const auto semantic_math = semantic.to(opmath).contiguous(layout.format);
  const auto gated_down =
      (detail_down.to(opmath) * at::sigmoid(semantic_down.to(opmath))).contiguous(layout.format);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, detail.scalar_type(), "bga_aggregate_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t>(g, d.const_data_ptr<scalar_t>(), semantic_math.const_data_ptr<opmath_t>(),
                             gated_down.const_data_ptr<opmath_t>(), out.mutable_data_ptr<scalar_t>());
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
