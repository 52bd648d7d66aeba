// The CUDA GE-layer kernels' block code and launch plan (formula and schema in csrc/ops.cpp),
// kept apart from the launches in ge_layer.cu so that tests/cuda_emulation can compile this
// same code for the CPU and run it block by block, each thread a fiber meeting the others at
// the barriers: the shared-memory indexing and synchronisation are tested without a GPU. So this file uses
// only threadIdx, blockIdx, __syncthreads, __threadfence, atomicAdd (int), __ldcg,
// nvcuda::wmma's load/mma/store, __half and __nv_bfloat16 with their float conversions,
// float2/float4, and plain C++; compiled for the CPU it needs tests/cuda_emulation/shim.h
// included first, which supplies them.
//
// A block owns a tile of kTileH x kTileW output pixels (NHWC) and a tile of output
// channels. It walks the expanded (mid) channels in chunks of kChunk, in PyTorch's order
// (channel m reads input channel m / ratio), and per chunk:
//   1. stages the input pixels the chunk's 3x3 convs read (its halo, its few input
//      channels) and the chunk's weights in shared memory;
//   2. computes the chunk's expanded values for the tile's pixels into shared memory
//      (float32 arithmetic): stride 1: relu(dw(y)); stride 2: dw0(y) on the tile's halo at
//      the output resolution (zero outside the map: dw1's padding), then relu(dw1(.));
//   3. multiplies them by the chunk's rows of the 1x1 projection into float32
//      accumulators: on tensor cores (wmma; float16/bfloat16 operands, or TF32 for
//      float32 where cuDNN's convs may use TF32), or with float32 FMAs (float32 otherwise:
//      each thread 4 pixels x kOut output channels, a register-tiled GEMM).
// Stride 2 then runs the shortcut's depthwise conv of x through the same GEMM, chunk by
// chunk of input channels. The epilogue adds the biases and the residual (stride 1) and
// writes relu(.). No expanded value ever reaches global memory.
//
// Where the tiles are fewer than the SMs (the 1/32-resolution layers: 32 tiles at
// 1x1024x2048), the chunks are split over k_splits blocks per tile (split-K, grid z):
// each writes its float32 partial sums, and the tile's last block to arrive (an atomic
// count) adds them in split order and runs the epilogue, so the result does not depend
// on which block finishes last. Narrower output tiles would instead recompute the
// grouped conv, the kernels' main cost, once per tile.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "common/macros.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#endif

