// What CUDA kernel code needs to compile and run on the CPU, so tests can run a kernel's
// blocks without a GPU. Every block of a grid runs in turn; its threads are fibers (ucontext)
// on the calling OS thread, each with its own stack, switched at every barrier and warp vote.
// Between two barriers the block's threads run one after another in an order shuffled anew
// at every barrier (deterministically): a missing barrier then shows as a read of a value
// not yet written, or of one already overwritten, whichever thread writes it. A race of two
// threads writing one location without an atomic is not detected.
//   - threadIdx, blockIdx, blockDim, gridDim; __global__, __device__, __host__,
//     __forceinline__ and __launch_bounds__ mean nothing here; a static __shared__ variable is
//     a function-local static (one block runs at a time), dynamic_shared_memory() the block's
//     dynamic shared memory, which starts as NaN, so a read of a slot the block never wrote
//     shows in the output;
//   - __syncthreads and __syncthreads_or (a thread that has returned counts as arrived);
//   - the warp votes __ballot_sync and __match_any_sync, which exchange the values of the
//     lanes in their mask, __ffs and __popc;
//   - cub::BlockReduce's Sum (its result only in thread 0, as cub defines it);
//   - __threadfence, atomicAdd on int, unsigned and unsigned long long, __ldcg and __ldg
//     (blocks run one after another here, so a block's atomics always see every earlier
//     block's), __expf (as expf), __fmaf_rn and __fmul_rn, and CUDA's min and max of mixed
//     integer types;
//   - __half and __nv_bfloat16 (c10's, same rounding);
//   - the part of nvcuda::wmma the kernels use, where each lane holds its warp's whole tile
//     and computes the whole product (so the lanes agree, as wmma's collective operations
//     require), and lane 0 stores it. Tensor-core arithmetic is emulated as float32 FMAs over
//     float32 products, exact for 16-bit and TF32 operands.
// A block whose threads all wait and cannot go on (a barrier some thread never reaches while
// others vote, a vote's mask naming a lane that never votes) raises std::runtime_error (a
// RuntimeError in Python) naming the threads' states, instead of hanging; so does a misuse
// of a built-in. Shuffles are not emulated: code that uses them does not compile here.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <ucontext.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace cuda_emulation {

struct Index {
  unsigned x = 0, y = 0, z = 0;
};

[[noreturn]] inline void fail(const std::string& what) { throw std::runtime_error("cuda_emulation: " + what); }

// One CUDA thread.
struct Fiber {
  enum class State { kRunnable, kAtBarrier, kVoting, kFinished };
  Index index;
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  State state = State::kRunnable;
  int barrier_predicate = 0;  // its __syncthreads_or argument; then the block's count of non-zero ones
  std::array<std::uint32_t, 32> vote_values{};
};

// A warp vote in progress: the lanes of `mask` that have joined, and their values.
struct VoteRound {
  unsigned warp, mask, joined;
  std::array<std::uint32_t, 32> values;
};

// The block that runs: its fibers and the scheduler's context.
class Block {
 public:
  static constexpr std::size_t kStackBytes = 256 * 1024;

  explicit Block(int threads) : fibers_(threads) {
    for (auto& fiber : fibers_) fiber.stack.reset(new char[kStackBytes]);  // untouched pages cost nothing
  }

  // Runs code() on every thread of the block `index` until all have returned.
  template <typename Code>
  void run(const Index& index, const Code& code, std::mt19937& shuffle) {
    code_ = [](const void* c) { (*static_cast<const Code*>(c))(); };
    code_argument_ = &code;
    for (std::size_t t = 0; t < fibers_.size(); ++t) {
      Fiber& fiber = fibers_[t];
      fiber.index = {static_cast<unsigned>(t), 0, 0};
      fiber.state = Fiber::State::kRunnable;
      getcontext(&fiber.context);
      fiber.context.uc_stack.ss_sp = fiber.stack.get();
      fiber.context.uc_stack.ss_size = kStackBytes;
      fiber.context.uc_link = &scheduler_;
      makecontext(&fiber.context, &Block::fiber_main, 0);
    }
    block_index_ = index;
    std::vector<Fiber*> order;
    for (;;) {
      order.clear();
      for (auto& fiber : fibers_)
        if (fiber.state == Fiber::State::kRunnable) order.push_back(&fiber);
      if (order.empty() && !release_barrier()) break;
      std::shuffle(order.begin(), order.end(), shuffle);
      for (Fiber* fiber : order) {
        if (fiber->state != Fiber::State::kRunnable) continue;
        current_ = fiber;
        swapcontext(&scheduler_, &fiber->context);
        current_ = nullptr;
        // The other threads' stacks are dropped as they are: what they hold is not freed.
        if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
      }
    }
    for (const auto& fiber : fibers_)
      if (fiber.state != Fiber::State::kFinished) report_deadlock();
  }

