// Shared by CPU (.cpp) and CUDA (.cu) translation units.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define BF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define BF_HOST_DEVICE inline
#endif
