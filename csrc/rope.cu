// Rotary embedding of q and k in one launch (forward, and backward = rotation by -angle).
//
// Work is split in chunks of `chunk_tokens` tokens. For each chunk a block first fills a shared
// table of cos/sin for every (token, frequency) pair, then every thread rotates VEC pairs of one
// head at a time, so sincos is evaluated once per token and frequency, not once per head.
// The angle pos * inv_freq is formed in fp32 with its rounding error carried separately
// (inv_freq as a hi + lo pair split from the float64 table, the product split with an fma) and folded back
// into sin/cos, so the tables match a float64 reference to fp32 rounding even at large positions.
// The frequencies themselves come in as the float64 table of relscale.ops.rope_inv_freq (plain or
// llama3-scaled); the kernel never recomputes them.
#include <algorithm>

#include "cuda_common.cuh"
#include "kernels.h"

namespace relscale {
namespace {

constexpr int kRopeThreads = 256;
constexpr int kRopeSharedFloats = 4096;  // 16 KB of tables per block, so 8 blocks fit on an SM

// VEC table entries; 16-byte shared loads when VEC is a multiple of 4 (the row offsets then are).
template <int VEC>
__device__ __forceinline__ void load_table(const float* row, float (&out)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int j = 0; j < VEC; j += 4) {
      const float4 v = *reinterpret_cast<const float4*>(row + j);
      out[j] = v.x;
      out[j + 1] = v.y;
      out[j + 2] = v.z;
      out[j + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = row[j];
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kRopeThreads)
rope_kernel(const T* q_in, T* q_out, const T* k_in, T* k_out,  // may alias (in place)
            const int64_t* __restrict__ positions, const double* __restrict__ inv_freq_table,
            int64_t tokens, int q_heads, int k_heads, int head_dim, int chunk_tokens, float sign) {
  extern __shared__ __align__(16) float shared[];
  const int half = head_dim / 2;
  float* inv_freq_hi = shared;
  float* inv_freq_lo = inv_freq_hi + half;
  float* cos_table = inv_freq_lo + half;
  float* sin_table = cos_table + chunk_tokens * half;

  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const double inv_freq = inv_freq_table[i];
    const float hi = static_cast<float>(inv_freq);
    inv_freq_hi[i] = hi;
    inv_freq_lo[i] = static_cast<float>(inv_freq - static_cast<double>(hi));
  }

  const int groups = half / VEC;  // VEC-wide slices of one half of a head
  const int items_per_token = (q_heads + k_heads) * groups;
  const int64_t chunks = (tokens + chunk_tokens - 1) / chunk_tokens;

  for (int64_t chunk = blockIdx.x; chunk < chunks; chunk += gridDim.x) {
    const int64_t first_token = chunk * chunk_tokens;
    const int64_t remaining = tokens - first_token;
    const int chunk_len = remaining < chunk_tokens ? static_cast<int>(remaining) : chunk_tokens;
    __syncthreads();  // the inverse frequencies are ready and the previous chunk's tables are free

    for (int idx = threadIdx.x; idx < chunk_len * half; idx += blockDim.x) {
      const int local_token = idx / half;
      const int i = idx - local_token * half;
      const float pos = static_cast<float>(positions[first_token + local_token]);
      const float angle = pos * inv_freq_hi[i];
      // exact remainder of the product, plus the part of inv_freq fp32 could not hold
      const float delta = fmaf(pos, inv_freq_hi[i], -angle) + pos * inv_freq_lo[i];
      float s, c;
      sincosf(angle, &s, &c);
      // sin/cos(angle + delta) to second order; |delta| ~ 2^-24 |angle|, so the dropped delta^3/6
      // term stays below 3e-7 up to position 2e5
      const float cos_delta = 1.0f - 0.5f * delta * delta;
      cos_table[idx] = c * cos_delta - s * delta;
      sin_table[idx] = sign * (s * cos_delta + c * delta);
    }
    __syncthreads();

    for (int item = threadIdx.x; item < chunk_len * items_per_token; item += blockDim.x) {
      const int local_token = item / items_per_token;
      const int rest = item - local_token * items_per_token;
      const int head = rest / groups;
      const int col = (rest - head * groups) * VEC;
      const int64_t token = first_token + local_token;
      const T* src;
      T* dst;
      if (head < q_heads) {
        const int64_t offset = (token * q_heads + head) * head_dim + col;
        src = q_in + offset;
        dst = q_out + offset;
      } else {
        const int64_t offset = (token * k_heads + (head - q_heads)) * head_dim + col;
        src = k_in + offset;
        dst = k_out + offset;
      }
      const Pack<T, VEC> x1 = load_pack<T, VEC>(src);
      const Pack<T, VEC> x2 = load_pack<T, VEC>(src + half);
      float cos_v[VEC], sin_v[VEC];
      load_table<VEC>(cos_table + local_token * half + col, cos_v);
      load_table<VEC>(sin_table + local_token * half + col, sin_v);
      Pack<T, VEC> y1, y2;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float a = to_float(x1.v[j]);
        const float b = to_float(x2.v[j]);
        // rotate_half: the first half pairs with -second half, the second half with +first half
        from_float(a * cos_v[j] - b * sin_v[j], y1.v[j]);
        from_float(b * cos_v[j] + a * sin_v[j], y2.v[j]);
      }
      store_pack<T, VEC>(dst, y1);
      store_pack<T, VEC>(dst + half, y2);
    }
  }
}

template <typename T>
cudaError_t launch_rope(const RopeArgs& args, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int half = static_cast<int>(args.head_dim / 2);
  const bool vectorized = half % kVec == 0 && aligned16(args.q_in) && aligned16(args.q_out) &&
                          aligned16(args.k_in) && aligned16(args.k_out);
  const int vec = vectorized ? kVec : 1;
  const int items_per_token = static_cast<int>(args.q_heads + args.k_heads) * (half / vec);

  // Enough tokens per chunk to give every thread ~2 items, within the shared-memory budget.
  const int max_chunk_by_smem = (kRopeSharedFloats - 2 * half) / (2 * half);
  int chunk_tokens = (2 * kRopeThreads + items_per_token - 1) / items_per_token;
  chunk_tokens = std::max(1, std::min({chunk_tokens, max_chunk_by_smem, 64}));
  if (chunk_tokens > args.tokens) chunk_tokens = static_cast<int>(args.tokens);
  const size_t smem_bytes = sizeof(float) * (2 * half + 2 * static_cast<size_t>(chunk_tokens) * half);

  int sm_count = 0;
  cudaError_t status = multiprocessor_count(&sm_count);
  if (status != cudaSuccess) return status;
  const int64_t chunks = (args.tokens + chunk_tokens - 1) / chunk_tokens;
  const int blocks_per_sm = 2048 / kRopeThreads;
  const int grid = static_cast<int>(std::min(chunks, static_cast<int64_t>(sm_count) * blocks_per_sm));

  const T* q_in = static_cast<const T*>(args.q_in);
  const T* k_in = static_cast<const T*>(args.k_in);
  T* q_out = static_cast<T*>(args.q_out);
  T* k_out = static_cast<T*>(args.k_out);
  const float sign = args.inverse ? -1.0f : 1.0f;
  if (vectorized) {
    rope_kernel<T, kVec><<<grid, kRopeThreads, smem_bytes, stream>>>(
        q_in, q_out, k_in, k_out, args.positions, args.inv_freq, args.tokens, static_cast<int>(args.q_heads),
        static_cast<int>(args.k_heads), static_cast<int>(args.head_dim), chunk_tokens, sign);
  } else {
    rope_kernel<T, 1><<<grid, kRopeThreads, smem_bytes, stream>>>(
        q_in, q_out, k_in, k_out, args.positions, args.inv_freq, args.tokens, static_cast<int>(args.q_heads),
        static_cast<int>(args.k_heads), static_cast<int>(args.head_dim), chunk_tokens, sign);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t rope_cuda(const RopeArgs& args, cudaStream_t stream) {
  if (args.tokens == 0 || args.q_heads + args.k_heads == 0) return cudaSuccess;
  switch (args.type) {
    case ElementType::kFloat32: return launch_rope<float>(args, stream);
    case ElementType::kFloat16: return launch_rope<__half>(args, stream);
    case ElementType::kBFloat16: return launch_rope<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace relscale
