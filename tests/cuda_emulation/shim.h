// CUDA's block built-ins (threadIdx, blockIdx, __syncthreads) for device code compiled for
// the CPU, so tests can run a kernel's block code without a GPU: every block of the grid
// runs in turn, its threads as OS threads that really run concurrently and meet at a
// barrier. Shared memory starts as NaN, so a read of a slot the block never wrote shows
// in the output. Warp-level operations (shuffles, votes) are not emulated: block code
// that uses them cannot be compiled here.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <limits>
#include <mutex>
#include <thread>
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
// `shared_bytes` of shared memory.
template <typename Block>
void run_grid(unsigned grid_x, unsigned grid_y, int threads, std::size_t shared_bytes, const Block& block) {
  std::vector<float> shared((shared_bytes + sizeof(float) - 1) / sizeof(float));
  for (unsigned by = 0; by < grid_y; ++by) {
    for (unsigned bx = 0; bx < grid_x; ++bx) {
      std::fill(shared.begin(), shared.end(), std::numeric_limits<float>::quiet_NaN());
      BlockBarrier barrier(threads);
      std::vector<std::thread> block_threads;
      block_threads.reserve(threads);
      for (int t = 0; t < threads; ++t) {
        block_threads.emplace_back([&, t] {
          thread_index = {static_cast<unsigned>(t), 0, 0};
          block_index = {bx, by, 0};
          block_barrier = &barrier;
          block(shared.data());
        });
      }
      for (auto& thread : block_threads) thread.join();
    }
  }
}

}  // namespace cuda_emulation

#define threadIdx (::cuda_emulation::thread_index)
#define blockIdx (::cuda_emulation::block_index)
inline void __syncthreads() { ::cuda_emulation::block_barrier->arrive_and_wait(); }