namespace bisenet_fast {
namespace ge_cuda {

namespace wmma = nvcuda::wmma;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTileH = 8;
constexpr int kTileW = 8;
constexpr int kTilePixels = kTileH * kTileW;
constexpr int kPixelsPerThread = 4;  // FMA GEMM rows per thread: consecutive pixels of a tile row
constexpr int kPixelGroups = kTilePixels / kPixelsPerThread;
constexpr int kOutGroups = kThreads / kPixelGroups;  // threads sharing a pixel group
constexpr int kChunk = 32;                            // expanded channels per step of the K loop
// Step 2 gives each thread consecutive channels of one position: with ratio 6, 8 channels
// read 2 or 3 input channels, so their 9 taps are loaded 2 or 3 times instead of 8.
constexpr int kChannelGroups = kThreads / kTilePixels;
constexpr int kChannelsPerThread = kChunk / kChannelGroups;
// A 3x3 conv's 9 weights and its bias, padded to three 16-byte loads.
constexpr int kConvStride = 12;
// GEMM operand rows are padded by 8 elements (16 bytes for 16-bit operands), so the 16 rows
// a wmma load reads do not all start in the same shared-memory bank.
constexpr int kOperandPad = 8;
constexpr int kEStride = kTilePixels + kOperandPad;  // e_s[k][pixel]
static_assert(kTileW % kPixelsPerThread == 0, "an FMA GEMM row group stays in one tile row");
static_assert(kChannelGroups * kChannelsPerThread == kChunk, "step 2 covers the chunk");
static_assert(kTilePixels == 4 * 16 && kWarps == 8, "wmma: 4 row tiles of 16 pixels, 2 warps per row tile");

// Halos: stride 1 reads y around the tile; stride 2 computes dw0 on the tile's halo at
// the output resolution, which reads y on (2 * (kTileH + 2) + 1)^2 input pixels.
constexpr int kHaloW = kTileW + 2;
constexpr int kHaloPositions = (kTileH + 2) * kHaloW;
constexpr int kInputHaloW = 2 * kHaloW + 1;
constexpr int kInputHaloPositions = (2 * (kTileH + 2) + 1) * kInputHaloW;

enum class Gemm { kFma, kTensorCores };

template <typename scalar_t>
struct GeParams {
  const scalar_t* x;             // (N, H, W, cin): residual (stride 1) or shortcut input
  const scalar_t* y;             // (N, H, W, cin): conv1's output
  const scalar_t* dw_weight;     // (mid, 9): dw (stride 1) or dw0 (stride 2)
  const scalar_t* dw_bias;       // (mid)
  const scalar_t* dw1_weight;    // (mid, 9), stride 2
  const scalar_t* dw1_bias;      // (mid), stride 2
  const scalar_t* pw_weight;     // (cout, mid)
  const scalar_t* pw_bias;       // (cout)
  const scalar_t* sc_dw_weight;  // (cin, 9), stride 2
  const scalar_t* sc_dw_bias;    // (cin), stride 2
  const scalar_t* sc_pw_weight;  // (cout, cin), stride 2
  const scalar_t* sc_pw_bias;    // (cout), stride 2
  scalar_t* out;                 // (N, out_height, out_width, cout)
  int height, width, out_height, out_width, cin, ratio, mid, cout;
  int tiles_h, tiles_w;
  int halo_channels;  // input channels one chunk can read: rows of the staged halo
  int cout_tiles, k_splits;
  int64_t tiles;
  float* partial;  // k_splits > 1: [k_splits][tiles * cout_tiles][kTilePixels][cols]
  int* arrivals;   // k_splits > 1: [tiles * cout_tiles], zeroed: splits done per tile
};

// The GEMM's operand type: float for FMAs and TF32, else the 16-bit input type.
template <typename scalar_t, Gemm kGemm>
struct OperandOf {
  using type = float;
};
template <>
struct OperandOf<c10::Half, Gemm::kTensorCores> {
  using type = __half;
};
template <>
struct OperandOf<c10::BFloat16, Gemm::kTensorCores> {
  using type = __nv_bfloat16;
};

// Byte offsets of a block's shared-memory buffers (each 128-byte aligned):
//   w  [kChunk][cols + kOperandPad] operands: the chunk's projection rows
//   e  [kChunk][kEStride] operands: the chunk's expanded values (GEMM A, column-major)
//   conv, conv1 [kChunk][kConvStride] float: 3x3 weights and bias (conv1: stride 2's dw1)
//   first [kChunk][kHaloPositions] float: stride 2's dw0 output on the tile's halo
//   halo [halo_channels][positions] float: the staged input
//   flag: int, whether this block is its tile's last split to arrive (split K loops only)
//   out [kTilePixels][cols + 4] float: tensor-core accumulators for the epilogue of an
//       unsplit K loop, over all of the above (free by then; flag is unused there)
struct SharedLayout {
  size_t w, e, conv, conv1, first, halo, flag, out, bytes;
};

BF_HOST_DEVICE size_t align128(size_t bytes) { return (bytes + 127) / 128 * 128; }

BF_HOST_DEVICE SharedLayout shared_layout(int stride, int cols, int operand_bytes, bool tensor_cores,
                                          int halo_channels) {
  SharedLayout s{};
  s.w = 0;
  s.e = align128(size_t(kChunk) * (cols + kOperandPad) * operand_bytes);
  s.conv = s.e + align128(size_t(kChunk) * kEStride * operand_bytes);
  const size_t conv_bytes = align128(size_t(kChunk) * kConvStride * sizeof(float));
  s.conv1 = s.conv + conv_bytes;
  s.first = s.conv1 + (stride == 2 ? conv_bytes : 0);
  s.halo = s.first + (stride == 2 ? align128(size_t(kChunk) * kHaloPositions * sizeof(float)) : 0);
  s.flag = align128(s.halo + size_t(halo_channels) * (stride == 1 ? kHaloPositions : kInputHaloPositions) * sizeof(float));
  const size_t end = s.flag + sizeof(int);
  s.out = 0;
  const size_t out_end = tensor_cores ? size_t(kTilePixels) * (cols + 4) * sizeof(float) : 0;
  s.bytes = end > out_end ? end : out_end;
  return s;
}

// How a call is launched: grid (tiles, cout_tiles, k_splits) of kThreads threads;
// out_per_thread (kOut: 2, 4 or 8) sets the output tile, kOutGroups * kOut channels.
struct GeLaunch {
  int64_t tiles;
  int cout_tiles;
  int k_splits;
  int out_per_thread;
  int halo_channels;
  Gemm gemm;
  size_t shared_bytes;
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Chunks of a block's K loop: the expanded channels', and stride 2's shortcut's.
inline int64_t k_items(int stride, int64_t cin, int64_t mid) {
  return ceil_div(mid, kChunk) + (stride == 2 ? ceil_div(cin, kChunk) : 0);
}

// The narrowest output tile that covers cout (up to 128 = kOutGroups x 8 channels); the K
// loop split over the fewest blocks that give every SM one (at most one chunk each).
inline GeLaunch plan_launch(int stride, int64_t batch, int64_t out_height, int64_t out_width, int64_t cin,
                            int64_t ratio, int64_t cout, int sm_count, Gemm gemm, int operand_bytes) {
  GeLaunch launch{};
  launch.tiles = batch * ceil_div(out_height, kTileH) * ceil_div(out_width, kTileW);
  int out_per_thread = 2;
  while (out_per_thread < 8 && int64_t(kOutGroups) * out_per_thread < cout) out_per_thread *= 2;
  launch.out_per_thread = out_per_thread;
  launch.cout_tiles = static_cast<int>(ceil_div(cout, int64_t(kOutGroups) * out_per_thread));
  const int64_t blocks = launch.tiles * launch.cout_tiles;
  launch.k_splits = static_cast<int>(blocks >= sm_count ? 1 : std::min(k_items(stride, cin, ratio * cin),
                                                                        ceil_div(sm_count, blocks)));
  // A chunk of kChunk consecutive expanded channels reads at most (kChunk - 1) / ratio + 2
  // input channels (floor((m0 + kChunk - 1) / r) - floor(m0 / r) + 1).
  launch.halo_channels = static_cast<int>(std::min<int64_t>(cin, (kChunk - 1) / ratio + 2));
  launch.gemm = gemm;
  launch.shared_bytes = shared_layout(stride, kOutGroups * out_per_thread, operand_bytes,
                                      gemm == Gemm::kTensorCores, launch.halo_channels)
                            .bytes;
  return launch;
}

// ---- device code ---------------------------------------------------------------------

struct Tile {
  int n, oy0, ox0, o0;
};

template <typename scalar_t>
BF_DEVICE Tile block_tile(const GeParams<scalar_t>& p, int cout_tile) {
  int t = static_cast<int>(blockIdx.x);
  const int tx = t % p.tiles_w;
  t /= p.tiles_w;
  const int ty = t % p.tiles_h;
  return {t / p.tiles_h, ty * kTileH, tx * kTileW, static_cast<int>(blockIdx.y) * cout_tile};
}

template <typename scalar_t>
BF_DEVICE float load_float(const scalar_t* p, int64_t i) {
  return static_cast<float>(p[i]);
}

template <typename operand_t>
BF_DEVICE operand_t to_operand(float v);
template <>
BF_DEVICE float to_operand<float>(float v) {
  return v;
}
template <>
BF_DEVICE __half to_operand<__half>(float v) {
  return __float2half_rn(v);
}
template <>
BF_DEVICE __nv_bfloat16 to_operand<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// halo_s[c][r * cols + col] = src[n, row0 + r, col0 + col, c_lo + c] (NHWC, `channels` of
// its `src_channels`), 0 outside the map. Consecutive threads read consecutive channels.
template <typename scalar_t>
BF_DEVICE void stage_halo(float* halo_s, const scalar_t* src, int src_channels, int height, int width, int n,
                          int row0, int col0, int rows, int cols, int c_lo, int channels) {
  const int positions = rows * cols;
  for (int i = threadIdx.x; i < positions * channels; i += kThreads) {
    const int c = i % channels, pos = i / channels;
    const int r = row0 + pos / cols, col = col0 + pos % cols;
    float v = 0.f;
    if (r >= 0 && r < height && col >= 0 && col < width)
      v = load_float(src, ((int64_t(n) * height + r) * width + col) * src_channels + c_lo + c);
    halo_s[c * positions + pos] = v;
  }
}

// conv_s[k] = (9 weights, bias, 0, 0) of channels k0 + k of a (channels, 9) 3x3 weight;
// zeros beyond kc.
template <typename scalar_t>
BF_DEVICE void stage_conv3x3(float* conv_s, const scalar_t* weight, const scalar_t* bias, int k0, int kc) {
  for (int i = threadIdx.x; i < kChunk * kConvStride; i += kThreads) {
    const int k = i / kConvStride, t = i % kConvStride;
    float v = 0.f;
    if (k < kc && t < 9) v = load_float(weight, int64_t(k0 + k) * 9 + t);
    if (k < kc && t == 9) v = load_float(bias, k0 + k);
    conv_s[i] = v;
  }
}

// w_s[k][o] = weight[o0 + o][k0 + k] of a (cout, depth) projection, 0 beyond kc or cout.
// Consecutive threads write consecutive o (no bank conflicts); the transposed reads hit
// L2, where the layer's few hundred KB of weights stay.
template <int kCols, typename operand_t, typename scalar_t>
BF_DEVICE void stage_projection(operand_t* w_s, const scalar_t* weight, int depth, int k0, int kc, int cout, int o0) {
  for (int i = threadIdx.x; i < kChunk * kCols; i += kThreads) {
    const int k = i / kCols, o = i % kCols;
    const float v = k < kc && o0 + o < cout ? load_float(weight, int64_t(o0 + o) * depth + k0 + k) : 0.f;
    w_s[k * (kCols + kOperandPad) + o] = to_operand<operand_t>(v);
  }
}

template <int kCount>
BF_DEVICE void load_shared(float (&v)[kCount], const float* p) {
  if constexpr (kCount % 4 == 0) {  // 16-byte loads: p is 16-byte aligned here
#pragma unroll
    for (int i = 0; i < kCount; i += 4) {
      const float4 q = reinterpret_cast<const float4*>(p)[i / 4];
      v[i] = q.x, v[i + 1] = q.y, v[i + 2] = q.z, v[i + 3] = q.w;
    }
  } else {
    static_assert(kCount == 2, "kOut is 2, 4 or 8");
    const float2 q = *reinterpret_cast<const float2*>(p);
    v[0] = q.x, v[1] = q.y;
  }
}

// The 3x3 taps whose top-left one is at position `base` of a halo row `halo_w` wide.
BF_DEVICE void load_taps(float (&taps)[9], const float* row, int base, int halo_w) {
#pragma unroll
  for (int t = 0; t < 9; ++t) taps[t] = row[base + (t / 3) * halo_w + (t % 3)];
}

// bias + the 3x3 conv of `taps` with conv_s's row (kConvStride floats: 9 weights, bias).
BF_DEVICE float conv3x3(const float (&taps)[9], const float* conv_row) {
  float w[kConvStride];
  load_shared(w, conv_row);
  float v = w[9];
#pragma unroll
  for (int t = 0; t < 9; ++t) v = fmaf(w[t], taps[t], v);
  return v;
}

// max(v, 0) with a NaN kept NaN, as torch.relu does (fmaxf returns 0 for a NaN).
BF_DEVICE float relu_keeping_nan(float v) { return v < 0.f ? 0.f : v; }

// Step 2 of a grouped 3x3 conv (expanded channel m reads input channel m / ratio) over a
// staged halo: out_s[k * out_stride + q] for the chunk's kChunk channels at `positions`
// output positions, position q's taps starting at halo position base_of(q). Each thread
// takes kChannelsPerThread consecutive channels of one position and loads the taps once
// per input channel (a warp's threads share their channels, so the branch is uniform).
// inside(q) false: 0 (padding of the next conv); relu as asked.
template <typename out_t, typename BaseOf, typename Inside>
BF_DEVICE void grouped_conv_chunk(out_t* out_s, int out_stride, int positions, const float* halo_s,
                                  int halo_positions, int halo_w, const float* conv_s, int m0, int kc, int ratio,
                                  int c_lo, bool relu, BaseOf base_of, Inside inside) {
  for (int i = threadIdx.x; i < kChannelGroups * positions; i += kThreads) {
    const int group = i / positions, q = i % positions;
    const bool valid = inside(q);
    const int base = base_of(q);
    const int m_first = m0 + group * kChannelsPerThread;
    int c = m_first / ratio;
    int rem = m_first - c * ratio;  // m = c * ratio + rem, stepped without dividing
    c -= c_lo;
    bool loaded = false;
    float taps[9];
#pragma unroll
    for (int j = 0; j < kChannelsPerThread; ++j) {
      const int k = group * kChannelsPerThread + j;
      float v = 0.f;
      if (valid && k < kc) {
        if (!loaded) {
          load_taps(taps, halo_s + c * halo_positions, base, halo_w);
          loaded = true;
        }
        v = conv3x3(taps, conv_s + k * kConvStride);
        if (relu) v = relu_keeping_nan(v);
      }
      out_s[k * out_stride + q] = to_operand<out_t>(v);
      if (++rem == ratio) {
        rem = 0;
        ++c;
        loaded = false;
      }
    }
  }
}

// The chunk GEMM with float32 FMAs: each thread accumulates 4 pixels x kOut outputs in
// registers (one 16-byte load of e per k, kOut / 4 of w).
template <int kOut>
struct FmaGemm {
  static constexpr int kCols = kOutGroups * kOut;
  float acc[kPixelsPerThread][kOut] = {};

