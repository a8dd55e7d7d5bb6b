// CPU benchmarks of the kernels in kernels/. Before timing, each kernel's result on one input is
// compared with a naive loop written here, so a benchmark of a broken kernel cannot pass silently.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "../../kernels/compact_kv.h"
#include "../../kernels/draft_tree.h"
#include "../../kernels/greedy_topk.h"
#include "../../kernels/skinny_linear.h"
#include "../../kernels/tree_attention.h"
#include "../../kernels/update_adjacency.h"
#include "../../kernels/verify_greedy.h"
#include "benchmarks.h"
#include "harness.h"
#include "shapes.h"

namespace bench {
namespace {

namespace k = token_recycling::kernels;

void draft_tree(const Options& o, const ModelShape& m, const Tree& tree, int64_t batch) {
  std::vector<int32_t> matrix(m.vocab * m.topk);
  for (auto& x : matrix) x = static_cast<int32_t>(randint(0, m.vocab));
  std::vector<int64_t> roots(batch), tokens(batch * tree.size());
  for (auto& r : roots) r = randint(0, m.vocab);
  auto run = [&] {
    k::build_draft_tree(matrix.data(), m.vocab, m.topk, roots.data(), batch, tree.parents.data(), tree.ranks.data(),
                        tree.size(), tokens.data());
  };
  run();
  bool same = true;  // naive: tokens[b, i] = matrix[tokens[b, parent], rank]
  for (int64_t b = 0; b < batch; ++b) {
    std::vector<int64_t> naive(tree.size());
    naive[0] = roots[b];
    for (int64_t i = 1; i < tree.size(); ++i) naive[i] = matrix[naive[tree.parents[i]] * m.topk + tree.ranks[i]];
    same = same && std::equal(naive.begin(), naive.end(), tokens.begin() + b * tree.size());
  }
  expect(same, "cpu build_draft_tree differs from the naive loop");
  const double t = time_host(run, o.quick ? 3 : 200);
  print_row("cpu", "build_draft_tree", shape_str({{"B", batch}, {"N", tree.size()}, {"V", m.vocab}}), t,
            batch * tree.size() * (8.0 + sizeof(int32_t)), 0);
}

void verify_greedy(const Options& o, const Tree& tree, int64_t batch) {
  const int64_t n = tree.size(), width = tree.depth() + 1;
  std::vector<int64_t> tokens(batch * n), preds(batch * n), len(batch), path(batch * width), bonus(batch);
  for (auto& x : tokens) x = randint(0, 2);  // two symbols: long accepted paths
  for (auto& x : preds) x = randint(0, 2);
  auto run = [&] {
    k::verify_greedy(tokens.data(), preds.data(), tree.parents.data(), 0, batch, n, width, len.data(), path.data(),
                     bonus.data());
  };
  run();
  bool same = true;  // naive: walk every node's path to the root; keep the deepest full match, then the smallest index
  for (int64_t b = 0; b < batch; ++b) {
    int64_t best = 0, best_depth = 0;
    for (int64_t i = 1; i < n; ++i) {
      int64_t depth = 0;
      bool match = true;
      for (int64_t j = i; j != 0; j = tree.parents[j], ++depth) match = match && tokens[b * n + j] == preds[b * n + tree.parents[j]];
      if (match && depth > best_depth) best = i, best_depth = depth;
    }
    same = same && len[b] == best_depth + 1 && bonus[b] == preds[b * n + best] && path[b * width + best_depth] == best;
  }
  expect(same, "cpu verify_greedy differs from the naive loop");
  const double t = time_host(run, o.quick ? 3 : 200);
  print_row("cpu", "verify_greedy", shape_str({{"B", batch}, {"N", n}}), t, batch * n * 16.0, 0);
}

void update_adjacency(const Options& o, const ModelShape& m, int64_t count) {
  std::vector<int32_t> matrix(m.vocab * m.topk, 0);
  std::vector<int64_t> tokens(count), cand(count * m.topk);
  for (auto& t : tokens) t = randint(0, std::min<int64_t>(m.vocab, 64));  // duplicates on purpose
  for (auto& c : cand) c = randint(0, m.vocab);
  auto run = [&] { k::update_adjacency(matrix.data(), m.vocab, m.topk, tokens.data(), cand.data(), count); };
  run();
  bool same = true;  // naive: the row of each token equals the candidates of its last occurrence
  for (int64_t i = 0; i < count; ++i) {
    if (std::find(tokens.begin() + i + 1, tokens.end(), tokens[i]) != tokens.end()) continue;
    for (int64_t j = 0; j < m.topk; ++j) same = same && matrix[tokens[i] * m.topk + j] == cand[i * m.topk + j];
  }
  expect(same, "cpu update_adjacency differs from the naive loop");
  const double t = time_host(run, o.quick ? 3 : 200);
  print_row("cpu", "update_adjacency", shape_str({{"count", count}, {"V", m.vocab}, {"k", m.topk}}), t,
            count * (8.0 + m.topk * 12.0), 0);
}

void compact_kv(const Options& o, const ModelShape& m, int64_t batch, int64_t kv_heads, int64_t prefix, int64_t accept) {
  const int64_t tree = 81, seq = prefix + tree, width = 7, d = m.head_dim;
  const int64_t tensors = 2 * m.layers;
  std::vector<std::vector<uint16_t>> caches(tensors, std::vector<uint16_t>(batch * kv_heads * seq * d));
  for (auto& c : caches)
    for (auto& x : c) x = static_cast<uint16_t>(randint(0, 65536));
  std::vector<k::KvTensor<uint16_t>> views;
  for (auto& c : caches) views.push_back({c.data(), kv_heads, d, kv_heads * seq * d, seq * d, d, 1});
  std::vector<int64_t> prefix_len(batch, prefix), len(batch, accept), nodes(batch * width, -1);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t j = 0; j < accept; ++j) nodes[b * width + j] = j == 0 ? 0 : nodes[b * width + j - 1] + randint(1, 4);
  const std::vector<uint16_t> before = caches[0];
  auto run = [&] {
    k::compact_kv(views.data(), tensors, batch, seq, prefix_len.data(), nodes.data(), width, len.data());
  };
  run();
  bool same = true;  // naive, first tensor: position prefix + j holds what was at prefix + nodes[j]
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t h = 0; h < kv_heads; ++h)
      for (int64_t j = 0; j < accept; ++j)
        for (int64_t x = 0; x < d; ++x) {
          const int64_t base = (b * kv_heads + h) * seq * d;
          same = same && caches[0][base + (prefix + j) * d + x] == before[base + (prefix + nodes[b * width + j]) * d + x];
        }
  expect(same, "cpu compact_kv differs from the naive loop");
  const double t = time_host(run, o.quick ? 3 : 50);
  print_row("cpu", "compact_kv",
            shape_str({{"L", m.layers}, {"B", batch}, {"Hkv", kv_heads}, {"D", d}, {"P", prefix}, {"accept", accept}}), t,
            2.0 * tensors * batch * kv_heads * accept * d * sizeof(uint16_t), 0);
}

