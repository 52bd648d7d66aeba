// The row pipeline of the BGA CPU kernels, shared by bga.cpp (the aggregation) and
// bga_pointwise.cpp (the aggregation fused after the 1x1 conv), whose upsampling part
// resize_bilinear.cpp reuses: bilinear row upsampling,
// the vectorised sigmoid and the per-row forward/backward of the gate. Upsampling is
// horizontal first, once per low-resolution row (UpsampledRows caches the two a high-res
// row reads), then vertical as a contiguous blend of two high-res-width rows: the
// horizontal pass, an indexed gather in NCHW, then runs ~scale times less often than if
// every high-res row upsampled its own vertically blended low-res row. Everything is in an
// anonymous namespace on purpose: each kernel file gets its own copy of the
// multiversioned (target_clones) row functions, so no resolver symbol is shared between
// translation units.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
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

// The per-row work is multiversioned (BF_CPU_CLONES, common/macros.h).

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

// sigmoid(x): float through vectorisable_exp, double through libm (the float64 path
// exists for gradcheck, not speed).
inline float row_sigmoid(float x) { return 1.0f / (1.0f + vectorisable_exp(-x)); }
inline double row_sigmoid(double x) { return bga_sigmoid(x); }

// out[q] = sigmoid(in[q]). Plain overloads, not a template: GCC inlines these into the
// multiversioned callers (so they take the caller's ISA); a template instance was emitted
// out of line for the baseline ISA and made the backward 25 % slower.
inline void sigmoid_row(const float* in, float* out, int64_t n) {
  for (int64_t q = 0; q < n; ++q) out[q] = row_sigmoid(in[q]);
}

inline void sigmoid_row(const double* in, double* out, int64_t n) {
  for (int64_t q = 0; q < n; ++q) out[q] = row_sigmoid(in[q]);
}

// The taps of one axis in the math type T (float, or double for float64: ATen's opmath).
template <typename T>
std::vector<BasicLinearTap<T>> axis_taps(int64_t in_size, int64_t out_size) {
  const T scale = linear_scale<T>(in_size, out_size);
  std::vector<BasicLinearTap<T>> taps(out_size);
  for (int64_t dst = 0; dst < out_size; ++dst) taps[dst] = linear_tap(dst, in_size, scale);
  return taps;
}

// out[q] = w0 * a[q] + w1 * b[q]
template <typename T>
void blend_rows(const T* a, const T* b, T w0, T w1, T* out, int64_t n) {
  for (int64_t q = 0; q < n; ++q) out[q] = w0 * a[q] + w1 * b[q];
}

// acc[q] += w * row[q]
template <typename T>
void add_scaled_row(const T* row, T w, T* acc, int64_t n) {
  for (int64_t q = 0; q < n; ++q) acc[q] += w * row[q];
}

// Horizontal upsample of one row of pixels: out[x] = w0 * row[i0] + w1 * row[i1] (each
// pixel `inner` values wide).
template <typename T>
void upsample_row(const T* row, const std::vector<BasicLinearTap<T>>& taps, int64_t inner, T* out) {
  const int64_t width = static_cast<int64_t>(taps.size());
  if (inner == 1) {
    for (int64_t x = 0; x < width; ++x) {
      const BasicLinearTap<T>& t = taps[x];
      out[x] = t.w0 * row[t.i0] + t.w1 * row[t.i1];
    }
    return;
  }
  for (int64_t x = 0; x < width; ++x) {
    const BasicLinearTap<T>& t = taps[x];
    blend_rows(row + t.i0 * inner, row + t.i1 * inner, t.w0, t.w1, out + x * inner, inner);
  }
}

// Transpose of upsample_row, added into acc in increasing x (acc is the low-res row).
template <typename T>
void upsample_row_transposed(const T* row, const std::vector<BasicLinearTap<T>>& taps, int64_t inner, T* acc) {
  const int64_t width = static_cast<int64_t>(taps.size());
  if (inner == 1) {
    for (int64_t x = 0; x < width; ++x) {
      const BasicLinearTap<T>& t = taps[x];
      acc[t.i0] += t.w0 * row[x];
      acc[t.i1] += t.w1 * row[x];
    }
    return;
  }
  for (int64_t x = 0; x < width; ++x) {
    const BasicLinearTap<T>& t = taps[x];
    add_scaled_row(row + x * inner, t.w0, acc + t.i0 * inner, inner);
    add_scaled_row(row + x * inner, t.w1, acc + t.i1 * inner, inner);
  }
}