  BF_DEVICE void accumulate(const float* e_s, const float* w_s) {
    const int pixel_group = threadIdx.x % kPixelGroups, out_group = threadIdx.x / kPixelGroups;
#pragma unroll 4
    for (int k = 0; k < kChunk; ++k) {
      float e[kPixelsPerThread], w[kOut];
      load_shared(e, e_s + k * kEStride + pixel_group * kPixelsPerThread);
      load_shared(w, w_s + k * (kCols + kOperandPad) + out_group * kOut);
#pragma unroll
      for (int i = 0; i < kPixelsPerThread; ++i)
#pragma unroll
        for (int j = 0; j < kOut; ++j) acc[i][j] = fmaf(e[i], w[j], acc[i][j]);
    }
  }
  BF_DEVICE void finish(float*) {}
  // Accumulator of the thread's pixel i and output j (store_tile's numbering).
  BF_DEVICE float at(int i, int j) const { return acc[i][j]; }
  // dst[pixel][output] (kCols wide) = the tile's accumulators.
  BF_DEVICE void store_partial(float* dst) const {
    const int pixel_group = threadIdx.x % kPixelGroups, out_group = threadIdx.x / kPixelGroups;
#pragma unroll
    for (int i = 0; i < kPixelsPerThread; ++i)
#pragma unroll
      for (int j = 0; j < kOut; ++j) dst[(pixel_group * kPixelsPerThread + i) * kCols + out_group * kOut + j] = acc[i][j];
  }
};

// The chunk GEMM on tensor cores: the tile's [64 pixels x kCols] accumulator is 4 x kOut
// wmma tiles of 16 x 16, kOut / 2 per warp (warp w: pixel rows 16 * (w % 4), column tiles
// w / 4 + 2 f). finish() moves them to shared memory, where at() reads them in FmaGemm's
// numbering for the epilogue.
template <typename operand_t, int kOut>
struct TensorCoreGemm {
  static constexpr int kCols = kOutGroups * kOut;
  static constexpr int kK = sizeof(operand_t) == 4 ? 8 : 16;  // TF32: m16n16k8
  static constexpr int kTiles = kOut / 2;
  static constexpr int kOutStride = kCols + 4;
  using input_t = std::conditional_t<sizeof(operand_t) == 4, wmma::precision::tf32, operand_t>;
  wmma::fragment<wmma::accumulator, 16, 16, kK, float> acc[kTiles];
  const float* out_s = nullptr;

