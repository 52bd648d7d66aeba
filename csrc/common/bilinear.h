// Index math of size-based bilinear interpolation with align_corners=False, as ATen's
// upsample_bilinear2d computes it (scale in/out, source clamped at 0; exactly as its
// default-ISA CPU kernel: its AVX2/AVX-512 builds contract scale * (dst + 0.5) - 0.5 into an
// FMA, so a weight that is 0 here can be ~1e-8 there, about 1 ulp on finite results), plus
// its transpose: which destination indices read a given source index. Shared by the CPU
// and CUDA kernels so both compute the same taps as F.interpolate.
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace bisenet_fast {

// One destination index along one axis reads source indices i0 and i1 with weights w0, w1,
// computed in acc_t: float for float32/float16/bfloat16 and double for float64, as ATen's CPU
// upsample (its opmath type). The CUDA kernels use float taps for every dtype.
template <typename acc_t>
struct BasicLinearTap {
  int64_t i0;
  int64_t i1;
  acc_t w0;
  acc_t w1;
};
using LinearTap = BasicLinearTap<float>;

template <typename acc_t = float>
BF_HOST_DEVICE acc_t linear_scale(int64_t in_size, int64_t out_size) {
  return static_cast<acc_t>(in_size) / static_cast<acc_t>(out_size);
}

template <typename acc_t>
BF_HOST_DEVICE BasicLinearTap<acc_t> linear_tap(int64_t dst, int64_t in_size, acc_t scale) {
  acc_t src = scale * (static_cast<acc_t>(dst) + acc_t(0.5)) - acc_t(0.5);
  if (src < acc_t(0)) src = acc_t(0);
  BasicLinearTap<acc_t> t;
  t.i0 = static_cast<int64_t>(src);
  if (t.i0 > in_size - 1) t.i0 = in_size - 1;
  t.w1 = src - static_cast<acc_t>(t.i0);
  t.w0 = acc_t(1) - t.w1;
  // An axis that keeps its size: ATen's CPU kernels (compute_source_index_and_lambda) read
  // i0 with weight 1 and i0 again with weight 0, not the next index, whose NaN would leak
  // (0 * NaN); an inf at i0 becomes NaN there, in both. scale is exactly 1 iff in == out,
  // for sizes below 2^24 (2^53 in double).
  t.i1 = t.i0 + (t.i0 < in_size - 1 && scale != acc_t(1) ? 1 : 0);
  return t;
}

// Weight with which destination `dst` reads source index `src` (0 if it does not).
template <typename acc_t>
BF_HOST_DEVICE acc_t linear_weight(const BasicLinearTap<acc_t>& t, int64_t src) {
  return (t.i0 == src ? t.w0 : acc_t(0)) + (t.i1 == src ? t.w1 : acc_t(0));
}

// First destination index whose tap i0 is >= m (out_size if none). i0 is non-decreasing
// in dst, so the destinations reading source index i form the range
// [first_dst_with_i0_at_least(i - 1), first_dst_with_i0_at_least(i + 1)).
template <typename acc_t>
BF_HOST_DEVICE int64_t first_dst_with_i0_at_least(int64_t m, int64_t in_size, int64_t out_size, acc_t scale) {
  if (m <= 0) return 0;
  if (m > in_size - 1) return out_size;
  // Analytic guess from src = scale * (dst + 0.5) - 0.5 >= m, then exact correction with
  // the same arithmetic as linear_tap so the range matches the forward taps.
  int64_t dst = static_cast<int64_t>((static_cast<acc_t>(m) + acc_t(0.5)) / scale - acc_t(0.5)) - 1;
  if (dst < 0) dst = 0;
  if (dst > out_size) dst = out_size;
  while (dst < out_size && linear_tap(dst, in_size, scale).i0 < m) ++dst;
  while (dst > 0 && linear_tap(dst - 1, in_size, scale).i0 >= m) --dst;
  return dst;
}

struct DstRange {
  int64_t begin;
  int64_t end;
};

// Destination indices whose taps read source index `src`.
template <typename acc_t>
BF_HOST_DEVICE DstRange dst_range_reading(int64_t src, int64_t in_size, int64_t out_size, acc_t scale) {
  return DstRange{first_dst_with_i0_at_least(src - 1, in_size, out_size, scale),
                  first_dst_with_i0_at_least(src + 1, in_size, out_size, scale)};
}

}  // namespace bisenet_fast
