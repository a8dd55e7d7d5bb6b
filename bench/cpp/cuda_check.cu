// Checks every CUDA kernel (kernels/cuda) against its CPU kernel (kernels/) on random inputs:
// equal outputs for the integer ops, close outputs for attention, and the same message for bad
// input (with nothing written by the ops that promise that). Built twice from this one file: by
// nvcc, to run on a GPU, and as cuda_check_emulated.cpp by the host compiler, where
// kernels/cuda/host_emulation.h runs the kernels on host threads.
#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../../kernels/compact_kv.h"
#include "../../kernels/draft_tree.h"
#include "../../kernels/tree_attention.h"
#include "../../kernels/update_adjacency.h"
#include "../../kernels/verify_greedy.h"
#include "../../kernels/verify_sample.h"
#include "../../kernels/cuda/compact_kv.cuh"
#include "../../kernels/cuda/draft_tree.cuh"
#include "../../kernels/cuda/tree_attention.cuh"
#include "../../kernels/cuda/update_adjacency.cuh"
#include "../../kernels/cuda/verify_greedy.cuh"
#include "../../kernels/cuda/verify_sample.cuh"
#include "device_buffer.h"
#include "harness.h"

namespace {

namespace k = token_recycling::kernels;
namespace kc = token_recycling::kernels::cuda;
using bench::DeviceBuffer;
using bench::expect;
using bench::randint;
using k::Status;

#if defined(__CUDACC__)
constexpr bool kEmulated = false;
#else
constexpr bool kEmulated = true;
#endif

Status device_status(cudaError_t launched, const DeviceBuffer<kc::DeviceError>& err,
                     Status (*describe)(const kc::DeviceError&), kc::DeviceError* record = nullptr) {
  bench::cuda_ok(launched, "launch");
  kc::DeviceError host{};
  bench::cuda_ok(kc::read_error(err.get(), &host, nullptr), "read_error");
  if (record != nullptr) *record = host;
  return describe(host);
}

// Same verdict, same message; returns whether both succeeded.
bool same_status(const std::string& label, const Status& cpu, const Status& gpu) {
  expect(cpu.ok == gpu.ok && cpu.message == gpu.message,
         label + ": CPU says '" + (cpu.ok ? "ok" : cpu.message) + "', CUDA says '" + (gpu.ok ? "ok" : gpu.message) + "'");
  return cpu.ok && gpu.ok;
}

// ------------------------------------------------------------------------------------ build_draft_tree
struct DraftInput {
  int64_t vocab, k;
  std::vector<int64_t> roots;
  std::vector<int32_t> parents, ranks;
};

template <typename M>
void draft_case(const std::string& label, const DraftInput& in, const std::vector<M>& matrix) {
  const int64_t batch = in.roots.size(), n = in.parents.size();
  std::vector<int64_t> cpu(batch * n, -7);
  const Status s = k::build_draft_tree(matrix.data(), in.vocab, in.k, in.roots.data(), batch, in.parents.data(),
                                       in.ranks.data(), n, cpu.data());
  DeviceBuffer<M> d_matrix(matrix);
  DeviceBuffer<int64_t> d_roots(in.roots), d_tokens(std::vector<int64_t>(batch * n, -7));
  DeviceBuffer<int32_t> d_parents(in.parents), d_ranks(in.ranks);
  DeviceBuffer<kc::DeviceError> err(1);
  const Status g = device_status(
      kc::build_draft_tree(d_matrix.get(), in.vocab, in.k, d_roots.get(), batch, d_parents.get(), d_ranks.get(), n,
                           d_tokens.get(), err.get(), nullptr),
      err, kc::describe_draft_tree_error);
  if (same_status(label, s, g)) expect(d_tokens.download() == cpu, label + ": tokens differ");
}

template <typename M>
void check_draft_tree(const std::string& type) {
  bench::Section section("build_draft_tree<" + type + ">");
  for (auto [batch, n, vocab, kk] : {std::tuple<int64_t, int64_t, int64_t, int64_t>{1, 1, 5, 1}, {3, 81, 300, 8},
                                     {2, 300, 1000, 4}, {0, 10, 50, 8}}) {
    DraftInput in{vocab, kk, {}, {}, {}};
    for (int64_t b = 0; b < batch; ++b) in.roots.push_back(randint(0, vocab));
    bench::random_tree(n, kk, in.parents, in.ranks);
    std::vector<M> matrix(vocab * kk);
    for (auto& x : matrix) x = static_cast<M>(randint(0, vocab));
    const std::string label = "build_draft_tree<" + type + "> B=" + std::to_string(batch) + " N=" + std::to_string(n);
    draft_case(label, in, matrix);
    if (batch == 0 || n < 3) continue;
    DraftInput bad = in;
    bad.roots[batch - 1] = vocab;
    draft_case(label + " bad root", bad, matrix);
    bad = in;
    bad.ranks[n - 1] = static_cast<int32_t>(kk);
    draft_case(label + " bad rank", bad, matrix);
    bad = in;
    bad.parents[n - 1] = static_cast<int32_t>(n - 1);
    draft_case(label + " parent not before child", bad, matrix);
    bad = in;
    bad.parents[0] = 0;
    draft_case(label + " root with a parent", bad, matrix);
    std::vector<M> bad_matrix = matrix;
    bad_matrix[in.roots[0] * kk + in.ranks[1]] = static_cast<M>(-3);  // node 1 hangs off the root
    bad = in;
    bad.parents[1] = 0;
    draft_case(label + " bad matrix entry", bad, bad_matrix);
  }
  DraftInput empty{5, 2, {1}, {}, {}};
  draft_case("build_draft_tree<" + type + "> empty tree", empty, std::vector<M>(10, 0));
}

// ------------------------------------------------------------------------------------ verify_greedy
void verify_case(const std::string& label, int64_t batch, int64_t n, const std::vector<int64_t>& tokens,
                 const std::vector<int64_t>& preds, const std::vector<int32_t>& parents, bool per_row) {
  // The CPU adapter's width: the deepest tree + 1, over every tree checked.
  int64_t width = 1;
  Status s = Status::Ok();
  for (int64_t t = 0; t < (per_row ? batch : 1) && s.ok; ++t) {
    int64_t depth = 0;
    s = k::CheckTreeParents(parents.data() + t * (per_row ? n : 0), n, nullptr, &depth);
    width = std::max(width, depth + 1);
  }
  std::vector<int64_t> len(batch, -7), path(batch * width, -7), bonus(batch, -7);
  if (s.ok) {
    s = k::verify_greedy(tokens.data(), preds.data(), parents.data(), per_row ? n : 0, batch, n, width, len.data(),
                         path.data(), bonus.data());
  }
  DeviceBuffer<int64_t> d_tokens(tokens), d_preds(preds), d_len(std::vector<int64_t>(batch, -7)),
      d_path(std::vector<int64_t>(batch * n, -7)), d_bonus(std::vector<int64_t>(batch, -7));
  DeviceBuffer<int32_t> d_parents(parents), d_state(std::max<int64_t>(batch, 1) * n);
  DeviceBuffer<kc::DeviceError> err(1);
  kc::DeviceError record{};
  const Status g = device_status(kc::verify_greedy(d_tokens.get(), d_preds.get(), d_parents.get(), per_row ? n : 0,
                                                   batch, n, d_state.get(), d_len.get(), d_path.get(), d_bonus.get(),
                                                   err.get(), nullptr),
                                 err, kc::describe_verify_greedy_error, &record);
  if (!same_status(label, s, g)) return;
  expect(std::max<int64_t>(1, record.result + 1) == width, label + ": path width differs");
  const std::vector<int64_t> g_path = d_path.download();
  std::vector<int64_t> narrowed;
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t j = 0; j < width; ++j) narrowed.push_back(g_path[b * n + j]);
  expect(d_len.download() == len && narrowed == path && d_bonus.download() == bonus, label + ": outputs differ");
}

void check_verify_greedy() {
  bench::Section section("verify_greedy");
  for (auto [batch, n, per_row] : {std::tuple<int64_t, int64_t, bool>{1, 1, false}, {4, 81, false}, {3, 40, true},
                                   {2, 300, false}, {0, 9, false}, {0, 9, true}}) {
    const int64_t vocab = 3;  // few distinct tokens: long accepted paths
    std::vector<int64_t> tokens(batch * n), preds(batch * n);
    for (auto& x : tokens) x = randint(0, vocab);
    for (auto& x : preds) x = randint(0, vocab);
    std::vector<int32_t> parents, one, ranks;
    for (int64_t t = 0; t < (per_row ? batch : 1); ++t) {
      bench::random_tree(n, 8, one, ranks);
      parents.insert(parents.end(), one.begin(), one.end());
    }
    const std::string label = "verify_greedy B=" + std::to_string(batch) + " N=" + std::to_string(n) +
                              (per_row ? " per-row trees" : "");
    verify_case(label, batch, n, tokens, preds, parents, per_row);
    if (parents.size() < 3) continue;
    std::vector<int32_t> bad = parents;
    bad[bad.size() - 2] = -2;
    verify_case(label + " bad parent", batch, n, tokens, preds, bad, per_row);
    bad = parents;
    bad[0] = 1;
    verify_case(label + " root with a parent", batch, n, tokens, preds, bad, per_row);
  }
  verify_case("verify_greedy empty tree", 1, 0, {}, {}, {}, false);
}