  BF_DEVICE TensorCoreGemm() {
#pragma unroll
    for (int f = 0; f < kTiles; ++f) wmma::fill_fragment(acc[f], 0.f);
  }

  template <typename Fragment>
  BF_DEVICE static void round_tf32(Fragment& fragment) {
    if constexpr (sizeof(operand_t) == 4) {
#pragma unroll
      for (int i = 0; i < fragment.num_elements; ++i) fragment.x[i] = wmma::__float_to_tf32(fragment.x[i]);
    }
  }

  BF_DEVICE void accumulate(const operand_t* e_s, const operand_t* w_s) {
    const int warp = threadIdx.x / 32;
    const int row0 = (warp % 4) * 16;
#pragma unroll
    for (int k0 = 0; k0 < kChunk; k0 += kK) {
      wmma::fragment<wmma::matrix_a, 16, 16, kK, input_t, wmma::col_major> a;
      wmma::load_matrix_sync(a, e_s + k0 * kEStride + row0, kEStride);
      round_tf32(a);
#pragma unroll
      for (int f = 0; f < kTiles; ++f) {
        wmma::fragment<wmma::matrix_b, 16, 16, kK, input_t, wmma::row_major> b;
        wmma::load_matrix_sync(b, w_s + k0 * (kCols + kOperandPad) + (warp / 4 + 2 * f) * 16, kCols + kOperandPad);
        round_tf32(b);
        wmma::mma_sync(acc[f], a, b, acc[f]);
      }
    }
  }