template <typename T>
BF_CPU_CLONES void upsample_low_row(const T* row, const std::vector<BasicLinearTap<T>>& col_taps, int64_t inner,
                                     T* out) {
  upsample_row(row, col_taps, inner, out);
}

// The low-resolution operands of the forward in the math type and the call's layout:
// semantic, and detail_down * sigmoid(semantic_down). At the model's sizes they are 1/16
// of the high-res traffic, so forming the gated product once here is cheaper than per tap.
struct LowResOperands {
  at::Tensor semantic;
  at::Tensor gated_down;
};

inline LowResOperands low_res_operands(const at::Tensor& semantic, const at::Tensor& detail_down,
                                       const at::Tensor& semantic_down, const BgaLayout& layout) {
  const auto opmath = at::toOpMathType(semantic.scalar_type());
  return {semantic.to(opmath).contiguous(layout.format),
          (detail_down.to(opmath) * at::sigmoid(semantic_down.to(opmath))).contiguous(layout.format)};
}

struct Geometry {
  int64_t planes, inner, high_rows, high_cols, low_rows, low_cols;
  int64_t high_row_len() const { return high_cols * inner; }
  int64_t low_row_len() const { return low_cols * inner; }
};

inline Geometry geometry(const BgaLayout& layout, const at::Tensor& detail, const at::Tensor& semantic) {
  return {layout.planes, layout.inner, detail.size(2), detail.size(3), semantic.size(2), semantic.size(3)};
}

// Low-resolution rows upsampled horizontally to the high-res width, two at a time (a
// high-res row reads two): walking consecutive high-res rows, each low-res row is
// upsampled once instead of once per high-res row that reads it (~scale times).
template <typename T>
class UpsampledRows {
 public:
  UpsampledRows(const std::vector<BasicLinearTap<T>>& col_taps, int64_t inner)
      : col_taps_(col_taps), inner_(inner), slots_{std::vector<T>(col_taps.size() * inner),
                                                    std::vector<T>(col_taps.size() * inner)} {}

  // The upsampled rows of low-res rows r0 and r1 (pointers to their first value).
  std::pair<const T*, const T*> get(const T* r0, const T* r1) {
    const int k0 = fill(r0, r1);
    const int k1 = fill(r1, r0);
    return {slots_[k0].data(), slots_[k1].data()};
  }

 private:
  // Slot holding `row`, upsampling it into the slot not holding `keep` if needed.
  int fill(const T* row, const T* keep) {
    for (int k = 0; k < 2; ++k)
      if (key_[k] == row) return k;
    const int k = key_[0] == keep ? 1 : 0;
    upsample_low_row(row, col_taps_, inner_, slots_[k].data());
    key_[k] = row;
    return k;
  }

  const std::vector<BasicLinearTap<T>>& col_taps_;
  int64_t inner_;
  std::vector<T> slots_[2];
  const T* key_[2] = {nullptr, nullptr};
};

// Rows are processed in chunks of this many values so that a chunk's blended, gated and
// output values stay in L1 between the passes (a channels_last row is W * C values, e.g.
// 128 KiB at 256 x 128: whole-row passes went through L2 several times).
constexpr int64_t kRowChunk = 512;

