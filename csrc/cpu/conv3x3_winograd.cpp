// Dense 3x3 convolution, stride 1, padding 1, with bias and optional ReLU, by Winograd's
// minimal filtering F(m x m, 3x3) with m = 2 or 4 (Lavin & Gray, 2016), inference only, on
// the CPU.
//
// Why: on the CPU the fused model's time is mostly oneDNN's direct 3x3 convs, which run
// near the cores' peak FLOP rate already. F(m x m, 3x3) produces each m x m output tile
// from an (m+2) x (m+2) input tile with (m+2)^2 multiplies per (input, output) channel
// pair instead of 9 m^2: 2.25x fewer for m = 2, 4x fewer for m = 4, whose transforms'
// larger coefficients cost some accuracy (float32: ~1e-6 of a conv's output scale for
// m = 2, up to ~1e-5 for m = 4); the transforms are a few adds and multiplies by constants.
//
//   V_k = (B^T d B)_k   per input tile d (zero padded) and input channel    k < (m+2)^2
//   M_k = V_k @ U_k     one GEMM per point k: (tiles, cin) @ (cin, cout)
//   y   = A^T M A + bias (then ReLU)   per output tile and output channel
//
// U ((m+2)^2, cin, cout) = G g G^T is transformed once, when the model is fused
// (bisenet_fast/ops/conv3x3_winograd.py). Data are channels_last (NHWC), so every
// transform is a run over contiguous channels that vectorises. Tiles are processed in
// blocks small enough that a block's V and M stay in cache between the transforms and its
// GEMMs; each thread owns its blocks and its (reused) buffers.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "common/inference_only.h"
#include "common/macros.h"
#include "cpu/huge_pages.h"

namespace bisenet_fast {
namespace {

// Tile blocks: a block's V and M should stay in cache between the transforms and the
// GEMMs (4-16 MiB measured alike on a 2-core Zen 4; larger blocks are slower), while each
// GEMM needs enough rows (tiles) to amortise packing the weight it multiplies.
constexpr int64_t kBlockBytes = 4 << 20;
constexpr int64_t kMinBlockTiles = 64;
constexpr int64_t kMaxBlockTiles = 256;

// The transforms work on kLanes channels at a time: every value below is a row of kLanes
// lanes, and each formula is a fixed-length loop over the lanes, which GCC vectorises
// (written per channel, the 36 values of an F(4x4) tile stayed scalar).
constexpr int kLanes = 16;
template <typename T>
using Lanes = T[kLanes];

// Copies between channel rows and lane rows. The full-width case is a fixed 16-value loop,
// which compiles to vector moves; a loop of runtime length `lanes` is turned into a memcpy
// call by GCC, and those calls (four per point and lane block) took ~10 % of the model.
template <typename T>
inline void copy_lanes(const T* src, int lanes, T* dst) {
  if (lanes == kLanes) {
    for (int l = 0; l < kLanes; ++l) dst[l] = src[l];
    return;
  }
  for (int l = 0; l < lanes; ++l) dst[l] = src[l];
}

// A lane row from `lanes` channels, the unused lanes zero.
template <typename T>
inline void load_lanes(const T* src, int lanes, T* dst) {
  copy_lanes(src, lanes, dst);
  for (int l = lanes; l < kLanes; ++l) dst[l] = T(0);
}

// ---- F(2x2, 3x3): 4x4 input tiles, 16 points -------------------------------------------
//   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]      A^T = [1 1 1 0; 0 1 -1 -1]

// v = B^T d for one 4-vector (a column or a row of the tile): d[s * stride], v[s * v_stride].
template <typename T>
inline void input_1d_f2(const Lanes<T>* d, int stride, Lanes<T>* v, int v_stride) {
  for (int l = 0; l < kLanes; ++l) {
    const T d0 = d[0][l], d1 = d[stride][l], d2 = d[2 * stride][l], d3 = d[3 * stride][l];
    v[0][l] = d0 - d2;
    v[v_stride][l] = d1 + d2;
    v[2 * v_stride][l] = d2 - d1;
    v[3 * v_stride][l] = d1 - d3;
  }
}

// y = A^T m for one 4-vector.
template <typename T>
inline void output_1d_f2(const Lanes<T>* m, int stride, Lanes<T>* y, int y_stride) {
  for (int l = 0; l < kLanes; ++l) {
    const T m1 = m[stride][l], m2 = m[2 * stride][l];
    y[0][l] = m[0][l] + m1 + m2;
    y[y_stride][l] = m1 - m2 - m[3 * stride][l];
  }
}

// ---- F(4x4, 3x3): 6x6 input tiles, 36 points (interpolation points 0, +-1, +-2, inf) ----
//   B^T = [4  0 -5  0 1 0;  0 -4 -4  1 1 0;  0 4 -4 -1 1 0;
//          0 -2 -1  2 1 0;  0  2 -1 -2 1 0;  0 4  0 -5 0 1]
//   A^T = [1 1 1 1 1 0;  0 1 -1 2 -2 0;  0 1 1 4 4 0;  0 1 -1 8 -8 1]

template <typename T>
inline void input_1d_f4(const Lanes<T>* d, int stride, Lanes<T>* v, int v_stride) {
  for (int l = 0; l < kLanes; ++l) {
    const T d0 = d[0][l], d1 = d[stride][l], d2 = d[2 * stride][l], d3 = d[3 * stride][l], d4 = d[4 * stride][l],
            d5 = d[5 * stride][l];
    v[0][l] = T(4) * d0 - T(5) * d2 + d4;
    v[v_stride][l] = (d4 + d3) - T(4) * (d1 + d2);
    v[2 * v_stride][l] = (d4 - d3) + T(4) * (d1 - d2);
    v[3 * v_stride][l] = (d4 - d2) + T(2) * (d3 - d1);
    v[4 * v_stride][l] = (d4 - d2) - T(2) * (d3 - d1);
    v[5 * v_stride][l] = T(4) * d1 - T(5) * d3 + d5;
  }
}

template <typename T>
inline void output_1d_f4(const Lanes<T>* m, int stride, Lanes<T>* y, int y_stride) {
  for (int l = 0; l < kLanes; ++l) {
    const T a = m[stride][l] + m[2 * stride][l], b = m[stride][l] - m[2 * stride][l];
    const T c = m[3 * stride][l] + m[4 * stride][l], e = m[3 * stride][l] - m[4 * stride][l];
    y[0][l] = m[0][l] + a + c;
    y[y_stride][l] = b + T(2) * e;
    y[2 * y_stride][l] = a + T(4) * c;
    y[3 * y_stride][l] = b + T(8) * e + m[5 * stride][l];
  }
}

template <int kTile>
struct Winograd {
  static constexpr int kAlpha = kTile + 2;  // input tile side
  static constexpr int kPoints = kAlpha * kAlpha;

