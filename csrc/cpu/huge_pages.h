// Fresh large CPU outputs backed by transparent huge pages where the kernel allows it.
//
// A kernel writing a fresh 40 MB output first faults in ~10,000 zeroed 4 KiB pages: on the
// project's 2-core machine that took ~14 ms, against ~1 ms to write the same memory once
// mapped, i.e. more than the arithmetic of a bilinear resize or of a Winograd conv's output
// transform. Advising the output's 2 MiB-aligned interior as MADV_HUGEPAGE before the first
// write makes those faults map 2 MiB pages instead (what PyTorch's own
// THP_MEM_ALLOC_ENABLE=1 does for every large allocation). Advisory only: where THP is
// disabled, or memory came from an already-mapped heap, nothing changes.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace bisenet_fast {

inline void advise_huge_pages(const at::Tensor& fresh) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
  const auto begin = reinterpret_cast<uintptr_t>(fresh.data_ptr());
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (begin + fresh.nbytes()) & ~(kHugePage - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // errors: advice ignored
#else
  (void)fresh;
#endif
}

}  // namespace bisenet_fast
