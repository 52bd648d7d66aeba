// OHEM cross-entropy on logits upsampled on the fly (CPU).
//
// Forward, one task per band of output rows: each output row's C upsampled logits are
// blended from two x-interpolated head-resolution rows (cached, so each head row is
// x-interpolated about once per band), then max / sum-exp / log give the cross-entropy and
// the ground-truth probability, stored per pixel (2 floats per pixel instead of the C
// upsampled logits). Counts and sums are kept per output row and added in row order, so the
// loss does not depend on the thread count. The OHEM threshold needs the k-th smallest
// probability only when fewer than k+1 valid probabilities are <= thresh; it is then found
// by an exact radix select over the probabilities' bits (integer histograms).
//
// Backward, one task per band of head rows: the output rows that read the band are
// recomputed, their softmax gradient is reduced along x into head columns, and added with
// the row weight into the band's own head rows only. Each head row receives its
// contributions in increasing output-row order whatever the bands are: deterministic, no
// atomics, nothing at output resolution beyond one row.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#include "common/bilinear.h"
#include "common/macros.h"
#include "common/ohem_checks.h"
#include "common/ohem_math.h"
#include "cpu/huge_pages.h"

namespace bisenet_fast {
namespace {

// exp(x) for x <= 0 (softmax terms exp(z - max)): Cody-Waite range reduction and a degree-6
// polynomial (about 1 ulp), branch-free so that the compiler vectorises the loops calling it
// (std::exp does not vectorise here). Terms below e^-87 are flushed to 0 by a bit mask: next
// to the sum >= 1 they do not matter.
inline float exp_fast(float x) {
  const float round_magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (x * 1.44269504088896341f + round_magic) - round_magic;
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float poly = 1.0f / 720.0f;
  poly = poly * r + 1.0f / 120.0f;
  poly = poly * r + 1.0f / 24.0f;
  poly = poly * r + 1.0f / 6.0f;
  poly = poly * r + 0.5f;
  poly = poly * r + 1.0f;
  poly = poly * r + 1.0f;
  const int32_t exponent_bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &exponent_bits, sizeof(scale));
  const float value = poly * scale;
  int32_t value_bits;
  std::memcpy(&value_bits, &value, sizeof(value_bits));
  value_bits &= -static_cast<int32_t>(x >= -87.0f);
  float result;
  std::memcpy(&result, &value_bits, sizeof(result));
  return result;
}

// float64 (the gradcheck path): libm's exp, but NaN maps to 0 as in the float overload
// above, which row_softmax and the backward rely on: a pixel not kept (an ignored one) is
// masked by multiplying its softmax terms by 0, so a NaN term there (a NaN or infinite logit
// read only by ignored pixels) would otherwise leak NaN into the gradient. Valid pixels keep
// their NaN: row_softmax's max propagates it, and their sum of exps is then 0 (p = 0/0).
inline double exp_fast(double x) { return x == x ? std::exp(x) : 0.0; }

template <typename acc_t>
struct AxisTaps {
  std::vector<int64_t> i0, i1;
  std::vector<acc_t> w0, w1;

  AxisTaps(int64_t in_size, int64_t out_size) : i0(out_size), i1(out_size), w0(out_size), w1(out_size) {
    const acc_t scale = linear_scale<acc_t>(in_size, out_size);  // ATen's opmath, as acc_t
    for (int64_t d = 0; d < out_size; ++d) {
      const BasicLinearTap<acc_t> t = linear_tap(d, in_size, scale);
      i0[d] = t.i0;
      i1[d] = t.i1;
      w0[d] = t.w0;
      w1[d] = t.w1;
    }
  }
};

// The transpose of the x interpolation as a gather (applied by gather_columns below): head
// column j sums weight[k] * g[x[k]] over k in [begin[j], begin[j + 1]), the output columns
// that read j, in increasing x. Taps of weight 0 are kept: 0 * NaN is NaN in the reference
// (ohem_math.h: a non-finite logit's NaN must reach the gradient).
// (A scatter along x would chain every add through memory on the same few columns.)
template <typename acc_t>
struct ColumnGather {
  std::vector<int64_t> begin, x;
  std::vector<acc_t> weight;

