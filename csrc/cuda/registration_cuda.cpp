// CUDA implementations of the schemas defined in ../registration.cpp.
#include <torch/library.h>

#include "../ops.h"

TORCH_LIBRARY_IMPL(token_recycling, CUDA, m) {
  m.impl("build_draft_tree", &token_recycling::build_draft_tree_cuda);
  m.impl("update_adjacency", &token_recycling::update_adjacency_cuda);
  m.impl("verify_greedy", &token_recycling::verify_greedy_cuda);
  m.impl("verify_sample", &token_recycling::verify_sample_cuda);
  m.impl("compact_kv", &token_recycling::compact_kv_cuda);
  m.impl("tree_attention", &token_recycling::tree_attention_cuda);
  m.impl("tree_attention_lse", &token_recycling::tree_attention_lse_cuda);
  m.impl("merge_attention_states", &token_recycling::merge_attention_states_cuda);
}
