// OHEM cross-entropy on logits upsampled on the fly: the CUDA kernels.
//
// Forward: each thread walks kForwardRows output rows of one column (grid: column chunk,
// run of rows, image, so no 64-bit division recovers a position). Per pixel it computes the
// C upsampled logits (never stored at (N, C, H, W)), their logsumexp (two passes in
// registers for up to kRegisterClasses classes; an online loop beyond), the cross-entropy
// and the ground-truth probability. Up to kRegisterClasses, the column's values on the
// pixel's two head rows (interpolated along x) are held in registers and reloaded only when
// the column reaches the next pair of head rows: the output rows between two head rows
// share them (8 per pair at 8x upsampling). Per-block counts and sums are reduced by one
// block in a fixed order (deterministic). Whether the k-th probability is needed is
// decided on the device; if it is, an exact radix select over the probabilities' bits
// (3 passes of integer histograms: 11 + 11 + 10 bits, one shared-memory atomic per warp and
// digit) finds it, and the kept CE is summed
// again. The host synchronises once, to read the count of out-of-range labels, unless the
// caller has checked the labels already (check_labels=False; an out-of-range label then
// makes the loss NaN on the device instead of raising). Logits are
// read in their dtype (float math throughout) and the gradient is written in it, so
// float16/bfloat16 calls make no float32 copy of the logits or the gradient.
//
// Backward, as a gather (no float atomics, deterministic): one block per (image, band of
// head rows, tile of head columns), the CUDA form of the CPU kernel's row pipeline. For each
// output row that reads the band, and each chunk of the output columns that read the tile,
// every thread recomputes one output pixel's softmax (the same functions as the forward,
// from its column's held head rows, so both agree on which pixels are kept) into shared
// memory as its gradient softmax - onehot; the block then reduces that row chunk along x
// into the tile's head columns and adds it, with the two row weights, to the band's
// accumulators in shared memory. Each accumulator has one owner thread and receives its terms in a fixed order.
// Compared with the first version (one thread per head element (n, c, i, j), gathering
// over its ~4 s^2 output pixels after a separate logsumexp pass), each pixel's upsampled
// logits are computed ~1.3 times (band and tile overlaps) instead of 5, its label is read
// ~1.3 times instead of 4 C times, and no per-pixel logsumexp buffer is written.
//
// This file holds the kernels, launched by ohem_cross_entropy_host.h (the calls' order and
// buffers) through a launcher: ohem_cross_entropy.cu's launches them on the GPU, and
// tests/cuda_emulation compiles this same code for the CPU, where each block's threads run
// as fibers (shim.h supplies the CUDA built-ins, cub's BlockReduce and the warp votes), so
// the indexing, the synchronisation and the selection are tested without a GPU.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "common/bilinear.h"
#include "common/ohem_math.h"
#include "cuda/launch_grid.h"

#if defined(__CUDACC__)
#include <cub/block/block_reduce.cuh>
#endif

