// Shared by CPU (.cpp) and CUDA (.cu) translation units.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define BF_HOST_DEVICE __host__ __device__ __forceinline__
#define BF_DEVICE __device__ __forceinline__
#else
#define BF_HOST_DEVICE inline
// Device code compiled for the CPU: tests/cuda_emulation runs it there.
#define BF_DEVICE inline
#endif

// A CPU hot loop compiled three times, for AVX-512 (x86-64-v4), AVX2+FMA (x86-64-v3) and
// the baseline ISA, and picked when the library loads (GCC function multiversioning): the
// build flags are the baseline's, while ATen's own kernels use AVX2/AVX-512 on the same
// machines. The AVX-512 clone made the BGA rows 10-25 % faster on a Zen 4 CPU than the AVX2
// one. Put the functions in an anonymous namespace so no resolver symbol is shared between
// files.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(__CUDACC__)
#define BF_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define BF_CPU_CLONES
#endif