// ------------------------------------------------------------------------------------ verify_sample
void sample_case(const std::string& label, int64_t batch, int64_t n, int64_t vocab, const std::vector<int64_t>& tokens,
                 const std::vector<int32_t>& parents, const std::vector<float>& probs,
                 const std::vector<double>& uniforms, bool per_row) {
  int64_t width = 1;
  Status s = Status::Ok();
  for (int64_t t = 0; t < (per_row ? batch : 1) && s.ok; ++t) {
    int64_t depth = 0;
    s = k::CheckTreeParents(parents.data() + t * (per_row ? n : 0), n, nullptr, &depth);
    width = std::max(width, depth + 1);
  }
  std::vector<int64_t> len(batch, -7), path(batch * width, -7), bonus(batch, -7);
  if (s.ok) {
    s = k::verify_sample(tokens.data(), parents.data(), per_row ? n : 0, probs.data(), uniforms.data(), batch, n,
                         vocab, width, len.data(), path.data(), bonus.data());
  }
  DeviceBuffer<int64_t> d_tokens(tokens), d_len(std::vector<int64_t>(batch, -7)),
      d_path(std::vector<int64_t>(batch * n, -7)), d_bonus(std::vector<int64_t>(batch, -7));
  DeviceBuffer<int32_t> d_parents(parents), d_depth(std::max<int64_t>(batch, 1) * n);
  DeviceBuffer<float> d_probs(probs);
  DeviceBuffer<double> d_uniforms(uniforms);
  DeviceBuffer<kc::DeviceError> err(1);
  kc::DeviceError record{};
  const Status g = device_status(kc::verify_sample(d_tokens.get(), d_parents.get(), per_row ? n : 0, d_probs.get(),
                                                   d_uniforms.get(), batch, n, vocab, d_depth.get(), d_len.get(),
                                                   d_path.get(), d_bonus.get(), err.get(), nullptr),
                                 err, kc::describe_verify_sample_error, &record);
  if (!same_status(label, s, g)) return;
  expect(std::max<int64_t>(1, record.result + 1) == width, label + ": path width differs");
  const std::vector<int64_t> g_path = d_path.download();
  std::vector<int64_t> narrowed;
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t j = 0; j < width; ++j) narrowed.push_back(g_path[b * n + j]);
  expect(d_len.download() == len && narrowed == path && d_bonus.download() == bonus, label + ": outputs differ");
}

void check_verify_sample() {
  bench::Section section("verify_sample");
  // Small vocabularies give long walks; large ones split the row over every thread (and leave some
  // threads an empty chunk when vocab < 256).
  for (auto [batch, n, vocab, per_row] :
       {std::tuple<int64_t, int64_t, int64_t, bool>{1, 1, 1, false}, {4, 81, 3, false}, {3, 40, 5, true},
        {2, 120, 1000, false}, {2, 30, 50257, false}, {0, 9, 4, false}}) {
    const int64_t hot = std::min<int64_t>(vocab, 3);  // tree tokens and most of the mass in [0, hot)
    std::vector<int64_t> tokens(batch * n);
    for (auto& x : tokens) x = randint(0, hot);
    std::vector<float> probs(batch * n * vocab);
    for (size_t i = 0; i < probs.size(); ++i) {
      const int64_t v = static_cast<int64_t>(i % vocab);
      const float w = std::abs(bench::randn());
      probs[i] = v < hot ? w * vocab : (randint(0, 4) == 0 ? 0.0f : w * w * w);  // zeros: never drawn
    }
    std::vector<double> uniforms(batch * n);
    for (auto& u : uniforms) u = std::uniform_real_distribution<double>(0.0, 1.0)(bench::rng());
    if (!uniforms.empty()) uniforms[0] = 0.0;
    std::vector<int32_t> parents, one, ranks;
    for (int64_t t = 0; t < (per_row ? batch : 1); ++t) {
      bench::random_tree(n, 8, one, ranks);
      parents.insert(parents.end(), one.begin(), one.end());
    }
    const std::string label = "verify_sample B=" + std::to_string(batch) + " N=" + std::to_string(n) +
                              " V=" + std::to_string(vocab) + (per_row ? " per-row trees" : "");
    sample_case(label, batch, n, vocab, tokens, parents, probs, uniforms, per_row);
    if (batch == 0) continue;
    auto bad_u = uniforms;
    bad_u[0] = 1.0;
    sample_case(label + " uniform 1.0", batch, n, vocab, tokens, parents, probs, bad_u, per_row);
    auto bad_p = probs;
    bad_p[vocab - 1] = std::nanf("");
    sample_case(label + " NaN weight", batch, n, vocab, tokens, parents, bad_p, uniforms, per_row);
    bad_p = probs;
    std::fill(bad_p.begin(), bad_p.begin() + vocab, 0.0f);
    sample_case(label + " zero row", batch, n, vocab, tokens, parents, bad_p, uniforms, per_row);
    if (parents.size() < 3) continue;
    std::vector<int32_t> bad = parents;
    bad[bad.size() - 2] = -2;
    sample_case(label + " bad parent", batch, n, vocab, tokens, bad, probs, uniforms, per_row);
  }
  sample_case("verify_sample empty tree", 1, 0, 4, {}, {}, {}, {}, false);
}

// ------------------------------------------------------------------------------------ update_adjacency
template <typename M, typename Cand>
void adjacency_case(const std::string& label, int64_t vocab, int64_t kk, const std::vector<int64_t>& tokens,
                    const std::vector<Cand>& cand) {
  std::vector<M> matrix(vocab * kk);
  for (auto& x : matrix) x = static_cast<M>(randint(0, vocab));
  std::vector<M> cpu = matrix;
  const int64_t count = tokens.size();
  const Status s = k::update_adjacency(cpu.data(), vocab, kk, tokens.data(), cand.data(), count);
  DeviceBuffer<M> d_matrix(matrix);
  DeviceBuffer<int64_t> d_tokens(tokens);
  DeviceBuffer<Cand> d_cand(cand);
  DeviceBuffer<unsigned> last(vocab);
  DeviceBuffer<kc::DeviceError> err(1);
  const Status g = device_status(kc::update_adjacency(d_matrix.get(), vocab, kk, d_tokens.get(), d_cand.get(), count,
                                                      last.get(), err.get(), nullptr),
                                 err, kc::describe_update_adjacency_error);
  same_status(label, s, g);
  expect(d_matrix.download() == cpu, label + (s.ok ? ": matrices differ" : ": the matrix changed on bad input"));
}

template <typename M, typename Cand>
void check_update_adjacency(const std::string& type) {
  bench::Section section("update_adjacency<" + type + ">");
  for (auto [count, vocab, kk] : {std::tuple<int64_t, int64_t, int64_t>{1, 4, 1}, {81, 40, 8}, {4 * 81, 1000, 8},
                                  {2000, 30, 3}, {0, 10, 8}}) {
    std::vector<int64_t> tokens(count);
    for (auto& t : tokens) t = randint(0, vocab);  // small vocabularies: many duplicates
    std::vector<Cand> cand(count * kk);
    for (auto& c : cand) c = static_cast<Cand>(randint(0, vocab));
    const std::string label = "update_adjacency<" + type + "> count=" + std::to_string(count);
    adjacency_case<M, Cand>(label, vocab, kk, tokens, cand);
    if (count < 2) continue;
    std::vector<int64_t> bad_tokens = tokens;
    bad_tokens[count / 2] = -1;
    adjacency_case<M, Cand>(label + " bad token", vocab, kk, bad_tokens, cand);
    std::vector<Cand> bad_cand = cand;
    bad_cand[cand.size() - 1] = static_cast<Cand>(vocab);
    adjacency_case<M, Cand>(label + " bad candidate", vocab, kk, tokens, bad_cand);
  }
}

// ------------------------------------------------------------------------------------ compact_kv
// A cache tensor [B, heads, seq, dim] inside a flat buffer, with its own strides and offset.
struct Layout {
  int64_t heads, dim, stride_b, stride_h, stride_s, stride_d, offset, size;
};
Layout make_layout(int64_t batch, int64_t heads, int64_t seq, int64_t dim, int64_t dim_step, int64_t offset) {
  Layout l{heads, dim, 0, 0, dim * dim_step, dim_step, offset, 0};
  l.stride_h = seq * l.stride_s;
  l.stride_b = heads * l.stride_h + 3;  // a gap between rows b
  l.size = offset + batch * l.stride_b;
  return l;
}

template <typename T>
void compact_case(const std::string& label, int64_t batch, int64_t seq, const std::vector<Layout>& layouts,
                  const std::vector<int64_t>& prefix, const std::vector<int64_t>& nodes, int64_t width,
                  const std::vector<int64_t>& len) {
  std::vector<std::vector<T>> host;
  for (const Layout& l : layouts) {
    host.emplace_back(l.size);
    for (auto& x : host.back()) x = static_cast<T>(randint(0, 60000));
  }
  std::vector<std::vector<T>> cpu = host;
  std::vector<k::KvTensor<T>> views, d_views;
  std::vector<std::unique_ptr<DeviceBuffer<T>>> device;
  for (size_t t = 0; t < layouts.size(); ++t) {
    const Layout& l = layouts[t];
    views.push_back({cpu[t].data() + l.offset, l.heads, l.dim, l.stride_b, l.stride_h, l.stride_s, l.stride_d});
    device.push_back(std::make_unique<DeviceBuffer<T>>(host[t]));
    d_views.push_back({device.back()->get() + l.offset, l.heads, l.dim, l.stride_b, l.stride_h, l.stride_s, l.stride_d});
  }
  const Status s = k::compact_kv(views.data(), views.size(), batch, seq, prefix.data(), nodes.data(), width, len.data());
  DeviceBuffer<k::KvTensor<T>> d_tensors(d_views);
  DeviceBuffer<int64_t> d_prefix(prefix), d_nodes(nodes), d_len(len);
  DeviceBuffer<kc::DeviceError> err(1);
  const Status g = device_status(kc::compact_kv(d_tensors.get(), d_views.data(), static_cast<int64_t>(d_views.size()),
                                                batch, seq, d_prefix.get(), d_nodes.get(), width, d_len.get(),
                                                err.get(), nullptr),
                                 err, kc::describe_compact_kv_error);
  same_status(label, s, g);
  bool same = true;
  for (size_t t = 0; t < layouts.size(); ++t) same = same && device[t]->download() == cpu[t];
  expect(same, label + (s.ok ? ": caches differ" : ": a cache changed on bad input"));
}