// vectorized: the AVX2/FMA path where the CPU has it (else, and with false, the portable loop).
void tree_attention(const Options& o, const ModelShape& m, int64_t batch, int64_t kv_heads, const Tree& tree,
                    int64_t prefix, bool vectorized) {
  const int64_t n = tree.size(), d = m.head_dim, hq = m.q_heads, seq = prefix + n;
  std::vector<float> q(batch * hq * n * d), kk(batch * kv_heads * seq * d), v(kk.size()), out(q.size());
  for (auto* buf : {&q, &kk, &v})
    for (auto& x : *buf) x = randn();
  std::vector<uint8_t> mask(n * n, 0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = i; j != -1; j = tree.parents[j]) mask[i * n + j] = 1;
  std::vector<int64_t> prefix_len(batch, prefix);
  const float scale = 1.f / std::sqrt(static_cast<float>(d));
  const k::TreeAttentionShape shape{batch, hq, kv_heads, n, seq, d};
  auto strided = [&](const std::vector<float>& x, int64_t heads, int64_t len) {
    return k::Strided4D<const float>{x.data(), heads * len * d, len * d, d, 1};
  };
  auto run = [&] {
    k::tree_attention<float>(strided(q, hq, n), strided(kk, kv_heads, seq), strided(v, kv_heads, seq),
                             k::Strided4D<float>{out.data(), hq * n * d, n * d, d, 1}, shape, prefix_len.data(),
                             mask.data(), scale, nullptr, -1, 0, 0, -1, vectorized);
  };
  const bool fast = vectorized && k::tree_attention_vectorized<float>(strided(q, hq, n), strided(kk, kv_heads, seq),
                                                                      strided(v, kv_heads, seq), shape);
  run();
  // Naive, in double, for one (b, h, node): the last row of the last head sees the most tree nodes.
  {
    const int64_t b = batch - 1, h = hq - 1, i = n - 1, hk = h / (hq / kv_heads);
    std::vector<double> w;
    std::vector<int64_t> keys;
    for (int64_t pos = 0; pos < seq; ++pos) {
      if (pos >= prefix && !mask[i * n + pos - prefix]) continue;
      double dot = 0;
      for (int64_t x = 0; x < d; ++x) dot += double(q[((b * hq + h) * n + i) * d + x]) * kk[((b * kv_heads + hk) * seq + pos) * d + x];
      w.push_back(dot * scale);
      keys.push_back(pos);
    }
    const double mx = *std::max_element(w.begin(), w.end());
    double sum = 0;
    for (double& x : w) sum += (x = std::exp(x - mx));
    double worst = 0;
    for (int64_t x = 0; x < d; ++x) {
      double acc = 0;
      for (size_t c = 0; c < keys.size(); ++c) acc += w[c] / sum * v[((b * kv_heads + hk) * seq + keys[c]) * d + x];
      worst = std::max(worst, std::fabs(acc - out[((b * hq + h) * n + i) * d + x]));
    }
    expect(worst < 1e-4, std::string("cpu tree_attention") + (fast ? " (avx2)" : "") +
                             " differs from the naive loop by " + std::to_string(worst));
  }
  const double t = time_host(run, o.quick ? 2 : 3);
  print_row("cpu", fast ? "tree_attention avx2" : "tree_attention", shape_str({{"B", batch}, {"Hq", hq}, {"Hkv", kv_heads}, {"N", n}, {"D", d}, {"P", prefix}}),
            t, 2.0 * batch * kv_heads * seq * d * sizeof(float), 4.0 * batch * hq * n * seq * d);
}

// Whether y [n, out] = x [n, in] @ w^T, checked against a double-precision loop on a sample of
// ~64 outputs per row, within tol.
template <typename W>
bool matches_naive_linear(const float* x, const W* w, const float* y, int64_t n, int64_t out, int64_t in,
                          double tol) {
  bool close = true;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t r = 0; r < out; r += std::max<int64_t>(1, out / 64)) {
      double want = 0;
      for (int64_t c = 0; c < in; ++c) want += static_cast<double>(x[i * in + c]) * k::to_float(w[r * in + c]);
      close = close && std::abs(y[i * out + r] - want) <= tol;
    }
  return close;
}

// W: float or bf16 weights; X: float x, or bf16 x with bf16 weights (y float32 either way). path:
// "portable", "avx2" or "avx512-bf16" (a path this CPU lacks is skipped).
template <typename W, typename X>
void skinny_linear(const Options& o, int64_t out, int64_t in, int64_t n, const std::string& path) {
  if (path != "portable" && !k::skinny_linear_vectorized()) return;
  if (path == "avx512-bf16" && std::string(k::skinny_linear_path()) != "avx512-bf16") return;
  const bool vectorized = path != "portable", avx512 = path == "avx512-bf16";
  std::vector<float> xf(n * in), y(n * out);
  std::vector<X> x(n * in);
  std::vector<W> w(out * in);
  for (size_t i = 0; i < x.size(); ++i) xf[i] = k::to_float(x[i] = k::from_float<X>(randn()));
  for (auto& v : w) v = k::from_float<W>(randn());
  auto run = [&] {
    k::skinny_linear(x.data(), n, in, w.data(), out, in, in, nullptr, y.data(), out, 0, out, vectorized, avx512);
  };
  run();
  // Float sums of `in` terms of size ~1 are off by ~in * 2^-24 at most.
  expect(matches_naive_linear(xf.data(), w.data(), y.data(), n, out, in,
                              1e-6 * in * std::sqrt(static_cast<double>(in)) + 1e-4),
         "cpu skinny_linear differs from the naive loop");
  const double t = time_host(run, o.quick ? 3 : 20);
  const std::string name = "skinny_linear " + (avx512 ? std::string("avx512") : path) +
                           (sizeof(X) == 2 ? " bf16wx" : sizeof(W) == 2 ? " bf16w" : "");
  print_row("cpu", name.c_str(), shape_str({{"n", n}, {"out", out}, {"in", in}}), t,
            sizeof(W) * out * in + sizeof(X) * n * in + 4.0 * n * out, 2.0 * n * out * in);
}

#ifdef TOKEN_RECYCLING_AVX2
// The CPU's float32 FMA throughput (12 independent 8-wide chains): the ceiling skinny_model's rows
// run into once the weight stream no longer hides the arithmetic.
__attribute__((target("avx2,fma"))) void fma_peak(const Options& o) {
  const int64_t iters = o.quick ? 100000 : 20000000;
  __m256 acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm256_set1_ps(static_cast<float>(i));
  const __m256 a = _mm256_set1_ps(0.999f), b = _mm256_set1_ps(1e-3f);
  const auto start = std::chrono::steady_clock::now();
  for (int64_t t = 0; t < iters; ++t)
    for (int i = 0; i < 12; ++i) acc[i] = _mm256_fmadd_ps(acc[i], a, b);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  float sink = 0;
  for (int i = 0; i < 12; ++i) sink += _mm256_cvtss_f32(acc[i]);
  expect(std::isfinite(sink), "fma_peak: the chains overflowed");
  print_row("cpu", "fma_peak avx2", shape_str({{"fma8", 12 * iters}}), s, 0, 16.0 * 12 * iters);
}
#endif

// A whole model's linear layers for n rows of x: SmolLM2-135M's 30 x 7 projections and its tied
// 49152-row vocabulary projection (537 MB of float32 weights, far beyond any cache), so the weights
// stream from DRAM as in a real verification forward, where the one-layer rows above keep them in
// cache. The ratio to n = 1 is what a drafted token costs in the linear layers on this CPU: it stays
// near 1 while the arithmetic hides under the weight stream and grows once the FMAs are the bound.
void skinny_model(const Options& o, const std::vector<int64_t>& rows) {
  struct Layer { int64_t out, in; std::vector<float> w; };
  const int64_t hidden = o.quick ? 64 : 576, kv = o.quick ? 32 : 192, mlp = o.quick ? 160 : 1536;
  const int64_t vocab = o.quick ? 1000 : 49152, layers = o.quick ? 2 : 30;
  std::vector<Layer> stack;
  for (int64_t l = 0; l < layers; ++l)
    for (auto [out, in] : {std::pair{hidden, hidden}, {kv, hidden}, {kv, hidden}, {hidden, hidden}, {mlp, hidden},
                           {mlp, hidden}, {hidden, mlp}})
      stack.push_back({out, in, {}});
  stack.push_back({vocab, hidden, {}});
  double bytes = 0;
  for (auto& layer : stack) {
    layer.w.resize(layer.out * layer.in);
    for (auto& v : layer.w) v = 0.05f * randn();
    bytes += 4.0 * layer.w.size();
  }
  const int64_t max_n = *std::max_element(rows.begin(), rows.end());
  std::vector<float> x(max_n * mlp), y(max_n * vocab);
  for (auto& v : x) v = randn();
  double base = 0;
  for (int64_t n : rows) {
    auto run = [&] {
      for (auto& l : stack)
        k::skinny_linear(x.data(), n, l.in, l.w.data(), l.out, l.in, l.in, nullptr, y.data(), l.out, 0, l.out, true);
    };
    const double t = time_host(run, o.quick ? 2 : 5);
    if (n == rows.front()) base = t;
    const Layer& last = stack.back();  // y holds the last layer's output: check a sample of it
    expect(matches_naive_linear(x.data(), last.w.data(), y.data(), n, last.out, last.in, 1e-5 * last.in + 1e-4),
           "cpu skinny_model: the last layer differs from the naive loop");
    char ratio[32];
    std::snprintf(ratio, sizeof ratio, " time/n1=%.2f", t / base);
    print_row("cpu", "skinny_model", shape_str({{"layers", static_cast<int64_t>(stack.size())}, {"n", n}}) + ratio,
              t, bytes, 2.0 * n * bytes / 4);
  }
}

