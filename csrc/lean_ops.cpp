// The lean verification forward's fused elementwise steps (lean_forward.py): an RMS norm's tail and the
// rotary embedding, each the same bit for bit as the tensor operations they replace.
#include "../kernels/rms_norm.h"
#include "../kernels/rotary.h"

#include "checks.h"
#include "ops.h"

namespace token_recycling {

namespace {

// rows [n, dim] contiguous, weight [dim] contiguous, out [n, dim]: all T (float or bfloat16).
template <typename T>
void rms_norm_rows(const at::Tensor& rows, const at::Tensor& weight, int64_t n, int64_t dim, float eps,
                   at::Tensor& out, const char* op) {
  const T* xp = reinterpret_cast<const T*>(rows.data_ptr());
  // The variance as transformers computes it, h.pow(2).mean(-1): the squares here (pow(2) of a float is
  // h * h), then ATen's own sum (its summation order) divided by dim, as ATen's mean divides its sum.
  auto squares = at::empty({n, dim}, rows.options().dtype(at::kFloat));
  throw_if_error(kernels::rms_norm_squares(xp, n, dim, dim, squares.data_ptr<float>()), op);
  auto variance = at::sum(squares, -1).contiguous();
  float* v = variance.data_ptr<float>();
  for (int64_t r = 0; r < n; ++r) v[r] /= static_cast<float>(dim);
  throw_if_error(kernels::rms_norm_apply(xp, n, dim, dim, v, reinterpret_cast<const T*>(weight.data_ptr()), eps,
                                         reinterpret_cast<T*>(out.data_ptr())),
                 op);
}

}  // namespace

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  constexpr const char* op = "rms_norm";
  check_dtype(x, {at::kFloat, at::kBFloat16}, op, "x");
  check_dtype(weight, {x.scalar_type()}, op, "weight");
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must be [..., dim], got a 0-D tensor");
  check_dim(weight, 1, op, "weight");
  check_size(weight, 0, x.size(-1), op, "weight", "dim, x.size(-1)");
  check_device(weight, x.device(), op, "weight");
  const int64_t dim = x.size(-1);
  int64_t n = 1;  // rows (not -1 in reshape: with dim 0 it could not be inferred)
  for (int64_t d = 0; d + 1 < x.dim(); ++d) n *= x.size(d);
  const auto rows = x.reshape({n, dim}).contiguous();
  auto out = at::empty(x.sizes(), x.options());
  if (x.scalar_type() == at::kFloat) {
    rms_norm_rows<float>(rows, weight.contiguous(), n, dim, static_cast<float>(eps), out, op);
  } else {
    rms_norm_rows<kernels::bfloat16>(rows, weight.contiguous(), n, dim, static_cast<float>(eps), out, op);
  }
  return out;
}

at::Tensor rotary_embedding_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  constexpr const char* op = "rotary_embedding";
  check_dtype(x, {at::kFloat, at::kBFloat16}, op, "x");
  check_dtype(cos, {x.scalar_type()}, op, "cos");
  check_dtype(sin, {x.scalar_type()}, op, "sin");
  check_dim(x, 4, op, "x");
  check_device(cos, x.device(), op, "cos");
  check_device(sin, x.device(), op, "sin");
  const int64_t batch = x.size(0), heads = x.size(1), tokens = x.size(2), dim = x.size(3);
  TORCH_CHECK_VALUE(dim % 2 == 0, op, ": x's last dimension (head_dim) must be even, got ", dim);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{cos, "cos"}, {sin, "sin"}}) {
    const bool fits = t.dim() == 4 && t.size(0) == batch && t.size(1) == 1 && t.size(2) == tokens && t.size(3) == dim;
    TORCH_CHECK_VALUE(fits, op, ": ", name, " must be [batch=", batch, ", 1, tokens=", tokens, ", dim=", dim,
                      "] (shared by the heads), got ", t.sizes());
  }
  const auto xs = x.stride(3) == 1 ? x : x.contiguous();
  const auto c = cos.contiguous(), sn = sin.contiguous();
  auto out = at::empty({batch, heads, tokens, dim}, x.options());
  kernels::Status s;
  if (x.scalar_type() == at::kFloat) {
    s = kernels::rotary_embedding(xs.data_ptr<float>(), batch, heads, tokens, dim, xs.stride(0), xs.stride(1),
                                  xs.stride(2), c.data_ptr<float>(), sn.data_ptr<float>(), out.data_ptr<float>());
  } else {
    using bf = kernels::bfloat16;
    s = kernels::rotary_embedding(reinterpret_cast<const bf*>(xs.data_ptr()), batch, heads, tokens, dim, xs.stride(0),
                                  xs.stride(1), xs.stride(2), reinterpret_cast<const bf*>(c.data_ptr()),
                                  reinterpret_cast<const bf*>(sn.data_ptr()), reinterpret_cast<bf*>(out.data_ptr()));
  }
  throw_if_error(s, op);
  return out;
}

}  // namespace token_recycling