// One high-res row of the forward from the horizontally upsampled low-res rows it reads
// (hs0/hs1 of semantic, hp0/hp1 of detail_down * sigmoid(semantic_down)): blended
// vertically, then gated.
template <typename scalar_t>
BF_CPU_CLONES void forward_row(const BasicLinearTap<at::opmath_type<scalar_t>>& t, const at::opmath_type<scalar_t>* hs0,
                                const at::opmath_type<scalar_t>* hs1, const at::opmath_type<scalar_t>* hp0,
                                const at::opmath_type<scalar_t>* hp1, int64_t high_len, const scalar_t* detail,
                                scalar_t* out) {
  using opmath_t = at::opmath_type<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    // One pass: the blends, the sigmoid and the output vectorise together, with nothing
    // going through a temporary row (channels_last forward 2.7 -> 1.7 ms at 1x128x128x256).
    // float16/bfloat16 keep the chunked passes below; one pass was not tried for them.
    const opmath_t w0 = t.w0, w1 = t.w1;
    for (int64_t q = 0; q < high_len; ++q) {
      const opmath_t gate = row_sigmoid(w0 * hs0[q] + w1 * hs1[q]);
      out[q] = bga_output<opmath_t>(detail[q], gate, w0 * hp0[q] + w1 * hp1[q]);
    }
    return;
  }
  opmath_t gate[kRowChunk], down[kRowChunk];
  for (int64_t q0 = 0; q0 < high_len; q0 += kRowChunk) {
    const int64_t n = std::min(kRowChunk, high_len - q0);
    blend_rows(hs0 + q0, hs1 + q0, t.w0, t.w1, gate, n);
    blend_rows(hp0 + q0, hp1 + q0, t.w0, t.w1, down, n);
    sigmoid_row(gate, gate, n);
    for (int64_t q = 0; q < n; ++q) {
      out[q0 + q] = static_cast<scalar_t>(bga_output<opmath_t>(static_cast<opmath_t>(detail[q0 + q]), gate[q], down[q]));
    }
  }
}

// Where one high-res row's backward contributions go: the band's accumulators (still at
// high-res width) of the low-res rows its vertical taps read, or null for a tap whose row
// belongs to another band.
template <typename T>
struct LowRowAccumulators {
  T* semantic[2];  // += w_k * g * detail * s * (1 - s), for tap k = 0, 1
  T* gated[2];     // += w_k * g
};

// One high-res row of the backward, from the horizontally upsampled semantic rows it reads:
// writes its grad_detail when `grad_detail` is not null and adds its contributions
// g * detail * s * (1 - s) and g, times the row's vertical weights, into `acc`; the caller
// transposes the horizontal upsample once per low-res row. Per value the additions run in
// tap order, whatever the chunking.
template <typename scalar_t>
BF_CPU_CLONES void backward_row(const BasicLinearTap<at::opmath_type<scalar_t>>& t, const at::opmath_type<scalar_t>* hs0,
                                 const at::opmath_type<scalar_t>* hs1, int64_t high_len, const scalar_t* grad_out,
                                 const scalar_t* detail, scalar_t* grad_detail,
                                 const LowRowAccumulators<at::opmath_type<scalar_t>>& acc) {
  using opmath_t = at::opmath_type<scalar_t>;
  opmath_t gate[kRowChunk];  // sigmoid(up(semantic)), then grad_detail's values
  opmath_t tsem[kRowChunk], g[kRowChunk];
  const opmath_t weights[2] = {t.w0, t.w1};
  for (int64_t q0 = 0; q0 < high_len; q0 += kRowChunk) {
    const int64_t n = std::min(kRowChunk, high_len - q0);
    blend_rows(hs0 + q0, hs1 + q0, t.w0, t.w1, gate, n);
    sigmoid_row(gate, gate, n);
    for (int64_t q = 0; q < n; ++q) {
      const opmath_t gq = static_cast<opmath_t>(grad_out[q0 + q]);
      const auto hg = bga_high_grad<opmath_t>(gq, static_cast<opmath_t>(detail[q0 + q]), gate[q]);
      tsem[q] = hg.semantic_up;
      g[q] = gq;
      gate[q] = hg.detail;
    }
    if (grad_detail != nullptr) {
      for (int64_t q = 0; q < n; ++q) grad_detail[q0 + q] = static_cast<scalar_t>(gate[q]);
    }
    for (int k = 0; k < 2; ++k) {
      if (acc.semantic[k] == nullptr) continue;
      add_scaled_row(tsem, weights[k], acc.semantic[k] + q0, n);
      add_scaled_row(g, weights[k], acc.gated[k] + q0, n);
    }
  }
}

// acc = (horizontal upsample)^T of one high-res-width row (acc: low-res row length).
template <typename T>
BF_CPU_CLONES void transpose_upsampled_row(const T* row, const std::vector<BasicLinearTap<T>>& col_taps, int64_t inner,
                                            T* acc, int64_t low_len) {
  std::fill(acc, acc + low_len, T(0));
  upsample_row_transposed(row, col_taps, inner, acc);
}

}  // namespace
}  // namespace bisenet_fast

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif
