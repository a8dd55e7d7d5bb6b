// Input validation shared by the torch adapters: every message names the op and the argument,
// and maps to the Python exception a user expects (TypeError for dtypes, ValueError otherwise).
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <string>

#include "../kernels/status.h"

namespace token_recycling {

inline std::string dtype_list(std::initializer_list<at::ScalarType> ok) {
  std::string s;
  for (auto t : ok) s += (s.empty() ? "" : " or ") + std::string(c10::toString(t));
  return s;
}

inline void check_dtype(const at::Tensor& t, std::initializer_list<at::ScalarType> ok, const char* op,
                        const char* name) {
  for (auto d : ok) {
    if (t.scalar_type() == d) return;
  }
  TORCH_CHECK_TYPE(false, op, ": ", name, " must be ", dtype_list(ok), ", got ", t.scalar_type());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
}

inline void check_size(const at::Tensor& t, int64_t dim, int64_t size, const char* op, const char* name,
                       const char* what) {
  TORCH_CHECK_VALUE(t.size(dim) == size, op, ": ", name, ".size(", dim, ") must be ", size, " (", what,
                    "), got shape ", t.sizes());
}

inline void check_device(const at::Tensor& t, const at::Device& device, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.device() == device, op, ": ", name, " is on ", t.device(), " but the other inputs are on ",
                    device);
}

// Turns a kernel's Status into a ValueError that names the op.
inline void throw_if_error(const kernels::Status& s, const char* op) {
  TORCH_CHECK_VALUE(s.ok, op, ": ", s.message);
}

}  // namespace token_recycling