namespace bisenet_fast {
namespace ohem_cuda {

constexpr int kThreads = 256;
constexpr int kFinalThreads = 1024;
// The widest head-column tile of the backward.
constexpr int kMaxTileCols = 128;
// Up to this many classes (Cityscapes has 19) a column's values on two head rows are held in
// registers (ColumnRows, column_softmax); more take the online loop (pixel_softmax_online).
// Registers are allocated for the bound, not for C: 2 x 20 of them; sm_90 then needs 90-96
// registers in the forward and 128 (one 8-byte stack slot) in the backward.
constexpr int kRegisterClasses = 20;
// Output rows per forward thread (it holds each pair of head rows for the rows between them).
constexpr int kForwardRows = 8;
// Radix select over 32-bit keys: digits of 11, 11 and 10 bits, most significant first.
constexpr int kSelectPasses = 3;
constexpr int kSelectBins = 1 << 11;
__host__ __device__ constexpr int select_bits(int pass) { return pass == 2 ? 10 : 11; }
__host__ __device__ constexpr int select_shift(int pass) { return pass == 0 ? 21 : (pass == 1 ? 10 : 0); }

struct Geometry {
  int64_t N, C, h, w, H, W;
  float scale_h, scale_w;
};

// Device-side state of one forward call.
struct ForwardState {
  long long n_valid;
  long long n_le_thresh;
  long long n_bad;
  long long rank;  // rank of the k-th key among the keys with the current prefix
  int needs_select;
  unsigned int prefix;
  double sum_valid;
  double sum_below;
};
// The host reads n_bad from a tensor of int64 that holds the state.
static_assert(sizeof(ForwardState) % sizeof(int64_t) == 0 && offsetof(ForwardState, n_bad) % sizeof(int64_t) == 0,
              "ForwardState is stored in an int64 tensor");

struct PixelSoftmax {
  float zmax, sumexp, z_gt;
};

// Logits are read in their own dtype and converted per tap (float math throughout), so
// float16/bfloat16 logits need no float32 copy at head resolution. Loads take the read-only
// (non-coherent) path, ld.global.nc, which the compiler cannot choose itself for the opaque
// image address below.
__device__ __forceinline__ float read_only_logit(const float* p) { return __ldg(p); }
__device__ __forceinline__ float read_only_logit(const at::Half* p) {
  return static_cast<float>(at::Half(__ldg(reinterpret_cast<const unsigned short*>(p)), at::Half::from_bits()));
}
__device__ __forceinline__ float read_only_logit(const at::BFloat16* p) {
  return static_cast<float>(
      at::BFloat16(__ldg(reinterpret_cast<const unsigned short*>(p)), at::BFloat16::from_bits()));
}

// Image n of the logits, as an opaque register: else the compiler folds the 64-bit image
// offset into every load's index arithmetic (four instructions per load instead of two).
template <typename scalar_t>
__device__ __forceinline__ const scalar_t* logits_image(const scalar_t* logits, const Geometry& g, int64_t n) {
  const scalar_t* image = logits + n * g.C * g.h * g.w;
#if defined(__CUDA_ARCH__)
  asm("" : "+l"(image));
#endif
  return image;
}

// An output row's two head rows, as offsets within a class plane, and their weights; and an
// output column's two head columns and weights. Computed once per row and column, so a
// class costs its loads only (the first version's build redid ~25 integer instructions of
// 64-bit tap arithmetic per class). Offsets within an image are < 2^31 (checked on the
// host), so a class's taps are these plus c * h * w in unsigned 32-bit arithmetic.
struct RowTaps {
  int64_t head_row;  // i0: it decides i1
  int top, bottom;
  float w_top, w_bottom;
};
struct ColumnTaps {
  int left, right;
  float w_left, w_right;
};

__device__ __forceinline__ RowTaps row_taps(const Geometry& g, int64_t y) {
  const LinearTap ty = linear_tap(y, g.h, g.scale_h);
  return {ty.i0, static_cast<int>(ty.i0 * g.w), static_cast<int>(ty.i1 * g.w), ty.w0, ty.w1};
}

__device__ __forceinline__ ColumnTaps column_taps(const Geometry& g, int64_t x) {
  const LinearTap tx = linear_tap(x, g.w, g.scale_w);
  return {static_cast<int>(tx.i0), static_cast<int>(tx.i1), tx.w0, tx.w1};
}

// wa * a + wb * b with its roundings spelled out (the product wb * b, then one fma), leaving
// the compiler no choice of FMA contraction: every kernel computes a logit bit for bit
// alike, which the forward's and the backward's keep decisions rely on.
__device__ __forceinline__ float blend(float a, float b, float wa, float wb) {
  return __fmaf_rn(wa, a, __fmul_rn(wb, b));
}

// Head row `row` (an offset) of the class at `class_offset` (c * h * w) in `image`,
// interpolated along x at an output column.
template <typename scalar_t>
__device__ __forceinline__ float head_row_value(const scalar_t* image, int row, const ColumnTaps& ct,
                                                uint32_t class_offset) {
  const auto tap_value = [&](int tap) {
    return read_only_logit(image + (static_cast<uint32_t>(row + tap) + class_offset));
  };
  return blend(tap_value(ct.left), tap_value(ct.right), ct.w_left, ct.w_right);
}

// The upsampled logit of one class at one output pixel: each head row interpolated along x,
// then the two blended along y, ATen's order, so the value rounds as F.interpolate's does.
template <typename scalar_t>
__device__ __forceinline__ float upsampled_logit(const scalar_t* image, const RowTaps& rt, const ColumnTaps& ct,
                                                 uint32_t class_offset) {
  return blend(head_row_value(image, rt.top, ct, class_offset), head_row_value(image, rt.bottom, ct, class_offset),
               rt.w_top, rt.w_bottom);
}

// One output column's values on one pair of head rows (interpolated along x), for every
// class up to kMaxClasses: the output rows between two head rows (8 per pair at 8x
// upsampling) share them, so a thread walking down a column loads each pair's 4C taps once
// instead of once per row. A logit is then blend(top[c], bottom[c]) of the row's weights,
// the same arithmetic as upsampled_logit's.
template <int kMaxClasses>
struct ColumnRows {
  float top[kMaxClasses], bottom[kMaxClasses];
  int64_t head_row = -1;  // i0 of the pair held; -1: none yet