  ColumnGather(const AxisTaps<acc_t>& tx, int64_t in_size) : begin(in_size + 1, 0) {
    const int64_t out_size = static_cast<int64_t>(tx.i0.size());
    const acc_t scale = linear_scale<acc_t>(in_size, out_size);
    for (int64_t j = 0; j < in_size; ++j) {
      const DstRange range = dst_range_reading(j, in_size, out_size, scale);
      for (int64_t d = range.begin; d < range.end; ++d) {
        if (tx.i0[d] != j && tx.i1[d] != j) continue;  // in the range, but does not read j
        const acc_t wt = (tx.i0[d] == j ? tx.w0[d] : acc_t(0)) + (tx.i1[d] == j ? tx.w1[d] : acc_t(0));
        x.push_back(d);
        weight.push_back(wt);
      }
      begin[j + 1] = static_cast<int64_t>(x.size());
    }
  }
};

// The row pipeline's loops, compiled for AVX-512, AVX2 and the baseline ISA (BF_CPU_CLONES;
// the build flags alone are the baseline's, 4 float lanes). Free functions in this
// anonymous namespace, as the clones need.

// out[j] = sum over k in [begin[j], begin[j + 1]) of weight[k] * g[x[k]] (ColumnGather).
template <typename acc_t>
BF_CPU_CLONES void gather_columns(const ColumnGather<acc_t>& columns, const acc_t* g, acc_t* out) {
  const int64_t count = static_cast<int64_t>(columns.begin.size()) - 1;
  const int64_t* begin = columns.begin.data();
  const int64_t* x = columns.x.data();
  const acc_t* weight = columns.weight.data();
  for (int64_t j = 0; j < count; ++j) {
    acc_t acc = 0;
    for (int64_t k = begin[j]; k < begin[j + 1]; ++k) acc += weight[k] * g[x[k]];
    out[j] = acc;
  }
}

// z[e] = wy0 * a[e] + wy1 * b[e]
template <typename acc_t>
BF_CPU_CLONES void blend_rows(const acc_t* a, const acc_t* b, acc_t wy0, acc_t wy1, acc_t* z, int64_t n) {
  for (int64_t e = 0; e < n; ++e) z[e] = wy0 * a[e] + wy1 * b[e];
}

// dst[x] = wx0[x] * src[x0[x]] + wx1[x] * src[x1[x]] for every channel's row.
template <typename acc_t>
BF_CPU_CLONES void interpolate_rows_x(const acc_t* image_row, int64_t channel_stride, int64_t channels,
                                      const int64_t* x0, const int64_t* x1, const acc_t* wx0, const acc_t* wx1,
                                      int64_t W, acc_t* out) {
  for (int64_t c = 0; c < channels; ++c) {
    const acc_t* src = image_row + c * channel_stride;
    acc_t* dst = out + c * W;
    for (int64_t x = 0; x < W; ++x) dst[x] = wx0[x] * src[x0[x]] + wx1[x] * src[x1[x]];
  }
}

// z[c * W + x] *= coef[x] for every class c.
template <typename acc_t>
BF_CPU_CLONES void scale_columns(acc_t* z, const acc_t* coef, int64_t channels, int64_t W) {
  for (int64_t c = 0; c < channels; ++c) {
    acc_t* zc = z + c * W;
    for (int64_t x = 0; x < W; ++x) zc[x] *= coef[x];
  }
}

// dst[j] += w * src[j]
template <typename acc_t>
BF_CPU_CLONES void add_scaled(const acc_t* src, acc_t w, acc_t* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] += w * src[j];
}