  Fiber& current() { return *current_; }
  const Index& block_index() const { return block_index_; }
  unsigned threads() const { return static_cast<unsigned>(fibers_.size()); }

  // A barrier of the running thread: returns the number of the block's threads whose
  // predicate is non-zero (__syncthreads_or: whether any is).
  int barrier(int predicate) {
    Fiber& fiber = *current_;
    fiber.barrier_predicate = predicate != 0;
    fiber.state = Fiber::State::kAtBarrier;
    yield(fiber);
    return fiber.barrier_predicate;
  }

  // The values the lanes of `mask` in the running thread's warp vote with, once all have.
  std::array<std::uint32_t, 32> vote(unsigned mask, std::uint32_t value) {
    Fiber& fiber = *current_;
    const unsigned warp = fiber.index.x / 32, lane = fiber.index.x % 32;
    if (!((mask >> lane) & 1u)) fail("a lane votes with a mask that leaves it out");
    // The oldest round of this warp and mask the lane has not joined: lanes that vote in the
    // same order meet in the same rounds; lanes outside the mask may vote in their own.
    auto round = std::find_if(rounds_.begin(), rounds_.end(), [&](const VoteRound& r) {
      return r.warp == warp && r.mask == mask && !((r.joined >> lane) & 1u);
    });
    if (round == rounds_.end()) round = rounds_.insert(rounds_.end(), VoteRound{warp, mask, 0u, {}});
    round->values[lane] = value;
    round->joined |= 1u << lane;
    if (round->joined != mask) {
      fiber.state = Fiber::State::kVoting;
      yield(fiber);
      return fiber.vote_values;
    }
    const auto values = round->values;
    for (unsigned l = 0; l < 32; ++l) {
      if (!((mask >> l) & 1u) || l == lane) continue;
      Fiber& peer = fibers_[warp * 32 + l];
      peer.vote_values = values;
      peer.state = Fiber::State::kRunnable;
    }
    rounds_.erase(round);
    return values;
  }

 private:
  static void fiber_main();

  void yield(Fiber& fiber) { swapcontext(&fiber.context, &scheduler_); }

  // When every thread waits at the barrier or has returned: releases the waiting ones with
  // the count of their non-zero predicates; false if none waits there.
  bool release_barrier() {
    int count = 0, waiting = 0;
    for (const auto& fiber : fibers_) {
      if (fiber.state == Fiber::State::kVoting) return false;
      if (fiber.state == Fiber::State::kAtBarrier) ++waiting, count += fiber.barrier_predicate;
    }
    for (auto& fiber : fibers_) {
      if (fiber.state != Fiber::State::kAtBarrier) continue;
      fiber.state = Fiber::State::kRunnable;
      fiber.barrier_predicate = count;
    }
    return waiting > 0;
  }

  [[noreturn]] void report_deadlock() const {
    std::string states;
    for (const auto& fiber : fibers_)
      if (fiber.state != Fiber::State::kFinished)
        states += "; thread " + std::to_string(fiber.index.x) +
                  (fiber.state == Fiber::State::kVoting ? " waits in a warp vote" : " waits at a barrier");
    fail("deadlock in block (" + std::to_string(block_index_.x) + ", " + std::to_string(block_index_.y) + ", " +
         std::to_string(block_index_.z) + "): its threads wait for each other" + states);
  }