template <typename T>
void check_compact_kv(const std::string& type) {
  bench::Section section("compact_kv<" + type + ">");
  const int64_t batch = 3, seq = 70, tree = 20, width = 7;
  // 16-byte vectors (contiguous), elements (head_dim strided), elements (misaligned start), a small head.
  const std::vector<Layout> layouts = {make_layout(batch, 2, seq, 64, 1, 0), make_layout(batch, 3, seq, 40, 2, 0),
                                       make_layout(batch, 1, seq, 64, 1, 1), make_layout(batch, 4, seq, 8, 1, 0)};
  for (int rep = 0; rep < 3; ++rep) {
    std::vector<int64_t> prefix(batch), len(batch), nodes(batch * width, -1);
    for (int64_t b = 0; b < batch; ++b) {
      prefix[b] = randint(0, seq - tree + 1);
      len[b] = randint(0, width + 1);
      for (int64_t j = 0; j < len[b]; ++j) nodes[b * width + j] = randint(0, tree);  // any order, repeats too
    }
    const std::string label = "compact_kv<" + type + "> rep " + std::to_string(rep);
    compact_case<T>(label, batch, seq, layouts, prefix, nodes, width, len);
    if (rep > 0) continue;
    len[1] = width;  // row 1: a full path, so every bad case below is an index that is read
    for (int64_t j = 0; j < width; ++j) nodes[width + j] = j;
    std::vector<int64_t> bad = nodes;
    bad[width + 2] = seq - prefix[1];
    compact_case<T>(label + " node past the cache", batch, seq, layouts, prefix, bad, width, len);
    std::vector<int64_t> bad_len = len;
    bad_len[2] = width + 1;
    compact_case<T>(label + " accept_len > width", batch, seq, layouts, prefix, nodes, width, bad_len);
    std::vector<int64_t> bad_prefix = prefix;
    bad_prefix[0] = -1;
    compact_case<T>(label + " negative prefix", batch, seq, layouts, bad_prefix, nodes, width, len);
    bad_prefix = prefix;
    bad_prefix[1] = seq - 2;
    compact_case<T>(label + " prefix + accept_len > seq", batch, seq, layouts, bad_prefix, nodes, width, len);
    bad_prefix = prefix;  // a node whose position prefix + node overflows int64
    bad_prefix[1] = std::max<int64_t>(bad_prefix[1], 1);
    bad = nodes;
    bad[width + 3] = std::numeric_limits<int64_t>::max();
    compact_case<T>(label + " node at INT64_MAX", batch, seq, layouts, bad_prefix, bad, width, len);
  }
}

