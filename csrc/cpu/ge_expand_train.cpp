// GE expansion for training on the CPU (schema and formula in csrc/ops.cpp): grouped 3x3
// conv (groups = cin, `ratio` output channels per input channel) -> BatchNorm with batch
// statistics -> optional ReLU, without keeping the conv's output for backward.
//
// Every output channel's statistics reduce over N, H, W, and every output channel belongs
// to exactly one group; so one task owns one group (input channel c and its `ratio` output
// channels) from start to end. Reductions are then sequential within a task: deterministic,
// no atomics, no cross-thread merge. Backward recomputes the conv output of the group into a
// per-task buffer, forms the BN/ReLU gradient, and scatters it into grad_x (the group's
// input plane, also owned by the task) and the 9 taps of grad_weight.
//
// Layout: NCHW (inputs are made contiguous); the stats and all sums are in the
// accumulation type (float for float/half/bfloat16, double for double).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "common/macros.h"
#include "common/tensor_args.h"
#include "cpu/huge_pages.h"

namespace bisenet_fast {
namespace {

inline int64_t conv_out_size(int64_t size, int64_t stride) { return (size - 1) / stride + 1; }

// sum over i in [0, n) of term(i): blocks of kBlock terms, each in kLanes interleaved partial
// sums (no single serial dependency chain, which keeps a plain float sum from vectorising),
// the block totals added in double, all in a fixed order: deterministic, and with an error
// that grows with kBlock rather than with n (a batch's BN statistics sum N*H*W terms; eight
// float32 running sums over 2^18 of them erred ~10x more than ATen's).
constexpr int64_t kLanes = 8;
constexpr int64_t kBlock = 4096;

template <typename acc_t, typename Term>
inline acc_t lane_sum(int64_t n, const Term& term) {
  double total = 0;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t end = std::min(n, start + kBlock);
    acc_t lanes[kLanes] = {};
    int64_t i = start;
    for (; i + kLanes <= end; i += kLanes) {
      for (int64_t j = 0; j < kLanes; ++j) lanes[j] += term(i + j);
    }
    for (; i < end; ++i) lanes[(i - start) % kLanes] += term(i);
    acc_t block = 0;
    for (int64_t j = 0; j < kLanes; ++j) block += lanes[j];
    total += static_cast<double>(block);
  }
  return static_cast<acc_t>(total);
}

// The outputs o in [lo, hi) whose tap k reads inside the input: 0 <= o*stride + k - 1 < size.
// Looping taps outside and these ranges inside keeps the innermost loop free of bounds
// checks and contiguous (vectorisable) at stride 1.
struct TapRange {
  int64_t lo, hi;
};

inline TapRange tap_range(int64_t k, int64_t size, int64_t stride, int64_t out) {
  const int64_t lo = k == 0 ? 1 : 0;
  const int64_t hi = size - k < 0 ? 0 : std::min(out, (size - k) / stride + 1);
  return {lo, std::max(lo, hi)};
}

// dst = 3x3 conv (padding 1) of one (n, c) plane with the taps w9 (multiversioned: with
// its backward, most of this op's time).
template <int64_t stride, typename scalar_t, typename acc_t>
BF_CPU_CLONES void conv3x3_plane_strided(const scalar_t* src, int64_t height, int64_t width, const acc_t* w9, int64_t out_h,
                           int64_t out_w, acc_t* dst) {
  std::fill(dst, dst + out_h * out_w, acc_t(0));
  for (int64_t ky = 0; ky < 3; ++ky) {
    const TapRange rows = tap_range(ky, height, stride, out_h);
    for (int64_t kx = 0; kx < 3; ++kx) {
      const TapRange cols = tap_range(kx, width, stride, out_w);
      const acc_t wk = w9[ky * 3 + kx];
      for (int64_t oh = rows.lo; oh < rows.hi; ++oh) {
        const scalar_t* __restrict__ s = src + (oh * stride + ky - 1) * width + kx - 1;
        acc_t* __restrict__ d = dst + oh * out_w;
        for (int64_t ow = cols.lo; ow < cols.hi; ++ow) d[ow] += wk * static_cast<acc_t>(s[ow * stride]);
      }
    }
  }
}

// The conv's backward for one (n, c) plane given dz (the gradient at its output): adds the
// input gradient into dx and the 9 weight-gradient taps into gw.
template <int64_t stride, typename scalar_t, typename acc_t>
BF_CPU_CLONES void conv3x3_plane_backward_strided(const scalar_t* src, const acc_t* dz, int64_t height, int64_t width,
                                    const acc_t* w9, int64_t out_h, int64_t out_w, acc_t* dx, acc_t* gw) {
  for (int64_t ky = 0; ky < 3; ++ky) {
    const TapRange rows = tap_range(ky, height, stride, out_h);
    for (int64_t kx = 0; kx < 3; ++kx) {
      const TapRange cols = tap_range(kx, width, stride, out_w);
      const acc_t wk = w9[ky * 3 + kx];
      acc_t tap_sum = 0;
      for (int64_t oh = rows.lo; oh < rows.hi; ++oh) {
        const int64_t offset = (oh * stride + ky - 1) * width + kx - 1;
        const scalar_t* __restrict__ s = src + offset + cols.lo * stride;
        acc_t* __restrict__ d = dx + offset + cols.lo * stride;
        const acc_t* __restrict__ g = dz + oh * out_w + cols.lo;
        const int64_t n = cols.hi - cols.lo;
        tap_sum += lane_sum<acc_t>(n, [&](int64_t i) { return g[i] * static_cast<acc_t>(s[i * stride]); });
        for (int64_t i = 0; i < n; ++i) d[i * stride] += g[i] * wk;
      }
      gw[ky * 3 + kx] += tap_sum;
    }
  }
}

// The stride as a compile-time constant, so the inner loops' accesses have a known step.
template <typename scalar_t, typename acc_t>
void conv3x3_plane(const scalar_t* src, int64_t height, int64_t width, const acc_t* w9, int64_t stride,
                   int64_t out_h, int64_t out_w, acc_t* dst) {
  if (stride == 1) return conv3x3_plane_strided<1>(src, height, width, w9, out_h, out_w, dst);
  conv3x3_plane_strided<2>(src, height, width, w9, out_h, out_w, dst);
}

template <typename scalar_t, typename acc_t>
void conv3x3_plane_backward(const scalar_t* src, const acc_t* dz, int64_t height, int64_t width, const acc_t* w9,
                            int64_t stride, int64_t out_h, int64_t out_w, acc_t* dx, acc_t* gw) {
  if (stride == 1) return conv3x3_plane_backward_strided<1>(src, dz, height, width, w9, out_h, out_w, dx, gw);
  conv3x3_plane_backward_strided<2>(src, dz, height, width, w9, out_h, out_w, dx, gw);
}

struct Geometry {
  int64_t n_batch, cin, height, width, mid, ratio, stride, out_h, out_w;
  int64_t plane_in() const { return height * width; }
  int64_t plane_out() const { return out_h * out_w; }
  int64_t count() const { return n_batch * plane_out(); }  // values per BN channel
};

Geometry check_and_measure(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bn_weight,
                           const at::Tensor& bn_bias, int64_t stride, double eps) {
  check_defined(op, {{"x", &x}, {"weight", &weight}, {"bn_weight", &bn_weight}, {"bn_bias", &bn_bias}});
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (N, C, H, W), got ", x.sizes());
  // conv_out_size truncates (size - 1) / stride toward zero: an empty axis would give one
  // output at stride 2 (F.conv2d and the fake kernel: none), and a conv of nothing.
  TORCH_CHECK_VALUE(x.size(2) > 0 && x.size(3) > 0, op, ": x must have a non-empty spatial size, got ", x.sizes());
  TORCH_CHECK_VALUE(eps > 0, op, ": eps must be > 0, got ", eps);
  for (const auto* t : {&x, &weight, &bn_weight, &bn_bias}) {
    TORCH_CHECK(t->device().is_cpu(), op, ": every tensor must be on the CPU, got ", t->device());
  }
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), op, ": x must be floating point, got ", x.scalar_type());
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), op, ": weight must have x's dtype");
  TORCH_CHECK_TYPE(bn_weight.scalar_type() == bn_bias.scalar_type() &&
                       (bn_weight.scalar_type() == x.scalar_type() || bn_weight.scalar_type() == at::kFloat),
                   op, ": bn_weight and bn_bias must share x's dtype or float32, got ", bn_weight.scalar_type(),
                   " and ", bn_bias.scalar_type());
  TORCH_CHECK(stride == 1 || stride == 2, op, ": stride must be 1 or 2, got ", stride);
  Geometry g{x.size(0), x.size(1), x.size(2), x.size(3), weight.dim() == 4 ? weight.size(0) : 0, 0, stride, 0, 0};
  TORCH_CHECK(g.cin > 0 && g.mid % g.cin == 0 && weight.sizes() == at::IntArrayRef({g.mid, 1, 3, 3}), op,
              ": weight must be (k * cin, 1, 3, 3), got ", weight.sizes());
  TORCH_CHECK(bn_weight.sizes() == at::IntArrayRef({g.mid}) && bn_bias.sizes() == at::IntArrayRef({g.mid}), op,
              ": bn_weight and bn_bias must be (", g.mid, "), got ", bn_weight.sizes(), " and ", bn_bias.sizes());
  g.ratio = g.mid / g.cin;
  g.out_h = conv_out_size(g.height, stride);
  g.out_w = conv_out_size(g.width, stride);
  TORCH_CHECK(g.count() > 1, op, ": BatchNorm statistics need more than one value per channel");
  return g;
}