  std::vector<Fiber> fibers_;
  std::vector<VoteRound> rounds_;
  ucontext_t scheduler_;
  Fiber* current_ = nullptr;
  Index block_index_;
  void (*code_)(const void*) = nullptr;
  const void* code_argument_ = nullptr;
  std::exception_ptr error_;  // thrown by a thread: the block stops, run() rethrows it
};

inline Block* running_block = nullptr;
inline Index grid_dim;
inline Index block_dim;
inline unsigned char* dynamic_shared = nullptr;

inline void Block::fiber_main() {
  try {
    running_block->code_(running_block->code_argument_);
  } catch (...) {  // an exception cannot leave the fiber's stack: the scheduler rethrows it
    running_block->error_ = std::current_exception();
  }
  running_block->current().state = Fiber::State::kFinished;
}  // returns to the scheduler (uc_link)

// The launch limits of the GPUs these kernels target (compute capability 8.0-9.0): a launch
// beyond them fails there ("invalid configuration argument"), so it fails here too.
constexpr unsigned kMaxGridX = 2147483647u, kMaxGridYZ = 65535u;
constexpr int kMaxThreads = 1024;
constexpr std::size_t kMaxSharedBytes = 227 * 1024;  // sm_90's opt-in maximum per block

inline void check_launch(unsigned grid_x, unsigned grid_y, unsigned grid_z, int threads, std::size_t shared_bytes) {
  const auto fail = [&](const std::string& why) {
    throw std::runtime_error("invalid launch (grid " + std::to_string(grid_x) + "x" + std::to_string(grid_y) + "x" +
                             std::to_string(grid_z) + ", " + std::to_string(threads) + " threads, " +
                             std::to_string(shared_bytes) + " shared bytes): " + why);
  };
  if (grid_x == 0 || grid_y == 0 || grid_z == 0) fail("an empty grid");
  if (grid_x > kMaxGridX || grid_y > kMaxGridYZ || grid_z > kMaxGridYZ) fail("a grid dimension over its limit");
  if (threads < 1 || threads > kMaxThreads) fail("threads per block outside [1, 1024]");
  if (shared_bytes > kMaxSharedBytes) fail("more dynamic shared memory than a block may have");
}

// block_code(shared) for every block of a grid_x x grid_y x grid_z grid, `threads` threads
// each, with `shared_bytes` of 128-byte aligned dynamic shared memory, NaN-filled before
// each block. One grid at a time per process.
template <typename BlockCode>
void run_grid(unsigned grid_x, unsigned grid_y, unsigned grid_z, int threads, std::size_t shared_bytes,
              const BlockCode& block_code) {
  check_launch(grid_x, grid_y, grid_z, threads, shared_bytes);
  static std::mutex one_grid_at_a_time;
  const std::lock_guard<std::mutex> lock(one_grid_at_a_time);
  // Exactly shared_bytes (at least 1), so that a sanitized build (cuda_emulation._load)
  // reports an access past the end.
  void* allocation = nullptr;
  if (posix_memalign(&allocation, 128, std::max<std::size_t>(shared_bytes, 1)) != 0) throw std::bad_alloc();
  const std::unique_ptr<void, decltype(&std::free)> storage(allocation, &std::free);
  auto* shared = static_cast<unsigned char*>(allocation);
  Block block(threads);
  running_block = &block;
  grid_dim = {grid_x, grid_y, grid_z};
  block_dim = {static_cast<unsigned>(threads), 1, 1};
  dynamic_shared = shared;
  std::mt19937 shuffle(12345);
  const auto code = [&] { block_code(shared); };
  for (unsigned bz = 0; bz < grid_z; ++bz)
    for (unsigned by = 0; by < grid_y; ++by)
      for (unsigned bx = 0; bx < grid_x; ++bx) {
        std::memset(shared, 0xff, shared_bytes);  // NaN as float, float16 and bfloat16
        block.run({bx, by, bz}, code, shuffle);
      }
  running_block = nullptr;
}

}  // namespace cuda_emulation

#define __global__ inline
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define threadIdx (::cuda_emulation::running_block->current().index)
#define blockIdx (::cuda_emulation::running_block->block_index())
#define blockDim (::cuda_emulation::block_dim)
#define gridDim (::cuda_emulation::grid_dim)

