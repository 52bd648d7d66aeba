// Dense 3x3 convolution, stride 1, padding 1, with bias and optional ReLU, by Winograd's
// minimal filtering F(2x2, 3x3) (Lavin & Gray, 2016), inference only, on the CPU.
//
// Why: on the CPU the fused model's time is mostly oneDNN's direct 3x3 convs, which run
// near the cores' peak FLOP rate already. F(2x2, 3x3) produces each 2x2 output tile from
// a 4x4 input tile with 16 multiplies per (input, output) channel pair instead of 36, so
// the GEMM work drops 2.25x; the transforms are additions only.
//
//   V_k = (B^T d B)_k   per input tile d (4x4, zero padded) and input channel   k = 0..15
//   M_k = V_k @ U_k     one GEMM per k: (tiles, cin) @ (cin, cout)
//   y   = A^T M A + bias (then ReLU)   per output tile (2x2) and output channel
//
// U (16, cin, cout) = G g G^T is transformed once, when the model is fused
// (bisenet_fast/ops/conv3x3_winograd.py). Data are channels_last (NHWC), so every
// transform is a run over contiguous channels that vectorises. Tiles are processed in
// blocks small enough that a block's V and M stay in cache between the transforms and its
// GEMMs; each thread owns its blocks and its (reused) buffers.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "common/macros.h"