at::ScalarType stats_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ge_expand_train_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                                   const at::Tensor& bn_weight,
                                                                   const at::Tensor& bn_bias, int64_t stride,
                                                                   bool relu, double eps) {
  const Geometry g = check_and_measure("ge_expand_train", x, weight, bn_weight, bn_bias, stride, eps);
  const auto xc = x.contiguous();
  auto out = at::empty({g.n_batch, g.mid, g.out_h, g.out_w}, x.options().memory_format(at::MemoryFormat::Contiguous));
  advise_huge_pages(out);
  auto mean = at::empty({g.mid}, x.options().dtype(stats_type(x)));
  auto var = at::empty({g.mid}, x.options().dtype(stats_type(x)));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ge_expand_train_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const auto w = weight.reshape({g.mid, 9}).to(acc_type).contiguous();
    const auto gamma = bn_weight.to(acc_type).contiguous(), beta = bn_bias.to(acc_type).contiguous();
    const acc_t *wp = w.data_ptr<acc_t>(), *gp = gamma.data_ptr<acc_t>(), *bp = beta.data_ptr<acc_t>();
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    acc_t *mp = mean.data_ptr<acc_t>(), *vp = var.data_ptr<acc_t>();

    at::parallel_for(0, g.cin, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> z(g.count());
      for (int64_t c = begin; c < end; ++c) {
        for (int64_t r = 0; r < g.ratio; ++r) {
          const int64_t m = c * g.ratio + r;
          for (int64_t n = 0; n < g.n_batch; ++n) {
            conv3x3_plane(xp + (n * g.cin + c) * g.plane_in(), g.height, g.width, wp + m * 9, g.stride, g.out_h,
                          g.out_w, z.data() + n * g.plane_out());
          }
          // Two passes (mean, then squared deviations): no cancellation for large means.
          const acc_t* zp = z.data();
          const acc_t sum = lane_sum<acc_t>(g.count(), [&](int64_t i) { return zp[i]; });
          const acc_t mu = sum / static_cast<acc_t>(g.count());
          const acc_t sq = lane_sum<acc_t>(g.count(), [&](int64_t i) { return (zp[i] - mu) * (zp[i] - mu); });
          const acc_t sigma2 = sq / static_cast<acc_t>(g.count());
          mp[m] = mu;
          vp[m] = sigma2;
          const acc_t scale = gp[m] / std::sqrt(sigma2 + static_cast<acc_t>(eps));
          const acc_t shift = bp[m] - mu * scale;
          for (int64_t n = 0; n < g.n_batch; ++n) {
            const acc_t* zn = z.data() + n * g.plane_out();
            scalar_t* on = op + (n * g.mid + m) * g.plane_out();
            for (int64_t i = 0; i < g.plane_out(); ++i) {
              acc_t o = zn[i] * scale + shift;
              if (relu && o < 0) o = 0;  // NaN stays NaN, as torch.relu keeps it
              on[i] = static_cast<scalar_t>(o);
            }
          }
        }
      }
    });
  });
  return {out, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ge_expand_train_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const at::Tensor& mean, const at::Tensor& var, int64_t stride, bool relu, double eps) {
  const Geometry g = check_and_measure("ge_expand_train_backward", x, weight, bn_weight, bn_bias, stride, eps);
  check_defined("ge_expand_train_backward", {{"grad_out", &grad_out}, {"mean", &mean}, {"var", &var}});
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({g.n_batch, g.mid, g.out_h, g.out_w}) &&
                  grad_out.scalar_type() == x.scalar_type() && grad_out.device() == x.device(),
              "ge_expand_train_backward: grad_out must have the output's shape and x's dtype and device");
  TORCH_CHECK(mean.scalar_type() == stats_type(x) && var.scalar_type() == stats_type(x) && mean.numel() == g.mid &&
                  var.numel() == g.mid,
              "ge_expand_train_backward: mean and var must be the forward's statistics");
  const auto xc = x.contiguous();
  const auto go = grad_out.to(x.scalar_type()).contiguous();
  const auto mc = mean.contiguous(), vc = var.contiguous();
  auto grad_x = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  advise_huge_pages(grad_x);
  const auto acc_type = stats_type(x);
  auto grad_w = at::empty({g.mid, 9}, x.options().dtype(acc_type));
  auto grad_gamma = at::empty({g.mid}, x.options().dtype(acc_type));
  auto grad_beta = at::empty({g.mid}, x.options().dtype(acc_type));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ge_expand_train_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto w = weight.reshape({g.mid, 9}).to(acc_type).contiguous();
    const auto gamma = bn_weight.to(acc_type).contiguous(), beta = bn_bias.to(acc_type).contiguous();
    const acc_t *wp = w.data_ptr<acc_t>(), *gp = gamma.data_ptr<acc_t>(), *bp = beta.data_ptr<acc_t>();
    const acc_t *mp = mc.data_ptr<acc_t>(), *vp = vc.data_ptr<acc_t>();
    const scalar_t *xp = xc.data_ptr<scalar_t>(), *gop = go.data_ptr<scalar_t>();
    scalar_t* gxp = grad_x.data_ptr<scalar_t>();
    acc_t *gwp = grad_w.data_ptr<acc_t>(), *ggp = grad_gamma.data_ptr<acc_t>(), *gbp = grad_beta.data_ptr<acc_t>();
    const acc_t count = static_cast<acc_t>(g.count());

    at::parallel_for(0, g.cin, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> z(g.count()), dz(g.count()), dx(g.n_batch * g.plane_in());
      for (int64_t c = begin; c < end; ++c) {
        std::fill(dx.begin(), dx.end(), acc_t(0));
        for (int64_t r = 0; r < g.ratio; ++r) {
          const int64_t m = c * g.ratio + r;
          for (int64_t n = 0; n < g.n_batch; ++n) {
            conv3x3_plane(xp + (n * g.cin + c) * g.plane_in(), g.height, g.width, wp + m * 9, g.stride, g.out_h,
                          g.out_w, z.data() + n * g.plane_out());
          }
          const acc_t invstd = acc_t(1) / std::sqrt(vp[m] + static_cast<acc_t>(eps));
          // z becomes x_hat; dz the gradient at the BN output, ReLU-masked by the output the
          // forward computed (same scale/shift arithmetic, so the same mask bit for bit).
          const acc_t mu = mp[m];
          const acc_t scale = gp[m] / std::sqrt(vp[m] + static_cast<acc_t>(eps)), shift = bp[m] - mu * scale;
          for (int64_t n = 0; n < g.n_batch; ++n) {
            const scalar_t* gon = gop + (n * g.mid + m) * g.plane_out();
            acc_t* zn = z.data() + n * g.plane_out();
            acc_t* dzn = dz.data() + n * g.plane_out();
            for (int64_t i = 0; i < g.plane_out(); ++i) {
              const acc_t dy = static_cast<acc_t>(gon[i]);
              // relu's gradient as torch's: zero where the output is <= 0 (a NaN output passes dy),
              // the output rounded to the activations' dtype as the forward stored it (a tiny
              // positive value that float16 rounds to 0 is clamped there too)
              const bool clamped = static_cast<acc_t>(static_cast<scalar_t>(zn[i] * scale + shift)) <= 0;
              dzn[i] = (relu && clamped) ? acc_t(0) : dy;
              zn[i] = (zn[i] - mu) * invstd;
            }
          }
          const acc_t *xh = z.data(), *dyp = dz.data();
          const acc_t sum_dy = lane_sum<acc_t>(g.count(), [&](int64_t i) { return dyp[i]; });
          const acc_t sum_dy_xhat = lane_sum<acc_t>(g.count(), [&](int64_t i) { return dyp[i] * xh[i]; });
          ggp[m] = sum_dy_xhat;
          gbp[m] = sum_dy;
          const acc_t k_scale = gp[m] * invstd, mean_dy = sum_dy / count, mean_dy_xhat = sum_dy_xhat / count;
          for (int64_t k = 0; k < g.count(); ++k) dz[k] = k_scale * (dz[k] - mean_dy - z[k] * mean_dy_xhat);
          acc_t gw[9] = {0, 0, 0, 0, 0, 0, 0, 0, 0};
          for (int64_t n = 0; n < g.n_batch; ++n) {
            conv3x3_plane_backward(xp + (n * g.cin + c) * g.plane_in(), dz.data() + n * g.plane_out(), g.height,
                                   g.width, wp + m * 9, g.stride, g.out_h, g.out_w, dx.data() + n * g.plane_in(), gw);
          }
          std::copy(gw, gw + 9, gwp + m * 9);
        }
        for (int64_t n = 0; n < g.n_batch; ++n) {
          const acc_t* dxn = dx.data() + n * g.plane_in();
          scalar_t* out = gxp + (n * g.cin + c) * g.plane_in();
          for (int64_t i = 0; i < g.plane_in(); ++i) out[i] = static_cast<scalar_t>(dxn[i]);
        }
      }
    });
  });
  return {grad_x, grad_w.reshape(weight.sizes()).to(weight.scalar_type()), grad_gamma.to(bn_weight.scalar_type()),
          grad_beta.to(bn_bias.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(bisenet_fast, CPU, m) {
  m.impl("ge_expand_train", &ge_expand_train_cpu);
  m.impl("ge_expand_train_backward", &ge_expand_train_backward_cpu);
}

}  // namespace bisenet_fast
