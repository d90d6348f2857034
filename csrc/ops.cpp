// The one binding file: registers torch.ops.relscale.{rope, rope_, swiglu, swiglu_backward} with
// their CPU implementations and, when built with RELSCALE_WITH_CUDA, their CUDA implementations.
// Fake (meta) kernels and autograd are registered in Python, in relscale/ext.py, which
// set_python_module below points torch at.
//
// Only core torch headers here (no ATen/cuda or c10/cuda ones): the current CUDA stream comes from
// the generic device-guard interface, so the CUDA build needs nothing but cuda_runtime_api.h.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <tuple>

#include "kernels.h"

namespace relscale {
namespace {

ElementType element_type(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return ElementType::kFloat32;
    case at::kHalf: return ElementType::kFloat16;
    case at::kBFloat16: return ElementType::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": ", name, " has dtype ", t.scalar_type(),
                  "; supported dtypes are float32, float16 and bfloat16");
  }
}

void check_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but the other inputs are on ",
              ref.device());
  TORCH_CHECK(t.device().is_cpu() || t.device().is_cuda(), op, ": unsupported device ", t.device());
}

#ifdef RELSCALE_WITH_CUDA
cudaStream_t current_stream(const at::Tensor& t) {
  const c10::impl::DeviceGuardImplInterface* impl = c10::impl::getDeviceGuardImpl(t.device().type());
  return static_cast<cudaStream_t>(impl->getStream(t.device()).native_handle());
}

void check_launch(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(status));
}
#endif

// Shapes: q (..., Hq, D), k (..., Hk, D) with the same leading dims; positions has one int64 per
// token (T = product of the leading dims), in any shape and layout; inv_freq is the (D / 2,)
// float64 frequency table (relscale.ops.rope_inv_freq), any stride.
RopeArgs rope_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                   const at::Tensor& inv_freq, bool inverse, const char* op) {
  TORCH_CHECK(q.dim() >= 2 && k.dim() >= 2, op, ": q and k must be (..., heads, head_dim), got q ", q.sizes(),
              " and k ", k.sizes());
  TORCH_CHECK(q.sizes().slice(0, q.dim() - 2) == k.sizes().slice(0, k.dim() - 2), op,
              ": q and k must share their leading (token) dims, got q ", q.sizes(), " and k ", k.sizes());
  const int64_t head_dim = q.size(-1);
  TORCH_CHECK(k.size(-1) == head_dim, op, ": q and k head_dim differ (", head_dim, " vs ", k.size(-1), ")");
  TORCH_CHECK(head_dim > 0 && head_dim % 2 == 0 && head_dim <= kMaxRopeHeadDim, op,
              ": head_dim must be even and at most ", kMaxRopeHeadDim, ", got ", head_dim);
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), op, ": q is ", q.scalar_type(), " but k is ", k.scalar_type());
  TORCH_CHECK(positions.scalar_type() == at::kLong, op, ": positions must be int64, got ",
              positions.scalar_type());
  check_device(k, q, op, "k");
  check_device(positions, q, op, "positions");
  const int64_t tokens = q.dim() == 2 ? 1 : c10::multiply_integers(q.sizes().slice(0, q.dim() - 2));
  TORCH_CHECK(positions.numel() == tokens, op, ": positions has ", positions.numel(),
              " entries but q and k have ", tokens, " tokens (shape ", q.sizes(), ")");
  TORCH_CHECK(inv_freq.scalar_type() == at::kDouble, op, ": inv_freq must be float64 (relscale.ops.rope_inv_freq), got ",
              inv_freq.scalar_type());
  TORCH_CHECK(inv_freq.dim() == 1 && inv_freq.size(0) == head_dim / 2, op, ": inv_freq must have shape [",
              head_dim / 2, "] (head_dim / 2), got ", inv_freq.sizes());
  check_device(inv_freq, q, op, "inv_freq");
  RopeArgs args{};
  args.tokens = tokens;
  args.q_heads = q.size(-2);
  args.k_heads = k.size(-2);
  args.head_dim = head_dim;
  args.inverse = inverse;
  args.type = element_type(q, op, "q");
  return args;
}

// positions and inv_freq are made contiguous here (a strided view is copied, never misread); the
// copies live until the kernel has been enqueued, and the caching allocator orders their reuse
// after it on the stream.
void run_rope(RopeArgs& args, const at::Tensor& device_ref, const at::Tensor& positions,
              const at::Tensor& inv_freq, const char* op) {
  const at::Tensor pos = positions.contiguous();
  const at::Tensor freq = inv_freq.contiguous();
  args.positions = pos.const_data_ptr<int64_t>();
  args.inv_freq = freq.const_data_ptr<double>();
  if (device_ref.device().is_cpu()) {
    rope_cpu(args);
    return;
  }
#ifdef RELSCALE_WITH_CUDA
  const c10::DeviceGuard guard(device_ref.device());
  check_launch(rope_cuda(args, current_stream(device_ref)), op);
#else
  TORCH_CHECK(false, op, ": relscale._C was built without CUDA");
#endif
}