namespace bisenet_fast {
namespace {

constexpr int64_t kPoints = 16;  // Winograd-domain points of F(2x2, 3x3), one per value of a 4x4 input tile
// Tile blocks: a block's V and M should stay in cache between the transforms and the
// GEMMs (4-16 MiB measured alike on a 2-core Zen 4; larger blocks are slower), while each
// GEMM needs enough rows (tiles) to amortise packing the weight it multiplies.
constexpr int64_t kBlockBytes = 4 << 20;
constexpr int64_t kMinBlockTiles = 64;
constexpr int64_t kMaxBlockTiles = 256;

// V = B^T d B for one tile over `cin` contiguous channels. d[4 * i + j] points at the input
// pixel (row i, column j of the tile) or at a zero row in the padding; output point k is
// written to v + k * plane.
//   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]
template <typename scalar_t>
BF_CPU_CLONES void input_transform(const scalar_t* const* d, scalar_t* v, int64_t plane, int64_t cin) {
#pragma GCC ivdep  // v never overlaps the input rows; lets GCC vectorise over c
  for (int64_t c = 0; c < cin; ++c) {
    scalar_t t[4][4];  // t = B^T d: combine rows
    for (int j = 0; j < 4; ++j) {
      const scalar_t d0 = d[j][c], d1 = d[4 + j][c], d2 = d[8 + j][c], d3 = d[12 + j][c];
      t[0][j] = d0 - d2;
      t[1][j] = d1 + d2;
      t[2][j] = d2 - d1;
      t[3][j] = d1 - d3;
    }
    for (int i = 0; i < 4; ++i) {  // (B^T d) B: combine columns
      scalar_t* out = v + 4 * i * plane + c;
      out[0] = t[i][0] - t[i][2];
      out[plane] = t[i][1] + t[i][2];
      out[2 * plane] = t[i][2] - t[i][1];
      out[3 * plane] = t[i][1] - t[i][3];
    }
  }
}

// y = A^T M A + bias (ReLU if `relu`) for one tile over `cout` contiguous channels; point k
// of M is at m + k * plane; y[2 * i + j] is the output pixel (row i, column j of the tile),
// or a scratch row outside the image (branch-free stores vectorise).
//   A^T = [1 1 1 0; 0 1 -1 -1]
template <typename scalar_t>
BF_CPU_CLONES void output_transform(const scalar_t* m, int64_t plane, const scalar_t* bias, scalar_t* const* y,
                                    int64_t cout, bool relu) {
  const scalar_t lower = relu ? scalar_t(0) : -std::numeric_limits<scalar_t>::infinity();
#pragma GCC ivdep  // the output rows never overlap m or bias
  for (int64_t o = 0; o < cout; ++o) {
    scalar_t t[2][4];  // t = A^T M: combine rows
    for (int j = 0; j < 4; ++j) {
      const scalar_t m0 = m[j * plane + o], m1 = m[(4 + j) * plane + o], m2 = m[(8 + j) * plane + o],
                     m3 = m[(12 + j) * plane + o];
      t[0][j] = m0 + m1 + m2;
      t[1][j] = m1 - m2 - m3;
    }
    for (int i = 0; i < 2; ++i) {  // (A^T M) A: combine columns
      const scalar_t left = t[i][0] + t[i][1] + t[i][2] + bias[o];
      const scalar_t right = t[i][1] - t[i][2] - t[i][3] + bias[o];
      y[2 * i][o] = std::max(left, lower);
      y[2 * i + 1][o] = std::max(right, lower);
    }
  }
}

// This thread's scratch memory, at least `size` values, kept between calls: fresh buffers
// of this size would be page-faulted in (and zeroed) on every call.
template <typename scalar_t>
scalar_t* thread_scratch(size_t size) {
  thread_local std::vector<scalar_t> buffer;
  if (buffer.size() < size) buffer.resize(size);
  return buffer.data();
}

// Tiles per block: as many as fit kBlockBytes within [kMinBlockTiles, kMaxBlockTiles],
// but fewer when that would leave threads without a block.
int64_t block_tiles(int64_t n_tiles, int64_t cin, int64_t cout, int64_t element_size) {
  const int64_t fit = std::clamp(kBlockBytes / (kPoints * (cin + cout) * element_size), kMinBlockTiles, kMaxBlockTiles);
  const int64_t threads = at::get_num_threads();
  return std::max<int64_t>(1, std::min(fit, (n_tiles + threads - 1) / threads));
}

// Distance between the 16 planes of a V or M buffer holding `values` each. A distance that
// is a multiple of 2 KiB maps all 16 planes the transforms touch together onto one or two
// L1 cache sets (8 ways), which evict each other; one extra cache line spreads them.
int64_t plane_stride(int64_t values, int64_t element_size) {
  const int64_t line = 64 / element_size;
  const int64_t stride = (values + line - 1) / line * line;
  return (stride * element_size) % 2048 == 0 ? stride + line : stride;
}

at::Tensor conv3x3_winograd_cpu(const at::Tensor& x, const at::Tensor& packed_weight, const at::Tensor& bias,
                                bool relu) {
  c10::InferenceMode inference_guard;
  const char* op = "conv3x3_winograd";
  for (const auto& [name, t] : {std::pair{"x", &x}, {"packed_weight", &packed_weight}, {"bias", &bias}}) {
    TORCH_CHECK(t->device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t->device());
    TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kDouble, op, ": ", name,
                " must be float32 or float64, got ", t->scalar_type());
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype ", x.scalar_type(),
                ", got ", t->scalar_type());
  }
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (N, C, H, W), got ", x.sizes());
  const int64_t n_batch = x.size(0), cin = x.size(1), height = x.size(2), width = x.size(3);
  TORCH_CHECK(packed_weight.dim() == 3 && packed_weight.size(0) == kPoints && packed_weight.size(1) == cin &&
                  packed_weight.size(2) > 0,
              op, ": packed_weight must have shape (16, ", cin, ", cout), got ", packed_weight.sizes());
  const int64_t cout = packed_weight.size(2);
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == cout, op, ": bias must have shape (", cout, "), got ",
              bias.sizes());

  auto out = at::empty({n_batch, cout, height, width}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;
  const auto input = x.contiguous(at::MemoryFormat::ChannelsLast);
  const auto weight = packed_weight.contiguous();
  const auto bias_c = bias.contiguous();
  const int64_t tiles_h = (height + 1) / 2, tiles_w = (width + 1) / 2;
  const int64_t n_tiles = n_batch * tiles_h * tiles_w;

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv3x3_winograd", [&] {
    const scalar_t* xp = input.data_ptr<scalar_t>();
    const scalar_t* bp = bias_c.data_ptr<scalar_t>();
    scalar_t* yp = out.data_ptr<scalar_t>();
    const int64_t block = block_tiles(n_tiles, cin, cout, sizeof(scalar_t));
    const int64_t n_blocks = (n_tiles + block - 1) / block;
    const int64_t v_plane = plane_stride(block * cin, sizeof(scalar_t));
    const int64_t m_plane = plane_stride(block * cout, sizeof(scalar_t));
    const std::vector<scalar_t> zeros(cin, scalar_t(0));
    const auto options = at::TensorOptions().dtype(x.scalar_type());

    at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
      scalar_t* v = thread_scratch<scalar_t>(kPoints * (v_plane + m_plane) + cout);
      scalar_t* m = v + kPoints * v_plane;
      scalar_t* outside = m + kPoints * m_plane;
      for (int64_t b = begin; b < end; ++b) {
        const int64_t first = b * block, count = std::min(block, n_tiles - first);
        for (int64_t t = 0; t < count; ++t) {
          const int64_t tile = first + t;
          const int64_t tx = tile % tiles_w, ty = (tile / tiles_w) % tiles_h, n = tile / (tiles_w * tiles_h);
          const scalar_t* d[kPoints];
          for (int i = 0; i < 4; ++i) {
            const int64_t iy = 2 * ty - 1 + i;
            for (int j = 0; j < 4; ++j) {
              const int64_t ix = 2 * tx - 1 + j;
              const bool inside = iy >= 0 && iy < height && ix >= 0 && ix < width;
              d[4 * i + j] = inside ? xp + ((n * height + iy) * width + ix) * cin : zeros.data();
            }
          }
          input_transform(d, v + t * cin, v_plane, cin);
        }
        for (int64_t k = 0; k < kPoints; ++k) {
          auto m_k = at::from_blob(m + k * m_plane, {count, cout}, options);
          at::mm_out(m_k, at::from_blob(v + k * v_plane, {count, cin}, options), weight[k]);
        }
        for (int64_t t = 0; t < count; ++t) {
          const int64_t tile = first + t;
          const int64_t tx = tile % tiles_w, ty = (tile / tiles_w) % tiles_h, n = tile / (tiles_w * tiles_h);
          scalar_t* y[4];
          for (int i = 0; i < 2; ++i) {
            for (int j = 0; j < 2; ++j) {
              const int64_t oy = 2 * ty + i, ox = 2 * tx + j;
              y[2 * i + j] = (oy < height && ox < width) ? yp + ((n * height + oy) * width + ox) * cout : outside;
            }
          }
          output_transform(m + t * cout, m_plane, bp, y, cout, relu);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bisenet_fast, CPU, m) {
  m.impl("conv3x3_winograd", &conv3x3_winograd_cpu);
}

}  // namespace bisenet_fast