// ------------------------------------------------------------------------------------ tree_attention
template <typename T>
// tree_start >= 0: every row's tree at that slot after its own prefix (batched decoding); per_row:
// one tree mask per row ([B, N, N]) instead of one for the batch.
void attention_case(const std::string& type, int64_t batch, int64_t hq, int64_t hkv, int64_t n, int64_t seq, int64_t d,
                    std::vector<int64_t> prefix, bool uniform, int num_sms, bool expect_chunks,
                    int64_t tree_start = -1, bool per_row = false) {
  // q is [B, N, Hq, D] in memory (as a model's projection, seen as [B, Hq, N, D] through strides).
  std::vector<T> q(batch * n * hq * d), kv_k(batch * hkv * seq * d), kv_v(kv_k.size());
  for (auto* buf : {&q, &kv_k, &kv_v})
    for (auto& x : *buf) x = k::from_float<T>(bench::randn());
  const int64_t trees = per_row ? batch : 1;
  std::vector<uint8_t> mask(trees * n * n, 0);
  for (int64_t t = 0; t < trees; ++t) {
    std::vector<int32_t> parents, ranks;
    bench::random_tree(n, 8, parents, ranks);
    uint8_t* m = mask.data() + t * n * n;
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = i; j != -1; j = parents[j]) m[i * n + j] = 1;
      if (i % 5 == 3) m[i * n + randint(0, n)] ^= 1;  // not only ancestor masks
    }
    if (n > 1) std::fill(m + (n - 1) * n, m + n * n, 0);  // with prefix 0, row n-1 sees nothing
  }
  const int64_t mask_stride_b = per_row ? n * n : 0;
  const float scale = 1.f / std::sqrt(static_cast<float>(d));
  const k::TreeAttentionShape shape{batch, hq, hkv, n, seq, d};
  const k::Strided4D<const T> qv{q.data(), n * hq * d, d, hq * d, 1};
  const k::Strided4D<const T> kv{kv_k.data(), hkv * seq * d, seq * d, d, 1};
  const k::Strided4D<const T> vv{kv_v.data(), hkv * seq * d, seq * d, d, 1};
  std::vector<T> cpu(batch * hq * n * d);
  std::vector<float> cpu_lse(batch * hq * n);
  const Status s = k::tree_attention<T>(qv, kv, vv, k::Strided4D<T>{cpu.data(), hq * n * d, n * d, d, 1}, shape,
                                        prefix.data(), mask.data(), scale, cpu_lse.data(), tree_start, mask_stride_b);

  DeviceBuffer<T> d_q(q), d_k(kv_k), d_v(kv_v), d_out(std::vector<T>(cpu.size(), k::from_float<T>(NAN)));
  DeviceBuffer<int64_t> d_prefix(prefix);
  DeviceBuffer<uint8_t> d_mask(mask);
  kc::TreeAttentionArgs<T> args{d_q.get(), d_k.get(), d_v.get(), d_out.get(), n * hq * d, d, hq * d,
                                hkv * seq * d, seq * d, d, hkv * seq * d, seq * d, d, shape,
                                uniform ? nullptr : d_prefix.get(), uniform ? prefix[0] : 0, d_mask.get(), scale};
  DeviceBuffer<float> d_lse(std::vector<float>(cpu_lse.size(), NAN));
  args.lse = d_lse.get();
  args.tree_start = tree_start;
  args.mask_stride_b = mask_stride_b;
  // The key range the adapter plans for (csrc/cuda/tree_attention.cu).
  const bool tree_start_fits = tree_start >= -1 && tree_start <= seq - n;
  const int64_t key_len = tree_start >= 0 && tree_start_fits ? tree_start + n : uniform ? prefix[0] + n : seq;
  const kc::TreeAttentionPlan plan = kc::plan_tree_attention<T>(shape, key_len, num_sms);
  DeviceBuffer<unsigned char> workspace(plan.workspace_bytes);
  DeviceBuffer<kc::DeviceError> err(1);
  std::string label = "tree_attention<" + type + "> B=" + std::to_string(batch) + " Hq=" + std::to_string(hq) +
                      " Hkv=" + std::to_string(hkv) + " N=" + std::to_string(n) + " S=" + std::to_string(seq) +
                      " D=" + std::to_string(d) + " chunks=" + std::to_string(plan.chunks) + (uniform ? " uniform" : "") +
                      (tree_start != -1 ? " tree_start=" + std::to_string(tree_start) : "") + (per_row ? " per-row masks" : "");
  const cudaError_t launched = kc::tree_attention<T>(args, plan, workspace.get(), err.get(), nullptr);
  if (!tree_start_fits) {
    // A tree_start outside the keys is a host value: refused before any launch, nothing written.
    expect(!s.ok, label + ": the CPU kernel accepted a tree_start outside the keys");
    expect(launched == cudaErrorInvalidValue, label + ": the CUDA kernel did not refuse a tree_start outside the keys");
    bool untouched = true;
    for (const T& x : d_out.download()) untouched = untouched && std::isnan(k::to_float(x));
    expect(untouched, label + ": out was written for a bad tree_start");
    return;
  }
  const Status g = device_status(launched, err, kc::describe_tree_attention_error);
  expect(!expect_chunks || plan.chunks > 1, label + ": the plan was meant to split the keys");
  if (!same_status(label, s, g)) return;
  // Tolerances: float accumulates alike; 16-bit inputs also round P to 16 bits (as flash attention).
  const double atol = std::is_same_v<T, float> ? 2e-5 : (std::is_same_v<T, k::float16> ? 2e-3 : 1.6e-2);
  const double rtol = std::is_same_v<T, float> ? 1e-4 : (std::is_same_v<T, k::float16> ? 1e-2 : 3e-2);
  const std::vector<T> gpu = d_out.download();
  double worst = 0;
  int64_t bad = 0, zero_rows_ok = 0;
  for (size_t i = 0; i < cpu.size(); ++i) {
    const double a = k::to_float(cpu[i]), b = k::to_float(gpu[i]);
    const double err_i = std::fabs(a - b);
    if (!(err_i <= atol + rtol * std::fabs(a))) {
      if (bad < 3) std::printf("  [%zu] cpu %g cuda %g\n", i, a, b);
      ++bad;
    }
    worst = std::max(worst, std::isnan(err_i) ? INFINITY : err_i);
  }
  for (int64_t b = 0; b < batch; ++b) {  // rows that see nothing are exactly zero
    if (prefix[b] != 0 || n < 2) continue;
    bool zero = true;
    for (int64_t h = 0; h < hq; ++h)
      for (int64_t x = 0; x < d; ++x) zero = zero && k::to_float(gpu[((b * hq + h) * n + n - 1) * d + x]) == 0.f;
    expect(zero, label + ": a row that sees no key is not zero");
    zero_rows_ok += zero;
  }
  expect(bad == 0, label + ": " + std::to_string(bad) + " elements off, worst error " + std::to_string(worst));
  // The log-sum-exp (tree_attention_lse): float statistics in both, -inf where a row sees nothing.
  const std::vector<float> gpu_lse = d_lse.download();
  int64_t bad_lse = 0;
  for (size_t i = 0; i < cpu_lse.size(); ++i) {
    const double a = cpu_lse[i], b = gpu_lse[i];
    const bool ok = (std::isinf(a) && a < 0) ? (std::isinf(b) && b < 0) : std::fabs(a - b) <= 1e-3 + 1e-4 * std::fabs(a);
    if (!ok && bad_lse++ < 3) std::printf("  lse[%zu] cpu %g cuda %g\n", i, a, b);
  }
  expect(bad_lse == 0, label + ": " + std::to_string(bad_lse) + " lse values off");
}

