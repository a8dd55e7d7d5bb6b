// The public ops contract: every schema of torch.ops.token_recycling, defined once, with its CPU
// implementation. CUDA implementations register in cuda/registration_cuda.cpp when built.
#include <torch/library.h>

#include "device_errors.h"
#include "ops.h"

TORCH_LIBRARY(token_recycling, m) {
  m.def("build_draft_tree(Tensor matrix, Tensor roots, Tensor parents, Tensor ranks) -> Tensor");
  m.def("update_adjacency(Tensor(a!) matrix, Tensor tokens, Tensor candidates) -> ()");
  m.def("verify_greedy(Tensor tokens, Tensor predictions, Tensor parents) -> (Tensor, Tensor, Tensor)");
  m.def("verify_sample(Tensor tokens, Tensor parents, Tensor probs, Tensor uniforms) -> (Tensor, Tensor, Tensor)");
  m.def("compact_kv(Tensor(a!)[] caches, Tensor prefix_len, Tensor accepted_nodes, Tensor accept_len) -> ()");
  m.def("tree_attention(Tensor q, Tensor k, Tensor v, Tensor prefix_len, Tensor tree_mask, float scale, "
        "int tree_start=-1) -> Tensor");
  m.def("tree_attention_lse(Tensor q, Tensor k, Tensor v, Tensor prefix_len, Tensor tree_mask, float scale, "
        "int tree_start=-1) -> (Tensor, Tensor)");
  m.def("merge_attention_states(Tensor out_a, Tensor lse_a, Tensor out_b, Tensor lse_b) -> (Tensor, Tensor)");
  m.def("ngram_index_append(Tensor(a!) table, Tensor history, Tensor old_len, Tensor new_len) -> ()");
  m.def("ngram_lookup(Tensor table, Tensor history, Tensor length, int max_ngram, int max_tokens) -> (Tensor, Tensor)");
  m.def("ngram_candidates(Tensor table, Tensor history, Tensor length, int max_ngram, int max_tokens, "
        "int max_candidates) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("graft_chain(Tensor tree_tokens, Tensor parents, Tensor chain, Tensor chain_len) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("skinny_linear(Tensor x, Tensor weight, Tensor? bias=None, bool vectorized=True) -> Tensor");
  m.def("skinny_linear_cat(Tensor x, Tensor[] weights, Tensor[] biases, bool vectorized=True) -> Tensor");
  m.def("skinny_linear_vectorized() -> bool", &token_recycling::skinny_linear_vectorized);
  m.def("greedy_topk(Tensor logits, int k) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rotary_embedding(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  // Deferred device-error checks (device_errors.h): no tensor to dispatch on, one kernel for every backend.
  m.def("set_deferred_device_errors(Device device, bool enable) -> bool", &token_recycling::set_deferred_device_errors);
  m.def("take_device_errors(Device device) -> Tensor", &token_recycling::take_device_errors);
  m.def("raise_device_errors(Tensor record) -> ()", &token_recycling::raise_device_errors);
}

TORCH_LIBRARY_IMPL(token_recycling, CPU, m) {
  m.impl("build_draft_tree", &token_recycling::build_draft_tree_cpu);
  m.impl("update_adjacency", &token_recycling::update_adjacency_cpu);
  m.impl("verify_greedy", &token_recycling::verify_greedy_cpu);
  m.impl("verify_sample", &token_recycling::verify_sample_cpu);
  m.impl("compact_kv", &token_recycling::compact_kv_cpu);
  m.impl("tree_attention", &token_recycling::tree_attention_cpu);
  m.impl("tree_attention_lse", &token_recycling::tree_attention_lse_cpu);
  m.impl("merge_attention_states", &token_recycling::merge_attention_states_cpu);
  m.impl("ngram_index_append", &token_recycling::ngram_index_append_cpu);
  m.impl("ngram_lookup", &token_recycling::ngram_lookup_cpu);
  m.impl("ngram_candidates", &token_recycling::ngram_candidates_cpu);
  m.impl("graft_chain", &token_recycling::graft_chain_cpu);
  m.impl("skinny_linear", &token_recycling::skinny_linear_cpu);
  m.impl("skinny_linear_cat", &token_recycling::skinny_linear_cat_cpu);
  m.impl("greedy_topk", &token_recycling::greedy_topk_cpu);
  m.impl("rms_norm", &token_recycling::rms_norm_cpu);
  m.impl("rotary_embedding", &token_recycling::rotary_embedding_cpu);
}
