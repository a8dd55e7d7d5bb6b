// Error reporting shared by every CPU kernel: a kernel never throws and never touches memory
// outside the ranges it was given; it returns a Status naming the first bad input instead.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

namespace token_recycling::kernels {

struct Status {
  bool ok = true;
  std::string message;

  static Status Ok() { return {}; }
  static Status Error(std::string msg) { return {false, std::move(msg)}; }
};

// "name[i] = v is outside [lo, hi)".
inline Status OutOfRange(const char* name, int64_t index, int64_t value, int64_t lo, int64_t hi) {
  return Status::Error(std::string(name) + "[" + std::to_string(index) + "] = " + std::to_string(value) +
                       " is outside [" + std::to_string(lo) + ", " + std::to_string(hi) + ")");
}

// Sizes describe buffers the caller owns, so a negative one is a caller's bug: reported, never used
// in an allocation or in pointer arithmetic. Every kernel checks its sizes first.
inline Status CheckSizes(std::initializer_list<std::pair<const char*, int64_t>> sizes) {
  for (const auto& [name, value] : sizes) {
    if (value < 0) return Status::Error(std::string(name) + " = " + std::to_string(value) + " is negative");
  }
  return Status::Ok();
}

// Checks a tree given as parent indices: parents[0] == -1, 0 <= parents[i] < i.
// Fills depth[] (root depth 0) when depth is non-null. Returns the tree's maximum depth in *max_depth.
inline Status CheckTreeParents(const int32_t* parents, int64_t num_nodes, int32_t* depth, int64_t* max_depth) {
  if (num_nodes < 1) return Status::Error("tree has no nodes (the root is node 0)");
  if (parents[0] != -1) return Status::Error("parents[0] must be -1 (node 0 is the root), got " + std::to_string(parents[0]));
  std::vector<int32_t> scratch;
  if (!depth) {
    scratch.resize(num_nodes);
    depth = scratch.data();
  }
  int64_t deepest = 0;
  depth[0] = 0;
  for (int64_t i = 1; i < num_nodes; ++i) {
    const int64_t p = parents[i];
    if (p < 0 || p >= i) {
      return Status::Error("parents[" + std::to_string(i) + "] = " + std::to_string(p) +
                           " breaks topological order (need 0 <= parents[i] < i)");
    }
    depth[i] = depth[p] + 1;
    if (depth[i] > deepest) deepest = depth[i];
  }
  if (max_depth) *max_depth = deepest;
  return Status::Ok();
}

}  // namespace token_recycling::kernels