// The split of a row's keys (tree_attention_chunk): at the plan's key_len it is the plan's own; for a
// shorter row (a device prefix planned at the static cache's capacity) it covers exactly the live keys
// [0, key_end) in order, in about as many chunks as a plan for key_end itself would make (at most the
// grid's), and the chunks past them are empty.
void check_tree_attention_chunks() {
  const std::string label = "tree_attention_chunk";
  const bench::Section section(label);
  for (int64_t key_len : {1, 63, 64, 257, 1000, 4177, 32768 + 81, 131072}) {
    for (int sms : {1, 8, 132}) {
      for (int64_t hq : {8, 32}) {
        const k::TreeAttentionShape shape{1, hq, 8, 81, key_len, 128};
        const kc::TreeAttentionPlan plan = kc::plan_tree_attention<k::bfloat16>(shape, key_len, sms);
        const int64_t keys = kc::tree_attention_keys_per_tile(false, 128);
        const std::string where = label + " key_len=" + std::to_string(key_len) + " sms=" + std::to_string(sms) +
                                  " Hq=" + std::to_string(hq) + " chunks=" + std::to_string(plan.chunks);
        for (int64_t c = 0; c < plan.chunks; ++c) {  // the plan's own split at its key_len
          int64_t begin = 0, end = 0;
          kc::tree_attention_chunk(plan.chunks, keys, key_len, c, &begin, &end);
          expect(begin == c * plan.chunk_len && end == std::min(key_len, (c + 1) * plan.chunk_len) && begin < end,
                 where + ": chunk " + std::to_string(c) + " is not the plan's");
        }
        for (int64_t live : {int64_t{1}, int64_t{100}, int64_t{300}, key_len / 3, key_len - 1}) {
          if (live < 1 || live > key_len) continue;
          const kc::TreeAttentionPlan own = kc::plan_tree_attention<k::bfloat16>(shape, live, sms);
          int64_t next = 0, used = 0;
          for (int64_t c = 0; c < plan.chunks; ++c) {
            int64_t begin = 0, end = 0;
            kc::tree_attention_chunk(plan.chunks, keys, live, c, &begin, &end);
            if (begin >= end) {
              expect(begin >= live, where + " live=" + std::to_string(live) + ": an empty chunk inside the live keys");
              continue;
            }
            expect(begin == next && begin % keys == 0, where + " live=" + std::to_string(live) + ": chunks out of order");
            next = end;
            ++used;
          }
          expect(next == live, where + " live=" + std::to_string(live) + ": the chunks miss live keys");
          // Whole tiles cost up to a quarter of the chunks at the shortest chunk length, as in the plan.
          const int64_t want = std::min(plan.chunks, own.chunks);
          expect(used <= plan.chunks && 4 * used >= 3 * want,
                 where + " live=" + std::to_string(live) + ": " + std::to_string(used) + " chunks used, a plan for the "
                 "live keys makes " + std::to_string(own.chunks));
        }
      }
    }
  }
}

template <typename T>
void check_tree_attention(const std::string& type, bool quick, bool small) {
  bench::Section section("tree_attention<" + type + ">");
  // Emulated runs (and --small) stay small; on a GPU every head_dim gets a long, split prefix too.
  std::vector<int64_t> dims = {64, 80, 96, 128, 256};
  if ((kEmulated && quick) || small) dims = {64, 80};
  for (int64_t d : dims) {
    attention_case<T>(type, 2, 4, 2, 21, 300, d, {240, 0}, false, 64, true);  // split prefix, a zero row
    attention_case<T>(type, 1, 2, 2, 1, 5, d, {4}, true, 4, false);           // one node
    if (!kEmulated && !small) {
      attention_case<T>(type, 2, 32, 8, 81, 4200, d, {4096, 1000}, false, 132, true);
      attention_case<T>(type, 1, 32, 32, 81, 600, d, {512}, true, 132, false);
      attention_case<T>(type, 3, 8, 1, 256, 2000, d, {1500, 7, 0}, false, 132, true);
    }
  }
  attention_case<T>(type, 3, 6, 3, 37, 130, 64, {93, 50, 0}, false, 2, false);  // one chunk, rows of 2 heads in a tile
  // Graph mode: the prefix on the device, the plan sized by the keys' capacity (2000: 8 chunks), the
  // live keys (321 and 61) split by the kernel, the chunks past them empty.
  attention_case<T>(type, 2, 4, 2, 21, 2000, 64, {300, 40}, false, 64, true);
  attention_case<T>(type, 2, 4, 2, 20, 300, 64, {240, 281}, false, 64, true);   // prefix_len[1] does not fit
  attention_case<T>(type, 2, 4, 2, 20, 300, 64, {240, std::numeric_limits<int64_t>::max()}, false, 64, true);  // prefix + N overflows
  // Batched decoding: every row's tree at tree_start after its own prefix (keys in between unseen),
  // one tree per row; split and unsplit keys, a row with an empty prefix, a uniform prefix.
  attention_case<T>(type, 3, 6, 3, 37, 140, 64, {93, 50, 0}, false, 2, false, 100, true);
  attention_case<T>(type, 2, 4, 2, 21, 300, 80, {240, 17}, false, 64, true, 260, true);
  attention_case<T>(type, 2, 4, 2, 21, 300, 64, {240, 0}, false, 64, true, 240, false);  // tree right after row 0's prefix
  attention_case<T>(type, 2, 4, 4, 9, 80, 64, {30, 30}, true, 4, false, 60, true);     // uniform prefix, tree later
  attention_case<T>(type, 3, 4, 2, 16, 64, 64, {40, 48, 2}, false, 4, false, 48, true);  // tree_start = seq - N
  // Bad input: a prefix past tree_start (reported by the kernel), negative, tree_start outside the keys.
  attention_case<T>(type, 2, 4, 2, 8, 64, 64, {30, 41}, false, 4, false, 40, true);
  attention_case<T>(type, 2, 4, 2, 8, 64, 64, {-3, 10}, false, 4, false, 40, false);
  attention_case<T>(type, 2, 4, 2, 8, 64, 64, {41, 41}, true, 4, false, 40, true);  // uniform prefix past tree_start
  attention_case<T>(type, 2, 4, 2, 8, 64, 64, {30, 10}, false, 4, false, 57, true);  // tree_start + N > kv length
  attention_case<T>(type, 2, 4, 2, 8, 64, 64, {30, 10}, false, 4, false, -2, false);
  attention_case<T>(type, 2, 4, 2, 8, 64, 64, {30, 10}, false, 4, false, std::numeric_limits<int64_t>::max(), true);
}

}  // namespace

