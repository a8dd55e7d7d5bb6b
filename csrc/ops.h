// The torch adapters of every op, one file each; registration.cpp binds them to the schemas.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace token_recycling {

at::Tensor build_draft_tree_cpu(const at::Tensor& matrix, const at::Tensor& roots, const at::Tensor& parents,
                                const at::Tensor& ranks);
void update_adjacency_cpu(at::Tensor& matrix, const at::Tensor& tokens, const at::Tensor& candidates);
std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_greedy_cpu(const at::Tensor& tokens,
                                                                 const at::Tensor& predictions,
                                                                 const at::Tensor& parents);
std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_sample_cpu(const at::Tensor& tokens, const at::Tensor& parents,
                                                                 const at::Tensor& probs, const at::Tensor& uniforms);
void compact_kv_cpu(at::TensorList caches, const at::Tensor& prefix_len, const at::Tensor& accepted_nodes,
                    const at::Tensor& accept_len);
at::Tensor tree_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& prefix_len, const at::Tensor& tree_mask, double scale,
                              int64_t tree_start);
std::tuple<at::Tensor, at::Tensor> tree_attention_lse_cpu(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, const at::Tensor& prefix_len,
                                                          const at::Tensor& tree_mask, double scale, int64_t tree_start);
std::tuple<at::Tensor, at::Tensor> merge_attention_states_cpu(const at::Tensor& out_a, const at::Tensor& lse_a,
                                                              const at::Tensor& out_b, const at::Tensor& lse_b);

void ngram_index_append_cpu(at::Tensor& table, const at::Tensor& history, const at::Tensor& old_len,
                            const at::Tensor& new_len);
std::tuple<at::Tensor, at::Tensor> ngram_lookup_cpu(const at::Tensor& table, const at::Tensor& history,
                                                    const at::Tensor& length, int64_t max_ngram, int64_t max_tokens);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ngram_candidates_cpu(
    const at::Tensor& table, const at::Tensor& history, const at::Tensor& length, int64_t max_ngram,
    int64_t max_tokens, int64_t max_candidates);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> graft_chain_cpu(const at::Tensor& tree_tokens,
                                                                                       const at::Tensor& parents,
                                                                                       const at::Tensor& chain,
                                                                                       const at::Tensor& chain_len);

at::Tensor skinny_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             bool vectorized);
// x [..., in] times each weight [out_i, in] (+ bias_i), the outputs side by side: [..., sum out_i].
at::Tensor skinny_linear_cat_cpu(const at::Tensor& x, at::TensorList weights, at::TensorList biases, bool vectorized);
bool skinny_linear_vectorized();  // true when skinny_linear has an AVX2/FMA path on this CPU
// The lean forward's fused steps (lean_ops.cpp): an RMS norm, and the rotary embedding of q or k.
at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor rotary_embedding_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

at::Tensor greedy_topk_cpu(const at::Tensor& logits, int64_t k);

}  // namespace token_recycling

namespace token_recycling {
// Validation shared by the CPU and CUDA adapters (shapes, dtypes, devices; values are the kernels' job).
void check_compact_kv_inputs(at::TensorList caches, const at::Tensor& prefix_len, const at::Tensor& accepted_nodes,
                             const at::Tensor& accept_len);
void check_tree_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& prefix_len, const at::Tensor& tree_mask,
                                 const char* op = "tree_attention",  // the op named in errors
                                 int64_t tree_start = -1);
void check_build_draft_tree_inputs(const at::Tensor& matrix, const at::Tensor& roots, const at::Tensor& parents,
                                   const at::Tensor& ranks);
void check_verify_greedy_inputs(const at::Tensor& tokens, const at::Tensor& predictions, const at::Tensor& parents);
void check_verify_sample_inputs(const at::Tensor& tokens, const at::Tensor& parents, const at::Tensor& probs,
                                const at::Tensor& uniforms);
void check_update_adjacency_inputs(const at::Tensor& matrix, const at::Tensor& tokens, const at::Tensor& candidates);
void check_merge_attention_states_inputs(const at::Tensor& out_a, const at::Tensor& lse_a, const at::Tensor& out_b,
                                         const at::Tensor& lse_b);
}  // namespace token_recycling

namespace token_recycling {
// The CUDA adapters (csrc/cuda/), registered by cuda/registration_cuda.cpp when built with CUDA.
at::Tensor build_draft_tree_cuda(const at::Tensor& matrix, const at::Tensor& roots, const at::Tensor& parents,
                                 const at::Tensor& ranks);
void update_adjacency_cuda(at::Tensor& matrix, const at::Tensor& tokens, const at::Tensor& candidates);
std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_greedy_cuda(const at::Tensor& tokens,
                                                                  const at::Tensor& predictions,
                                                                  const at::Tensor& parents);
std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_sample_cuda(const at::Tensor& tokens, const at::Tensor& parents,
                                                                  const at::Tensor& probs, const at::Tensor& uniforms);
void compact_kv_cuda(at::TensorList caches, const at::Tensor& prefix_len, const at::Tensor& accepted_nodes,
                     const at::Tensor& accept_len);
at::Tensor tree_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& prefix_len, const at::Tensor& tree_mask, double scale,
                               int64_t tree_start);
std::tuple<at::Tensor, at::Tensor> tree_attention_lse_cuda(const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v, const at::Tensor& prefix_len,
                                                           const at::Tensor& tree_mask, double scale, int64_t tree_start);
std::tuple<at::Tensor, at::Tensor> merge_attention_states_cuda(const at::Tensor& out_a, const at::Tensor& lse_a,
                                                               const at::Tensor& out_b, const at::Tensor& lse_b);
}  // namespace token_recycling