  // Holds the pair of `rt` (loading it unless held already). Classes from C on re-read class
  // C - 1 (in bounds, so no load needs a branch); the softmax leaves them out.
  template <typename scalar_t>
  __device__ __forceinline__ void hold(const scalar_t* image, const Geometry& g, const RowTaps& rt,
                                       const ColumnTaps& ct) {
    if (head_row == rt.head_row) return;
    const uint32_t plane = static_cast<uint32_t>(g.h * g.w);
    const int classes = static_cast<int>(g.C);
#pragma unroll
    for (int c = 0; c < kMaxClasses; ++c) {
      const uint32_t class_offset = static_cast<uint32_t>(min(c, classes - 1)) * plane;
      top[c] = head_row_value(image, rt.top, ct, class_offset);
      bottom[c] = head_row_value(image, rt.bottom, ct, class_offset);
    }
    head_row = rt.head_row;
  }

  __device__ __forceinline__ float logit(int c, const RowTaps& rt) const {
    return blend(top[c], bottom[c], rt.w_top, rt.w_bottom);
  }
};

// What a thread holds down its column for a softmax of class bound kMaxClasses: the rows of
// column_softmax's path; nothing used by the online path (kMaxClasses = 0).
template <int kMaxClasses>
using HeldRows = ColumnRows<(kMaxClasses > 0 ? kMaxClasses : 1)>;

// exp on the SFU (ex2.approx after a multiply: relative error ~1e-6 for the arguments of a
// softmax, z - max <= 0) instead of the ~9-instruction accurate expf: the kernels evaluate
// it ~3 times per pixel and class. Forward and backward both use it, so they agree on
// which pixels are kept.
__device__ __forceinline__ float fast_exp(float x) { return __expf(x); }

// The ground-truth probability of a pixel, which decides whether it is kept: the forward and
// both backward paths compute it here, so they agree on every pixel.
__device__ __forceinline__ float gt_probability(const PixelSoftmax& s) { return fast_exp(s.z_gt - s.zmax) / s.sumexp; }

// Online max / sum-exp over the classes of output pixel (n, y, x), and the logit of `label`,
// for any number of classes; with z_store set, each class's upsampled logit is also stored
// at z_store[c * z_stride]. Forward and backward call the same softmax function for a given
// class count (column_softmax up to kRegisterClasses), so they agree on which pixels are
// kept.
template <typename scalar_t>
__device__ __forceinline__ PixelSoftmax pixel_softmax_online(const scalar_t* __restrict__ logits, const Geometry& g,
                                                             int64_t n, int64_t y, int64_t x, int64_t label,
                                                             float* z_store = nullptr, int z_stride = 0) {
  const RowTaps rt = row_taps(g, y);
  const ColumnTaps ct = column_taps(g, x);
  const uint32_t plane = static_cast<uint32_t>(g.h * g.w);
  const scalar_t* image = logits_image(logits, g, n);
  PixelSoftmax s{0.f, 0.f, 0.f};
  uint32_t class_offset = 0;
  for (int64_t c = 0; c < g.C; ++c, class_offset += plane) {
    const float z = upsampled_logit(image, rt, ct, class_offset);
    if (z_store != nullptr) z_store[c * z_stride] = z;
    if (c == label) s.z_gt = z;
    // Starting from the first class (not from -inf) keeps a -inf logit finite here: -inf
    // minus a -inf running max would make the sum NaN where the reference's is not.
    if (c == 0) {
      s.zmax = z;
      s.sumexp = 1.f;
    } else if (z > s.zmax) {
      s.sumexp = __fmaf_rn(s.sumexp, fast_exp(s.zmax - z), 1.f);  // one rounding wherever compiled
      s.zmax = z;
    } else {
      s.sumexp += fast_exp(z - s.zmax);
    }
  }
  return s;
}

// pixel_softmax_online for C <= kMaxClasses (a compile-time bound), from a column's held
// head rows: the loops unroll with no branch, and the softmax takes two passes (max, then
// sum; each logit is two instructions from the held rows) instead of the online loop's
// rescaling, whose compare and branch per class made it ~47 instructions per class in the
// sm_90 build.
template <int kMaxClasses>
__device__ __forceinline__ PixelSoftmax column_softmax(const ColumnRows<kMaxClasses>& rows, const RowTaps& rt,
                                                       int classes, int64_t label) {
  // fmaxf skips a NaN logit; its exp below still makes the sum, hence the loss, NaN.
  PixelSoftmax s{rows.logit(0, rt), 0.f, 0.f};
#pragma unroll
  for (int c = 1; c < kMaxClasses; ++c) s.zmax = c < classes ? fmaxf(s.zmax, rows.logit(c, rt)) : s.zmax;
#pragma unroll
  for (int c = 0; c < kMaxClasses; ++c) {
    const float z = rows.logit(c, rt);
    s.sumexp += c < classes ? fast_exp(z - s.zmax) : 0.f;
    s.z_gt = c == label ? z : s.z_gt;
  }
  return s;
}

// A forward block's totals: the sums of its valid pixels' CE and of those kept at thresh,
// and its counts of valid pixels, of those with p <= thresh and of labels out of range.
struct BlockTotals {
  double sum_valid, sum_below;
  int valid, le, bad;
};
__host__ __device__ __forceinline__ BlockTotals operator+(const BlockTotals& a, const BlockTotals& b) {
  return {a.sum_valid + b.sum_valid, a.sum_below + b.sum_below, a.valid + b.valid, a.le + b.le, a.bad + b.bad};
}

// kMaxClasses: column_softmax's bound on C, 0 for pixel_softmax_online. A thread walks
// kForwardRows output rows of one column (grid: column chunk, run of rows, image, so no
// 64-bit division recovers a position), holding each pair of head rows it meets; the
// block's totals are one reduction.
template <int kMaxClasses, typename scalar_t, typename label_t>
__global__ void forward_pixels_kernel(const scalar_t* __restrict__ logits, const label_t* __restrict__ target, Geometry g,
                                      float thresh, int64_t ignore_index, float* __restrict__ prob,
                                      float* __restrict__ ce, long long* __restrict__ block_counts,
                                      double* __restrict__ block_sums) {
  const int64_t x = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n = blockIdx.z;
  const int64_t y_begin = static_cast<int64_t>(blockIdx.y) * kForwardRows;
  const int64_t y_end = min(y_begin + kForwardRows, g.H);
  const int64_t block = (static_cast<int64_t>(blockIdx.z) * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
  BlockTotals totals{0, 0, 0, 0, 0};
  if (x < g.W) {
    const scalar_t* image = logits_image(logits, g, n);
    const ColumnTaps ct = column_taps(g, x);
    HeldRows<kMaxClasses> rows;
    for (int64_t y = y_begin; y < y_end; ++y) {
      const int64_t pix = (n * g.H + y) * g.W + x;
      const int64_t label = static_cast<int64_t>(target[pix]);
      float p = INFINITY, loss = 0.f;
      if (label != ignore_index) {
        if (label < 0 || label >= g.C) {
          ++totals.bad;
        } else {
          PixelSoftmax s;
          if constexpr (kMaxClasses > 0) {
            const RowTaps rt = row_taps(g, y);
            rows.hold(image, g, rt, ct);
            s = column_softmax(rows, rt, static_cast<int>(g.C), label);
          } else {
            s = pixel_softmax_online(logits, g, n, y, x, label);
          }
          loss = s.zmax + logf(s.sumexp) - s.z_gt;
          p = gt_probability(s);
          ++totals.valid;
          totals.le += p <= thresh;
          totals.sum_valid += loss;
          totals.sum_below += ohem_kept(p, thresh) ? loss : 0.0;
        }
      }
      prob[pix] = p;
      ce[pix] = loss;
    }
  }
  using TotalsReduce = cub::BlockReduce<BlockTotals, kThreads>;
  __shared__ typename TotalsReduce::TempStorage storage;
  const BlockTotals block_totals = TotalsReduce(storage).Sum(totals);
  if (threadIdx.x == 0) {
    block_counts[block * 3] = block_totals.valid;
    block_counts[block * 3 + 1] = block_totals.le;
    block_counts[block * 3 + 2] = block_totals.bad;
    block_sums[block * 2] = block_totals.sum_valid;
    block_sums[block * 2 + 1] = block_totals.sum_below;
  }
}

// One block: totals of the per-block counts and sums in a fixed order; decides whether the
// k-th probability must be selected.
__global__ void __launch_bounds__(kFinalThreads) forward_totals_kernel(const long long* __restrict__ block_counts, const double* __restrict__ block_sums,
                                      int64_t blocks, int64_t min_kept, int64_t batch, bool has_thresh,
                                      ForwardState* state) {
  using CountReduce = cub::BlockReduce<long long, kFinalThreads>;
  using SumReduce = cub::BlockReduce<double, kFinalThreads>;
  __shared__ typename CountReduce::TempStorage count_storage;
  __shared__ typename SumReduce::TempStorage sum_storage;
  long long counts[3] = {0, 0, 0};
  double sums[2] = {0, 0};
  for (int64_t b = threadIdx.x; b < blocks; b += blockDim.x) {
    for (int i = 0; i < 3; ++i) counts[i] += block_counts[b * 3 + i];
    for (int i = 0; i < 2; ++i) sums[i] += block_sums[b * 2 + i];
  }
  long long totals[3];
  for (int i = 0; i < 3; ++i) {
    totals[i] = CountReduce(count_storage).Sum(counts[i]);
    __syncthreads();
  }
  double total_sums[2];
  for (int i = 0; i < 2; ++i) {
    total_sums[i] = SumReduce(sum_storage).Sum(sums[i]);
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    state->n_valid = totals[0];
    state->n_le_thresh = totals[1];
    state->n_bad = totals[2];
    state->sum_valid = total_sums[0];
    state->sum_below = total_sums[1];
    const int64_t k = ohem_rank(min_kept, batch, totals[0]);
    state->rank = k;
    state->needs_select = has_thresh && ohem_needs_select(totals[0], totals[1], k) ? 1 : 0;
    state->prefix = 0;
  }
}

static_assert(kThreads % 32 == 0, "select_histogram_kernel steps whole warps");

__global__ void select_histogram_kernel(const float* __restrict__ prob, int64_t count, int pass,
                                        const ForwardState* __restrict__ state,
                                        unsigned long long* __restrict__ histogram) {
  if (!state->needs_select) return;
  __shared__ unsigned int local[kSelectBins];
  for (int b = threadIdx.x; b < kSelectBins; b += blockDim.x) local[b] = 0;
  __syncthreads();
  const int shift = select_shift(pass), bits = select_bits(pass);
  const int prefix_shift = pass == 0 ? 32 : select_shift(pass - 1);
  const uint32_t prefix = state->prefix;
  const int lane = threadIdx.x % 32;
  // Lanes whose keys share a digit add their count with one atomic (their leader's). The
  // probabilities of a confident head crowd near 1, into a few digits of the first passes:
  // one atomic per key serialised up to 32-way there. Whole warps step together (the loop
  // runs while the warp's first element is in range) so that every lane joins the ballot.
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e - lane < count;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint32_t digit = 0;
    bool counted = false;
    if (e < count) {
      const uint32_t key = prob_key(prob[e]);
      counted = key_has_prefix(key, prefix, prefix_shift);
      digit = key_digit(key, shift, bits);
    }
    const unsigned counting = __ballot_sync(0xffffffffu, counted);
    if (counted) {
      const unsigned peers = __match_any_sync(counting, digit);
      if (lane == __ffs(peers) - 1) atomicAdd(&local[digit], static_cast<unsigned>(__popc(peers)));
    }
  }
  __syncthreads();
  for (int b = threadIdx.x; b < (1 << bits); b += blockDim.x)
    if (local[b]) atomicAdd(&histogram[b], static_cast<unsigned long long>(local[b]));
}

// Integer counts only: the selected bin is exact whatever the order of the atomics.
__global__ void select_bin_kernel(const unsigned long long* __restrict__ histogram, int pass, ForwardState* state) {
  if (!state->needs_select || threadIdx.x != 0) return;
  int64_t rank = state->rank;
  const uint32_t bin = select_bin(histogram, 1u << select_bits(pass), &rank);
  state->rank = rank;
  state->prefix |= bin << select_shift(pass);
}

__global__ void kept_sum_kernel(const float* __restrict__ prob, const float* __restrict__ ce, int64_t count,
                                const ForwardState* __restrict__ state, double* __restrict__ block_sums) {
  if (!state->needs_select) return;
  const float threshold = prob_from_key(static_cast<uint32_t>(state->prefix));
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const double v = (e < count && ohem_kept(prob[e], threshold)) ? static_cast<double>(ce[e]) : 0.0;
  using SumReduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename SumReduce::TempStorage storage;
  const double t = SumReduce(storage).Sum(v);
  if (threadIdx.x == 0) block_sums[blockIdx.x] = t;
}

__global__ void __launch_bounds__(kFinalThreads) forward_result_kernel(const double* __restrict__ kept_block_sums, int64_t blocks,
                                      const ForwardState* __restrict__ state, bool has_thresh, float thresh,
                                      double pixels, float* __restrict__ loss, float* __restrict__ threshold) {
  using SumReduce = cub::BlockReduce<double, kFinalThreads>;
  __shared__ typename SumReduce::TempStorage storage;
  const bool selected = state->needs_select;
  double partial = 0;
  if (selected)
    for (int64_t b = threadIdx.x; b < blocks; b += blockDim.x) partial += kept_block_sums[b];
  const double kept_sum = SumReduce(storage).Sum(partial);
  if (threadIdx.x == 0) {
    double total;
    if (!has_thresh) {
      total = state->sum_valid;
      *threshold = INFINITY;
    } else if (selected) {
      total = kept_sum;
      *threshold = prob_from_key(static_cast<uint32_t>(state->prefix));
    } else {
      total = state->sum_below;
      *threshold = thresh;
    }
    // Out-of-range labels count as ignored in the sums; a NaN loss makes them visible
    // where the host did not check (check_labels=False).
    *loss = state->n_bad > 0 ? NAN : static_cast<float>(total / pixels);
  }
}

// Shape of the backward's blocks, chosen on the host from the sizes: tile_cols and x_chunk,
// which fix the summation order (hence the result), from the sizes alone; band_rows also from
// the SM count (backward_tiling).
struct BackwardTiling {
  int band_rows;  // head rows per block
  int tile_cols;  // head columns per block
  int x_chunk;    // output columns per pass over a row (<= kThreads; one per thread)
  size_t shared_bytes;
};

// Shared memory of one backward block, carved from one dynamic allocation of 4-byte values.
// Phase 2 reads a head column's weights from two per-column arrays: the output columns
// reading head column j are [first with i0 >= j - 1, first with i0 >= j), which read it as
// their upper tap i1, then [first with i0 >= j, first with i0 >= j + 1), which read it as
// their lower tap i0. A term then costs two shared loads and an FMA, where finding the
// weight from each column's taps (compare, select, add) cost ~9 instructions per term.
struct BackwardShared {
  float* dz;            // [C][x_chunk + 1]: softmax - onehot of the row chunk (padded: no bank conflicts)
  float* acc;           // [band_rows][C][tile_cols]: gradient of the block's head elements
  float* weight_lower;  // [x_chunk]: each chunk column's weight for its lower tap (w0, + w1 where i1 == i0)
  float* weight_upper;  // [x_chunk]: its weight for its upper tap (w1; 0 where i1 == i0)
  int* col_range;       // [tile_cols][3]: output columns reading each head column, relative to the block's
                        // first: begin, first reading it as the lower tap, end

