// Device helpers shared by the .cu files: fp32 conversions that do not rely on the implicit
// half/bfloat16 conversions (torch builds with __CUDA_NO_HALF_CONVERSIONS__ and friends), packed
// 16-byte vectors, and the cached multiprocessor count that sizes the grids.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

namespace relscale {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ void from_float(float x, float& out) { out = x; }
__device__ __forceinline__ void from_float(float x, __half& out) { out = __float2half_rn(x); }
__device__ __forceinline__ void from_float(float x, __nv_bfloat16& out) { out = __float2bfloat16_rn(x); }

// VEC elements loaded and stored as one access (16 bytes when VEC * sizeof(T) == 16).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* ptr) {
  return *reinterpret_cast<const Pack<T, VEC>*>(ptr);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* ptr, const Pack<T, VEC>& pack) {
  *reinterpret_cast<Pack<T, VEC>*>(ptr) = pack;
}

inline bool aligned16(const void* ptr) { return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0; }

constexpr int kMaxDevices = 64;

// Multiprocessor count of the current device, read once per device (the attribute query is a
// driver call we do not want on every launch).
inline cudaError_t multiprocessor_count(int* count) {
  static std::atomic<int> cache[kMaxDevices] = {};
  int device = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status != cudaSuccess) return status;
  if (device >= 0 && device < kMaxDevices) {
    int cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) {
      *count = cached;
      return cudaSuccess;
    }
  }
  status = cudaDeviceGetAttribute(count, cudaDevAttrMultiProcessorCount, device);
  if (status != cudaSuccess) return status;
  if (device >= 0 && device < kMaxDevices) cache[device].store(*count, std::memory_order_relaxed);
  return cudaSuccess;
}

}  // namespace relscale
