// CPU implementations: plain C++ loops over raw pointers, split across threads with
// at::parallel_for. Same math as the CUDA kernels (fp32 arithmetic, one rounding to the storage
// type); the RoPE angles are formed in double, as in the float64 reference.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <vector>

#include "kernels.h"

namespace relscale {
namespace {

constexpr int64_t kGrainElements = 32768;  // below this, threading costs more than it saves

// Rotates `heads` contiguous heads of one token with that token's cos/sin table.
template <typename T>
void rotate_heads(const T* in, T* out, int64_t heads, int64_t head_dim, const float* cos_t,
                  const float* sin_t) {
  const int64_t half = head_dim / 2;
  for (int64_t h = 0; h < heads; ++h) {
    const T* x = in + h * head_dim;
    T* y = out + h * head_dim;
    for (int64_t i = 0; i < half; ++i) {
      const float a = static_cast<float>(x[i]);
      const float b = static_cast<float>(x[i + half]);
      y[i] = static_cast<T>(a * cos_t[i] - b * sin_t[i]);
      y[i + half] = static_cast<T>(b * cos_t[i] + a * sin_t[i]);
    }
  }
}

template <typename T>
void rope_typed(const RopeArgs& args) {
  const int64_t half = args.head_dim / 2;
  const double* inv_freq = args.inv_freq;
  const double sign = args.inverse ? -1.0 : 1.0;
  const int64_t row = (args.q_heads + args.k_heads) * args.head_dim;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(row, 1));
  const T* q_in = static_cast<const T*>(args.q_in);
  const T* k_in = static_cast<const T*>(args.k_in);
  T* q_out = static_cast<T*>(args.q_out);
  T* k_out = static_cast<T*>(args.k_out);
  at::parallel_for(0, args.tokens, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> cos_t(half), sin_t(half);
    for (int64_t t = begin; t < end; ++t) {
      const double pos = static_cast<double>(args.positions[t]);
      for (int64_t i = 0; i < half; ++i) {
        const double angle = pos * inv_freq[i];
        cos_t[i] = static_cast<float>(std::cos(angle));
        sin_t[i] = static_cast<float>(sign * std::sin(angle));
      }
      const int64_t q_offset = t * args.q_heads * args.head_dim;
      const int64_t k_offset = t * args.k_heads * args.head_dim;
      rotate_heads(q_in + q_offset, q_out + q_offset, args.q_heads, args.head_dim, cos_t.data(), sin_t.data());
      rotate_heads(k_in + k_offset, k_out + k_offset, args.k_heads, args.head_dim, cos_t.data(), sin_t.data());
    }
  });
}

inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

template <typename T>
void swiglu_forward_typed(const SwigluArgs& args) {
  const T* gate = static_cast<const T*>(args.gate);
  const T* up = static_cast<const T*>(args.up);
  T* out = static_cast<T*>(args.out);
  at::parallel_for(0, args.n, kGrainElements, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float g = static_cast<float>(gate[i]);
      out[i] = static_cast<T>(g * sigmoid(g) * static_cast<float>(up[i]));
    }
  });
}

template <typename T>
void swiglu_backward_typed(const SwigluArgs& args) {
  const T* grad_out = static_cast<const T*>(args.grad_out);
  const T* gate = static_cast<const T*>(args.gate);
  const T* up = static_cast<const T*>(args.up);
  T* grad_gate = static_cast<T*>(args.out);
  T* grad_up = static_cast<T*>(args.grad_up);
  at::parallel_for(0, args.n, kGrainElements, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float g = static_cast<float>(gate[i]);
      const float u = static_cast<float>(up[i]);
      const float d = static_cast<float>(grad_out[i]);
      const float s = sigmoid(g);
      grad_gate[i] = static_cast<T>(d * u * s * (1.0f + g * (1.0f - s)));
      grad_up[i] = static_cast<T>(d * g * s);
    }
  });
}

template <template <typename> class Fn, typename Args>
void dispatch(const Args& args) {
  switch (args.type) {
    case ElementType::kFloat32: return Fn<float>::run(args);
    case ElementType::kFloat16: return Fn<c10::Half>::run(args);
    case ElementType::kBFloat16: return Fn<c10::BFloat16>::run(args);
  }
}

template <typename T> struct RopeFn { static void run(const RopeArgs& a) { rope_typed<T>(a); } };
template <typename T> struct SwigluForwardFn { static void run(const SwigluArgs& a) { swiglu_forward_typed<T>(a); } };
template <typename T> struct SwigluBackwardFn { static void run(const SwigluArgs& a) { swiglu_backward_typed<T>(a); } };

}  // namespace

void rope_cpu(const RopeArgs& args) { dispatch<RopeFn>(args); }
void swiglu_forward_cpu(const SwigluArgs& args) { dispatch<SwigluForwardFn>(args); }
void swiglu_backward_cpu(const SwigluArgs& args) { dispatch<SwigluBackwardFn>(args); }

}  // namespace relscale
