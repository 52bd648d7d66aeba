// The CUDA GE-layer kernels' block code and launch plan (formula and schema in csrc/ops.cpp),
// kept apart from the launches in ge_layer.cu so that tests/cuda_emulation can compile this
// same code for the CPU and run it block by block with real threads and barriers: the
// shared-memory indexing and synchronisation are tested without a GPU. So this file uses
// only threadIdx, blockIdx, __syncthreads, the BF_DEVICE functions and plain C++.
//
// A block owns a tile of kTileH x kTileW output pixels (NHWC) and a tile of output
// channels. It walks the expanded (mid) channels in chunks of kChunk, in PyTorch's order
// (channel m reads input channel m / ratio), and per chunk:
//   1. stages the input pixels the chunk's 3x3 convs read (its halo, its few input
//      channels) and the chunk's weights in shared memory;
//   2. computes the chunk's expanded values for the tile's pixels into shared memory:
//      stride 1: relu(dw(y)); stride 2: dw0(y) on the tile's halo at the output
//      resolution (zero outside the map: dw1's padding), then relu(dw1(.)) at its pixels;
//   3. adds their 1x1 projection into per-thread float32 accumulators (each thread: 4
//      pixels x kOut output channels, a register-tiled GEMM reading shared memory).
// Stride 2 then runs the shortcut's depthwise conv of x through the same GEMM, chunk by
// chunk of input channels. The epilogue adds the biases and the residual (stride 1) and
// writes relu(.). No expanded value ever reaches global memory; all arithmetic is float32
// FMA (exact float32 projections, no TF32), for float32, float16 and bfloat16 tensors.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cmath>
#include <cstdint>

#include "common/macros.h"