// Upsampled logits of one output row of one image, z[c * W + x], in ATen's order
// wy0 * (x-interpolated row i0) + wy1 * (x-interpolated row i1). The two x-interpolated head
// rows are cached: consecutive output rows mostly read the same ones.
template <typename acc_t>
class RowUpsampler {
 public:
  RowUpsampler(const acc_t* image, int64_t channels, int64_t h, int64_t w, const AxisTaps<acc_t>& tx)
      : image_(image), channels_(channels), h_(h), w_(w), W_(static_cast<int64_t>(tx.i0.size())), tx_(tx) {
    for (auto& slot : slots_) slot.assign(channels_ * W_, acc_t(0));
  }

  void upsample(int64_t i0, int64_t i1, acc_t wy0, acc_t wy1, acc_t* z) {
    const acc_t* a = row(i0, -1);
    const acc_t* b = row(i1, i0);
    blend_rows(a, b, wy0, wy1, z, channels_ * W_);
  }

 private:
  // The x-interpolated head row i, loaded into a slot that does not hold row `keep`.
  const acc_t* row(int64_t i, int64_t keep) {
    for (int s = 0; s < 2; ++s)
      if (row_of_[s] == i) return slots_[s].data();
    const int s = row_of_[0] == keep ? 1 : 0;
    row_of_[s] = i;
    acc_t* out = slots_[s].data();
    interpolate_rows_x(image_ + i * w_, h_ * w_, channels_, tx_.i0.data(), tx_.i1.data(), tx_.w0.data(),
                       tx_.w1.data(), W_, out);
    return out;
  }

  const acc_t* image_;
  int64_t channels_, h_, w_, W_;
  const AxisTaps<acc_t>& tx_;
  std::vector<acc_t> slots_[2];
  int64_t row_of_[2] = {-1, -1};
};

// Per pixel of one output row: max over the classes, then z[c * W + x] is overwritten with
// exp(z - max) and sumexp[x] gets their sum. The max propagates NaN (std::max would drop a
// NaN after the first class, and exp_fast maps NaN to 0), so a pixel with a NaN or infinite
// logit gets a NaN cross-entropy and probability, as in the reference. The ground-truth probability is then
// z[gt * W + x] / sumexp[x]: forward and backward both read it from here, so they agree
// bit for bit on which pixels are kept.
template <typename acc_t>
BF_CPU_CLONES void row_softmax(acc_t* z, int64_t channels, int64_t W, acc_t* zmax, acc_t* sumexp) {
  std::copy(z, z + W, zmax);
  for (int64_t c = 1; c < channels; ++c) {
    const acc_t* zc = z + c * W;
    for (int64_t x = 0; x < W; ++x) zmax[x] = (zc[x] > zmax[x] || zc[x] != zc[x]) ? zc[x] : zmax[x];
  }
  std::fill(sumexp, sumexp + W, acc_t(0));
  for (int64_t c = 0; c < channels; ++c) {
    acc_t* zc = z + c * W;
    for (int64_t x = 0; x < W; ++x) {
      zc[x] = exp_fast(zc[x] - zmax[x]);
      sumexp[x] += zc[x];
    }
  }
}

template <typename label_t>
int64_t checked_label(label_t raw, int64_t channels, int64_t ignore_index) {
  const int64_t label = static_cast<int64_t>(raw);
  TORCH_CHECK_VALUE(label == ignore_index || (label >= 0 && label < channels),
                    "ohem_cross_entropy: target holds label ", label, ", which is neither a class id in [0, ", channels,
                    ") nor ignore_index (", ignore_index, ")");
  return label;
}

struct RowStats {
  int64_t n_valid = 0;
  int64_t n_le_thresh = 0;  // valid pixels with p <= thresh
  double sum_valid = 0;     // CE over valid pixels
  double sum_below = 0;     // CE over valid pixels with p < thresh
};

