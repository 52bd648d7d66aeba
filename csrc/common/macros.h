// Shared by CPU (.cpp) and CUDA (.cu) translation units.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define BF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define BF_HOST_DEVICE inline
#endif

// A CPU hot loop compiled twice, for AVX2+FMA (x86-64-v3) and for the baseline ISA, and
// picked when the library loads (GCC function multiversioning): the build flags are the
// baseline's, while ATen's own kernels use AVX2/AVX-512 on the same machines. Put the
// functions in an anonymous namespace so no resolver symbol is shared between files.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(__CUDACC__)
#define BF_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define BF_CPU_CLONES
#endif
