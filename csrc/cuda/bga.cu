// Bilateral Guided Aggregation on CUDA, forward and backward.
//
// Every tensor of a call is contiguous in one layout, walked as planes of pixel rows
// (BgaLayout: NCHW is N*C planes of 1-value pixels, channels_last is N planes of C-value
// pixels), so consecutive threads touch consecutive addresses in both layouts.
//
// Forward: a first kernel forms gated = detail_down * sigmoid(semantic_down) once per
// low-resolution value (in float; 1/16 of the output's values); then one thread per output
// value reads detail once and the four bilinear taps of semantic and of gated (served from
// L2). Forming gated per tap instead cost four more exp and divisions per output value,
// which made the kernel arithmetic-bound. A 3-D grid (column chunk, row, plane)
// gives each thread its position with at most one 32-bit division (channels_last),
// where a flat index would need three 64-bit divisions and modulos per value, which cost
// more than the value's memory traffic.
//
// Backward: deterministic, no atomics. One thread per low-resolution value gathers over
// the high-resolution pixels that read it (dst_range_reading, the transpose of the taps),
// in a fixed order, recomputing up(semantic) there: it accumulates up^T(g * detail *
// s * (1 - s)) and m = up^T(g). The thread whose pixel is tap (i0, j0) of a high-resolution
// pixel also writes grad_detail = g * s there, so each grad_detail value is written once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "common/bga_checks.h"
#include "common/bga_math.h"
#include "common/bilinear.h"

namespace bisenet_fast {
namespace {

constexpr int kThreads = 256;

struct Geometry {
  int64_t inner, high_rows, high_cols, low_rows, low_cols;
  float row_scale, col_scale;
};

Geometry geometry(const BgaLayout& layout, const at::Tensor& detail, const at::Tensor& semantic) {
  const int64_t H = detail.size(2), W = detail.size(3), h = semantic.size(2), w = semantic.size(3);
  return {layout.inner, H, W, h, w, linear_scale(h, H), linear_scale(w, W)};
}

// Blocks for a grid-stride loop over `total` values (the loop covers any remainder).
unsigned int blocks_for(int64_t total) {
  const int64_t wanted = (total + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(wanted, cap)));
}

// Bilinear value of a low-res map at the taps of one high-res pixel: each of the two rows
// interpolated along x, then the two blended along y (the CPU kernel's and ATen's order, so
// results round alike). `r0`, `r1` index the two rows' first pixels.
template <typename scalar_t, typename opmath_t>
__device__ __forceinline__ opmath_t bilinear(const scalar_t* __restrict__ map, int64_t r0, int64_t r1,
                                             const LinearTap& ty, const LinearTap& tx, int64_t inner, int64_t k) {
  const int64_t c0 = tx.i0 * inner + k, c1 = tx.i1 * inner + k;
  const opmath_t top = tx.w0 * static_cast<opmath_t>(map[r0 + c0]) + tx.w1 * static_cast<opmath_t>(map[r0 + c1]);
  const opmath_t bottom = tx.w0 * static_cast<opmath_t>(map[r1 + c0]) + tx.w1 * static_cast<opmath_t>(map[r1 + c1]);
  return ty.w0 * top + ty.w1 * bottom;
}

// gated[i] = detail_down[i] * sigmoid(semantic_down[i]) in the math type (grid-stride).
template <typename scalar_t>
__global__ void bga_gated_down_kernel(const scalar_t* __restrict__ detail_down,
                                      const scalar_t* __restrict__ semantic_down,
                                      at::opmath_type<scalar_t>* __restrict__ gated, int64_t total) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    gated[i] = bga_gated_down(static_cast<opmath_t>(detail_down[i]), static_cast<opmath_t>(semantic_down[i]));
  }
}