// k-th smallest (0-indexed) of `values` by their bits, 16 bits per pass, integer
// histograms merged across threads (order-free, so exact and deterministic).
template <typename acc_t>
acc_t radix_select(const acc_t* values, int64_t count, int64_t k) {
  using key_t = decltype(prob_key(acc_t(0)));
  constexpr int kKeyBits = 8 * sizeof(key_t);
  constexpr int kDigitBits = 16;
  constexpr uint32_t kBins = 1u << kDigitBits;
  key_t prefix = 0;
  std::vector<int64_t> histogram(kBins);
  std::mutex merge;
  for (int shift = kKeyBits - kDigitBits; shift >= 0; shift -= kDigitBits) {
    std::fill(histogram.begin(), histogram.end(), 0);
    const int prefix_shift = shift + kDigitBits;
    at::parallel_for(0, count, 1 << 16, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> local(kBins, 0);
      for (int64_t e = begin; e < end; ++e) {
        const key_t key = prob_key(values[e]);
        if (key_has_prefix(key, prefix, prefix_shift)) ++local[key_digit(key, shift, kDigitBits)];
      }
      std::lock_guard<std::mutex> lock(merge);
      for (uint32_t b = 0; b < kBins; ++b) histogram[b] += local[b];
    });
    const uint32_t bin = select_bin(histogram.data(), kBins, &k);
    prefix |= static_cast<key_t>(bin) << shift;
  }
  return prob_from_key(prefix);
}

template <typename acc_t, typename label_t>
std::tuple<at::Tensor, at::Tensor> forward_impl(const at::Tensor& logits, const at::Tensor& target,
                                                c10::optional<double> thresh, int64_t min_kept,
                                                int64_t ignore_index) {
  const int64_t N = logits.size(0), C = logits.size(1), h = logits.size(2), w = logits.size(3);
  const int64_t H = target.size(1), W = target.size(2);
  const acc_t* z_head = logits.data_ptr<acc_t>();
  const label_t* labels = target.data_ptr<label_t>();
  const auto acc_options = logits.options();

  // Per output pixel: gt probability (+inf where ignored, so it is never kept nor selected
  // below a valid one) and cross-entropy.
  at::Tensor prob = at::empty({N * H * W}, acc_options);
  at::Tensor ce = at::empty({N * H * W}, acc_options);
  advise_huge_pages(prob);
  advise_huge_pages(ce);
  acc_t* prob_ptr = prob.data_ptr<acc_t>();
  acc_t* ce_ptr = ce.data_ptr<acc_t>();
  const acc_t thresh_value = thresh.has_value() ? static_cast<acc_t>(*thresh) : std::numeric_limits<acc_t>::infinity();
  std::vector<RowStats> rows(N * H);

  const AxisTaps<acc_t> ty(h, H), tx(w, W);
  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> z(C * W), zmax(W), sumexp(W), z_gt(W);
    std::vector<int64_t> row_label(W);
    int64_t image = -1;
    std::unique_ptr<RowUpsampler<acc_t>> upsampler;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / H, y = row % H;
      if (n != image) {
        image = n;
        upsampler = std::make_unique<RowUpsampler<acc_t>>(z_head + n * C * h * w, C, h, w, tx);
      }
      upsampler->upsample(ty.i0[y], ty.i1[y], ty.w0[y], ty.w1[y], z.data());
      const label_t* row_labels = labels + row * W;
      for (int64_t x = 0; x < W; ++x) {
        const int64_t label = checked_label(row_labels[x], C, ignore_index);
        row_label[x] = label;
        z_gt[x] = label == ignore_index ? acc_t(0) : z[label * W + x];
      }
      row_softmax(z.data(), C, W, zmax.data(), sumexp.data());
      RowStats stats;
      acc_t* row_prob = prob_ptr + row * W;
      acc_t* row_ce = ce_ptr + row * W;
      for (int64_t x = 0; x < W; ++x) {
        const int64_t label = row_label[x];
        if (label == ignore_index) {
          row_prob[x] = std::numeric_limits<acc_t>::infinity();
          row_ce[x] = acc_t(0);
          continue;
        }
        const acc_t loss = zmax[x] + std::log(sumexp[x]) - z_gt[x];
        const acc_t p = z[label * W + x] / sumexp[x];
        row_prob[x] = p;
        row_ce[x] = loss;
        stats.n_valid += 1;
        stats.sum_valid += loss;
        if (p <= thresh_value) stats.n_le_thresh += 1;
        if (ohem_kept(p, thresh_value)) stats.sum_below += loss;
      }
      rows[row] = stats;
    }
  });

  RowStats total;
  for (const RowStats& r : rows) {
    total.n_valid += r.n_valid;
    total.n_le_thresh += r.n_le_thresh;
    total.sum_valid += r.sum_valid;
    total.sum_below += r.sum_below;
  }
  acc_t threshold = thresh_value;
  double loss_sum = thresh.has_value() ? total.sum_below : total.sum_valid;
  const int64_t k = ohem_rank(min_kept, N, total.n_valid);
  if (thresh.has_value() && ohem_needs_select(total.n_valid, total.n_le_thresh, k)) {
    threshold = radix_select(prob_ptr, N * H * W, k);
    std::vector<double> row_sums(N * H, 0.0);
    at::parallel_for(0, N * H, 16, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        double sum = 0;
        for (int64_t x = 0; x < W; ++x)
          if (ohem_kept(prob_ptr[row * W + x], threshold)) sum += ce_ptr[row * W + x];
        row_sums[row] = sum;
      }
    });
    loss_sum = 0;
    for (double s : row_sums) loss_sum += s;
  }
  const double loss = loss_sum / static_cast<double>(N * H * W);
  return {at::scalar_tensor(loss, acc_options), at::scalar_tensor(static_cast<double>(threshold), acc_options)};
}