// ------------------------------------------------------------------------ deferred checks (merge_error)
// An op's record ORed into an accumulated one: a clean record changes nothing, the first error wins
// and keeps its op tag and fields, and the accumulated record describes as the op's own would.
void check_deferred_errors() {
  const std::string label = "merge_error";
  const bench::Section section(label);
  DeviceBuffer<kc::DeviceError> acc(std::vector<kc::DeviceError>(1, kc::DeviceError{}));
  DeviceBuffer<kc::DeviceError> clean(std::vector<kc::DeviceError>(1, kc::DeviceError{}));
  bench::cuda_ok(kc::merge_error(acc.get(), clean.get(), 1, nullptr), "merge_error");
  expect(acc.download()[0].code == 0, label + ": a clean record set an error");

  // A first failing op: build_draft_tree with a root outside the vocab.
  DraftInput bad{10, 2, {12}, {-1, 0}, {0, 1}};
  std::vector<int32_t> matrix(bad.vocab * bad.k, 0);
  DeviceBuffer<int32_t> d_matrix(matrix);
  DeviceBuffer<int64_t> d_roots(bad.roots), d_tokens(std::vector<int64_t>(2, -7));
  DeviceBuffer<int32_t> d_parents(bad.parents), d_ranks(bad.ranks);
  DeviceBuffer<kc::DeviceError> first(1);
  bench::cuda_ok(kc::build_draft_tree(d_matrix.get(), bad.vocab, bad.k, d_roots.get(), 1, d_parents.get(),
                                      d_ranks.get(), 2, d_tokens.get(), first.get(), nullptr), "build_draft_tree");
  bench::cuda_ok(kc::merge_error(acc.get(), first.get(), 7, nullptr), "merge_error");
  // A second failing op (another record with another code) must not overwrite it.
  kc::DeviceError other{};
  other.code = kc::kTreeOrder;
  other.index = 5;
  DeviceBuffer<kc::DeviceError> second(std::vector<kc::DeviceError>(1, other));
  bench::cuda_ok(kc::merge_error(acc.get(), second.get(), 9, nullptr), "merge_error");
  bench::cuda_ok(kc::merge_error(acc.get(), clean.get(), 11, nullptr), "merge_error");
  const kc::DeviceError got = acc.download()[0], want = first.download()[0];
  expect(want.code != 0, label + ": the bad root was not reported");
  expect(got.code == want.code && got.op == 7 && got.index == want.index && got.value == want.value &&
             got.lo == want.lo && got.hi == want.hi,
         label + ": the first error did not win intact");
  const Status cpu = k::build_draft_tree(matrix.data(), bad.vocab, bad.k, bad.roots.data(), 1, bad.parents.data(),
                                         bad.ranks.data(), 2, std::vector<int64_t>(2).data());
  same_status(label, cpu, kc::describe_draft_tree_error(got));
}

int main(int argc, char** argv) {
  const bench::Options opt = bench::parse_options(argc, argv);
  bench::seed(opt.seed);
  std::printf("CUDA kernels vs CPU kernels (%s)\n", kEmulated ? "host emulation" : "GPU");
#if defined(__CUDACC__)
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: nothing checked\n");
    return 2;
  }
#endif
  if (bench::selected(opt, "build_draft_tree")) {
    check_draft_tree<int32_t>("int32");
    check_draft_tree<int64_t>("int64");
  }
  if (bench::selected(opt, "merge_error")) check_deferred_errors();
  if (bench::selected(opt, "verify_greedy")) check_verify_greedy();
  if (bench::selected(opt, "verify_sample")) check_verify_sample();
  if (bench::selected(opt, "update_adjacency")) {
    check_update_adjacency<int32_t, int64_t>("int32, int64");
    check_update_adjacency<int64_t, int32_t>("int64, int32");
  }
  if (bench::selected(opt, "compact_kv")) {
    check_compact_kv<uint16_t>("2-byte");
    check_compact_kv<uint32_t>("4-byte");
  }
  if (bench::selected(opt, "tree_attention")) {
    check_tree_attention_chunks();
    check_tree_attention<float>("float", opt.quick, opt.small);
    check_tree_attention<k::float16>("float16", opt.quick, opt.small);
    check_tree_attention<k::bfloat16>("bfloat16", opt.quick, opt.small);
  }
  return bench::exit_status();
}
