// What CUDA block code needs to compile and run on the CPU, so tests can run a kernel's
// blocks without a GPU: threadIdx, blockIdx and __syncthreads (every block of the grid
// runs in turn, its threads as OS threads that really run concurrently and meet at a
// barrier; shared memory starts as NaN, so a read of a slot the block never wrote shows
// in the output); __threadfence, atomicAdd on int and __ldcg (blocks run one after
// another here, so a block's atomics always see every earlier block's); __half and __nv_bfloat16 (c10's, same rounding); and the part of
// nvcuda::wmma the kernels use, where each lane holds its warp's whole tile and computes
// the whole product (so the lanes agree, as wmma's collective operations require), and
// lane 0 stores it. Tensor-core arithmetic is emulated as float32 FMAs over float32
// products, exact for 16-bit and TF32 operands. Other warp-level operations (shuffles,
// votes) are not emulated: block code that uses them does not compile here.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

namespace cuda_emulation {

struct Index {
  unsigned x = 0, y = 0, z = 0;
};

class BlockBarrier {
 public:
  explicit BlockBarrier(int threads) : threads_(threads) {}

  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const unsigned long generation = generation_;
    if (++arrived_ == threads_) {
      arrived_ = 0;
      ++generation_;
      released_.notify_all();
      return;
    }
    released_.wait(lock, [&] { return generation_ != generation; });
  }

 private:
  std::mutex mutex_;
  std::condition_variable released_;
  const int threads_;
  int arrived_ = 0;
  unsigned long generation_ = 0;
};

inline thread_local Index thread_index;
inline thread_local Index block_index;
inline thread_local BlockBarrier* block_barrier = nullptr;

// block(shared) for every block of a grid_x x grid_y grid, `threads` threads each, with
// `shared_bytes` of 128-byte aligned shared memory.
template <typename Block>
void run_grid(unsigned grid_x, unsigned grid_y, unsigned grid_z, int threads, std::size_t shared_bytes,
              const Block& block) {
  std::vector<std::max_align_t> storage((shared_bytes + 128) / sizeof(std::max_align_t) + 1);
  auto* shared = reinterpret_cast<unsigned char*>((reinterpret_cast<std::uintptr_t>(storage.data()) + 127) / 128 * 128);
  for (unsigned bz = 0; bz < grid_z; ++bz) {
  for (unsigned by = 0; by < grid_y; ++by) {
    for (unsigned bx = 0; bx < grid_x; ++bx) {
      std::memset(shared, 0xff, shared_bytes);  // NaN as float, float16 and bfloat16
      BlockBarrier barrier(threads);
      std::vector<std::thread> block_threads;
      block_threads.reserve(threads);
      for (int t = 0; t < threads; ++t) {
        block_threads.emplace_back([&, t] {
          thread_index = {static_cast<unsigned>(t), 0, 0};
          block_index = {bx, by, bz};
          block_barrier = &barrier;
          block(shared);
        });
      }
      for (auto& thread : block_threads) thread.join();
    }
  }
  }
}

}  // namespace cuda_emulation

#define threadIdx (::cuda_emulation::thread_index)
#define blockIdx (::cuda_emulation::block_index)
inline void __syncthreads() { ::cuda_emulation::block_barrier->arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline int atomicAdd(int* address, int value) { return __atomic_fetch_add(address, value, __ATOMIC_SEQ_CST); }
inline float __ldcg(const float* address) { return *address; }

using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;
inline __half __float2half_rn(float v) { return __half(v); }
inline __nv_bfloat16 __float2bfloat16_rn(float v) { return __nv_bfloat16(v); }

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}  // namespace precision

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = rows * cols;
  using element_type = std::conditional_t<std::is_same_v<T, precision::tf32>, float, T>;
  element_type x[num_elements];  // the whole tile, row-major
};

template <typename Use, int M, int N, int K, typename T, typename Layout, typename Source>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const Source* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, Layout>;
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c)
      f.x[r * F::cols + c] = std::is_same_v<Layout, row_major> ? p[r * ldm + c] : p[c * ldm + r];
}

template <int M, int N, int K>
void fill_fragment(fragment<accumulator, M, N, K, float>& f, float v) {
  for (auto& e : f.x) e = v;
}

template <int M, int N, int K, typename T, typename LayoutA, typename LayoutB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LayoutA>& a,
              const fragment<matrix_b, M, N, K, T, LayoutB>& b, const fragment<accumulator, M, N, K, float>& c) {
  float result[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float v = c.x[i * N + j];
      for (int k = 0; k < K; ++k) v += static_cast<float>(a.x[i * K + k]) * static_cast<float>(b.x[k * N + j]);
      result[i * N + j] = v;
    }
  std::memcpy(d.x, result, sizeof(result));
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  if (threadIdx.x % 32 != 0) return;  // the lanes hold the same tile: one writes it
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) p[layout == mem_row_major ? r * ldm + c : c * ldm + r] = f.x[r * N + c];
}

// cvt.rna.tf32.f32: 10 mantissa bits, rounded to nearest, ties away from zero.
inline float __float_to_tf32(float v) {
  std::uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  if ((bits & 0x7f800000u) != 0x7f800000u) bits = (bits + 0x1000u) & 0xffffe000u;
  std::memcpy(&v, &bits, sizeof(bits));
  return v;
}

}  // namespace wmma
}  // namespace nvcuda