template <typename acc_t, typename label_t>
at::Tensor backward_impl(double grad, const at::Tensor& logits, const at::Tensor& target, acc_t threshold,
                         int64_t ignore_index) {
  const int64_t N = logits.size(0), C = logits.size(1), h = logits.size(2), w = logits.size(3);
  const int64_t H = target.size(1), W = target.size(2);
  const acc_t* z_head = logits.data_ptr<acc_t>();
  const label_t* labels = target.data_ptr<label_t>();
  at::Tensor grad_head = at::empty_like(logits);
  advise_huge_pages(grad_head);
  grad_head.zero_();
  acc_t* grad_ptr = grad_head.data_ptr<acc_t>();
  const acc_t coef = static_cast<acc_t>(grad / static_cast<double>(N * H * W));
  const acc_t scale_h = linear_scale<acc_t>(h, H);
  const AxisTaps<acc_t> ty(h, H), tx(w, W);
  const ColumnGather<acc_t> columns(tx, w);

  // One task per band of head rows [i_begin, i_end) of one image.
  at::parallel_for(0, N * h, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> z(C * W), zmax(W), sumexp(W), row_coef(W), row_grad(C * w);
    std::vector<int64_t> row_label(W);
    for (int64_t band = begin; band < end;) {
      const int64_t n = band / h;
      const int64_t i_begin = band % h;
      const int64_t i_end = std::min(h, i_begin + (end - band));
      band += i_end - i_begin;
      RowUpsampler<acc_t> upsampler(z_head + n * C * h * w, C, h, w, tx);
      acc_t* grad_image = grad_ptr + n * C * h * w;
      const int64_t y_begin = dst_range_reading(i_begin, h, H, scale_h).begin;
      const int64_t y_end = dst_range_reading(i_end - 1, h, H, scale_h).end;
      for (int64_t y = y_begin; y < y_end; ++y) {
        const int64_t row = n * H + y;
        const label_t* row_labels = labels + row * W;
        upsampler.upsample(ty.i0[y], ty.i1[y], ty.w0[y], ty.w1[y], z.data());
        row_softmax(z.data(), C, W, zmax.data(), sumexp.data());
        bool any_kept = false;
        for (int64_t x = 0; x < W; ++x) {
          const int64_t label = checked_label(row_labels[x], C, ignore_index);
          row_label[x] = label;
          const bool kept = label != ignore_index && ohem_kept(z[label * W + x] / sumexp[x], threshold);
          row_coef[x] = kept ? coef / sumexp[x] : acc_t(0);
          any_kept |= kept;
        }
        if (!any_kept) continue;
        // Softmax gradient of the row, overwriting z, then reduced along x into head columns.
        scale_columns(z.data(), row_coef.data(), C, W);
        for (int64_t x = 0; x < W; ++x)
          if (row_coef[x] != acc_t(0)) z[row_label[x] * W + x] -= coef;
        for (int64_t c = 0; c < C; ++c) gather_columns(columns, z.data() + c * W, row_grad.data() + c * w);
        const int64_t taps[2] = {ty.i0[y], ty.i1[y]};
        const acc_t weights[2] = {ty.w0[y], ty.w1[y]};
        for (int t = 0; t < 2; ++t) {
          if (taps[t] < i_begin || taps[t] >= i_end) continue;
          for (int64_t c = 0; c < C; ++c)
            add_scaled(row_grad.data() + c * w, weights[t], grad_image + (c * h + taps[t]) * w, w);
        }
      }
    }
  });
  return grad_head;
}

