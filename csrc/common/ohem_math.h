// Arithmetic of the OHEM cross-entropy shared by the CPU and CUDA kernels: the order key of
// a probability for the exact radix select, the digit layout of that select, and the
// per-class gradient of a kept pixel.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/macros.h"

namespace bisenet_fast {

// Probabilities are >= 0 (ignored pixels are stored as +inf), so their IEEE bit patterns,
// read as unsigned integers, order exactly like the values: the k-th smallest key is the
// k-th smallest probability, ties included, without any sort.
BF_HOST_DEVICE uint32_t prob_key(float p) {
  uint32_t key;
  memcpy(&key, &p, sizeof(key));
  return key;
}

BF_HOST_DEVICE uint64_t prob_key(double p) {
  uint64_t key;
  memcpy(&key, &p, sizeof(key));
  return key;
}

BF_HOST_DEVICE float prob_from_key(uint32_t key) {
  float p;
  memcpy(&p, &key, sizeof(p));
  return p;
}

BF_HOST_DEVICE double prob_from_key(uint64_t key) {
  double p;
  memcpy(&p, &key, sizeof(p));
  return p;
}

// One pass of the radix select looks at the digit of `bits` bits starting at bit `shift`
// of the keys whose higher bits equal the prefix found so far.
template <typename key_t>
BF_HOST_DEVICE bool key_has_prefix(key_t key, key_t prefix, int shift) {
  // shift == key width means "no prefix fixed yet".
  return shift >= static_cast<int>(8 * sizeof(key_t)) || (key >> shift) == (prefix >> shift);
}

template <typename key_t>
BF_HOST_DEVICE uint32_t key_digit(key_t key, int shift, int bits) {
  return static_cast<uint32_t>((key >> shift) & ((key_t(1) << bits) - 1));
}

// Given the histogram of the current digit (over the keys with the current prefix) and the
// rank k among them, the bin that holds the k-th key; k becomes its rank inside that bin.
template <typename count_t>
BF_HOST_DEVICE uint32_t select_bin(const count_t* histogram, uint32_t bins, int64_t* k) {
  int64_t below = 0;
  for (uint32_t b = 0; b < bins; ++b) {
    const int64_t here = static_cast<int64_t>(histogram[b]);
    if (below + here > *k) {
      *k -= below;
      return b;
    }
    below += here;
  }
  return bins - 1;  // unreachable when k < number of keys
}

// The rank (0-indexed) of the budget pixel among the valid ones, mmseg's
// min(min_kept * N, n_valid - 1); only meaningful when n_valid > 0. The product saturates
// instead of overflowing (min_kept >= 0, batch >= 1).
BF_HOST_DEVICE int64_t ohem_rank(int64_t min_kept, int64_t batch, int64_t n_valid) {
  const int64_t budget = min_kept > INT64_MAX / batch ? INT64_MAX : min_kept * batch;
  return budget < n_valid - 1 ? budget : n_valid - 1;
}

// threshold = max(thresh, k-th smallest p) equals thresh exactly when at least k + 1 valid
// probabilities are <= thresh; only otherwise is the k-th value needed.
BF_HOST_DEVICE bool ohem_needs_select(int64_t n_valid, int64_t count_le_thresh, int64_t k) {
  return n_valid > 0 && count_le_thresh < k + 1;
}

// Whether a valid pixel of probability p is kept (mmseg: p < threshold). A NaN p (a NaN or
// infinite upsampled logit) counts as kept, so that its NaN cross-entropy reaches the loss
// and the gradient: in the reference, CE * weight is NaN even where the weight is 0, and a
// silently finite loss would hide the blow-up from the training loop's check.
template <typename acc_t>
BF_HOST_DEVICE bool ohem_kept(acc_t p, acc_t threshold) {
  return !(p >= threshold);
}

// d loss / d z_c of a pixel with loss weight `coef` (kept * grad_loss / (N*H*W)).
template <typename acc_t>
BF_HOST_DEVICE acc_t ce_grad(acc_t softmax_c, bool is_target, acc_t coef) {
  return coef * (softmax_c - (is_target ? acc_t(1) : acc_t(0)));
}

}  // namespace bisenet_fast
