// Bilateral Guided Aggregation on CUDA, forward and backward: the kernels.
//
// Every tensor of a call is contiguous in one layout, walked as planes of pixel rows
// (BgaLayout: NCHW is N*C planes of 1-value pixels, channels_last is N planes of C-value
// pixels), so consecutive threads touch consecutive addresses in both layouts.
//
// Forward: a first kernel forms gated = detail_down * sigmoid(semantic_down) once per
// low-resolution value (in float; 1/16 of the output's values); then each thread computes
// 16 bytes of output values (one value where the layout or alignment does not allow it),
// reading detail once and the four bilinear taps of semantic and of gated (served from
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
//
// Launched by bga_host.h through a launcher: bga.cu's launches them on the GPU, and
// tests/cuda_emulation compiles this same code for the CPU and runs it there.
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>

#include "common/bga_math.h"
#include "common/bilinear.h"
#include "cuda/launch_grid.h"

namespace bisenet_fast {
namespace bga_cuda {

constexpr int kThreads = 256;

struct Geometry {
  int64_t inner, high_rows, high_cols, low_rows, low_cols;
  float row_scale, col_scale;
};

// Bilinear blend of the four tap values of one high-res pixel (top-left, top-right,
// bottom-left, bottom-right): each of the two rows interpolated along x, then the two
// blended along y (the CPU kernel's and ATen's order, so results round alike).
template <typename opmath_t, typename T>
__device__ __forceinline__ opmath_t lerp2d(T v00, T v01, T v10, T v11, const LinearTap& ty, const LinearTap& tx) {
  const opmath_t top = tx.w0 * static_cast<opmath_t>(v00) + tx.w1 * static_cast<opmath_t>(v01);
  const opmath_t bottom = tx.w0 * static_cast<opmath_t>(v10) + tx.w1 * static_cast<opmath_t>(v11);
  return ty.w0 * top + ty.w1 * bottom;
}

// Bilinear value of a low-res map at the taps of one high-res pixel; `r0`, `r1` index the
// two rows' first pixels.
template <typename scalar_t, typename opmath_t>
__device__ __forceinline__ opmath_t bilinear(const scalar_t* __restrict__ map, int64_t r0, int64_t r1,
                                             const LinearTap& ty, const LinearTap& tx, int64_t inner, int64_t k) {
  const int64_t c0 = tx.i0 * inner + k, c1 = tx.i1 * inner + k;
  return lerp2d<opmath_t>(map[r0 + c0], map[r0 + c1], map[r1 + c0], map[r1 + c1], ty, tx);
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

// kVec consecutive values of `T` as one aligned access (16 bytes for float, 32 for float
// opmath of half: two 16-byte loads).
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Values {
  T v[kVec];
};

template <int kVec, typename T>
__device__ __forceinline__ Values<T, kVec> load_values(const T* __restrict__ p) {
  return *reinterpret_cast<const Values<T, kVec>*>(p);
}

// Each thread computes kVec consecutive values of an output row: kVec channels of one pixel
// (channels_last: the four taps of semantic and gated are then kVec-wide loads too) or kVec
// pixels of a row (NCHW: detail and out are kVec-wide, the taps one load per pixel). kVec > 1
// needs a row length divisible by kVec and 16-byte aligned tensors (chosen on the host);
// with 1 value per thread the kernel spent ~150 instructions per value on index math and
// reached 0.5-1.2 TB/s of the H200's ~4.8.
template <typename scalar_t, bool kChannelsLast, int kVec>
__global__ void bga_forward_kernel(const scalar_t* __restrict__ detail, const scalar_t* __restrict__ semantic,
                                   const at::opmath_type<scalar_t>* __restrict__ gated, scalar_t* __restrict__ out,
                                   Geometry g, int64_t planes) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int inner = kChannelsLast ? static_cast<int>(g.inner) : 1;
  const int row_len = static_cast<int>(g.high_cols) * inner;  // < 2^31, checked on the host
  // First of the thread's values in the row (64-bit: the last block's spare threads overshoot).
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kVec;
  if (first >= row_len) return;
  const int e = static_cast<int>(first);
  const int64_t y = blockIdx.y;
  const LinearTap ty = linear_tap(y, g.low_rows, g.row_scale);
  // Horizontal taps: one pixel for all lanes (channels_last), one per lane (NCHW).
  constexpr int kPixels = kChannelsLast ? 1 : kVec;
  LinearTap tx[kPixels];
  const int x = kChannelsLast ? e / inner : e;
  const int64_t k = kChannelsLast ? e - x * inner : 0;
#pragma unroll
  for (int i = 0; i < kPixels; ++i) tx[i] = linear_tap(x + i, g.low_cols, g.col_scale);
  const int64_t low_row_len = g.low_cols * inner;
  for (int64_t plane = blockIdx.z; plane < planes; plane += gridDim.z) {
    const int64_t r0 = (plane * g.low_rows + ty.i0) * low_row_len;
    const int64_t r1 = (plane * g.low_rows + ty.i1) * low_row_len;
    const int64_t high = (plane * g.high_rows + y) * row_len + e;
    const Values<scalar_t, kVec> d = load_values<kVec>(detail + high);
    Values<scalar_t, kVec> o;
    if constexpr (kChannelsLast) {
      const int64_t c0 = tx[0].i0 * inner + k, c1 = tx[0].i1 * inner + k;
      const auto s00 = load_values<kVec>(semantic + r0 + c0), s01 = load_values<kVec>(semantic + r0 + c1);
      const auto s10 = load_values<kVec>(semantic + r1 + c0), s11 = load_values<kVec>(semantic + r1 + c1);
      const auto g00 = load_values<kVec>(gated + r0 + c0), g01 = load_values<kVec>(gated + r0 + c1);
      const auto g10 = load_values<kVec>(gated + r1 + c0), g11 = load_values<kVec>(gated + r1 + c1);
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const opmath_t semantic_up = lerp2d<opmath_t>(s00.v[i], s01.v[i], s10.v[i], s11.v[i], ty, tx[0]);
        const opmath_t gated_up = lerp2d<opmath_t>(g00.v[i], g01.v[i], g10.v[i], g11.v[i], ty, tx[0]);
        o.v[i] = static_cast<scalar_t>(
            bga_output<opmath_t>(static_cast<opmath_t>(d.v[i]), bga_sigmoid(semantic_up), gated_up));
      }
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const opmath_t semantic_up = bilinear<scalar_t, opmath_t>(semantic, r0, r1, ty, tx[i], 1, 0);
        const opmath_t gated_up = bilinear<opmath_t, opmath_t>(gated, r0, r1, ty, tx[i], 1, 0);
        o.v[i] = static_cast<scalar_t>(
            bga_output<opmath_t>(static_cast<opmath_t>(d.v[i]), bga_sigmoid(semantic_up), gated_up));
      }
    }
    *reinterpret_cast<Values<scalar_t, kVec>*>(out + high) = o;
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

}  // namespace bga_cuda
}  // namespace bisenet_fast