  BF_DEVICE void finish(float* out_shared) {
    __syncthreads();  // out_shared overlays every buffer, which other warps may still read
    const int warp = threadIdx.x / 32;
#pragma unroll
    for (int f = 0; f < kTiles; ++f)
      wmma::store_matrix_sync(out_shared + (warp % 4) * 16 * kOutStride + (warp / 4 + 2 * f) * 16, acc[f],
                              kOutStride, wmma::mem_row_major);
    __syncthreads();
    out_s = out_shared;
  }

  BF_DEVICE float at(int i, int j) const {
    const int pixel = (threadIdx.x % kPixelGroups) * kPixelsPerThread + i;
    return out_s[pixel * kOutStride + (threadIdx.x / kPixelGroups) * kOut + j];
  }

  BF_DEVICE void store_partial(float* dst) const {
    const int warp = threadIdx.x / 32;
#pragma unroll
    for (int f = 0; f < kTiles; ++f)
      wmma::store_matrix_sync(dst + (warp % 4) * 16 * kCols + (warp / 4 + 2 * f) * 16, acc[f], kCols,
                              wmma::mem_row_major);
  }
};

// The epilogue's accumulators of a split K loop: the splits' partial sums, added in split
// order. Read through L2 (__ldcg): other SMs wrote them.
template <int kOut>
struct SplitSums {
  static constexpr int kCols = kOutGroups * kOut;
  const float* first;     // split 0's [kTilePixels][kCols] for this tile
  int64_t split_stride;   // floats between splits
  int k_splits;