  template <typename T>
  static void input_1d(const Lanes<T>* d, int stride, Lanes<T>* v, int v_stride) {
    if constexpr (kTile == 2) input_1d_f2(d, stride, v, v_stride);
    else input_1d_f4(d, stride, v, v_stride);
  }
  template <typename T>
  static void output_1d(const Lanes<T>* m, int stride, Lanes<T>* y, int y_stride) {
    if constexpr (kTile == 2) output_1d_f2(m, stride, y, y_stride);
    else output_1d_f4(m, stride, y, y_stride);
  }
};

// V = B^T d B for one tile over `cin` contiguous channels. d[kAlpha * i + j] points at the
// input pixel (row i, column j of the tile) or at a zero row in the padding; point
// kAlpha * i + j of V is written to v + (kAlpha * i + j) * plane.
template <int kTile, typename scalar_t>
BF_CPU_CLONES void input_transform(const scalar_t* const* d, scalar_t* v, int64_t plane, int64_t cin) {
  using W = Winograd<kTile>;
  constexpr int a = W::kAlpha;
  Lanes<scalar_t> tile[W::kPoints], t[W::kPoints], out[W::kPoints];
  for (int64_t c0 = 0; c0 < cin; c0 += kLanes) {
    const int lanes = static_cast<int>(std::min<int64_t>(kLanes, cin - c0));
    for (int k = 0; k < W::kPoints; ++k) load_lanes(d[k] + c0, lanes, tile[k]);
    for (int j = 0; j < a; ++j) W::input_1d(tile + j, a, t + j, a);            // B^T d: columns
    for (int i = 0; i < a; ++i) W::input_1d(t + a * i, 1, out + a * i, 1);     // (B^T d) B: rows
    for (int k = 0; k < W::kPoints; ++k) copy_lanes(out[k], lanes, v + k * plane + c0);
  }
}

// y = A^T M A + bias (ReLU if `relu`) for one tile over `cout` contiguous channels; point k
// of M is at m + k * plane; y[kTile * i + j] is the output pixel (row i, column j of the
// tile), or a scratch row outside the image.
template <int kTile, typename scalar_t>
BF_CPU_CLONES void output_transform(const scalar_t* m, int64_t plane, const scalar_t* bias, scalar_t* const* y,
                                    int64_t cout, bool relu) {
  using W = Winograd<kTile>;
  constexpr int a = W::kAlpha;
  const scalar_t lower = relu ? scalar_t(0) : -std::numeric_limits<scalar_t>::infinity();
  Lanes<scalar_t> points[W::kPoints], t[kTile * a], tile[kTile * kTile];
  for (int64_t o0 = 0; o0 < cout; o0 += kLanes) {
    const int lanes = static_cast<int>(std::min<int64_t>(kLanes, cout - o0));
    for (int k = 0; k < W::kPoints; ++k) load_lanes(m + k * plane + o0, lanes, points[k]);
    for (int j = 0; j < a; ++j) W::output_1d(points + j, a, t + j, a);              // A^T M: columns
    for (int i = 0; i < kTile; ++i) W::output_1d(t + a * i, 1, tile + kTile * i, 1);  // (A^T M) A: rows
    for (int k = 0; k < kTile * kTile; ++k) {
      for (int l = 0; l < lanes; ++l) y[k][o0 + l] = std::max(tile[k][l] + bias[o0 + l], lower);
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
int64_t block_tiles(int64_t n_tiles, int64_t points, int64_t cin, int64_t cout, int64_t element_size) {
  const int64_t fit = std::clamp(kBlockBytes / (points * (cin + cout) * element_size), kMinBlockTiles, kMaxBlockTiles);
  const int64_t threads = at::get_num_threads();
  return std::max<int64_t>(1, std::min(fit, (n_tiles + threads - 1) / threads));
}

// Distance between the planes (one per point) of a V or M buffer holding `values` each. A
// distance that is a multiple of 2 KiB maps all the planes the transforms touch together
// onto one or two L1 cache sets (8 ways), which evict each other; one extra cache line
// spreads them.
int64_t plane_stride(int64_t values, int64_t element_size) {
  const int64_t line = 64 / element_size;
  const int64_t stride = (values + line - 1) / line * line;
  return (stride * element_size) % 2048 == 0 ? stride + line : stride;
}

// The convolution with tiles of kTile x kTile outputs; `weight` is (kPoints, cin, cout).
template <int kTile, typename scalar_t>
void winograd_conv(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, bool relu,
                   at::Tensor& out) {
  using W = Winograd<kTile>;
  constexpr int a = W::kAlpha;
  constexpr int64_t points = W::kPoints;
  const int64_t n_batch = input.size(0), cin = input.size(1), height = input.size(2), width = input.size(3);
  const int64_t cout = weight.size(2);
  const int64_t tiles_h = (height + kTile - 1) / kTile, tiles_w = (width + kTile - 1) / kTile;
  const int64_t n_tiles = n_batch * tiles_h * tiles_w;
  const scalar_t* xp = input.data_ptr<scalar_t>();
  const scalar_t* bp = bias.data_ptr<scalar_t>();
  scalar_t* yp = out.data_ptr<scalar_t>();
  const int64_t block = block_tiles(n_tiles, points, cin, cout, sizeof(scalar_t));
  const int64_t n_blocks = (n_tiles + block - 1) / block;
  const int64_t v_plane = plane_stride(block * cin, sizeof(scalar_t));
  const int64_t m_plane = plane_stride(block * cout, sizeof(scalar_t));
  const std::vector<scalar_t> zeros(cin, scalar_t(0));
  const auto options = at::TensorOptions().dtype(input.scalar_type());

  at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
    // The caller's AutoDispatchBelowADInplaceOrView is thread-local: parallel_for's OpenMP
    // workers do not inherit it, so without this guard their GEMMs went through autograd
    // and raised ("functions with out=... arguments don't support automatic
    // differentiation") for a weight that requires grad, under no_grad/inference_mode too,
    // but only with more than one thread.
    const at::AutoDispatchBelowADInplaceOrView below_autograd_here;
    scalar_t* v = thread_scratch<scalar_t>(points * (v_plane + m_plane) + cout);
    scalar_t* m = v + points * v_plane;
    scalar_t* outside = m + points * m_plane;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t first = b * block, count = std::min(block, n_tiles - first);
      for (int64_t t = 0; t < count; ++t) {
        const int64_t tile = first + t;
        const int64_t tx = tile % tiles_w, ty = (tile / tiles_w) % tiles_h, n = tile / (tiles_w * tiles_h);
        const scalar_t* d[points];
        for (int i = 0; i < a; ++i) {
          const int64_t iy = kTile * ty - 1 + i;
          for (int j = 0; j < a; ++j) {
            const int64_t ix = kTile * tx - 1 + j;
            const bool inside = iy >= 0 && iy < height && ix >= 0 && ix < width;
            d[a * i + j] = inside ? xp + ((n * height + iy) * width + ix) * cin : zeros.data();
          }
        }
        input_transform<kTile>(d, v + t * cin, v_plane, cin);
      }
      for (int64_t k = 0; k < points; ++k) {
        auto m_k = at::from_blob(m + k * m_plane, {count, cout}, options);
        at::mm_out(m_k, at::from_blob(v + k * v_plane, {count, cin}, options), weight[k]);
      }
      for (int64_t t = 0; t < count; ++t) {
        const int64_t tile = first + t;
        const int64_t tx = tile % tiles_w, ty = (tile / tiles_w) % tiles_h, n = tile / (tiles_w * tiles_h);
        scalar_t* y[kTile * kTile];
        for (int i = 0; i < kTile; ++i) {
          for (int j = 0; j < kTile; ++j) {
            const int64_t oy = kTile * ty + i, ox = kTile * tx + j;
            y[kTile * i + j] = (oy < height && ox < width) ? yp + ((n * height + oy) * width + ox) * cout : outside;
          }
        }
        output_transform<kTile>(m + t * cout, m_plane, bp, y, cout, relu);
      }
    }
  });
}

at::Tensor conv3x3_winograd_cpu(const at::Tensor& x, const at::Tensor& packed_weight, const at::Tensor& bias,
                                bool relu) {
  const char* op = "conv3x3_winograd";
  check_defined(op, {{"x", &x}, {"packed_weight", &packed_weight}, {"bias", &bias}});
  check_inference_only(op, {{"x", &x}, {"packed_weight", &packed_weight}, {"bias", &bias}});
  for (const auto& [name, t] : {std::pair{"x", &x}, {"packed_weight", &packed_weight}, {"bias", &bias}}) {
    TORCH_CHECK(t->device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t->device());
    TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kDouble, op, ": ", name,
                " must be float32 or float64, got ", t->scalar_type());
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype ", x.scalar_type(),
                ", got ", t->scalar_type());
  }
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (N, C, H, W), got ", x.sizes());
  const int64_t cin = x.size(1);
  // 16 points: F(2x2, 3x3); 36 points: F(4x4, 3x3).
  TORCH_CHECK(packed_weight.dim() == 3 && (packed_weight.size(0) == 16 || packed_weight.size(0) == 36) &&
                  packed_weight.size(1) == cin && packed_weight.size(2) > 0,
              op, ": packed_weight must have shape (16 or 36, ", cin, ", cout), got ", packed_weight.sizes());
  const int64_t cout = packed_weight.size(2);
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == cout, op, ": bias must have shape (", cout, "), got ",
              bias.sizes());

  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // no backward: ATen calls skip autograd
  auto out = at::empty({x.size(0), cout, x.size(2), x.size(3)},
                       x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;
  advise_huge_pages(out);
  const auto input = x.contiguous(at::MemoryFormat::ChannelsLast);
  const auto weight = packed_weight.contiguous();
  const auto bias_c = bias.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv3x3_winograd", [&] {
    if (weight.size(0) == 16) {
      winograd_conv<2, scalar_t>(input, weight, bias_c, relu, out);
    } else {
      winograd_conv<4, scalar_t>(input, weight, bias_c, relu, out);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bisenet_fast, CPU, m) {
  m.impl("conv3x3_winograd", &conv3x3_winograd_cpu);
}

}  // namespace bisenet_fast