void check_inputs(const at::Tensor& logits, const at::Tensor& target) {
  check_defined("ohem_cross_entropy", {{"logits", &logits}, {"target", &target}});
  TORCH_CHECK(logits.device().is_cpu() && target.device().is_cpu(),
              "ohem_cross_entropy (CPU kernel): logits and target must be CPU tensors");
  check_ohem_tensors("CPU kernel", logits, target, /*float64=*/true);
}

// float16/bfloat16 logits are upcast at head resolution (mmseg computes losses in fp32).
at::Tensor head_logits(const at::Tensor& logits) {
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return logits.to(acc).contiguous();
}

template <typename F>
auto dispatch_types(const at::Tensor& logits, const at::Tensor& target, F&& f) {
  auto with_label = [&](auto acc_tag) {
    using acc_t = decltype(acc_tag);
    switch (target.scalar_type()) {
      case at::kByte:
        return f(acc_t{}, uint8_t{});
      case at::kInt:
        return f(acc_t{}, int32_t{});
      default:
        return f(acc_t{}, int64_t{});
    }
  };
  return logits.scalar_type() == at::kDouble ? with_label(double{}) : with_label(float{});
}

// check_labels is not needed here: this kernel checks each label as it reads it, which
// costs nothing on the CPU.
std::tuple<at::Tensor, at::Tensor> ohem_cross_entropy_forward_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                                  c10::optional<double> thresh, int64_t min_kept,
                                                                  int64_t ignore_index, bool /*check_labels*/) {
  check_inputs(logits, target);
  check_ohem_options(thresh, min_kept);
  const at::Tensor head = head_logits(logits);
  const at::Tensor labels = target.contiguous();
  return dispatch_types(head, labels, [&](auto acc_tag, auto label_tag) {
    return forward_impl<decltype(acc_tag), decltype(label_tag)>(head, labels, thresh, min_kept, ignore_index);
  });
}

at::Tensor ohem_cross_entropy_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& logits,
                                           const at::Tensor& target, const at::Tensor& threshold,
                                           int64_t ignore_index) {
  check_inputs(logits, target);
  check_ohem_backward_scalars(grad_loss, threshold, logits);
  const at::Tensor head = head_logits(logits);
  const at::Tensor labels = target.contiguous();
  const double grad = grad_loss.item<double>();
  const double thr = threshold.item<double>();
  at::Tensor grad_head = dispatch_types(head, labels, [&](auto acc_tag, auto label_tag) {
    using acc_t = decltype(acc_tag);
    return backward_impl<acc_t, decltype(label_tag)>(grad, head, labels, static_cast<acc_t>(thr), ignore_index);
  });
  return grad_head.to(logits.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(bisenet_fast, CPU, m) {
  m.impl("ohem_cross_entropy_forward", &ohem_cross_entropy_forward_cpu);
  m.impl("ohem_cross_entropy_backward", &ohem_cross_entropy_backward_cpu);
}

}  // namespace bisenet_fast