namespace bisenet_fast {
namespace ge_cuda {

constexpr int kThreads = 256;
constexpr int kTileH = 8;
constexpr int kTileW = 8;
constexpr int kTilePixels = kTileH * kTileW;
constexpr int kPixelsPerThread = 4;  // GEMM rows per thread: consecutive pixels of a tile row
constexpr int kPixelGroups = kTilePixels / kPixelsPerThread;
constexpr int kOutGroups = kThreads / kPixelGroups;  // threads sharing a pixel group
constexpr int kChunk = 32;                            // expanded channels per step of the K loop
// Step 2 gives each thread consecutive channels of one pixel: with ratio 6, 8 channels read
// 2 or 3 input channels, so their 9 taps are loaded 2 or 3 times instead of 8.
constexpr int kChannelGroups = kThreads / kTilePixels;
constexpr int kChannelsPerThread = kChunk / kChannelGroups;
static_assert(kTileW % kPixelsPerThread == 0, "a GEMM row group stays in one tile row");
static_assert(kChannelGroups * kChannelsPerThread == kChunk, "step 2 covers the chunk");

// Halos: stride 1 reads y around the tile; stride 2 computes dw0 on the tile's halo at
// the output resolution, which reads y on (2 * (kTileH + 2) + 1)^2 input pixels.
constexpr int kHaloW = kTileW + 2;
constexpr int kHaloPositions = (kTileH + 2) * kHaloW;
constexpr int kInputHaloW = 2 * kHaloW + 1;
constexpr int kInputHaloPositions = (2 * (kTileH + 2) + 1) * kInputHaloW;

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
};

// How a call is launched: grid (tiles, cout_tiles) of kThreads threads, each thread
// accumulating kPixelsPerThread x out_per_thread outputs.
struct GeLaunch {
  int64_t tiles;
  int cout_tiles;
  int out_per_thread;  // 2, 4 or 8: the kernel's kOut
  int halo_channels;
  size_t shared_bytes;
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Floats of shared memory a block uses (the layout is in ge_stride1_block/ge_stride2_block).
inline int64_t shared_floats(int stride, int out_per_thread, int halo_channels) {
  const int64_t common = int64_t(kChunk) * kOutGroups * out_per_thread + kChunk * kTilePixels + kChunk * 10;
  if (stride == 1) return common + int64_t(halo_channels) * kHaloPositions;
  return common + kChunk * 10 + kChunk * kHaloPositions + int64_t(halo_channels) * kInputHaloPositions;
}

// The widest output-channel tile (up to 128 = kOutGroups x 8) that covers cout, halved
// while the grid has fewer blocks than the GPU has SMs, down to 32 channels: narrower
// tiles recompute the chunk's expanded values once more per tile, and at 2 outputs per
// thread the GEMM already issues one shared load per 4 FMAs.
inline GeLaunch plan_launch(int stride, int64_t batch, int64_t out_height, int64_t out_width, int64_t cin,
                            int64_t ratio, int64_t cout, int sm_count) {
  GeLaunch launch{};
  launch.tiles = batch * ceil_div(out_height, kTileH) * ceil_div(out_width, kTileW);
  int out_per_thread = 2;
  while (out_per_thread < 8 && int64_t(kOutGroups) * out_per_thread < cout) out_per_thread *= 2;
  while (out_per_thread > 2 && launch.tiles * ceil_div(cout, int64_t(kOutGroups) * out_per_thread) < sm_count)
    out_per_thread /= 2;
  launch.out_per_thread = out_per_thread;
  launch.cout_tiles = static_cast<int>(ceil_div(cout, int64_t(kOutGroups) * out_per_thread));
  // A chunk of kChunk consecutive expanded channels reads at most (kChunk - 1) / ratio + 2
  // input channels (floor((m0 + kChunk - 1) / r) - floor(m0 / r) + 1).
  launch.halo_channels = static_cast<int>(std::min<int64_t>(cin, (kChunk - 1) / ratio + 2));
  launch.shared_bytes = sizeof(float) * shared_floats(stride, out_per_thread, launch.halo_channels);
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

// w_s[k][t] and b_s[k] for the chunk's channels k0 .. k0 + kc - 1 of a (channels, 9)
// 3x3 weight; 0 beyond kc.
template <typename scalar_t>
BF_DEVICE void stage_conv3x3(float* w_s, float* b_s, const scalar_t* weight, const scalar_t* bias, int k0, int kc) {
  for (int i = threadIdx.x; i < kChunk * 9; i += kThreads)
    w_s[i] = i < kc * 9 ? load_float(weight, int64_t(k0) * 9 + i) : 0.f;
  for (int k = threadIdx.x; k < kChunk; k += kThreads) b_s[k] = k < kc ? load_float(bias, k0 + k) : 0.f;
}

// w_s[k][o] = weight[o0 + o][k0 + k] of a (cout, depth) projection, 0 beyond kc or cout.
// Consecutive threads write consecutive o (no bank conflicts); the transposed reads hit
// L2, where the layer's few hundred KB of weights stay.
template <typename scalar_t, int kOut>
BF_DEVICE void stage_projection(float* w_s, const scalar_t* weight, int depth, int k0, int kc, int cout, int o0) {
  constexpr int kCols = kOutGroups * kOut;
  for (int i = threadIdx.x; i < kChunk * kCols; i += kThreads) {
    const int k = i / kCols, o = i % kCols;
    w_s[i] = k < kc && o0 + o < cout ? load_float(weight, int64_t(o0 + o) * depth + k0 + k) : 0.f;
  }
}

template <int kCount>
BF_DEVICE void load_shared(float (&v)[kCount], const float* p) {
#if defined(__CUDACC__)
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
#else
  for (int i = 0; i < kCount; ++i) v[i] = p[i];
#endif
}

// acc[i][j] += sum_k e_s[k][pixel i] * w_s[k][output j] over the chunk: the thread's 4
// pixels (one 16-byte load per k) and kOut outputs (kOut / 4 16-byte loads).
template <int kOut>
BF_DEVICE void accumulate_chunk(float (&acc)[kPixelsPerThread][kOut], const float* e_s, const float* w_s) {
  constexpr int kCols = kOutGroups * kOut;
  const int pixel_group = threadIdx.x % kPixelGroups, out_group = threadIdx.x / kPixelGroups;
#pragma unroll 4
  for (int k = 0; k < kChunk; ++k) {
    float e[kPixelsPerThread], w[kOut];
    load_shared(e, e_s + k * kTilePixels + pixel_group * kPixelsPerThread);
    load_shared(w, w_s + k * kCols + out_group * kOut);
#pragma unroll
    for (int i = 0; i < kPixelsPerThread; ++i)
#pragma unroll
      for (int j = 0; j < kOut; ++j) acc[i][j] = fmaf(e[i], w[j], acc[i][j]);
  }
}

// The 3x3 taps whose top-left one is at position `base` of a halo row `halo_w` wide.
BF_DEVICE void load_taps(float (&taps)[9], const float* row, int base, int halo_w) {
#pragma unroll
  for (int t = 0; t < 9; ++t) taps[t] = row[base + (t / 3) * halo_w + (t % 3)];
}

BF_DEVICE float conv3x3(const float (&taps)[9], const float* w, float bias) {
  float v = bias;
#pragma unroll
  for (int t = 0; t < 9; ++t) v = fmaf(w[t], taps[t], v);
  return v;
}

// Step 2 of a grouped 3x3 conv (expanded channel m reads input channel m / ratio) over a
// staged halo: out_s[k][q] for the chunk's kChunk channels at `positions` output
// positions, position q's taps starting at halo position base_of(q). Each thread takes kChannelsPerThread consecutive channels of one position and
// reloads the taps only when their input channel changes (a warp's channels agree, so the
// branch is uniform). inside(q) false: 0 (padding of the next conv); relu as asked.
template <typename BaseOf, typename Inside>
BF_DEVICE void grouped_conv_chunk(float* out_s, int positions, const float* halo_s, int halo_positions, int halo_w,
                                  const float* w_s, const float* b_s, int m0, int kc, int ratio, int c_lo,
                                  bool relu, BaseOf base_of, Inside inside) {
  for (int i = threadIdx.x; i < kChannelGroups * positions; i += kThreads) {
    const int group = i / positions, q = i % positions;
    const bool valid = inside(q);
    const int base = base_of(q);
    int loaded = -1;
    float taps[9];
#pragma unroll
    for (int j = 0; j < kChannelsPerThread; ++j) {
      const int k = group * kChannelsPerThread + j;
      float v = 0.f;
      if (valid && k < kc) {
        const int c = (m0 + k) / ratio - c_lo;
        if (c != loaded) {
          load_taps(taps, halo_s + c * halo_positions, base, halo_w);
          loaded = c;
        }
        v = conv3x3(taps, w_s + k * 9, b_s[k]);
        if (relu) v = fmaxf(v, 0.f);
      }
      out_s[k * positions + q] = v;
    }
  }
}

// out = relu(acc + biases (+ residual x)) for the thread's pixels and outputs.
template <typename scalar_t, int kOut>
BF_DEVICE void store_tile(const float (&acc)[kPixelsPerThread][kOut], const GeParams<scalar_t>& p, const Tile& tile,
                          bool stride1) {
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
      float v = acc[i][j] + load_float(p.pw_bias, o);
      v += stride1 ? load_float(p.x, pixel * p.cout + o) : load_float(p.sc_pw_bias, o);
      p.out[pixel * p.cout + o] = static_cast<scalar_t>(fmaxf(v, 0.f));
    }
  }
}

// Stride 1: out = relu(x + pw(relu(dw(y)))). Shared memory (floats):
//   w_s [kChunk][kOutGroups * kOut] | e_s [kChunk][kTilePixels] | dw_s [kChunk][9] |
//   dwb_s [kChunk] | halo_s [halo_channels][kHaloPositions]
template <typename scalar_t, int kOut>
BF_DEVICE void ge_stride1_block(float* smem, const GeParams<scalar_t>& p) {
  constexpr int kCols = kOutGroups * kOut;
  float* w_s = smem;
  float* e_s = w_s + kChunk * kCols;
  float* dw_s = e_s + kChunk * kTilePixels;
  float* dwb_s = dw_s + kChunk * 9;
  float* halo_s = dwb_s + kChunk;
  const Tile tile = block_tile(p, kCols);
  float acc[kPixelsPerThread][kOut] = {};
  for (int m0 = 0; m0 < p.mid; m0 += kChunk) {
    const int kc = p.mid - m0 < kChunk ? p.mid - m0 : kChunk;
    const int c_lo = m0 / p.ratio, channels = (m0 + kc - 1) / p.ratio - c_lo + 1;
    __syncthreads();  // the previous chunk's GEMM has read e_s and w_s
    stage_halo(halo_s, p.y, p.cin, p.height, p.width, tile.n, tile.oy0 - 1, tile.ox0 - 1, kTileH + 2, kHaloW, c_lo,
               channels);
    stage_conv3x3(dw_s, dwb_s, p.dw_weight, p.dw_bias, m0, kc);
    stage_projection<scalar_t, kOut>(w_s, p.pw_weight, p.mid, m0, kc, p.cout, tile.o0);
    __syncthreads();
    grouped_conv_chunk(
        e_s, kTilePixels, halo_s, kHaloPositions, kHaloW, dw_s, dwb_s, m0, kc, p.ratio, c_lo, true,
        [](int q) { return (q / kTileW) * kHaloW + q % kTileW; }, [](int) { return true; });
    __syncthreads();
    accumulate_chunk(acc, e_s, w_s);
  }
  store_tile(acc, p, tile, true);
}

// Stride 2: out = relu(pw(relu(dw1(dw0(y)))) + sc_pw(sc_dw(x))). Shared memory (floats):
//   w_s | e_s | dw_s | dwb_s (as stride 1, for dw0) | dw1_s [kChunk][9] | dw1b_s [kChunk] |
//   first_s [kChunk][kHaloPositions] (dw0 on the tile's halo) |
//   halo_s [halo_channels][kInputHaloPositions]
template <typename scalar_t, int kOut>
BF_DEVICE void ge_stride2_block(float* smem, const GeParams<scalar_t>& p) {
  constexpr int kCols = kOutGroups * kOut;
  float* w_s = smem;
  float* e_s = w_s + kChunk * kCols;
  float* dw_s = e_s + kChunk * kTilePixels;
  float* dwb_s = dw_s + kChunk * 9;
  float* dw1_s = dwb_s + kChunk;
  float* dw1b_s = dw1_s + kChunk * 9;
  float* first_s = dw1b_s + kChunk;
  float* halo_s = first_s + kChunk * kHaloPositions;
  const Tile tile = block_tile(p, kCols);
  float acc[kPixelsPerThread][kOut] = {};
  // dw0's output at halo position (hy, hx) is at (oy0 - 1 + hy, ox0 - 1 + hx); its taps
  // are input pixels 2 * that - 1 + (0..2), so the input halo starts at 2 * oy0 - 3.
  const int first_row0 = tile.oy0 - 1, first_col0 = tile.ox0 - 1;
  auto first_inside = [&](int q) {
    const int oy = first_row0 + q / kHaloW, ox = first_col0 + q % kHaloW;
    return oy >= 0 && oy < p.out_height && ox >= 0 && ox < p.out_width;
  };
  for (int m0 = 0; m0 < p.mid; m0 += kChunk) {
    const int kc = p.mid - m0 < kChunk ? p.mid - m0 : kChunk;
    const int c_lo = m0 / p.ratio, channels = (m0 + kc - 1) / p.ratio - c_lo + 1;
    __syncthreads();  // the previous chunk's steps have read every buffer
    stage_halo(halo_s, p.y, p.cin, p.height, p.width, tile.n, 2 * first_row0 - 1, 2 * first_col0 - 1,
               2 * (kTileH + 2) + 1, kInputHaloW, c_lo, channels);
    stage_conv3x3(dw_s, dwb_s, p.dw_weight, p.dw_bias, m0, kc);
    stage_conv3x3(dw1_s, dw1b_s, p.dw1_weight, p.dw1_bias, m0, kc);
    stage_projection<scalar_t, kOut>(w_s, p.pw_weight, p.mid, m0, kc, p.cout, tile.o0);
    __syncthreads();
    grouped_conv_chunk(
        first_s, kHaloPositions, halo_s, kInputHaloPositions, kInputHaloW, dw_s, dwb_s, m0, kc, p.ratio, c_lo, false,
        [](int q) { return 2 * (q / kHaloW) * kInputHaloW + 2 * (q % kHaloW); }, first_inside);
    __syncthreads();
    // dw1 is depthwise: channel k of first_s is its own "input channel" (ratio 1, c_lo m0).
    grouped_conv_chunk(
        e_s, kTilePixels, first_s, kHaloPositions, kHaloW, dw1_s, dw1b_s, 0, kc, 1, 0, true,
        [](int q) { return (q / kTileW) * kHaloW + q % kTileW; }, [](int) { return true; });
    __syncthreads();
    accumulate_chunk(acc, e_s, w_s);
  }
  // Shortcut: sc_dw (depthwise, stride 2, no ReLU) of x at the tile's pixels, chunk by
  // chunk of input channels, projected by sc_pw into the same accumulators. Its taps come
  // straight from global memory (cached): the shortcut is cin channels, not mid.
  for (int c0 = 0; c0 < p.cin; c0 += kChunk) {
    const int kc = p.cin - c0 < kChunk ? p.cin - c0 : kChunk;
    __syncthreads();
    stage_conv3x3(dw_s, dwb_s, p.sc_dw_weight, p.sc_dw_bias, c0, kc);
    stage_projection<scalar_t, kOut>(w_s, p.sc_pw_weight, p.cin, c0, kc, p.cout, tile.o0);
    __syncthreads();
    for (int i = threadIdx.x; i < kChunk * kTilePixels; i += kThreads) {
      const int k = i / kTilePixels, q = i % kTilePixels;
      float v = 0.f;
      if (k < kc) {
        const int iy0 = 2 * (tile.oy0 + q / kTileW) - 1, ix0 = 2 * (tile.ox0 + q % kTileW) - 1;
        v = dwb_s[k];
#pragma unroll
        for (int t = 0; t < 9; ++t) {
          const int iy = iy0 + t / 3, ix = ix0 + t % 3;
          if (iy >= 0 && iy < p.height && ix >= 0 && ix < p.width)
            v = fmaf(dw_s[k * 9 + t], load_float(p.x, ((int64_t(tile.n) * p.height + iy) * p.width + ix) * p.cin + c0 + k), v);
        }
      }
      e_s[i] = v;
    }
    __syncthreads();
    accumulate_chunk(acc, e_s, w_s);
  }
  store_tile(acc, p, tile, false);
}

}  // namespace ge_cuda
}  // namespace bisenet_fast