  __device__ BackwardShared(unsigned char* base, const BackwardTiling& t, int64_t C) {
    dz = reinterpret_cast<float*>(base);
    acc = dz + C * (t.x_chunk + 1);
    weight_lower = acc + static_cast<int64_t>(t.band_rows) * C * t.tile_cols;
    weight_upper = weight_lower + t.x_chunk;
    col_range = reinterpret_cast<int*>(weight_upper + t.x_chunk);
  }
  static size_t bytes(const BackwardTiling& t, int64_t C) {
    return (C * (t.x_chunk + 1) + static_cast<int64_t>(t.band_rows) * C * t.tile_cols + 2 * t.x_chunk +
            3 * t.tile_cols) * sizeof(float);
  }
};

// Phase 1 of the backward for one pixel (n, y, x): its column of dz (stride dz_stride)
// becomes softmax - onehot if the pixel is valid and kept, else 0; returns whether it was
// kept. `rows` holds the thread's column's head rows (column_softmax's path) and is updated
// to the pixel's row.
template <int kMaxClasses, typename scalar_t>
__device__ __forceinline__ bool pixel_grad_column(const scalar_t* __restrict__ logits, const Geometry& g, int64_t n,
                                                  int64_t y, int64_t x, const ColumnTaps& ct,
                                                  HeldRows<kMaxClasses>& rows, int64_t label, bool valid, float thresh,
                                                  float* dz, int dz_stride) {
  bool kept = false;
  if constexpr (kMaxClasses > 0) {
    const int classes = static_cast<int>(g.C);
    const RowTaps rt = row_taps(g, y);
    PixelSoftmax s{};
    if (valid) {
      rows.hold(logits_image(logits, g, n), g, rt, ct);
      s = column_softmax(rows, rt, classes, label);
      kept = ohem_kept(gt_probability(s), thresh);
    }
    if (kept) {
      const float inv_sumexp = 1.f / s.sumexp;
#pragma unroll
      for (int c = 0; c < kMaxClasses; ++c)
        if (c < classes)
          dz[c * dz_stride] = ce_grad(fast_exp(rows.logit(c, rt) - s.zmax) * inv_sumexp, c == label, 1.f);
    } else {
#pragma unroll
      for (int c = 0; c < kMaxClasses; ++c)
        if (c < classes) dz[c * dz_stride] = 0.f;
    }
  } else {
    if (valid) {
      const PixelSoftmax s = pixel_softmax_online(logits, g, n, y, x, label, dz, dz_stride);
      const float inv_sumexp = 1.f / s.sumexp;
      kept = ohem_kept(gt_probability(s), thresh);
      if (kept)
        for (int64_t c = 0; c < g.C; ++c)
          dz[c * dz_stride] = ce_grad(fast_exp(dz[c * dz_stride] - s.zmax) * inv_sumexp, c == label, 1.f);
    }
    if (!kept)
      for (int64_t c = 0; c < g.C; ++c) dz[c * dz_stride] = 0.f;
  }
  return kept;
}

// At least 2 resident blocks per SM (<= 128 registers a thread): a column's held head rows
// take 2 * 20 registers, and under 3 blocks' bound of 85 sm_90 spilled 72-80 bytes, which
// phase 1 would reload in each of its three passes over the classes. Phase 1 now loads
// logits only when its column reaches a new pair of head rows, so it needs less occupancy
// to hide their latency than when it loaded 4C taps per pixel.
template <int kMaxClasses, typename scalar_t, typename label_t>
__global__ void __launch_bounds__(kThreads, 2)
    backward_band_kernel(const scalar_t* __restrict__ logits, const label_t* __restrict__ target, Geometry g,
                         BackwardTiling tiling, const float* __restrict__ threshold, int64_t ignore_index,
                         const float* __restrict__ grad_loss, scalar_t* __restrict__ grad) {
  BackwardShared sh(dynamic_shared_memory(), tiling, g.C);
  const int64_t n = blockIdx.z;
  const int64_t i_begin = static_cast<int64_t>(blockIdx.y) * tiling.band_rows;
  const int64_t i_end = min(i_begin + tiling.band_rows, g.h);
  const int64_t j_begin = static_cast<int64_t>(blockIdx.x) * tiling.tile_cols;
  const int64_t j_end = min(j_begin + tiling.tile_cols, g.w);
  const int64_t tile_cols = j_end - j_begin;
  const int64_t accumulators = static_cast<int64_t>(tiling.band_rows) * g.C * tiling.tile_cols;
  const int dz_stride = tiling.x_chunk + 1;

  const int64_t y_begin = dst_range_reading(i_begin, g.h, g.H, g.scale_h).begin;
  const int64_t y_end = dst_range_reading(i_end - 1, g.h, g.H, g.scale_h).end;
  const int64_t x_begin = dst_range_reading(j_begin, g.w, g.W, g.scale_w).begin;
  const int64_t x_end = dst_range_reading(j_end - 1, g.w, g.W, g.scale_w).end;
  for (int64_t a = threadIdx.x; a < accumulators; a += blockDim.x) sh.acc[a] = 0.f;
  for (int64_t jl = threadIdx.x; jl < tile_cols; jl += blockDim.x) {
    const int64_t j = j_begin + jl;
    int* range = sh.col_range + 3 * jl;  // output columns < 2^31 (checked on the host)
    range[0] = static_cast<int>(first_dst_with_i0_at_least(j - 1, g.w, g.W, g.scale_w) - x_begin);
    range[1] = static_cast<int>(first_dst_with_i0_at_least(j, g.w, g.W, g.scale_w) - x_begin);
    range[2] = static_cast<int>(first_dst_with_i0_at_least(j + 1, g.w, g.W, g.scale_w) - x_begin);
  }
  const float thresh = *threshold;
  // Phase 2's (class, head column) pairs: this thread's first, and the step between its pairs
  // (32-bit: C * tile_cols is small, and one division here spares one per pair and row).
  const int classes = static_cast<int>(g.C), pairs = classes * static_cast<int>(tile_cols);
  const int first_class = threadIdx.x % classes, first_col = threadIdx.x / classes;
  const int step_class = blockDim.x % classes, step_col = blockDim.x / classes;
  __syncthreads();

  for (int64_t x0 = x_begin; x0 < x_end; x0 += tiling.x_chunk) {
    const int64_t chunk = min(static_cast<int64_t>(tiling.x_chunk), x_end - x0);
    const int64_t x = x0 + threadIdx.x;
    const int chunk_begin = static_cast<int>(x0 - x_begin);  // the chunk, relative to the block's first column
    const int chunk_end = chunk_begin + static_cast<int>(chunk);
    if (threadIdx.x < chunk) {
      const LinearTap tx = linear_tap(x, g.w, g.scale_w);
      const bool one_tap = tx.i1 == tx.i0;  // the last head column, clamped
      sh.weight_lower[threadIdx.x] = tx.w0 + (one_tap ? tx.w1 : 0.f);
      sh.weight_upper[threadIdx.x] = one_tap ? 0.f : tx.w1;
    }
    const ColumnTaps ct = column_taps(g, x);
    HeldRows<kMaxClasses> rows;  // this chunk's column's, down its rows
    for (int64_t y = y_begin; y < y_end; ++y) {
      // Phase 1: one pixel per thread; its column of dz = softmax - onehot if kept, else 0.
      bool kept = false;
      if (threadIdx.x < chunk) {
        const int64_t label = static_cast<int64_t>(target[(n * g.H + y) * g.W + x]);
        const bool valid = label != ignore_index && label >= 0 && label < g.C;
        kept = pixel_grad_column<kMaxClasses>(logits, g, n, y, x, ct, rows, label, valid, thresh,
                                              sh.dz + threadIdx.x, dz_stride);
      }
      if (!__syncthreads_or(kept)) continue;  // nothing kept in this row chunk
      // Phase 2: reduce the row chunk along x into head columns, then into the band's rows.
      const LinearTap ty = linear_tap(y, g.h, g.scale_h);
      const int64_t band_row[2] = {ty.i0 - i_begin, ty.i1 - i_begin};
      const float row_weight[2] = {ty.w0, ty.w1};
      // Pair (c, jl) = (pair % classes, pair / classes): consecutive threads, consecutive classes.
      int c = first_class, jl = first_col;
      for (int pair = threadIdx.x; pair < pairs; pair += blockDim.x) {
        // Output columns of this chunk (relative to its first) that read head column jl: as
        // their upper tap in [lo, mid), as their lower tap in [mid, hi). In increasing x,
        // so the sum's order is that of a single pass over the columns.
        const int* range = sh.col_range + 3 * jl;
        const int lo = max(range[0], chunk_begin) - chunk_begin;
        const int hi = min(range[2], chunk_end) - chunk_begin;
        const int mid = min(max(range[1] - chunk_begin, lo), hi);
        const float* dz = sh.dz + c * dz_stride;
        float partial = 0.f;
        for (int xl = lo; xl < mid; ++xl) partial += sh.weight_upper[xl] * dz[xl];
        for (int xl = mid; xl < hi; ++xl) partial += sh.weight_lower[xl] * dz[xl];
        for (int r = 0; r < 2; ++r)
          if (band_row[r] >= 0 && band_row[r] < i_end - i_begin)
            sh.acc[(band_row[r] * classes + c) * tiling.tile_cols + jl] += row_weight[r] * partial;
        c += step_class;
        jl += step_col;
        if (c >= classes) {
          c -= classes;
          ++jl;
        }
      }
      __syncthreads();  // dz is rewritten by the next row
    }
    __syncthreads();  // the weights are rewritten by the next chunk
  }

  const float coef = *grad_loss / static_cast<float>(g.N * g.H * g.W);
  for (int64_t a = threadIdx.x; a < accumulators; a += blockDim.x) {
    const int64_t jl = a % tiling.tile_cols, c = (a / tiling.tile_cols) % g.C, b = a / (tiling.tile_cols * g.C);
    if (jl < tile_cols && i_begin + b < i_end)
      grad[((n * g.C + c) * g.h + i_begin + b) * g.w + j_begin + jl] = static_cast<scalar_t>(sh.acc[a] * coef);
  }
}

}  // namespace ohem_cuda
}  // namespace bisenet_fast
