// Shapes the benchmarks use: Llama-7B (32 layers, 32 query heads, 8 or 32 kv heads, head_dim 128,
// vocabulary 32000), the paper's 81-node tree, and tiny versions of both for --quick.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

namespace bench {

struct ModelShape {
  int64_t layers, q_heads, head_dim, vocab, topk;
};
constexpr ModelShape kLlama7B{32, 32, 128, 32000, 8};
constexpr ModelShape kTiny{2, 4, 64, 500, 8};

// A tree with the paper's level sizes (8/21/25/15/8/3 below the root: 81 nodes), each level's
// nodes spread over the previous level's, best ranks first. For --quick: 3/4 (8 nodes).
struct Tree {
  std::vector<int32_t> parents, ranks;
  int64_t size() const { return static_cast<int64_t>(parents.size()); }
  int64_t depth() const;
};

inline Tree paper_like_tree(bool quick) {
  const std::vector<int64_t> levels = quick ? std::vector<int64_t>{3, 4} : std::vector<int64_t>{8, 21, 25, 15, 8, 3};
  Tree t{{-1}, {0}};
  int64_t level_begin = 0, level_end = 1;  // nodes of the previous level
  for (int64_t count : levels) {
    std::vector<int32_t> next_rank(level_end - level_begin, 0);
    for (int64_t j = 0; j < count; ++j) {
      const int64_t parent = level_begin + j % (level_end - level_begin);
      t.parents.push_back(static_cast<int32_t>(parent));
      t.ranks.push_back(next_rank[parent - level_begin]++ % 8);
    }
    level_begin = level_end;
    level_end = t.size();
  }
  return t;
}

inline int64_t Tree::depth() const {
  std::vector<int64_t> d(parents.size(), 0);
  int64_t deepest = 0;
  for (size_t i = 1; i < parents.size(); ++i) deepest = std::max(deepest, d[i] = d[parents[i]] + 1);
  return deepest;
}

inline std::string shape_str(const std::vector<std::pair<const char*, int64_t>>& parts) {
  std::string s;
  for (const auto& [name, value] : parts) s += (s.empty() ? "" : " ") + std::string(name) + "=" + std::to_string(value);
  return s;
}

}  // namespace bench