// Top-k ids (ties by the lower id) of `rows` logit rows of width `vocab`, against a stable sort.
template <typename T>
void greedy_topk(const Options& o, int64_t rows, int64_t vocab, int64_t kk) {
  std::vector<T> x(rows * vocab);
  std::vector<float> xf(x.size());
  for (size_t i = 0; i < x.size(); ++i) xf[i] = k::to_float(x[i] = k::from_float<T>(randn()));
  std::vector<int64_t> ids(rows * kk);
  auto run = [&] { k::greedy_topk(x.data(), rows, vocab, vocab, kk, ids.data()); };
  run();
  bool same = true;
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<int64_t> order(vocab);
    for (int64_t i = 0; i < vocab; ++i) order[i] = i;
    const float* row = xf.data() + r * vocab;
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return row[a] > row[b]; });
    for (int64_t j = 0; j < kk; ++j) same = same && ids[r * kk + j] == order[j];
  }
  expect(same, "cpu greedy_topk differs from a stable sort");
  const double t = time_host(run, o.quick ? 3 : 50);
  print_row("cpu", sizeof(T) == 2 ? "greedy_topk bf16" : "greedy_topk", shape_str({{"rows", rows}, {"V", vocab}, {"k", kk}}),
            t, sizeof(T) * rows * vocab + 8.0 * rows * kk, static_cast<double>(rows * vocab));
}

}  // namespace

void run_cpu_benchmarks(const Options& o) {
  const ModelShape& m = o.quick ? kTiny : kLlama7B;
  const Tree tree = paper_like_tree(o.quick);
  if (selected(o, "build_draft_tree")) {
    draft_tree(o, m, tree, 1);
    draft_tree(o, m, tree, 8);
  }
  if (selected(o, "verify_greedy")) {
    verify_greedy(o, tree, 1);
    verify_greedy(o, tree, 8);
  }
  if (selected(o, "update_adjacency")) {
    update_adjacency(o, m, tree.size());
    update_adjacency(o, m, 8 * tree.size());
  }
  if (selected(o, "compact_kv")) {
    compact_kv(o, m, 1, o.quick ? 2 : 8, o.quick ? 32 : 2048, 4);
    if (!o.quick) compact_kv(o, m, 1, 32, 2048, 6);
  }
  if (selected(o, "tree_attention")) {
    // The portable loop (the reference) and the AVX2 path, each checked against a double-precision loop.
    const std::vector<int64_t> prefixes = o.quick ? std::vector<int64_t>{40} : std::vector<int64_t>{512, 2048};
    for (bool vectorized : {false, true})
      for (int64_t p : prefixes) tree_attention(o, m, 1, o.quick ? 2 : 8, tree, p, vectorized);
    // SmolLM2-135M (the CPU model of bench/RESULTS.md): 9 query and 3 kv heads of 64, a chain of 4 nodes.
    const ModelShape smol{30, 9, 64, 49152, 8};
    Tree chain;
    chain.parents = {-1, 0, 1, 2};
    chain.ranks = {0, 0, 0, 0};
    for (bool vectorized : {false, true}) tree_attention(o, smol, 1, 3, chain, 200, vectorized);
  }
  if (selected(o, "skinny_linear")) {
    // SmolLM2-135M's MLP up-projection (the CPU model of bench/RESULTS.md); the scalar loop once.
    const int64_t out = o.quick ? 96 : 1536, in = o.quick ? 40 : 576;
    for (const char* path : {"avx2", "avx512-bf16"}) {
      for (int64_t n : {1, 2, 4, 8}) skinny_linear<float, float>(o, out, in, n, path);
      for (int64_t n : {1, 2, 4, 8}) skinny_linear<k::bfloat16, k::bfloat16>(o, out, in, n, path);
    }
    skinny_linear<float, float>(o, out, in, 4, "portable");
    skinny_linear<k::bfloat16, float>(o, out, in, 4, "avx2");
  }
#ifdef TOKEN_RECYCLING_AVX2
  if (selected(o, "fma_peak") && k::skinny_linear_vectorized()) fma_peak(o);
#endif
  if (selected(o, "skinny_model")) {  // the first size is the ratio's base
    skinny_model(o, o.quick ? std::vector<int64_t>{1, 4} : std::vector<int64_t>{1, 2, 3, 4, 6, 8, 12});
  }
  if (selected(o, "greedy_topk")) {
    // SmolLM2's vocabulary, a verification forward's few rows.
    const int64_t vocab = o.quick ? 500 : 49152;
    for (int64_t rows : {1, 4}) greedy_topk<float>(o, rows, vocab, 8);
    greedy_topk<k::bfloat16>(o, 4, vocab, 8);
  }
}

}  // namespace bench