inline unsigned char* dynamic_shared_memory() { return ::cuda_emulation::dynamic_shared; }

inline void __syncthreads() { ::cuda_emulation::running_block->barrier(0); }
inline int __syncthreads_or(int predicate) { return ::cuda_emulation::running_block->barrier(predicate) > 0; }

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  const auto votes = ::cuda_emulation::running_block->vote(mask, predicate != 0);
  unsigned ballot = 0;
  for (int l = 0; l < 32; ++l)
    if (((mask >> l) & 1u) && votes[l]) ballot |= 1u << l;
  return ballot;
}

inline unsigned __match_any_sync(unsigned mask, unsigned value) {
  const auto values = ::cuda_emulation::running_block->vote(mask, value);
  unsigned peers = 0;
  for (int l = 0; l < 32; ++l)
    if (((mask >> l) & 1u) && values[l] == value) peers |= 1u << l;
  return peers;
}

inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }

inline void __threadfence() {}  // one thread runs at a time
template <typename T>
T atomicAdd(T* address, T value) {
  static_assert(std::is_same_v<T, int> || std::is_same_v<T, unsigned> || std::is_same_v<T, unsigned long long>,
                "CUDA's integer atomicAdd overloads");
  const T old = *address;  // one thread runs at a time
  *address = old + value;
  return old;
}
inline float __ldcg(const float* address) { return *address; }
template <typename T>
T __ldg(const T* address) {
  return *address;
}
inline float __expf(float x) { return std::exp(x); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fmul_rn(float a, float b) { return a * b; }

template <typename A, typename B>
std::common_type_t<A, B> min(A a, B b) {
  return b < a ? b : a;
}
template <typename A, typename B>
std::common_type_t<A, B> max(A a, B b) {
  return a < b ? b : a;
}

namespace cub {

template <typename T, int kBlockThreads>
class BlockReduce {
 public:
  struct TempStorage {
    T values[kBlockThreads];
  };
  explicit BlockReduce(TempStorage& storage) : storage_(storage) {
    if (blockDim.x != kBlockThreads)
      ::cuda_emulation::fail("BlockReduce<" + std::to_string(kBlockThreads) + "> in a block of " +
                             std::to_string(blockDim.x) + " threads");
  }
  // The block's sum in thread 0; elsewhere a value no caller may use (cub leaves it undefined).
  T Sum(T value) {
    storage_.values[threadIdx.x] = value;
    __syncthreads();
    if (threadIdx.x != 0) return unusable();
    T total = storage_.values[0];
    for (int t = 1; t < kBlockThreads; ++t) total = total + storage_.values[t];
    return total;
  }

 private:
  // All bits set: NaN in floating point, -1 in integers.
  static T unusable() {
    static_assert(std::is_trivially_copyable_v<T>, "cub reduces plain values");
    T value;
    std::memset(&value, 0xff, sizeof(value));
    return value;
  }

  TempStorage& storage_;
};

}  // namespace cub

// CUDA's vector types, aligned as on the GPU: a sanitized build (-fsanitize=alignment)
// reports a vector access that would fault there ("misaligned address").
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};

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

// What the CUDA programming guide requires of every wmma load and store, which the GPU does
// not check (a violation is undefined behaviour there): a 256-bit aligned pointer, and a
// leading dimension of a whole number of 16 bytes.
template <typename Element>
void check_matrix_access(const char* what, const Element* p, unsigned ldm) {
  if (reinterpret_cast<std::uintptr_t>(p) % 32 != 0)
    throw std::runtime_error(std::string(what) + ": the pointer must be 256-bit (32-byte) aligned");
  if (ldm * sizeof(Element) % 16 != 0)
    throw std::runtime_error(std::string(what) + ": ldm must be a multiple of 16 bytes, got " + std::to_string(ldm) +
                             " elements of " + std::to_string(sizeof(Element)) + " bytes");
}

template <typename Use, int M, int N, int K, typename T, typename Layout, typename Source>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const Source* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, Layout>;
  check_matrix_access("wmma::load_matrix_sync", p, ldm);
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
  check_matrix_access("wmma::store_matrix_sync", p, ldm);
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