  BF_DEVICE float at(int i, int j) const {
    const int pixel = (threadIdx.x % kPixelGroups) * kPixelsPerThread + i;
    const float* p = first + pixel * kCols + (threadIdx.x / kPixelGroups) * kOut + j;
    float sum = 0.f;
    for (int split = 0; split < k_splits; ++split) sum += __ldcg(p + split * split_stride);
    return sum;
  }
};

template <typename scalar_t, int kOut, Gemm kGemm>
using ChunkGemm = std::conditional_t<kGemm == Gemm::kFma, FmaGemm<kOut>,
                                     TensorCoreGemm<typename OperandOf<scalar_t, kGemm>::type, kOut>>;

// out = relu(acc + biases (+ residual x)) for the thread's pixels and outputs.
template <typename scalar_t, int kOut, typename Accumulators>
BF_DEVICE void store_tile(const Accumulators& acc, const GeParams<scalar_t>& p, const Tile& tile, bool stride1) {
  const int pixel_group = threadIdx.x % kPixelGroups, out_group = threadIdx.x / kPixelGroups;
#pragma unroll
  for (int i = 0; i < kPixelsPerThread; ++i) {
    const int q = pixel_group * kPixelsPerThread + i;
    const int oy = tile.oy0 + q / kTileW, ox = tile.ox0 + q % kTileW;
    if (oy >= p.out_height || ox >= p.out_width) continue;
    const int64_t pixel = (int64_t(tile.n) * p.out_height + oy) * p.out_width + ox;
#pragma unroll
    for (int j = 0; j < kOut; ++j) {
      const int o = tile.o0 + out_group * kOut + j;
      if (o >= p.cout) continue;
      float v = acc.at(i, j) + load_float(p.pw_bias, o);
      v += stride1 ? load_float(p.x, pixel * p.cout + o) : load_float(p.sc_pw_bias, o);
      p.out[pixel * p.cout + o] = static_cast<scalar_t>(relu_keeping_nan(v));
    }
  }
}

template <typename T>
BF_DEVICE T* shared_at(unsigned char* smem, size_t offset) {
  return reinterpret_cast<T*>(smem + offset);
}

// A block's shared-memory buffers, as shared_layout places them.
template <typename operand_t>
struct BlockBuffers {
  SharedLayout layout;
  operand_t *w, *e;
  float *conv, *conv1, *first, *halo;

