// Launch API shared by the binding (ops.cpp), the CPU loops (cpu_kernels.cpp) and the CUDA
// kernels (*.cu). Plain pointers and sizes only: the .cu files must build without torch headers.
#pragma once

#include <cstdint>

#if defined(RELSCALE_WITH_CUDA) || defined(__CUDACC__)
#include <cuda_runtime_api.h>
#endif

namespace relscale {

// Storage type of the tensors; every kernel computes in fp32 whatever the storage type.
enum class ElementType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Rotary embedding of q and k in one pass (Hugging Face "rotate_half" layout).
// q is (tokens, q_heads, head_dim) and k is (tokens, k_heads, head_dim), both contiguous; the
// angle of pair i at token t is positions[t] * inv_freq[i], with the frequency table computed once
// in Python (relscale.ops.rope_inv_freq: plain or llama3-scaled), so no formula is repeated here.
// inverse rotates by the negative angle (the backward). q_out may equal q_in and k_out may equal
// k_in (in place).
struct RopeArgs {
  const void* q_in;
  void* q_out;
  const void* k_in;
  void* k_out;
  const int64_t* positions;  // (tokens,) contiguous
  const double* inv_freq;    // (head_dim / 2,) contiguous float64, on the same device as q
  int64_t tokens;
  int64_t q_heads;
  int64_t k_heads;
  int64_t head_dim;  // even, at most kMaxRopeHeadDim
  bool inverse;
  ElementType type;
};

constexpr int64_t kMaxRopeHeadDim = 256;

// SwiGLU on n contiguous elements: out = silu(gate) * up, and its backward
// grad_gate = grad_out * up * sig(g) * (1 + g * (1 - sig(g))), grad_up = grad_out * silu(g).
struct SwigluArgs {
  const void* grad_out;  // backward only
  const void* gate;
  const void* up;
  void* out;        // forward: out; backward: grad_gate
  void* grad_up;    // backward only
  int64_t n;
  ElementType type;
};

// CPU loops (always built).
void rope_cpu(const RopeArgs& args);
void swiglu_forward_cpu(const SwigluArgs& args);
void swiglu_backward_cpu(const SwigluArgs& args);

#if defined(RELSCALE_WITH_CUDA) || defined(__CUDACC__)
// CUDA launchers: enqueue on `stream` and return the launch status (cudaGetLastError), which the
// binding turns into a Python error.
cudaError_t rope_cuda(const RopeArgs& args, cudaStream_t stream);
cudaError_t swiglu_forward_cuda(const SwigluArgs& args, cudaStream_t stream);
cudaError_t swiglu_backward_cuda(const SwigluArgs& args, cudaStream_t stream);
#endif

}  // namespace relscale