std::tuple<at::Tensor, at::Tensor> rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                                        const at::Tensor& inv_freq, bool inverse) {
  constexpr const char* op = "relscale::rope";
  RopeArgs args = rope_args(q, k, positions, inv_freq, inverse, op);
  const at::Tensor q_in = q.contiguous();
  const at::Tensor k_in = k.contiguous();
  at::Tensor q_out = at::empty(q.sizes(), q.options());
  at::Tensor k_out = at::empty(k.sizes(), k.options());
  args.q_in = q_in.const_data_ptr();
  args.k_in = k_in.const_data_ptr();
  args.q_out = q_out.mutable_data_ptr();
  args.k_out = k_out.mutable_data_ptr();
  run_rope(args, q, positions, inv_freq, op);
  return {q_out, k_out};
}

void rope_(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions, const at::Tensor& inv_freq,
           bool inverse) {
  constexpr const char* op = "relscale::rope_";
  RopeArgs args = rope_args(q, k, positions, inv_freq, inverse, op);
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous(), op, ": in-place RoPE needs contiguous q and k (q strides ",
              q.strides(), ", k strides ", k.strides(), ")");
  args.q_in = args.q_out = q.mutable_data_ptr();
  args.k_in = args.k_out = k.mutable_data_ptr();
  run_rope(args, q, positions, inv_freq, op);
}

void check_same(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name, const char* ref_name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", name, " has shape ", t.sizes(), " but ", ref_name, " has shape ",
              ref.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " is ", t.scalar_type(), " but ", ref_name,
              " is ", ref.scalar_type());
  check_device(t, ref, op, name);
}

at::Tensor swiglu(const at::Tensor& gate, const at::Tensor& up) {
  constexpr const char* op = "relscale::swiglu";
  check_same(up, gate, op, "up", "gate");
  SwigluArgs args{};
  args.type = element_type(gate, op, "gate");
  const at::Tensor gate_in = gate.contiguous();
  const at::Tensor up_in = up.contiguous();
  at::Tensor out = at::empty(gate.sizes(), gate.options());
  args.gate = gate_in.const_data_ptr();
  args.up = up_in.const_data_ptr();
  args.out = out.mutable_data_ptr();
  args.n = gate.numel();
  if (gate.device().is_cpu()) {
    swiglu_forward_cpu(args);
    return out;
  }
#ifdef RELSCALE_WITH_CUDA
  const c10::DeviceGuard guard(gate.device());
  check_launch(swiglu_forward_cuda(args, current_stream(gate)), op);
#else
  TORCH_CHECK(false, op, ": relscale._C was built without CUDA");
#endif
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward(const at::Tensor& grad_out, const at::Tensor& gate,
                                                   const at::Tensor& up) {
  constexpr const char* op = "relscale::swiglu_backward";
  check_same(up, gate, op, "up", "gate");
  check_same(grad_out, gate, op, "grad_out", "gate");
  SwigluArgs args{};
  args.type = element_type(gate, op, "gate");
  const at::Tensor grad_in = grad_out.contiguous();
  const at::Tensor gate_in = gate.contiguous();
  const at::Tensor up_in = up.contiguous();
  at::Tensor grad_gate = at::empty(gate.sizes(), gate.options());
  at::Tensor grad_up = at::empty(up.sizes(), up.options());
  args.grad_out = grad_in.const_data_ptr();
  args.gate = gate_in.const_data_ptr();
  args.up = up_in.const_data_ptr();
  args.out = grad_gate.mutable_data_ptr();
  args.grad_up = grad_up.mutable_data_ptr();
  args.n = gate.numel();
  if (gate.device().is_cpu()) {
    swiglu_backward_cpu(args);
    return {grad_gate, grad_up};
  }
#ifdef RELSCALE_WITH_CUDA
  const c10::DeviceGuard guard(gate.device());
  check_launch(swiglu_backward_cuda(args, current_stream(gate)), op);
#else
  TORCH_CHECK(false, op, ": relscale._C was built without CUDA");
#endif
  return {grad_gate, grad_up};
}

}  // namespace
}  // namespace relscale

TORCH_LIBRARY(relscale, m) {
  m.set_python_module("relscale.ext");  // holds the fake kernels and the autograd formulas
  m.def("rope(Tensor q, Tensor k, Tensor positions, Tensor inv_freq, bool inverse=False) -> (Tensor, Tensor)");
  m.def("rope_(Tensor(a!) q, Tensor(b!) k, Tensor positions, Tensor inv_freq, bool inverse=False) -> ()");
  m.def("swiglu(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_backward(Tensor grad_out, Tensor gate, Tensor up) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(relscale, CPU, m) {
  m.impl("rope", &relscale::rope);
  m.impl("rope_", &relscale::rope_);
  m.impl("swiglu", &relscale::swiglu);
  m.impl("swiglu_backward", &relscale::swiglu_backward);
}

#ifdef RELSCALE_WITH_CUDA
TORCH_LIBRARY_IMPL(relscale, CUDA, m) {
  m.impl("rope", &relscale::rope);
  m.impl("rope_", &relscale::rope_);
  m.impl("swiglu", &relscale::swiglu);
  m.impl("swiglu_backward", &relscale::swiglu_backward);
}
#endif

// A Python module with no functions: importing relscale._C runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "relscale kernels (torch.ops.relscale)", -1,
                                   nullptr};
  return PyModule_Create(&module_def);
}