template <typename scalar_t, bool kChannelsLast>
__global__ void bga_forward_kernel(const scalar_t* __restrict__ detail, const scalar_t* __restrict__ semantic,
                                   const at::opmath_type<scalar_t>* __restrict__ gated, scalar_t* __restrict__ out,
                                   Geometry g, int64_t planes) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int inner = kChannelsLast ? static_cast<int>(g.inner) : 1;
  const int row_len = static_cast<int>(g.high_cols) * inner;  // < 2^31, checked on the host
  const int e = blockIdx.x * blockDim.x + threadIdx.x;        // position in the output row
  if (e >= row_len) return;
  const int x = kChannelsLast ? e / inner : e;
  const int64_t k = kChannelsLast ? e - x * inner : 0;
  const int64_t y = blockIdx.y;
  const LinearTap ty = linear_tap(y, g.low_rows, g.row_scale);
  const LinearTap tx = linear_tap(x, g.low_cols, g.col_scale);
  const int64_t low_row_len = g.low_cols * inner;
  for (int64_t plane = blockIdx.z; plane < planes; plane += gridDim.z) {
    const int64_t r0 = (plane * g.low_rows + ty.i0) * low_row_len;
    const int64_t r1 = (plane * g.low_rows + ty.i1) * low_row_len;
    const opmath_t semantic_up = bilinear<scalar_t, opmath_t>(semantic, r0, r1, ty, tx, inner, k);
    const opmath_t gated_up = bilinear<opmath_t, opmath_t>(gated, r0, r1, ty, tx, inner, k);
    const int64_t high = (plane * g.high_rows + y) * row_len + e;
    out[high] = static_cast<scalar_t>(
        bga_output<opmath_t>(static_cast<opmath_t>(detail[high]), bga_sigmoid(semantic_up), gated_up));
  }
}

template <typename scalar_t>
__global__ void bga_backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ detail,
                                    const scalar_t* __restrict__ semantic, const scalar_t* __restrict__ detail_down,
                                    const scalar_t* __restrict__ semantic_down, scalar_t* __restrict__ grad_detail,
                                    scalar_t* __restrict__ grad_semantic, scalar_t* __restrict__ grad_detail_down,
                                    scalar_t* __restrict__ grad_semantic_down, Geometry g, int64_t total) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    const int64_t k = idx % g.inner;
    int64_t rest = idx / g.inner;
    const int64_t j = rest % g.low_cols;
    rest /= g.low_cols;
    const int64_t i = rest % g.low_rows;
    const int64_t plane = rest / g.low_rows;
    const DstRange rows = dst_range_reading(i, g.low_rows, g.high_rows, g.row_scale);
    const DstRange cols = dst_range_reading(j, g.low_cols, g.high_cols, g.col_scale);
    opmath_t acc_semantic = 0, acc_up = 0;
    for (int64_t y = rows.begin; y < rows.end; ++y) {
      const LinearTap ty = linear_tap(y, g.low_rows, g.row_scale);
      const opmath_t wy = linear_weight(ty, i);
      const int64_t r0 = (plane * g.low_rows + ty.i0) * g.low_cols * g.inner;
      const int64_t r1 = (plane * g.low_rows + ty.i1) * g.low_cols * g.inner;
      const int64_t high_row = (plane * g.high_rows + y) * g.high_cols;
      for (int64_t x = cols.begin; x < cols.end; ++x) {
        const LinearTap tx = linear_tap(x, g.low_cols, g.col_scale);
        const opmath_t weight = wy * static_cast<opmath_t>(linear_weight(tx, j));
        const int64_t high = (high_row + x) * g.inner + k;
        const opmath_t go = static_cast<opmath_t>(grad_out[high]);
        const opmath_t s = bga_sigmoid(bilinear<scalar_t, opmath_t>(semantic, r0, r1, ty, tx, g.inner, k));
        const BgaHighGrad<opmath_t> hg = bga_high_grad<opmath_t>(go, static_cast<opmath_t>(detail[high]), s);
        acc_semantic += weight * hg.semantic_up;
        acc_up += weight * go;
        if (ty.i0 == i && tx.i0 == j) grad_detail[high] = static_cast<scalar_t>(hg.detail);
      }
    }
    const BgaLowGrad<opmath_t> lg = bga_low_grad<opmath_t>(acc_up, static_cast<opmath_t>(detail_down[idx]),
                                                           static_cast<opmath_t>(semantic_down[idx]));
    grad_semantic[idx] = static_cast<scalar_t>(acc_semantic);
    grad_detail_down[idx] = static_cast<scalar_t>(lg.detail_down);
    grad_semantic_down[idx] = static_cast<scalar_t>(lg.semantic_down);
  }
}