  BF_DEVICE BlockBuffers(unsigned char* smem, int stride, int cols, bool tensor_cores, int halo_channels)
      : layout(shared_layout(stride, cols, sizeof(operand_t), tensor_cores, halo_channels)),
        w(shared_at<operand_t>(smem, layout.w)),
        e(shared_at<operand_t>(smem, layout.e)),
        conv(shared_at<float>(smem, layout.conv)),
        conv1(shared_at<float>(smem, layout.conv1)),
        first(shared_at<float>(smem, layout.first)),
        halo(shared_at<float>(smem, layout.halo)) {}
};

// After the K loop: the epilogue; or, with a split K loop, this block's partial sums, and
// the epilogue if it is the tile's last split to arrive.
template <typename scalar_t, int kOut, typename Accumulators>
BF_DEVICE void finish_tile(Accumulators& gemm, unsigned char* smem, const SharedLayout& layout,
                           const GeParams<scalar_t>& p, const Tile& tile, bool stride1) {
  if (p.k_splits == 1) {
    gemm.finish(shared_at<float>(smem, layout.out));
    store_tile<scalar_t, kOut>(gemm, p, tile, stride1);
    return;
  }
  constexpr int kTileFloats = kTilePixels * kOutGroups * kOut;
  const int64_t tile_id = int64_t(blockIdx.x) * p.cout_tiles + blockIdx.y;
  const int64_t split_stride = p.tiles * p.cout_tiles * kTileFloats;
  gemm.store_partial(p.partial + blockIdx.z * split_stride + tile_id * kTileFloats);
  __threadfence();  // this thread's partials are visible device-wide before the block counts as arrived
  __syncthreads();
  int* last = shared_at<int>(smem, layout.flag);
  if (threadIdx.x == 0) *last = atomicAdd(p.arrivals + tile_id, 1) == p.k_splits - 1;
  __syncthreads();
  if (!*last) return;
  __threadfence();  // and the other splits' partials are seen here
  store_tile<scalar_t, kOut>(SplitSums<kOut>{p.partial + tile_id * kTileFloats, split_stride, p.k_splits}, p, tile,
                             stride1);
}

// Stride 1: out = relu(x + pw(relu(dw(y)))); shared memory as shared_layout(1, ...).
template <typename scalar_t, int kOut, Gemm kGemm>
BF_DEVICE void ge_stride1_block(unsigned char* smem, const GeParams<scalar_t>& p) {
  constexpr int kCols = kOutGroups * kOut;
  const BlockBuffers<typename OperandOf<scalar_t, kGemm>::type> s(smem, 1, kCols, kGemm == Gemm::kTensorCores,
                                                                  p.halo_channels);
  const Tile tile = block_tile(p, kCols);
  ChunkGemm<scalar_t, kOut, kGemm> gemm;
  for (int m0 = blockIdx.z * kChunk; m0 < p.mid; m0 += p.k_splits * kChunk) {
    const int kc = p.mid - m0 < kChunk ? p.mid - m0 : kChunk;
    const int c_lo = m0 / p.ratio, channels = (m0 + kc - 1) / p.ratio - c_lo + 1;
    __syncthreads();  // the previous chunk's GEMM has read e_s and w_s
    stage_halo(s.halo, p.y, p.cin, p.height, p.width, tile.n, tile.oy0 - 1, tile.ox0 - 1, kTileH + 2, kHaloW, c_lo,
               channels);
    stage_conv3x3(s.conv, p.dw_weight, p.dw_bias, m0, kc);
    stage_projection<kCols>(s.w, p.pw_weight, p.mid, m0, kc, p.cout, tile.o0);
    __syncthreads();
    grouped_conv_chunk(
        s.e, kEStride, kTilePixels, s.halo, kHaloPositions, kHaloW, s.conv, m0, kc, p.ratio, c_lo, true,
        [](int q) { return (q / kTileW) * kHaloW + q % kTileW; }, [](int) { return true; });
    __syncthreads();
    gemm.accumulate(s.e, s.w);
  }
  finish_tile<scalar_t, kOut>(gemm, smem, s.layout, p, tile, true);
}

// Stride 2: out = relu(pw(relu(dw1(dw0(y)))) + sc_pw(sc_dw(x))); shared memory as
// shared_layout(2, ...).
template <typename scalar_t, int kOut, Gemm kGemm>
BF_DEVICE void ge_stride2_block(unsigned char* smem, const GeParams<scalar_t>& p) {
  using operand_t = typename OperandOf<scalar_t, kGemm>::type;
  constexpr int kCols = kOutGroups * kOut;
  const BlockBuffers<operand_t> s(smem, 2, kCols, kGemm == Gemm::kTensorCores, p.halo_channels);
  const Tile tile = block_tile(p, kCols);
  ChunkGemm<scalar_t, kOut, kGemm> gemm;
  // dw0's output at halo position (hy, hx) is at (oy0 - 1 + hy, ox0 - 1 + hx); its taps
  // are input pixels 2 * that - 1 + (0..2), so the input halo starts at 2 * oy0 - 3.
  const int first_row0 = tile.oy0 - 1, first_col0 = tile.ox0 - 1;
  auto first_inside = [&](int q) {
    const int oy = first_row0 + q / kHaloW, ox = first_col0 + q % kHaloW;
    return oy >= 0 && oy < p.out_height && ox >= 0 && ox < p.out_width;
  };
  // K items: the chunks of mid, then (the shortcut) those of cin; split z takes items
  // z, z + k_splits, ...
  const int main_chunks = (p.mid + kChunk - 1) / kChunk;
  int item = blockIdx.z;
  for (; item < main_chunks; item += p.k_splits) {
    const int m0 = item * kChunk;
    const int kc = p.mid - m0 < kChunk ? p.mid - m0 : kChunk;
    const int c_lo = m0 / p.ratio, channels = (m0 + kc - 1) / p.ratio - c_lo + 1;
    __syncthreads();  // the previous chunk's steps have read every buffer
    stage_halo(s.halo, p.y, p.cin, p.height, p.width, tile.n, 2 * first_row0 - 1, 2 * first_col0 - 1,
               2 * (kTileH + 2) + 1, kInputHaloW, c_lo, channels);
    stage_conv3x3(s.conv, p.dw_weight, p.dw_bias, m0, kc);
    stage_conv3x3(s.conv1, p.dw1_weight, p.dw1_bias, m0, kc);
    stage_projection<kCols>(s.w, p.pw_weight, p.mid, m0, kc, p.cout, tile.o0);
    __syncthreads();
    grouped_conv_chunk(
        s.first, kHaloPositions, kHaloPositions, s.halo, kInputHaloPositions, kInputHaloW, s.conv, m0, kc, p.ratio,
        c_lo, false, [](int q) { return 2 * (q / kHaloW) * kInputHaloW + 2 * (q % kHaloW); }, first_inside);
    __syncthreads();
    // dw1 is depthwise: channel k of s.first is its own input channel (ratio 1).
    grouped_conv_chunk(
        s.e, kEStride, kTilePixels, s.first, kHaloPositions, kHaloW, s.conv1, 0, kc, 1, 0, true,
        [](int q) { return (q / kTileW) * kHaloW + q % kTileW; }, [](int) { return true; });
    __syncthreads();
    gemm.accumulate(s.e, s.w);
  }
  // Shortcut: sc_dw (depthwise, stride 2, no ReLU) of x at the tile's pixels, chunk by
  // chunk of input channels, projected by sc_pw into the same accumulators. Its taps come
  // straight from global memory (cached): the shortcut is cin channels, not mid.
  for (; (item - main_chunks) * kChunk < p.cin; item += p.k_splits) {
    const int c0 = (item - main_chunks) * kChunk;
    const int kc = p.cin - c0 < kChunk ? p.cin - c0 : kChunk;
    __syncthreads();
    stage_conv3x3(s.conv, p.sc_dw_weight, p.sc_dw_bias, c0, kc);
    stage_projection<kCols>(s.w, p.sc_pw_weight, p.cin, c0, kc, p.cout, tile.o0);
    __syncthreads();
    for (int i = threadIdx.x; i < kChunk * kTilePixels; i += kThreads) {
      const int k = i / kTilePixels, q = i % kTilePixels;
      float v = 0.f;
      if (k < kc) {
        const int iy0 = 2 * (tile.oy0 + q / kTileW) - 1, ix0 = 2 * (tile.ox0 + q % kTileW) - 1;
        float taps[9];
#pragma unroll
        for (int t = 0; t < 9; ++t) {
          const int iy = iy0 + t / 3, ix = ix0 + t % 3;
          const bool inside = iy >= 0 && iy < p.height && ix >= 0 && ix < p.width;
          taps[t] = inside ? load_float(p.x, ((int64_t(tile.n) * p.height + iy) * p.width + ix) * p.cin + c0 + k) : 0.f;
        }
        v = conv3x3(taps, s.conv + k * kConvStride);
      }
      s.e[k * kEStride + q] = to_operand<operand_t>(v);
    }
    __syncthreads();
    gemm.accumulate(s.e, s.w);
  }
  finish_tile<scalar_t, kOut>(gemm, smem, s.layout, p, tile, false);
}

// The block code of a stride-kStride layer.
template <int kStride, typename scalar_t, int kOut, Gemm kGemm>
BF_DEVICE void ge_layer_block(unsigned char* smem, const GeParams<scalar_t>& p) {
  if constexpr (kStride == 1) {
    ge_stride1_block<scalar_t, kOut, kGemm>(smem, p);
  } else {
    ge_stride2_block<scalar_t, kOut, kGemm>(smem, p);
  }
}

}  // namespace ge_cuda
}  // namespace bisenet_fast
