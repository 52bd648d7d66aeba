// Host side of the CUDA OHEM cross-entropy ops (kernels in ohem_cross_entropy_kernels.cuh):
// argument checks, buffers, the backward's tiling and the order of the launches. The
// launches themselves are the Launcher's (ohem_cross_entropy.cu: CUDA launches on the
// current stream; tests/cuda_emulation: the blocks run on CPU threads), which has
//   template <typename... KernelArgs, typename... Args>
//   static void launch(void (*kernel)(KernelArgs...), Grid grid, int threads, size_t shared_bytes, Args&&...)
// running kernel(args...) over the grid with `shared_bytes` of dynamic shared memory.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <tuple>
#include <type_traits>

#include "common/ohem_checks.h"
#include "cuda/ohem_cross_entropy_kernels.cuh"

namespace bisenet_fast {
namespace ohem_cuda {

// What the GPU offers the kernels.
struct DeviceCaps {
  int sm_count;
  size_t shared_bytes_optin;  // shared memory a block may have after opting in
};

// Band of 4 head rows (2 or 1 when that leaves too few blocks to fill the device) and as
// many head columns as one chunk of kThreads output columns covers: each output row and
// column is then recomputed by ~(4+1)/4 and ~(T+1)/T blocks. Classes that do not fit the
// default 48 KB of shared memory shrink the chunk, then the tile, then the band; beyond the
// device's opt-in limit the call is refused.
inline BackwardTiling backward_tiling(const Geometry& g, const DeviceCaps& caps) {
  BackwardTiling t;
  t.x_chunk = kThreads;
  const double out_cols_per_head_col = static_cast<double>(g.W) / static_cast<double>(g.w);
  t.tile_cols = static_cast<int>(std::clamp<double>(std::floor(kThreads / out_cols_per_head_col) - 2, 1, kMaxTileCols));
  t.tile_cols = static_cast<int>(std::min<int64_t>(t.tile_cols, g.w));
  t.band_rows = 4;
  // x_chunk and tile_cols fix the order of the sums, so they are fitted to the shared memory
  // with the tallest band, before the band shrinks to fill the SMs: the result then does not
  // depend on the GPU's SM count. The band height leaves the order alone (a head row's
  // contributions are added in the same order; a shorter band only skips terms of +0).
  const auto fits = [&](size_t limit) { return BackwardShared::bytes(t, g.C) <= limit; };
  while (!fits(kDefaultSharedBytes) && t.x_chunk > 64) t.x_chunk -= 32;
  while (!fits(kDefaultSharedBytes) && t.tile_cols > 8) t.tile_cols /= 2;
  while (!fits(kDefaultSharedBytes) && t.band_rows > 1) t.band_rows /= 2;
  while (!fits(kDefaultSharedBytes) && t.x_chunk > 32) t.x_chunk -= 32;
  const auto blocks = [&] {
    return g.N * ((g.h + t.band_rows - 1) / t.band_rows) * ((g.w + t.tile_cols - 1) / t.tile_cols);
  };
  while (t.band_rows > 1 && blocks() < 2 * caps.sm_count) t.band_rows /= 2;
  t.shared_bytes = BackwardShared::bytes(t, g.C);
  TORCH_CHECK(t.shared_bytes <= caps.shared_bytes_optin, "ohem_cross_entropy (CUDA kernel): ", g.C,
              " classes need ", t.shared_bytes, " bytes of shared memory per block in the backward; the device has ",
              caps.shared_bytes_optin);
  TORCH_CHECK(g.N <= 65535 && (g.h + t.band_rows - 1) / t.band_rows <= 65535,
              "ohem_cross_entropy (CUDA kernel): batch and head height must be <= 65535, got ", g.N, " and ", g.h);
  TORCH_CHECK(g.W < (int64_t{1} << 31), "ohem_cross_entropy (CUDA kernel): target width must be < 2^31, got ", g.W);
  return t;
}

inline Geometry geometry(const at::Tensor& head, const at::Tensor& target) {
  Geometry g;
  g.N = head.size(0);
  g.C = head.size(1);
  g.h = head.size(2);
  g.w = head.size(3);
  g.H = target.size(1);
  g.W = target.size(2);
  g.scale_h = linear_scale(g.h, g.H);
  g.scale_w = linear_scale(g.w, g.W);
  TORCH_CHECK(g.C * g.h * g.w < (int64_t{1} << 31), "ohem_cross_entropy (CUDA kernel): logits must have fewer than ",
              "2^31 values per image (32-bit offsets within an image), got ", head.sizes());
  return g;
}

template <typename F>
void dispatch_label(const at::Tensor& target, F&& f) {
  switch (target.scalar_type()) {
    case at::kByte:
      f(static_cast<const uint8_t*>(target.const_data_ptr()));
      break;
    case at::kInt:
      f(target.const_data_ptr<int32_t>());
      break;
    default:
      f(target.const_data_ptr<int64_t>());
  }
}

// f(pointer to the logits' data) in their dtype (check_ohem_tensors admits these three).
template <typename F>
void dispatch_logits(const at::Tensor& logits, F&& f) {
  switch (logits.scalar_type()) {
    case at::kHalf:
      f(logits.const_data_ptr<at::Half>());
      break;
    case at::kBFloat16:
      f(logits.const_data_ptr<at::BFloat16>());
      break;
    default:
      f(logits.const_data_ptr<float>());
  }
}

// f(std::integral_constant<int, kMaxClasses>) with the softmax's class bound for C classes:
// kRegisterClasses where they fit in registers, else 0 (the online loop). Forward and
// backward dispatch alike, so both run the same softmax on a pixel.
template <typename F>
void dispatch_classes(int64_t classes, F&& f) {
  if (classes <= kRegisterClasses) {
    f(std::integral_constant<int, kRegisterClasses>{});
  } else {
    f(std::integral_constant<int, 0>{});
  }
}

inline int64_t blocks_for(int64_t count, int threads) { return (count + threads - 1) / threads; }

inline void raise_bad_label(const at::Tensor& target, int64_t channels, int64_t ignore_index) {
  const at::Tensor labels = target.to(at::kLong);
  const at::Tensor bad = labels.ne(ignore_index).logical_and(labels.lt(0).logical_or(labels.ge(channels)));
  const int64_t value = labels.masked_select(bad)[0].item<int64_t>();
  TORCH_CHECK_VALUE(false, "ohem_cross_entropy: target holds label ", value, ", which is neither a class id in [0, ",
                    channels, ") nor ignore_index (", ignore_index, ")");
}

// The loss (float32 scalar) and the threshold it used, on the logits' device.
template <typename Launcher>
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& logits, const at::Tensor& target,
                                           c10::optional<double> thresh, int64_t min_kept, int64_t ignore_index,
                                           bool check_labels) {
  check_ohem_tensors("CUDA kernel", logits, target, /*float64=*/false);
  check_ohem_options(thresh, min_kept);
  const at::Tensor head = logits.contiguous();  // NCHW at head resolution, in its own dtype
  const at::Tensor labels = target.contiguous();
  const Geometry g = geometry(head, labels);
  const int64_t pixels = g.N * g.H * g.W;
  const int64_t blocks = blocks_for(pixels, kThreads);
  TORCH_CHECK(blocks < (int64_t{1} << 31) && g.H <= 65535 && g.N <= 65535,
              "ohem_cross_entropy (CUDA kernel): target must have <= 65535 images and rows and < 2^39 pixels, got ",
              target.sizes());
  const Grid pixel_grid{static_cast<unsigned>(blocks_for(g.W, kThreads)),
                        static_cast<unsigned>(blocks_for(g.H, kForwardRows)), static_cast<unsigned>(g.N)};
  const int64_t pixel_blocks = static_cast<int64_t>(pixel_grid.x) * pixel_grid.y * pixel_grid.z;
  const auto f32 = head.options().dtype(at::kFloat);
  at::Tensor prob = at::empty({pixels}, f32);
  at::Tensor ce = at::empty({pixels}, f32);
  at::Tensor block_counts = at::empty({pixel_blocks, 3}, f32.dtype(at::kLong));
  at::Tensor block_sums = at::empty({pixel_blocks, 2}, f32.dtype(at::kDouble));
  at::Tensor state_words =
      at::empty({static_cast<int64_t>(sizeof(ForwardState) / sizeof(int64_t))}, f32.dtype(at::kLong));
  auto* state = reinterpret_cast<ForwardState*>(state_words.data_ptr());
  const float thresh32 = thresh.has_value() ? static_cast<float>(*thresh) : INFINITY;

  dispatch_logits(head, [&](auto* logits_ptr) {
    using scalar_t = std::remove_const_t<std::remove_pointer_t<decltype(logits_ptr)>>;
    dispatch_label(labels, [&](auto* target_ptr) {
      using label_t = std::remove_const_t<std::remove_pointer_t<decltype(target_ptr)>>;
      dispatch_classes(g.C, [&](auto max_classes) {
        Launcher::launch(forward_pixels_kernel<decltype(max_classes)::value, scalar_t, label_t>, pixel_grid,
                         kThreads, 0, logits_ptr, target_ptr, g, thresh32, ignore_index, prob.data_ptr<float>(),
                         ce.data_ptr<float>(), reinterpret_cast<long long*>(block_counts.data_ptr<int64_t>()),
                         block_sums.data_ptr<double>());
      });
    });
  });
  Launcher::launch(forward_totals_kernel, Grid{}, kFinalThreads, 0,
                   reinterpret_cast<const long long*>(block_counts.const_data_ptr<int64_t>()),
                   block_sums.const_data_ptr<double>(), pixel_blocks, min_kept, g.N, thresh.has_value(), state);

  // Radix select, skipped on the device when the threshold is thresh itself.
  at::Tensor histograms = at::zeros({kSelectPasses, kSelectBins}, f32.dtype(at::kLong));
  auto* histogram_ptr = reinterpret_cast<unsigned long long*>(histograms.data_ptr<int64_t>());
  const Grid histogram_grid{static_cast<unsigned>(std::min<int64_t>(blocks, 1024))};
  for (int pass = 0; pass < kSelectPasses; ++pass) {
    Launcher::launch(select_histogram_kernel, histogram_grid, kThreads, 0, prob.const_data_ptr<float>(), pixels, pass,
                     state, histogram_ptr + pass * kSelectBins);
    Launcher::launch(select_bin_kernel, Grid{}, 32, 0, histogram_ptr + pass * kSelectBins, pass, state);
  }
  at::Tensor kept_sums = at::empty({blocks}, f32.dtype(at::kDouble));
  Launcher::launch(kept_sum_kernel, Grid{static_cast<unsigned>(blocks)}, kThreads, 0, prob.const_data_ptr<float>(),
                   ce.const_data_ptr<float>(), pixels, state, kept_sums.data_ptr<double>());
  at::Tensor loss = at::empty({}, f32);
  at::Tensor threshold = at::empty({}, f32);
  Launcher::launch(forward_result_kernel, Grid{}, kFinalThreads, 0, kept_sums.const_data_ptr<double>(), blocks, state,
                   thresh.has_value(), thresh32, static_cast<double>(pixels), loss.data_ptr<float>(),
                   threshold.data_ptr<float>());

  // The one synchronisation: labels outside [0, C) are an error, not a silent zero.
  if (check_labels) {
    const int64_t n_bad = state_words[offsetof(ForwardState, n_bad) / sizeof(int64_t)].item<int64_t>();
    if (n_bad > 0) raise_bad_label(labels, g.C, ignore_index);
  }
  return {loss, threshold};
}

// d loss / d logits, in the logits' dtype and NCHW.
template <typename Launcher>
at::Tensor backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                    const at::Tensor& threshold, int64_t ignore_index, const DeviceCaps& caps) {
  check_ohem_tensors("CUDA kernel", logits, target, /*float64=*/false);
  check_ohem_backward_scalars(grad_loss, threshold, logits);
  const at::Tensor head = logits.contiguous();
  const at::Tensor labels = target.contiguous();
  const auto f32 = head.options().dtype(at::kFloat);
  const at::Tensor grad_scalar = grad_loss.to(f32).reshape({1});
  const at::Tensor threshold32 = threshold.to(f32).reshape({1});
  const Geometry g = geometry(head, labels);
  const BackwardTiling tiling = backward_tiling(g, caps);
  const Grid grid{static_cast<unsigned>((g.w + tiling.tile_cols - 1) / tiling.tile_cols),
                  static_cast<unsigned>((g.h + tiling.band_rows - 1) / tiling.band_rows), static_cast<unsigned>(g.N)};
  at::Tensor grad = at::empty_like(head);  // written in the logits' dtype from float sums
  dispatch_logits(head, [&](auto* logits_ptr) {
    using scalar_t = std::remove_const_t<std::remove_pointer_t<decltype(logits_ptr)>>;
    dispatch_label(labels, [&](auto* target_ptr) {
      using label_t = std::remove_const_t<std::remove_pointer_t<decltype(target_ptr)>>;
      dispatch_classes(g.C, [&](auto max_classes) {
        Launcher::launch(backward_band_kernel<decltype(max_classes)::value, scalar_t, label_t>, grid, kThreads,
                         tiling.shared_bytes, logits_ptr, target_ptr, g, tiling, threshold32.const_data_ptr<float>(),
                         ignore_index, grad_scalar.const_data_ptr<float>(), grad.mutable_data_ptr<scalar_t>());
      });
    });
  });
  return grad;
}

}  // namespace ohem_cuda
}  // namespace bisenet_fast