at::Tensor bga_aggregate_cuda(const at::Tensor& detail, const at::Tensor& semantic, const at::Tensor& detail_down,
                              const at::Tensor& semantic_down) {
  check_bga_inputs("bga_aggregate", detail, semantic, detail_down, semantic_down);
  TORCH_CHECK(detail.is_cuda(), "bga_aggregate: detail must be a CUDA tensor for this kernel, got ", detail.device());
  const c10::cuda::CUDAGuard guard(detail.device());
  const BgaLayout layout = bga_layout(detail);
  const Geometry g = geometry(layout, detail, semantic);
  const auto d = detail.contiguous(layout.format);
  const auto s = semantic.contiguous(layout.format);
  const auto dd = detail_down.contiguous(layout.format);
  const auto sd = semantic_down.contiguous(layout.format);
  auto out = at::empty_like(d, d.options(), layout.format);
  const int64_t total = out.numel();
  if (total == 0) return out;
  const int64_t row_len = g.high_cols * g.inner;
  TORCH_CHECK(row_len < (int64_t{1} << 31) && g.high_rows <= 65535,
              "bga_aggregate (CUDA kernel): detail rows must hold < 2^31 values and be <= 65535, got ",
              detail.sizes());
  // Row chunks of one warp multiple (a 128-wide NCHW row fills half a 256-thread block).
  const int threads = static_cast<int>(std::min<int64_t>(kThreads, (row_len + 31) / 32 * 32));
  const dim3 grid(static_cast<unsigned>((row_len + threads - 1) / threads), static_cast<unsigned>(g.high_rows),
                  static_cast<unsigned>(std::min<int64_t>(layout.planes, 65535)));
  const bool channels_last = layout.format == at::MemoryFormat::ChannelsLast;
  const auto stream = at::cuda::getCurrentCUDAStream();
  auto gated = at::empty_like(dd, dd.options().dtype(at::toOpMathType(dd.scalar_type())), layout.format);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, detail.scalar_type(), "bga_aggregate_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    bga_gated_down_kernel<scalar_t><<<blocks_for(gated.numel()), kThreads, 0, stream>>>(
        dd.const_data_ptr<scalar_t>(), sd.const_data_ptr<scalar_t>(), gated.mutable_data_ptr<opmath_t>(),
        gated.numel());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const auto kernel = channels_last ? bga_forward_kernel<scalar_t, true> : bga_forward_kernel<scalar_t, false>;
    kernel<<<grid, threads, 0, stream>>>(d.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(),
                                         gated.const_data_ptr<opmath_t>(), out.mutable_data_ptr<scalar_t>(), g,
                                         layout.planes);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bga_aggregate_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& detail, const at::Tensor& semantic, const at::Tensor& detail_down,
    const at::Tensor& semantic_down) {
  check_bga_inputs("bga_aggregate_backward", detail, semantic, detail_down, semantic_down);
  check_bga_grad_out(grad_out, detail);
  TORCH_CHECK(detail.is_cuda(), "bga_aggregate_backward: detail must be a CUDA tensor for this kernel, got ",
              detail.device());
  const c10::cuda::CUDAGuard guard(detail.device());
  const BgaLayout layout = bga_layout(detail);
  const Geometry g = geometry(layout, detail, semantic);
  const auto go = grad_out.contiguous(layout.format);
  const auto d = detail.contiguous(layout.format);
  const auto s = semantic.contiguous(layout.format);
  const auto dd = detail_down.contiguous(layout.format);
  const auto sd = semantic_down.contiguous(layout.format);
  auto grad_detail = at::empty_like(d, d.options(), layout.format);
  auto grad_semantic = at::empty_like(dd, dd.options(), layout.format);
  auto grad_detail_down = at::empty_like(dd, dd.options(), layout.format);
  auto grad_semantic_down = at::empty_like(dd, dd.options(), layout.format);
  const int64_t total = dd.numel();
  if (total == 0 || d.numel() == 0) {
    // Nothing reads or is read: every gradient is empty or zero.
    return {grad_detail.zero_(), grad_semantic.zero_(), grad_detail_down.zero_(), grad_semantic_down.zero_()};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, detail.scalar_type(), "bga_aggregate_backward_cuda", [&] {
    bga_backward_kernel<scalar_t><<<blocks_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        go.const_data_ptr<scalar_t>(), d.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(),
        dd.const_data_ptr<scalar_t>(), sd.const_data_ptr<scalar_t>(), grad_detail.mutable_data_ptr<scalar_t>(),
        grad_semantic.mutable_data_ptr<scalar_t>(), grad_detail_down.mutable_data_ptr<scalar_t>(),
        grad_semantic_down.mutable_data_ptr<scalar_t>(), g, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_detail, grad_semantic, grad_detail_down, grad_semantic_down};
}

}  // namespace

TORCH_LIBRARY_IMPL(bisenet_fast, CUDA, m) {
  m.impl("bga_aggregate", &bga_aggregate_cuda);
  m.impl("bga_aggregate_backward", &bga_aggregate_backward_cuda);
}

}  // namespace bisenet_fast
