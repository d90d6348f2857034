// Fused SwiGLU forward (out = silu(gate) * up) and backward, one read of every input and one
// write of every output. Each thread handles 16-byte packs in a grid-stride loop sized from the
// multiprocessor count; elements past the last full pack (or every element, when a pointer is
// not 16-byte aligned) go through a scalar loop.
#include <algorithm>
#include <type_traits>

#include "cuda_common.cuh"
#include "kernels.h"

namespace relscale {
namespace {

constexpr int kSwigluThreads = 256;

// expf, not __expf: the fast intrinsic loses ~|x| ulps, and this kernel is memory bound anyway
__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

struct ForwardMath {
  // out = silu(g) * u
  __device__ __forceinline__ static void apply(float g, float u, float, float& out, float&) {
    out = g * sigmoid(g) * u;
  }
};

struct BackwardMath {
  // d_gate = d_out * u * s * (1 + g * (1 - s)),  d_up = d_out * g * s,  s = sigmoid(g)
  __device__ __forceinline__ static void apply(float g, float u, float d_out, float& d_gate, float& d_up) {
    const float s = sigmoid(g);
    d_gate = d_out * u * s * (1.0f + g * (1.0f - s));
    d_up = d_out * g * s;
  }
};

// FORWARD: reads gate, up; writes out. BACKWARD: reads grad_out, gate, up; writes out (= grad_gate)
// and grad_up.
template <typename T, int VEC, typename Math, bool kBackward>
__global__ void __launch_bounds__(kSwigluThreads)
swiglu_kernel(const T* __restrict__ grad_out, const T* __restrict__ gate, const T* __restrict__ up,
              T* __restrict__ out, T* __restrict__ grad_up, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t packs = n / VEC;
  for (int64_t p = first; p < packs; p += stride) {
    const Pack<T, VEC> g = load_pack<T, VEC>(gate + p * VEC);
    const Pack<T, VEC> u = load_pack<T, VEC>(up + p * VEC);
    Pack<T, VEC> d;
    if constexpr (kBackward) d = load_pack<T, VEC>(grad_out + p * VEC);
    Pack<T, VEC> y0, y1;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float r0, r1 = 0.0f;
      Math::apply(to_float(g.v[j]), to_float(u.v[j]), kBackward ? to_float(d.v[j]) : 0.0f, r0, r1);
      from_float(r0, y0.v[j]);
      if constexpr (kBackward) from_float(r1, y1.v[j]);
    }
    store_pack<T, VEC>(out + p * VEC, y0);
    if constexpr (kBackward) store_pack<T, VEC>(grad_up + p * VEC, y1);
  }
  for (int64_t i = packs * VEC + first; i < n; i += stride) {  // scalar tail
    float r0, r1 = 0.0f;
    Math::apply(to_float(gate[i]), to_float(up[i]), kBackward ? to_float(grad_out[i]) : 0.0f, r0, r1);
    from_float(r0, out[i]);
    if constexpr (kBackward) from_float(r1, grad_up[i]);
  }
}

template <typename T, bool kBackward>
cudaError_t launch_swiglu(const SwigluArgs& args, cudaStream_t stream) {
  using Math = typename std::conditional<kBackward, BackwardMath, ForwardMath>::type;
  constexpr int kVec = 16 / sizeof(T);
  bool vectorized = aligned16(args.gate) && aligned16(args.up) && aligned16(args.out);
  if (kBackward) vectorized = vectorized && aligned16(args.grad_out) && aligned16(args.grad_up);

  int sm_count = 0;
  const cudaError_t status = multiprocessor_count(&sm_count);
  if (status != cudaSuccess) return status;
  const int64_t work = vectorized ? (args.n + kVec - 1) / kVec : args.n;
  const int64_t wanted = (work + kSwigluThreads - 1) / kSwigluThreads;
  const int blocks_per_sm = 2048 / kSwigluThreads;
  const int grid = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(wanted, int64_t{sm_count} * blocks_per_sm)));

  const T* grad_out = static_cast<const T*>(args.grad_out);
  const T* gate = static_cast<const T*>(args.gate);
  const T* up = static_cast<const T*>(args.up);
  T* out = static_cast<T*>(args.out);
  T* grad_up = static_cast<T*>(args.grad_up);
  if (vectorized) {
    swiglu_kernel<T, kVec, Math, kBackward><<<grid, kSwigluThreads, 0, stream>>>(grad_out, gate, up, out, grad_up, args.n);
  } else {
    swiglu_kernel<T, 1, Math, kBackward><<<grid, kSwigluThreads, 0, stream>>>(grad_out, gate, up, out, grad_up, args.n);
  }
  return cudaGetLastError();
}

template <bool kBackward>
cudaError_t dispatch_swiglu(const SwigluArgs& args, cudaStream_t stream) {
  if (args.n == 0) return cudaSuccess;
  switch (args.type) {
    case ElementType::kFloat32: return launch_swiglu<float, kBackward>(args, stream);
    case ElementType::kFloat16: return launch_swiglu<__half, kBackward>(args, stream);
    case ElementType::kBFloat16: return launch_swiglu<__nv_bfloat16, kBackward>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t swiglu_forward_cuda(const SwigluArgs& args, cudaStream_t stream) {
  return dispatch_swiglu<false>(args, stream);
}

cudaError_t swiglu_backward_cuda(const SwigluArgs& args, cudaStream_t stream) {
  return dispatch_swiglu<true>(args, stream);
}

}  // namespace relscale
