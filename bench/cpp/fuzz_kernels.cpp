// tr_fuzz_kernels: every framework-free kernel in kernels/*.h called with random inputs, valid and
// not: random shapes (empty and negative sizes too), out-of-range ids, lengths and prefixes
// (INT64_MIN/MAX included), tree slots (tree_start) outside the keys or before a row's prefix, one
// tree mask per row, broken trees, strided caches, n-gram indexes out of step with their
// lengths, and corrupted n-gram tables. Every call must return an error Status exactly when the
// naive loop written here finds the input invalid, and otherwise the naive loop's result (for
// attention: within a float tolerance of a double-precision loop). Ops that promise to check
// before writing must leave their outputs untouched on error. Every buffer is a heap allocation of
// exactly the size the call describes, so under AddressSanitizer (.ci/sanitize.sh) any access
// outside it is a report; UndefinedBehaviorSanitizer catches overflowing index arithmetic.
//   tr_fuzz_kernels [--quick] [--seed=N] [--only=NAME]
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "../../kernels/compact_kv.h"
#include "../../kernels/draft_tree.h"
#include "../../kernels/graft_chain.h"
#include "../../kernels/greedy_topk.h"
#include "../../kernels/merge_attention_states.h"
#include "../../kernels/ngram_index.h"
#include "../../kernels/rms_norm.h"
#include "../../kernels/rotary.h"
#include "../../kernels/skinny_linear.h"
#include "../../kernels/tree_attention.h"
#include "../../kernels/update_adjacency.h"
#include "../../kernels/verify_greedy.h"
#include "../../kernels/verify_sample.h"
#include "harness.h"

namespace {

namespace k = token_recycling::kernels;
using bench::randint;
using k::Status;

constexpr int64_t kMin = std::numeric_limits<int64_t>::min();
constexpr int64_t kMax = std::numeric_limits<int64_t>::max();

bool chance(double p) { return std::uniform_real_distribution<double>(0.0, 1.0)(bench::rng()) < p; }

// A size in [lo, hi]; now and then a negative one, which every kernel must reject.
int64_t pick_size(int64_t lo, int64_t hi) {
  if (chance(0.02)) {
    const int64_t bad[] = {-1, -2, -7, kMin};
    return bad[randint(0, 4)];
  }
  return randint(lo, hi + 1);
}
size_t alloc(int64_t n) { return n > 0 ? static_cast<size_t>(n) : 0; }

// A value outside [lo, hi): next to the range, far from it, or at the int64 extremes.
int64_t outside(int64_t lo, int64_t hi) {
  switch (randint(0, 6)) {
    case 0: return lo - 1;
    case 1: return hi;
    case 2: return hi + randint(1, 100);
    case 3: return lo - randint(2, 100);
    case 4: return kMin;
    default: return kMax;
  }
}
// An int32 value outside [lo, hi).
int32_t outside32(int64_t lo, int64_t hi) {
  const int64_t v = chance(0.3) ? (chance(0.5) ? std::numeric_limits<int32_t>::min() : std::numeric_limits<int32_t>::max())
                                : (chance(0.5) ? lo - randint(1, 50) : hi + randint(0, 50));
  return static_cast<int32_t>(std::clamp<int64_t>(v, std::numeric_limits<int32_t>::min(), std::numeric_limits<int32_t>::max()));
}
template <typename T>
T outside_as(int64_t lo, int64_t hi) {
  if constexpr (sizeof(T) == 4) return static_cast<T>(outside32(lo, hi));
  else return static_cast<T>(outside(lo, hi));
}

// Per section: calls, how many succeeded, and failures (the first few printed).
struct Tally {
  std::string name;
  int64_t calls = 0, ok = 0, failed = 0;
  explicit Tally(std::string n) : name(std::move(n)) {}
  void check(bool good, const std::string& what) {
    if (good) return;
    if (++failed <= 5) bench::expect(false, name + ": " + what);
    else ++bench::failures();
  }
  // The kernel's verdict against the naive loop's; returns whether both accepted the input.
  bool verdict(const Status& s, bool valid, int64_t iter) {
    ++calls;
    ok += s.ok;
    check(s.ok == valid, "call " + std::to_string(iter) + ": kernel says " + (s.ok ? "ok" : "'" + s.message + "'") +
                             ", the naive loop says " + (valid ? "valid" : "invalid"));
    return s.ok && valid;
  }
  ~Tally() {
    // A fuzz pass that only ever accepts or only ever rejects tests half of the contract.
    bench::expect(ok > 0 && ok < calls, name + ": " + std::to_string(ok) + " of " + std::to_string(calls) +
                                            " calls succeeded; want both outcomes");
    if (failed == 0) {
      std::printf("ok    %-28s %6lld calls, %6lld accepted, %6lld rejected\n", name.c_str(), (long long)calls,
                  (long long)ok, (long long)(calls - ok));
    }
    std::fflush(stdout);
  }
};

// A random tree in topological order: parents[0] = -1, parents[i] in [max(0, i - 6), i).
std::vector<int32_t> random_parents(int64_t n) {
  std::vector<int32_t> p(alloc(n), -1);
  for (int64_t i = 1; i < n; ++i) p[i] = static_cast<int32_t>(randint(std::max<int64_t>(0, i - 6), i));
  return p;
}
// Breaks one entry of a tree: the root gets a parent, or a node points at itself, later, or nowhere.
void break_tree(std::vector<int32_t>& p) {
  if (p.empty()) return;
  const int64_t i = randint(0, static_cast<int64_t>(p.size()));
  p[i] = i == 0 ? static_cast<int32_t>(chance(0.5) ? 0 : randint(-5, 5) | 1) : outside32(0, i);
  if (i == 0 && p[0] == -1) p[0] = 0;
}
// The naive tree check: nodes >= 1, parents[0] == -1, 0 <= parents[i] < i; depths out.
bool naive_tree(const int32_t* p, int64_t n, std::vector<int64_t>& depth) {
  if (n < 1 || p[0] != -1) return false;
  depth.assign(n, 0);
  for (int64_t i = 1; i < n; ++i) {
    if (p[i] < 0 || p[i] >= i) return false;
    depth[i] = depth[p[i]] + 1;
  }
  return true;
}

// ------------------------------------------------------------------------------ build_draft_tree
template <typename M>
void fuzz_draft_tree(int64_t iters) {
  Tally t(std::string("build_draft_tree<") + (sizeof(M) == 4 ? "int32>" : "int64>"));
  for (int64_t it = 0; it < iters; ++it) {
    const int64_t vocab = pick_size(0, 40), kk = pick_size(0, 6), batch = pick_size(0, 4), n = pick_size(0, 25);
    const bool dirty = chance(0.4);
    std::vector<M> matrix(alloc(vocab) * alloc(kk));
    for (auto& x : matrix) x = vocab > 0 ? static_cast<M>(randint(0, vocab)) : outside_as<M>(0, 0);
    std::vector<int32_t> parents = random_parents(n), ranks(alloc(n), 0);
    for (int64_t i = 1; i < n; ++i) ranks[i] = kk > 0 ? static_cast<int32_t>(randint(0, kk)) : outside32(0, kk);
    if (n > 0 && chance(0.3)) ranks[0] = outside32(0, kk);  // the root's rank is never read
    std::vector<int64_t> roots(alloc(batch));
    for (auto& r : roots) r = vocab > 0 ? randint(0, vocab) : outside(0, vocab);
    if (dirty) {
      switch (randint(0, 4)) {
        case 0: break_tree(parents); break;
        case 1: if (n > 1) ranks[randint(1, n)] = outside32(0, kk); break;
        case 2: if (batch > 0) roots[randint(0, batch)] = outside(0, vocab); break;
        default:
          for (int64_t j = 0, m = randint(1, 4); j < m && !matrix.empty(); ++j)
            matrix[randint(0, matrix.size())] = outside_as<M>(0, vocab);
      }
    }
    // Naive: check the tree, ranks and roots, then walk each row checking every entry it reads.
    std::vector<int64_t> depth, want(alloc(batch) * alloc(n));
    bool valid = vocab >= 0 && kk >= 0 && batch >= 0 && naive_tree(parents.data(), n, depth);
    for (int64_t i = 1; valid && i < n; ++i) valid = ranks[i] >= 0 && ranks[i] < kk;
    for (int64_t b = 0; valid && b < batch; ++b) valid = roots[b] >= 0 && roots[b] < vocab;
    for (int64_t b = 0; valid && b < batch; ++b) {
      want[b * n] = roots[b];
      for (int64_t i = 1; valid && i < n; ++i) {
        const int64_t next = static_cast<int64_t>(matrix[want[b * n + parents[i]] * kk + ranks[i]]);
        valid = next >= 0 && next < vocab;
        want[b * n + i] = next;
      }
    }
    std::vector<int64_t> got(want.size(), -77);
    const Status s = k::build_draft_tree(matrix.data(), vocab, kk, roots.data(), batch, parents.data(), ranks.data(),
                                         n, got.data());
    if (t.verdict(s, valid, it)) t.check(got == want, "call " + std::to_string(it) + ": tokens differ");
  }
}

// ------------------------------------------------------------------------------ update_adjacency
template <typename M, typename C>
void fuzz_update_adjacency(int64_t iters) {
  Tally t(std::string("update_adjacency<") + (sizeof(M) == 4 ? "int32, " : "int64, ") +
          (sizeof(C) == 4 ? "int32>" : "int64>"));
  for (int64_t it = 0; it < iters; ++it) {
    const int64_t vocab = pick_size(0, 30), kk = pick_size(0, 5), count = pick_size(0, 40);
    std::vector<M> matrix(alloc(vocab) * alloc(kk));
    for (auto& x : matrix) x = static_cast<M>(randint(-3, 50));
    std::vector<int64_t> tokens(alloc(count));
    // A small range of tokens: many duplicates, so "the last occurrence wins" is exercised.
    for (auto& x : tokens) x = vocab > 0 ? randint(0, std::min<int64_t>(vocab, 6)) : outside(0, vocab);
    std::vector<C> cand(alloc(count) * alloc(kk));
    for (auto& x : cand) x = vocab > 0 ? static_cast<C>(randint(0, vocab)) : outside_as<C>(0, vocab);
    if (chance(0.3) && !tokens.empty()) tokens[randint(0, tokens.size())] = outside(0, vocab);
    if (chance(0.3) && !cand.empty()) cand[randint(0, cand.size())] = outside_as<C>(0, vocab);

    bool valid = vocab >= 0 && kk >= 0 && count >= 0;
    for (int64_t x : tokens) valid = valid && x >= 0 && x < vocab;
    for (C x : cand) valid = valid && static_cast<int64_t>(x) >= 0 && static_cast<int64_t>(x) < vocab;
    std::vector<M> want = matrix;
    if (valid) {
      for (int64_t i = 0; i < count; ++i)
        for (int64_t j = 0; j < kk; ++j) want[tokens[i] * kk + j] = static_cast<M>(cand[i * kk + j]);
    }
    const Status s = k::update_adjacency(matrix.data(), vocab, kk, tokens.data(), cand.data(), count);
    t.verdict(s, valid, it);
    // On error nothing may have been written: the op checks every value first.
    t.check(matrix == want, "call " + std::to_string(it) + (valid ? ": matrices differ" : ": the matrix changed on bad input"));
  }
}

// ------------------------------------------------------------------------------ verify_greedy
void fuzz_verify_greedy(int64_t iters) {
  Tally t("verify_greedy");
  for (int64_t it = 0; it < iters; ++it) {
    const int64_t batch = pick_size(0, 4), n = pick_size(0, 30);
    int64_t stride = chance(0.3) ? n : 0;
    if (chance(0.03)) stride = chance(0.5) ? n + randint(1, 3) : outside(0, 1);  // (mostly) neither shared nor per row
    const bool per_row = stride != 0 && stride == n;
    const int64_t trees = per_row ? std::max<int64_t>(batch, 0) : 1;
    std::vector<int32_t> parents;
    for (int64_t b = 0; b < trees; ++b) {
      std::vector<int32_t> p = random_parents(n);
      parents.insert(parents.end(), p.begin(), p.end());
    }
    if (chance(0.15)) break_tree(parents);
    std::vector<int64_t> tokens(alloc(batch) * alloc(n)), preds(tokens.size());
    for (auto& x : tokens) x = randint(0, 3);  // three symbols: long accepted paths, ties between them
    for (auto& x : preds) x = chance(0.05) ? outside(0, 3) : randint(0, 3);  // predictions are any int64
    // Predictions that often equal a child's token.
    for (int64_t b = 0; n > 0 && b < batch; ++b) {
      const int32_t* par = parents.data() + (per_row ? b * n : 0);
      for (int64_t i = 1; i < n; ++i) {
        if (par[i] >= 0 && par[i] < i && chance(0.5)) preds[b * n + par[i]] = tokens[b * n + i];
      }
    }
    // Naive: every tree checked (a shared tree even without rows), the path width against the deepest.
    std::vector<int64_t> depth;
    int64_t deepest = -1;
    bool valid = batch >= 0 && n >= 0 && (stride == 0 || stride == n);
    const int64_t checked = stride == 0 ? 1 : batch;
    for (int64_t b = 0; valid && b < checked; ++b) {
      valid = naive_tree(parents.data() + b * stride, n, depth);
      if (valid) deepest = std::max(deepest, *std::max_element(depth.begin(), depth.end()));
    }
    int64_t width = std::max<int64_t>(deepest + 1, 0) + (chance(0.5) ? 0 : randint(0, 3));
    if (chance(0.08)) width = chance(0.5) ? deepest : -1;  // one too narrow, or negative
    valid = valid && width >= 0 && (deepest < 0 || width >= deepest + 1);
    std::vector<int64_t> len(alloc(batch), -77), path(alloc(batch) * alloc(width), -77), bonus(alloc(batch), -77);
    std::vector<int64_t> want_len = len, want_path = path, want_bonus = bonus;
    for (int64_t b = 0; valid && b < batch; ++b) {
      // Walk every node's path to the root; keep the deepest full match, then the smallest index.
      const int32_t* par = parents.data() + b * stride;
      int64_t best = 0, best_depth = 0;
      for (int64_t i = 1; i < n; ++i) {
        int64_t d = 0;
        bool match = true;
        for (int64_t j = i; j != 0; j = par[j], ++d) match = match && tokens[b * n + j] == preds[b * n + par[j]];
        if (match && d > best_depth) best = i, best_depth = d;
      }
      want_len[b] = best_depth + 1;
      want_bonus[b] = preds[b * n + best];
      for (int64_t j = 0; j < width; ++j) want_path[b * width + j] = -1;
      for (int64_t j = best_depth, node = best; j >= 0; --j, node = par[node]) want_path[b * width + j] = node;
    }
    const Status s = k::verify_greedy(tokens.data(), preds.data(), parents.data(), stride, batch, n, width,
                                      len.data(), path.data(), bonus.data());
    if (t.verdict(s, valid, it)) {
      t.check(len == want_len && path == want_path && bonus == want_bonus, "call " + std::to_string(it) + ": outputs differ");
    }
  }
}

// ------------------------------------------------------------------------------ compact_kv
// A [batch, heads, seq, dim] tensor in its own exactly-sized buffer, dims laid out in a random
// order with random gaps (as torch views of permuted or sliced caches are).
template <typename T>
struct Cache {
  k::KvTensor<T> view;
  std::vector<T> data;
};
template <typename T>
Cache<T> random_cache(int64_t batch, int64_t heads, int64_t seq, int64_t dim) {
  Cache<T> c;
  const int64_t sizes[4] = {batch, heads, seq, dim};
  int64_t order[4] = {0, 1, 2, 3}, strides[4] = {0, 0, 0, 0};
  if (chance(0.5)) std::shuffle(order, order + 4, bench::rng());
  int64_t step = chance(0.7) ? 1 : randint(1, 3);
  for (int i = 3; i >= 0; --i) {
    strides[order[i]] = step;
    step *= std::max<int64_t>(sizes[order[i]], 1) + (chance(0.2) ? randint(0, 3) : 0);
  }
  int64_t extent = 0;  // 1 + the largest offset; no element at all when a size is 0 (or negative)
  if (*std::min_element(sizes, sizes + 4) > 0) {
    extent = 1;
    for (int i = 0; i < 4; ++i) extent += (sizes[i] - 1) * strides[i];
  }
  const int64_t front = chance(0.3) ? randint(1, 4) : 0;  // the view starts inside its buffer
  c.data.resize(alloc(extent > 0 ? extent + front : 0));
  for (auto& x : c.data) x = static_cast<T>(randint(0, 60000));
  c.view = {c.data.empty() ? nullptr : c.data.data() + front, heads, dim, strides[0], strides[1], strides[2], strides[3]};
  return c;
}

template <typename T>
void fuzz_compact_kv(int64_t iters) {
  Tally t(std::string("compact_kv<") + std::to_string(8 * sizeof(T)) + "-bit>");
  for (int64_t it = 0; it < iters; ++it) {
    const int64_t num = pick_size(0, 3), batch = pick_size(0, 3), seq = pick_size(0, 30), width = pick_size(0, 8);
    std::vector<Cache<T>> caches;
    bool sizes_ok = num >= 0 && batch >= 0 && seq >= 0 && width >= 0;
    for (int64_t c = 0; c < num; ++c) {
      const int64_t heads = pick_size(0, 3), dim = pick_size(0, 9);
      sizes_ok = sizes_ok && heads >= 0 && dim >= 0;
      caches.push_back(random_cache<T>(std::max<int64_t>(batch, 0), heads, std::max<int64_t>(seq, 0), dim));
    }
    std::vector<int64_t> prefix(alloc(batch)), len(alloc(batch)), nodes(alloc(batch) * alloc(width));
    for (auto& x : nodes) x = chance(0.8) ? -1 : outside(0, 0);  // padding: never read
    for (int64_t b = 0; b < batch; ++b) {
      prefix[b] = randint(0, std::max<int64_t>(seq, 0) + 1);
      const int64_t room = std::max<int64_t>(seq, 0) - prefix[b];
      len[b] = randint(0, std::min(room, std::max<int64_t>(width, 0)) + 1);
      for (int64_t j = 0; j < len[b]; ++j) nodes[b * width + j] = randint(0, room);  // any order, repeats too
    }
    if (batch > 0 && chance(0.35)) {
      const int64_t b = randint(0, batch);
      switch (randint(0, 3)) {
        case 0: prefix[b] = outside(0, seq + 1); break;
        case 1: len[b] = outside(0, width + 1); break;
        default: if (len[b] > 0) nodes[b * width + randint(0, len[b])] = outside(0, seq - prefix[b]);
      }
    }
    // Naive: the index checks, then per tensor, row and head all reads before the writes.
    bool valid = sizes_ok;
    for (int64_t b = 0; valid && b < batch; ++b) {
      valid = prefix[b] >= 0 && prefix[b] <= seq && len[b] >= 0 && len[b] <= width && len[b] <= seq - prefix[b];
      for (int64_t j = 0; valid && j < len[b]; ++j) valid = nodes[b * width + j] >= 0 && nodes[b * width + j] < seq - prefix[b];
    }
    std::vector<std::vector<T>> want;
    for (const auto& c : caches) want.push_back(c.data);
    for (size_t c = 0; valid && c < caches.size(); ++c) {
      const auto& v = caches[c].view;
      const int64_t front = caches[c].data.empty() ? 0 : v.data - caches[c].data.data();
      for (int64_t b = 0; b < batch; ++b)
        for (int64_t h = 0; h < v.heads; ++h) {
          std::vector<T> staged;
          auto at = [&](int64_t pos, int64_t d) { return front + b * v.stride_b + h * v.stride_h + pos * v.stride_s + d * v.stride_d; };
          for (int64_t j = 0; j < len[b]; ++j)
            for (int64_t d = 0; d < v.dim; ++d) staged.push_back(caches[c].data[at(prefix[b] + nodes[b * width + j], d)]);
          for (int64_t j = 0; j < len[b]; ++j)
            for (int64_t d = 0; d < v.dim; ++d) want[c][at(prefix[b] + j, d)] = staged[j * v.dim + d];
        }
    }
    std::vector<k::KvTensor<T>> views;
    for (const auto& c : caches) views.push_back(c.view);
    const Status s = k::compact_kv(views.data(), num, batch, seq, prefix.data(), nodes.data(), width, len.data());
    t.verdict(s, valid, it);
    bool same = true;
    for (size_t c = 0; c < caches.size(); ++c) same = same && caches[c].data == want[c];
    t.check(same, "call " + std::to_string(it) + (valid ? ": caches differ" : ": a cache changed on bad input"));
  }
}

// ------------------------------------------------------------------------------ tree_attention
template <typename T>
void fuzz_tree_attention(int64_t iters, const char* type) {
  Tally t(std::string("tree_attention<") + type + ">");
  // Tolerances against a double-precision loop: float accumulation, plus output rounding for 16-bit types.
  const double tol = std::is_same_v<T, float> ? 2e-5 : (std::is_same_v<T, k::float16> ? 2e-3 : 1.6e-2);
  for (int64_t it = 0; it < iters; ++it) {
    const int64_t batch = pick_size(0, 2), kv_heads = pick_size(0, 3), group = randint(1, 4), n = pick_size(0, 7),
                  dim = pick_size(0, 9);
    int64_t q_heads = std::max<int64_t>(kv_heads, 0) * group;
    if (chance(0.05)) q_heads = kv_heads + 1;  // not a multiple of kv_heads (or kv_heads == 0)
    if (chance(0.02)) q_heads = -std::max<int64_t>(kv_heads, 1);
    const int64_t seq = pick_size(0, 12) + std::max<int64_t>(n, 0);
    const k::TreeAttentionShape shape{batch, q_heads, kv_heads, n, seq, dim};
    const int64_t B = alloc(batch), Hq = alloc(q_heads), Hkv = alloc(kv_heads), N = alloc(n), S = alloc(seq), D = alloc(dim);
    // q [B, Hq, N, D] and k, v [B, Hkv, S, D]: contiguous, or [B, N|S, H, D] in memory.
    const bool seq_major = chance(0.5);
    std::vector<T> q(B * Hq * N * D), kk(B * Hkv * S * D), vv(kk.size());
    for (auto* buf : {&q, &kk, &vv})
      for (auto& x : *buf) x = k::from_float<T>(bench::randn());
    auto view = [&](std::vector<T>& x, int64_t heads, int64_t len) {
      return seq_major ? k::Strided4D<const T>{x.data(), len * heads * D, D, heads * D, 1}
                       : k::Strided4D<const T>{x.data(), heads * len * D, len * D, D, 1};
    };
    // One tree mask for every row [N, N] (stride 0) or one per row [B, N, N].
    const bool per_row = chance(0.5);
    const int64_t mask_stride_b = per_row ? static_cast<int64_t>(N * N) : 0;
    std::vector<uint8_t> mask((per_row ? B : 1) * N * N);
    for (auto& m : mask) m = chance(0.5) ? 0 : static_cast<uint8_t>(chance(0.7) ? 1 : randint(2, 256));  // non-zero = visible
    // Where the trees sit: after each row's prefix (tree_start = -1), or at one slot tree_start for
    // every row (batched decoding: prefix_len[b] <= tree_start); now and then a tree_start outside
    // [-1, seq - N] or a prefix past it.
    const int64_t last_start = std::max<int64_t>(S - N, 0);
    int64_t tree_start = -1;
    if (chance(0.5)) tree_start = randint(0, last_start + 1);
    if (chance(0.1)) tree_start = chance(0.3) ? -2 : outside(-1, last_start + 1);
    const int64_t prefix_end = tree_start >= 0 && tree_start <= last_start ? tree_start : last_start;
    std::vector<int64_t> prefix(B);
    for (auto& p : prefix) p = randint(0, prefix_end + 1);
    if (B > 0 && chance(0.2)) prefix[randint(0, B)] = outside(0, prefix_end + 1);
    if (B > 0 && tree_start >= 0 && tree_start <= last_start && chance(0.1)) prefix[randint(0, B)] = tree_start + randint(1, 3);  // just past it
    const float scale = static_cast<float>(randint(1, 11)) / 10.f;
    // Each pair cut into node_chunks node ranges (threads splitting the nodes), now and then out of range.
    int64_t chunks = chance(0.4) ? randint(1, std::max<int64_t>(n, 1) + 1) : 1;
    if (chance(0.03)) chunks = chance(0.5) ? randint(-2, 1) : std::max<int64_t>(n, 1) + randint(1, 3);

    bool valid = batch >= 0 && q_heads >= 0 && kv_heads > 0 && n >= 0 && seq >= 0 && dim >= 0 && q_heads % kv_heads == 0;
    valid = valid && (chunks == 1 || (chunks >= 1 && chunks <= n));
    valid = valid && tree_start >= -1 && (tree_start == -1 || tree_start <= seq - n);
    for (int64_t b = 0; valid && b < batch; ++b) {
      valid = prefix[b] >= 0 && prefix[b] <= seq - n && (tree_start == -1 || prefix[b] <= tree_start);
    }
    const T poison = k::from_float<T>(NAN);
    std::vector<T> out(B * Hq * N * D, poison);
    const bool with_lse = chance(0.5);  // tree_attention_lse: each row's log-sum-exp as well
    std::vector<float> lse(with_lse ? B * Hq * N : 0, NAN);
    // With node ranges, the units are computed in two calls split at a random unit, as threads would.
    const int64_t units = chunks > 1 && valid ? batch * kv_heads * chunks : -1;
    const int64_t cut = units > 0 ? randint(0, units + 1) : 0;
    auto run = [&](std::vector<T>& o, std::vector<float>& l, int64_t c, int64_t begin, int64_t end) {
      return k::tree_attention<T>(view(q, Hq, N), view(kk, Hkv, S), view(vv, Hkv, S),
                                  k::Strided4D<T>{o.data(), Hq * N * D, N * D, D, 1}, shape, prefix.data(),
                                  mask.data(), scale, with_lse ? l.data() : nullptr, tree_start, mask_stride_b,
                                  begin, end, /*vectorized=*/true, c);
    };
    Status s = run(out, lse, chunks, 0, units > 0 ? cut : -1);
    if (s.ok && units > 0) s = run(out, lse, chunks, cut, units);
    if (s.ok && units > 0) {  // the same bits as one range per pair
      std::vector<T> whole(out.size(), poison);
      std::vector<float> whole_lse(lse.size(), NAN);
      t.check(run(whole, whole_lse, 1, 0, -1).ok, "call " + std::to_string(it) + ": node_chunks = 1 failed");
      const bool same = (out.empty() || std::memcmp(whole.data(), out.data(), out.size() * sizeof(T)) == 0) &&
                        (lse.empty() || std::memcmp(whole_lse.data(), lse.data(), lse.size() * sizeof(float)) == 0);
      t.check(same, "call " + std::to_string(it) + ": node_chunks = " + std::to_string(chunks) +
                        " differs from one range per pair");
    }
    if (!t.verdict(s, valid, it)) {
      bool untouched = true;  // checked before anything is written
      for (const T& x : out) untouched = untouched && std::isnan(k::to_float(x));
      for (float x : lse) untouched = untouched && std::isnan(x);
      t.check(untouched, "call " + std::to_string(it) + ": out or lse was written on bad input");
      continue;
    }
    const auto qv = view(q, Hq, N), kv = view(kk, Hkv, S), vv_ = view(vv, Hkv, S);
    double worst = 0;
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t h = 0; h < q_heads; ++h)
        for (int64_t i = 0; i < n; ++i) {
          const int64_t hk = h / (q_heads / kv_heads);
          std::vector<double> w;
          std::vector<int64_t> keys;
          // Keys: the row's prefix, then tree node j at tree_at + j where its mask row allows.
          const int64_t tree_at = tree_start >= 0 ? tree_start : prefix[b];
          const uint8_t* row_mask = mask.data() + b * mask_stride_b + i * n;
          for (int64_t pos = 0; pos < tree_at + n; ++pos) {
            if (pos >= prefix[b] && pos < tree_at) continue;  // between the prefix and the trees: never seen
            if (pos >= tree_at && row_mask[pos - tree_at] == 0) continue;
            double dot = 0;
            for (int64_t d = 0; d < dim; ++d) dot += double(k::to_float(qv.at(b, h, i, d))) * k::to_float(kv.at(b, hk, pos, d));
            w.push_back(dot * scale);
            keys.push_back(pos);
          }
          const double mx = w.empty() ? 0 : *std::max_element(w.begin(), w.end());
          double sum = 0;
          for (double& x : w) sum += (x = std::exp(x - mx));
          if (with_lse) {  // log of the softmax denominator; -inf for a row that sees no key
            const double got = lse[(b * q_heads + h) * n + i];
            const double err = keys.empty() ? (got == -INFINITY ? 0 : INFINITY)
                                            : std::fabs(got - (mx + std::log(sum))) / (1 + std::fabs(mx));
            worst = std::max(worst, std::isnan(err) ? INFINITY : err);
          }
          for (int64_t d = 0; d < dim; ++d) {
            double acc = 0;
            for (size_t c = 0; c < keys.size(); ++c) acc += w[c] / sum * k::to_float(vv_.at(b, hk, keys[c], d));
            const double got = k::to_float(out[((b * q_heads + h) * n + i) * dim + d]);
            const double err = keys.empty() ? (got == 0 ? 0 : INFINITY) : std::fabs(got - acc) / (1 + std::fabs(acc));
            worst = std::max(worst, std::isnan(err) ? INFINITY : err);
          }
        }
    t.check(worst <= tol, "call " + std::to_string(it) + ": off by " + std::to_string(worst));
  }
}

// ------------------------------------------------------------------------------ merge_attention_states
template <typename T>
void fuzz_merge_attention_states(int64_t iters, const char* type) {
  Tally t(std::string("merge_attention_states<") + type + ">");
  const double tol = std::is_same_v<T, float> ? 1e-5 : (std::is_same_v<T, k::float16> ? 2e-3 : 1.6e-2);
  auto random_lse = [] {
    if (chance(0.1)) return -INFINITY;  // saw no key
    if (chance(0.03)) return chance(0.5) ? NAN : INFINITY;  // garbage in: no crash, nothing compared
    return static_cast<float>(randint(-4000, 4000)) / 100.f;
  };
  for (int64_t it = 0; it < iters; ++it) {
    const k::MergeShape shape{pick_size(0, 2), pick_size(0, 3), pick_size(0, 5), pick_size(0, 9)};
    const int64_t B = alloc(shape.batch), H = alloc(shape.heads), R = alloc(shape.rows), D = alloc(shape.head_dim);
    const bool rows_major = chance(0.5);  // [B, R, H, D] in memory, seen as [B, H, R, D]
    std::vector<T> a(B * H * R * D), b(a.size()), out(a.size(), k::from_float<T>(NAN));
    for (auto* buf : {&a, &b})
      for (auto& x : *buf) x = k::from_float<T>(bench::randn());
    auto view = [&](std::vector<T>& x) {
      return rows_major ? k::Strided4D<const T>{x.data(), R * H * D, D, H * D, 1}
                        : k::Strided4D<const T>{x.data(), H * R * D, R * D, D, 1};
    };
    std::vector<float> la(B * H * R), lb(la.size()), lse(la.size(), NAN);
    for (auto& x : la) x = random_lse();
    for (auto& x : lb) x = random_lse();
    const bool valid = shape.batch >= 0 && shape.heads >= 0 && shape.rows >= 0 && shape.head_dim >= 0;
    const Status s = k::merge_attention_states<T>(view(a), la.data(), view(b), lb.data(),
                                                  k::Strided4D<T>{out.data(), H * R * D, R * D, D, 1}, lse.data(), shape);
    if (!t.verdict(s, valid, it)) continue;
    double worst = 0;
    const auto av = view(a), bv = view(b);
    for (int64_t x = 0; x < B; ++x)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t r = 0; r < R; ++r) {
          const int64_t row = (x * H + h) * R + r;
          const double m = std::max<double>(la[row], lb[row]);
          if (std::isnan(la[row]) || std::isnan(lb[row]) || m == INFINITY) continue;  // garbage: no crash is enough
          if (m == -INFINITY) {  // neither part saw a key: zero output, lse -inf
            bool zero = lse[row] == -INFINITY;
            for (int64_t d = 0; d < D; ++d) zero = zero && k::to_float(out[row * D + d]) == 0.f;
            worst = std::max(worst, zero ? 0.0 : INFINITY);
            continue;
          }
          const double wa = std::exp(la[row] - m), wb = std::exp(lb[row] - m);
          worst = std::max(worst, std::fabs(lse[row] - (m + std::log(wa + wb))) / (1 + std::fabs(m)));
          for (int64_t d = 0; d < D; ++d) {
            const double want = (wa * k::to_float(av.at(x, h, r, d)) + wb * k::to_float(bv.at(x, h, r, d))) / (wa + wb);
            const double err = std::fabs(k::to_float(out[row * D + d]) - want) / (1 + std::fabs(want));
            worst = std::max(worst, std::isnan(err) ? INFINITY : err);
          }
        }
    t.check(worst <= tol, "call " + std::to_string(it) + ": off by " + std::to_string(worst));
  }
}

// ------------------------------------------------------------------------------ verify_sample
// The draw, as the kernel's header specifies it: integer weights ceil(p / pmax * 2^32), the smallest
// v whose running sum exceeds min(floor(u * total), total - 1). Returns false for an invalid row.
bool naive_draw(const float* p, int64_t vocab, double u, int64_t* token) {
  if (!(u >= 0.0 && u < 1.0)) return false;
  double pmax = 0;
  for (int64_t v = 0; v < vocab; ++v) {
    if (!(p[v] >= 0.0f) || std::isinf(p[v])) return false;
    pmax = std::max<double>(pmax, p[v]);
  }
  if (pmax == 0) return false;
  std::vector<uint64_t> q(vocab);
  uint64_t total = 0;
  for (int64_t v = 0; v < vocab; ++v) total += q[v] = p[v] > 0 ? static_cast<uint64_t>(std::ceil(p[v] / pmax * 4294967296.0)) : 0;
  const uint64_t target = std::min<uint64_t>(static_cast<uint64_t>(std::floor(u * static_cast<double>(total))), total - 1);
  uint64_t run = 0;
  for (int64_t v = 0; v < vocab; ++v) {
    if ((run += q[v]) > target) {
      *token = v;
      return true;
    }
  }
  return false;
}

void fuzz_verify_sample(int64_t iters) {
  Tally t("verify_sample");
  for (int64_t it = 0; it < iters; ++it) {
    const int64_t batch = pick_size(0, 3), n = pick_size(0, 20), vocab = chance(0.03) ? 0 : pick_size(1, 5);
    int64_t stride = chance(0.3) ? n : 0;
    if (chance(0.03)) stride = chance(0.5) ? n + randint(1, 3) : outside(0, 1);
    const bool per_row = stride != 0 && stride == n;
    const int64_t B = alloc(batch), N = alloc(n), V = alloc(vocab), trees = per_row ? B : 1;
    std::vector<int32_t> parents;
    for (int64_t x = 0; x < trees; ++x) {
      std::vector<int32_t> p = random_parents(n);
      parents.insert(parents.end(), p.begin(), p.end());
    }
    if (chance(0.1)) break_tree(parents);
    std::vector<int64_t> tokens(B * N);
    for (auto& x : tokens) x = randint(0, std::max<int64_t>(V, 1));  // a small vocabulary: deep walks
    std::vector<float> probs(B * N * V);
    for (auto& x : probs) x = chance(0.3) ? 0.f : static_cast<float>(randint(1, 1000)) / 1000.f;
    std::vector<double> uniforms(B * N);
    for (auto& x : uniforms) x = static_cast<double>(randint(0, 1 << 30)) / (1 << 30);
    if (chance(0.25) && !probs.empty()) {  // bad weights or draws; an error only where the walk reads them
      const float bad[] = {-1.f, NAN, INFINITY, -0.f};
      probs[randint(0, probs.size())] = bad[randint(0, 4)];
    }
    if (chance(0.1) && !uniforms.empty()) {
      const double bad[] = {-0.25, 1.0, 7.0, NAN, INFINITY};
      uniforms[randint(0, uniforms.size())] = bad[randint(0, 5)];
    }
    if (chance(0.1) && B * N > 0) {  // a row of zero weights
      const int64_t row = randint(0, B * N);
      std::fill(probs.begin() + row * V, probs.begin() + (row + 1) * V, 0.f);
    }
    std::vector<int64_t> depth;
    int64_t deepest = -1;
    bool valid = batch >= 0 && n >= 0 && (stride == 0 || stride == n) && vocab >= 1;
    for (int64_t x = 0; valid && x < (stride == 0 ? 1 : batch); ++x) {
      valid = naive_tree(parents.data() + x * stride, n, depth);
      if (valid) deepest = std::max(deepest, *std::max_element(depth.begin(), depth.end()));
    }
    int64_t width = std::max<int64_t>(deepest + 1, 0) + (chance(0.7) ? 0 : randint(0, 3));
    if (chance(0.05)) width = chance(0.5) ? deepest : -1;
    valid = valid && width >= 0 && (deepest < 0 || width >= deepest + 1);
    std::vector<int64_t> len(B, -77), path(B * alloc(width), -77), bonus(B, -77);
    std::vector<int64_t> want_len = len, want_path = path, want_bonus = bonus;
    for (int64_t b = 0; valid && b < batch; ++b) {  // the walk: draw at the node, move to the first child holding the draw
      const int32_t* par = parents.data() + b * stride;
      int64_t node = 0, steps = 0, drawn = 0;
      for (int64_t j = 0; j < width; ++j) want_path[b * width + j] = -1;
      while (valid) {
        want_path[b * width + steps++] = node;
        valid = naive_draw(&probs[(b * n + node) * vocab], vocab, uniforms[b * n + steps - 1], &drawn);
        int64_t next = -1;
        for (int64_t i = 1; i < n && next < 0; ++i) if (par[i] == node && tokens[b * n + i] == drawn) next = i;
        if (next < 0) break;
        node = next;
      }
      want_len[b] = steps;
      want_bonus[b] = drawn;
    }
    const Status s = k::verify_sample(tokens.data(), parents.data(), stride, probs.data(), uniforms.data(), batch, n,
                                      vocab, width, len.data(), path.data(), bonus.data());
    if (t.verdict(s, valid, it)) {
      t.check(len == want_len && path == want_path && bonus == want_bonus, "call " + std::to_string(it) + ": outputs differ");
    }
  }
}

// ------------------------------------------------------------------------------ graft_chain
void fuzz_graft_chain(int64_t iters) {
  Tally t("graft_chain");
  for (int64_t it = 0; it < iters; ++it) {
    const int64_t batch = pick_size(0, 3), n = pick_size(0, 15), width = pick_size(0, 8);
    const int64_t B = alloc(batch), N = alloc(n), W = alloc(width), M = N + W;
    std::vector<int32_t> parents = random_parents(n);
    if (chance(0.1)) break_tree(parents);
    std::vector<int64_t> tree(B * N), chain(B * W, -1), chain_len(B);
    for (auto& x : tree) x = randint(0, 4);  // four symbols: chains often merge into the tree
    for (int64_t b = 0; b < batch; ++b) {
      chain_len[b] = randint(0, W + 1);
      for (int64_t j = 0; j < chain_len[b]; ++j) chain[b * W + j] = randint(0, 4);
      for (int64_t j = chain_len[b]; j < width; ++j) if (chance(0.3)) chain[b * W + j] = outside(0, 0);  // never read
    }
    if (batch > 0 && chance(0.3)) {
      const int64_t b = randint(0, batch);
      switch (randint(0, 3)) {
        case 0: if (n > 0) tree[b * N + randint(0, N)] = -randint(1, 100) + (chance(0.1) ? kMin + 100 : 0); break;
        case 1: chain_len[b] = outside(0, width + 1); break;
        default: if (chain_len[b] > 0) chain[b * W + randint(0, chain_len[b])] = chance(0.5) ? -1 : kMin;
      }
    }
    std::vector<int64_t> depth;
    bool valid = batch >= 0 && width >= 0 && naive_tree(parents.data(), n, depth);
    for (int64_t b = 0; valid && b < batch; ++b) {
      for (int64_t i = 0; i < n; ++i) valid = valid && tree[b * N + i] >= 0;
      valid = valid && chain_len[b] >= 0 && chain_len[b] <= width;
      for (int64_t j = 0; valid && j < chain_len[b]; ++j) valid = chain[b * W + j] >= 0;
    }
    // Naive (as reference.graft_chain): walk down while a child (smallest index) has the next token,
    // then append the rest; pad with root-token leaves; mask = ancestors by walking parents.
    std::vector<int64_t> want_tok(B * M), want_dep(B * M), want_num(B);
    std::vector<int32_t> want_par(B * M);
    for (int64_t b = 0; valid && b < batch; ++b) {
      std::vector<int64_t> tok(tree.begin() + b * N, tree.begin() + (b + 1) * N), dep(depth);
      std::vector<int32_t> par(parents);
      int64_t cur = 0;
      bool appending = false;
      for (int64_t j = 0; j < chain_len[b]; ++j) {
        const int64_t c = chain[b * W + j];
        int64_t child = -1;
        for (int64_t i = 1; i < static_cast<int64_t>(tok.size()) && !appending && child < 0; ++i)
          if (par[i] == cur && tok[i] == c) child = i;
        if (child >= 0) {
          cur = child;
          continue;
        }
        appending = true;
        tok.push_back(c);
        par.push_back(static_cast<int32_t>(cur));
        dep.push_back(dep[cur] + 1);
        cur = static_cast<int64_t>(tok.size()) - 1;
      }
      want_num[b] = static_cast<int64_t>(tok.size());
      while (static_cast<int64_t>(tok.size()) < M) tok.push_back(tok[0]), par.push_back(0), dep.push_back(1);
      std::copy(tok.begin(), tok.end(), want_tok.begin() + b * M);
      std::copy(par.begin(), par.end(), want_par.begin() + b * M);
      std::copy(dep.begin(), dep.end(), want_dep.begin() + b * M);
    }
    std::vector<int64_t> tok(B * M, -77), dep(B * M, -77), num(B, -77);
    std::vector<int32_t> par(B * M, -77);
    std::unique_ptr<bool[]> mask(new bool[B * M * M]);
    std::fill(mask.get(), mask.get() + B * M * M, true);
    const Status s = k::graft_chain(tree.data(), parents.data(), batch, n, chain.data(), chain_len.data(), width,
                                    tok.data(), par.data(), dep.data(), mask.get(), num.data());
    if (!t.verdict(s, valid, it)) continue;
    bool mask_ok = true;
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t i = 0; i < M; ++i) {
        std::vector<bool> anc(M, false);
        for (int64_t j = i; j != -1; j = j == 0 ? -1 : want_par[b * M + j]) anc[j] = true;
        for (int64_t j = 0; j < M; ++j) mask_ok = mask_ok && mask[(b * M + i) * M + j] == anc[j];
      }
    t.check(tok == want_tok && par == want_par && dep == want_dep && num == want_num && mask_ok,
            "call " + std::to_string(it) + ": outputs differ");
  }
}

// ------------------------------------------------------------------------------ skinny_linear
// Random sizes, row strides (some too small: an error), output ranges (some outside [0, out]); x, w and
// y exactly as large as the strides describe. Outputs outside [o_begin, o_end) must stay untouched.
// Half the calls take bf16 weights, half of those bf16 x too (the same values: small multiples of 1/4
// are exact in bf16), and half of those a bf16 y; the calls spread over every path this CPU has
// (portable, AVX2, AVX-512).
void fuzz_skinny_linear(int64_t iters) {
  Tally t("skinny_linear");
  for (int64_t it = 0; it < iters; ++it) {
    const int64_t n = pick_size(0, 13), out = pick_size(0, 21), in = pick_size(0, 72);
    const int64_t IN = alloc(in), OUT = alloc(out), N = alloc(n);
    auto stride = [&](int64_t need) { return chance(0.05) ? need - randint(1, 5) : need + randint(0, 4); };
    const int64_t xs = stride(IN), ws = stride(IN), ys = stride(OUT);
    int64_t ob = randint(0, OUT + 1), oe = randint(ob, OUT + 1);
    if (chance(0.05)) ob = chance(0.5) ? -randint(1, 5) : ob;
    if (chance(0.05)) oe = chance(0.5) ? OUT + randint(1, 5) : ob - 1;
    const bool vectorized = chance(0.5), avx512 = chance(0.5), bias = chance(0.5), bf16 = chance(0.5);
    const bool bf16x = bf16 && chance(0.5);  // bf16 activations too (with bf16 weights only)
    const bool bf16y = bf16x && chance(0.5);  // and a bf16 y (each output rounded once)
    const bool strides_ok = (n <= 1 || xs >= in) && (out <= 1 || ws >= in) && (n <= 1 || ys >= out);
    const bool valid = n >= 0 && out >= 0 && in >= 0 && ob >= 0 && strides_ok && oe >= ob && oe <= out;
    auto span = [](int64_t rows, int64_t stride, int64_t cols) {
      return rows > 0 && cols > 0 ? static_cast<size_t>((rows - 1) * std::max<int64_t>(stride, 0) + cols) : 0;
    };
    std::vector<float> x(span(N, xs, IN)), w(span(OUT, ws, IN)), b(bias ? OUT : 0), y(span(N, ys, OUT), -77.f);
    for (auto& v : x) v = static_cast<float>(randint(-8, 9)) / 4;
    for (auto& v : w) v = static_cast<float>(randint(-8, 9)) / 4;
    for (auto& v : b) v = static_cast<float>(randint(-8, 9)) / 4;
    std::vector<k::bfloat16> wb(bf16 ? w.size() : 0), xb(bf16x ? x.size() : 0);
    for (size_t i = 0; i < wb.size(); ++i) wb[i] = k::from_float<k::bfloat16>(w[i]);
    for (size_t i = 0; i < xb.size(); ++i) xb[i] = k::from_float<k::bfloat16>(x[i]);
    const float* bp = bias ? b.data() : nullptr;
    std::vector<k::bfloat16> yb(bf16y ? y.size() : 0, k::from_float<k::bfloat16>(-77.f));
    const Status s =
        bf16y  ? k::skinny_linear(xb.data(), n, xs, wb.data(), out, in, ws, bp, yb.data(), ys, ob, oe, vectorized, avx512)
        : bf16x ? k::skinny_linear(xb.data(), n, xs, wb.data(), out, in, ws, bp, y.data(), ys, ob, oe, vectorized, avx512)
        : bf16 ? k::skinny_linear(x.data(), n, xs, wb.data(), out, in, ws, bp, y.data(), ys, ob, oe, vectorized, avx512)
               : k::skinny_linear(x.data(), n, xs, w.data(), out, in, ws, bp, y.data(), ys, ob, oe, vectorized, avx512);
    if (!t.verdict(s, valid, it)) continue;
    bool same = true;  // small multiples of 1/4: every partial sum is exact in float, in any order
    for (int64_t i = 0; i < n; ++i)
      for (int64_t o = 0; o < out; ++o) {
        double want = -77;
        if (o >= ob && o < oe) {
          want = bias ? b[o] : 0;
          for (int64_t c = 0; c < in; ++c) want += static_cast<double>(x[i * xs + c]) * w[o * ws + c];
        }
        if (bf16y) {  // the exact sum, rounded once
          same = same && yb[i * ys + o].bits == k::from_float<k::bfloat16>(static_cast<float>(want)).bits;
        } else {
          same = same && y[i * ys + o] == static_cast<float>(want);
        }
      }
    t.check(same, "call " + std::to_string(it) + ": outputs differ");
  }
}

// ------------------------------------------------------------------------------ rms_norm, rotary
// Random sizes (some negative) and x row strides (some too small), buffers exactly as large as the
// valid layouts need; outputs against the formulas written out with their own indexing.
void fuzz_rms_norm(int64_t iters) {
  Tally t("rms_norm");
  for (int64_t it = 0; it < iters; ++it) {
    const int64_t rows = pick_size(0, 6), dim = pick_size(0, 40);
    const int64_t R = alloc(rows), D = alloc(dim);
    const int64_t xs = chance(0.05) ? D - randint(1, 4) : D + randint(0, 4);
    const bool valid = rows >= 0 && dim >= 0 && (rows <= 1 || xs >= dim);
    std::vector<float> x(R > 0 && D > 0 ? static_cast<size_t>((R - 1) * std::max<int64_t>(xs, 0) + D) : 0);
    std::vector<float> var(R), w(D), out(static_cast<size_t>(R * D), -77.f);
    for (auto& v : x) v = static_cast<float>(randint(-8, 9)) / 4;
    for (auto& v : var) v = static_cast<float>(randint(0, 9)) / 4;
    for (auto& v : w) v = static_cast<float>(randint(-8, 9)) / 4;
    const float eps = 1e-5f;
    const Status s = k::rms_norm_apply(x.data(), rows, dim, xs, var.data(), w.data(), eps, out.data());
    if (!t.verdict(s, valid, it)) continue;
    bool same = true;
    for (int64_t r = 0; r < rows; ++r) {
      const float scale = 1.0f / std::sqrt(var[r] + eps);
      for (int64_t d = 0; d < dim; ++d) same = same && out[r * dim + d] == w[d] * (x[r * xs + d] * scale);
    }
    t.check(same, "call " + std::to_string(it) + ": outputs differ");
    // The squares the caller sums for the variance, from the same x.
    std::vector<float> sq(static_cast<size_t>(R * D), -77.f);
    const Status q = k::rms_norm_squares(x.data(), rows, dim, xs, sq.data());
    if (!t.verdict(q, valid, it)) continue;
    bool squares = true;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t d = 0; d < dim; ++d) squares = squares && sq[r * dim + d] == x[r * xs + d] * x[r * xs + d];
    t.check(squares, "call " + std::to_string(it) + ": squares differ");
  }
}

void fuzz_rotary(int64_t iters) {
  Tally t("rotary_embedding");
  for (int64_t it = 0; it < iters; ++it) {
    const int64_t b = pick_size(0, 3), h = pick_size(0, 4), n = pick_size(0, 5);
    int64_t d = pick_size(0, 16);
    if (d > 0 && !chance(0.1)) d &= ~int64_t{1};  // mostly even: the kernel rejects an odd head_dim
    const int64_t B = alloc(b), H = alloc(h), N = alloc(n), Dm = alloc(d);
    // x as [b, n, h, d].transpose(1, 2): strides (n*h*d, d, h*d)
    const int64_t sb = N * H * Dm, sh = Dm, st = H * Dm;
    const bool valid = b >= 0 && h >= 0 && n >= 0 && d >= 0 && d % 2 == 0;
    std::vector<float> x(static_cast<size_t>(std::max<int64_t>(B * N * H * Dm, 0)));
    std::vector<float> c(static_cast<size_t>(std::max<int64_t>(B * N * Dm, 0))), sn(c.size());
    std::vector<float> out(x.size(), -77.f);
    for (auto& v : x) v = static_cast<float>(randint(-8, 9)) / 4;
    for (auto& v : c) v = static_cast<float>(randint(-4, 5)) / 4;
    for (auto& v : sn) v = static_cast<float>(randint(-4, 5)) / 4;
    const Status s = k::rotary_embedding(x.data(), b, h, n, d, sb, sh, st, c.data(), sn.data(), out.data());
    if (!t.verdict(s, valid, it)) continue;
    bool same = true;
    for (int64_t i = 0; i < b; ++i)
      for (int64_t j = 0; j < h; ++j)
        for (int64_t p = 0; p < n; ++p)
          for (int64_t e = 0; e < d; ++e) {
            const float* xr = &x[i * sb + j * sh + p * st];
            const float rot = e < d / 2 ? -xr[e + d / 2] : xr[e - d / 2];
            const float want = xr[e] * c[(i * n + p) * d + e] + rot * sn[(i * n + p) * d + e];
            same = same && out[((i * h + j) * n + p) * d + e] == want;  // small multiples of 1/16: exact
          }
    t.check(same, "call " + std::to_string(it) + ": outputs differ");
  }
}

// ------------------------------------------------------------------------------ greedy_topk
// Random rows of small integer logits (many ties), now and then NaN and +-inf; random k (some outside
// [1, min(vocab, 64)]) and row strides (some too small). The result must equal a stable sort by
// (NaN first, larger value, lower id), computed here with std::stable_sort.
template <typename T>
void fuzz_greedy_topk(int64_t iters, const char* dtype) {
  Tally t((std::string("greedy_topk/") + dtype).c_str());
  for (int64_t it = 0; it < iters; ++it) {
    const int64_t rows = pick_size(0, 5), vocab = pick_size(0, 300);
    const int64_t R = alloc(rows), V = alloc(vocab);
    int64_t kk = randint(1, std::min<int64_t>(std::max<int64_t>(V, 1), 64) + 1);
    if (chance(0.08)) kk = chance(0.5) ? randint(-3, 1) : randint(std::min<int64_t>(V, 64) + 1, 80);
    if (chance(0.02)) kk = chance(0.5) ? kMin : kMax;
    const int64_t stride = chance(0.05) ? V - randint(1, 4) : V + randint(0, 3);
    const bool valid = rows >= 0 && vocab >= 0 && stride >= 0 && kk >= 1 && kk <= 64 && kk <= vocab &&
                       (rows <= 1 || stride >= vocab);
    const size_t span = R > 0 && V > 0 ? static_cast<size_t>((R - 1) * std::max<int64_t>(stride, 0) + V) : 0;
    std::vector<T> x(span);
    std::vector<float> xf(span);
    const int64_t spread = randint(1, 12);
    for (size_t i = 0; i < span; ++i) {
      float v = static_cast<float>(randint(-spread, spread + 1));
      if (chance(0.01)) v = std::numeric_limits<float>::quiet_NaN();
      else if (chance(0.01)) v = chance(0.5) ? INFINITY : -INFINITY;
      x[i] = k::from_float<T>(v);
      xf[i] = k::to_float(x[i]);
    }
    const int64_t K = kk >= 1 && kk <= 64 ? kk : 1;
    std::vector<int64_t> ids(valid ? static_cast<size_t>(R * K) : 0, -77);
    const Status s = k::greedy_topk(x.data(), rows, vocab, stride, kk, valid ? ids.data() : nullptr);
    if (!t.verdict(s, valid, it)) continue;
    bool same = true;
    for (int64_t r = 0; r < rows; ++r) {
      std::vector<int64_t> order(V);
      for (int64_t i = 0; i < vocab; ++i) order[i] = i;
      const float* row = xf.data() + r * stride;
      std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
        const bool na = std::isnan(row[a]), nb = std::isnan(row[b]);
        if (na != nb) return na;
        return !na && row[a] > row[b];
      });
      for (int64_t j = 0; j < kk; ++j) same = same && ids[r * kk + j] == order[j];
    }
    t.check(same, "call " + std::to_string(it) + ": ids differ from the stable sort");
  }
}

// ------------------------------------------------------------------------------ ngram index
// Brute force over the history: the largest end e in [lo_end, hi_end] with h[e-n:e] == h[len-n:len].
int64_t last_end(const int64_t* h, int64_t len, int64_t n, int64_t lo_end, int64_t hi_end) {
  for (int64_t e = hi_end; e >= lo_end; --e)
    if (std::equal(h + e - n, h + e, h + len - n)) return e;
  return 0;
}

// One episode: a table and history, then a random sequence of appends and lookups, mostly in step
// with the index, some out of step, some with bad lengths; sometimes the table is corrupted (then
// only "no access outside the buffers, outputs well formed" is required).
void ngram_episode(Tally& append, Tally& lookup, Tally& candidates, Tally& garbage, int64_t& it) {
  const int64_t batch = pick_size(0, 3), capacity = pick_size(0, 24), table_ngram = pick_size(1, 4);
  int64_t slots = 1;
  while (slots <= std::max<int64_t>(capacity, 0)) slots *= 2;
  if (chance(0.5)) slots *= 2;
  if (chance(0.04)) slots = chance(0.5) ? std::max<int64_t>(capacity, 0) : (chance(0.5) ? slots + 1 : 0);
  if (chance(0.02)) slots = -slots;
  const int64_t B = alloc(batch), L = alloc(capacity);
  std::vector<int64_t> table(B * alloc(table_ngram) * alloc(slots) * 3, 0), history(B * L);
  const int64_t alphabet = randint(1, 5);
  for (auto& x : history) x = randint(0, alphabet);
  const bool state_ok = batch >= 0 && capacity >= 0 && slots > capacity && (slots & (slots - 1)) == 0;
  const bool corrupt = chance(0.15);
  std::vector<int64_t> indexed(B, 0);
  for (int op = 0; op < 10; ++op, ++it) {
    if (corrupt && !table.empty() && chance(0.5)) {
      for (int j = 0, m = randint(1, 6); j < m; ++j) {
        const int64_t w = randint(0, table.size());
        table[w] = w % 3 == 0 ? randint(kMin, kMax) : (chance(0.7) ? randint(-3, L + 4) : outside(0, L + 1));
      }
    }
    if (chance(0.55)) {  // append
      std::vector<int64_t> lo(B), hi(B);
      for (int64_t b = 0; b < batch; ++b) {
        lo[b] = indexed[b];
        hi[b] = std::min<int64_t>(lo[b] + randint(0, 8), L);
      }
      if (batch > 0 && chance(0.3)) {
        const int64_t b = randint(0, batch);
        switch (randint(0, 5)) {
          case 0: lo[b] = std::clamp<int64_t>(lo[b] + (chance(0.5) ? -1 : 1) * randint(1, 4), 0, L); break;
          case 1: lo[b] = outside(0, L + 1); break;
          case 2: hi[b] = outside(lo[b], L + 1); break;  // past the capacity or before old_len
          case 3: if (hi[b] > lo[b]) history[b * L + randint(lo[b], hi[b])] = -randint(1, 10); break;
          default: hi[b] = lo[b];
        }
      }
      // Naive verdict: sizes, lengths, new tokens, and the index in step with old_len (an index that
      // is ahead passes only for an empty append whose last token does not recur in what is indexed).
      bool valid = state_ok && table_ngram >= 1;
      for (int64_t b = 0; valid && b < batch; ++b) {
        const int64_t* h = history.data() + b * L;
        valid = lo[b] >= 0 && lo[b] <= L && hi[b] <= L && hi[b] >= lo[b];
        for (int64_t i = lo[b]; valid && i < hi[b]; ++i) valid = h[i] >= 0;
        if (!valid || lo[b] == indexed[b]) continue;
        if (lo[b] > indexed[b] || hi[b] > lo[b]) valid = false;
        else if (lo[b] >= 1) valid = std::find(h + lo[b], h + indexed[b], h[lo[b] - 1]) == h + indexed[b];
      }
      const std::vector<int64_t> before = table;
      const Status s = k::ngram_index_append(table.data(), batch, table_ngram, slots, history.data(), capacity,
                                             lo.data(), hi.data());
      if (corrupt) {
        ++garbage.calls;
        garbage.ok += s.ok;
        continue;
      }
      if (append.verdict(s, valid, it)) {
        for (int64_t b = 0; b < batch; ++b)
          if (lo[b] == indexed[b]) indexed[b] = hi[b];
      } else {
        append.check(table == before, "call " + std::to_string(it) + ": the table changed on bad input");
      }
    } else if (chance(0.4)) {  // candidates: several continuations, longest match first, no repeats
      std::vector<int64_t> length(indexed);
      int64_t max_ngram = randint(1, std::max<int64_t>(table_ngram, 1) + 1), max_tokens = pick_size(1, 6),
              max_cand = pick_size(1, 4);
      if (batch > 0 && chance(0.25)) {
        const int64_t b = randint(0, batch);
        length[b] = chance(0.7) ? randint(0, L + 1) : outside(0, L + 1);
      }
      if (chance(0.05)) max_ngram = chance(0.5) ? 0 : table_ngram + 1;
      if (chance(0.04)) max_tokens = chance(0.5) ? 0 : -3;
      if (chance(0.04)) max_cand = chance(0.5) ? 0 : -3;
      bool valid = state_ok && max_ngram >= 1 && max_ngram <= table_ngram && max_tokens >= 1 && max_cand >= 1;
      for (int64_t b = 0; valid && b < batch; ++b) valid = length[b] >= 0 && length[b] <= L;
      const int64_t T = alloc(max_tokens), C = alloc(max_cand);
      std::vector<int64_t> want(B * C * T, -1), want_count(B * C, 0), want_ngram(B * C, 0), want_start(B * C, 0);
      for (int64_t b = 0; valid && b < batch; ++b) {
        const int64_t* h = history.data() + b * L;
        const int64_t len = length[b];
        int64_t taken = 0;
        for (int64_t n = std::min(max_ngram, len - 1); valid && n >= 1 && taken < C; --n) {
          if (last_end(h, len, n, n, indexed[b]) != len) {  // the table must index exactly up to len
            valid = false;
            break;
          }
          for (int64_t x = len - 1; x >= n && taken < C; --x) {  // every earlier occurrence, most recent first
            if (!std::equal(h + x - n, h + x, h + len - n)) continue;
            const int64_t c = std::min(T, len - x);
            bool repeats = false;
            for (int64_t j = 0; j < taken && !repeats; ++j) {
              const int64_t common = std::min(c, want_count[b * C + j]);
              repeats = std::equal(h + x, h + x + common, want.begin() + (b * C + j) * T);
            }
            if (repeats) continue;
            std::copy(h + x, h + x + c, want.begin() + (b * C + taken) * T);
            want_count[b * C + taken] = c;
            want_ngram[b * C + taken] = n;
            want_start[b * C + taken] = x;
            ++taken;
          }
        }
      }
      std::vector<int64_t> got(B * C * T, -77), count(B * C, -77), ngram(B * C, -77), start(B * C, -77);
      const Status s = k::ngram_candidates(table.data(), batch, table_ngram, slots, history.data(), capacity,
                                           length.data(), max_ngram, max_tokens, max_cand, got.data(), count.data(),
                                           ngram.data(), start.data());
      if (corrupt) {
        ++garbage.calls;
        garbage.ok += s.ok;
        bool well_formed = true;
        for (int64_t r = 0; s.ok && r < B * C; ++r) {
          well_formed = well_formed && count[r] >= 0 && count[r] <= T;
          for (int64_t j = std::max<int64_t>(count[r], 0); well_formed && j < T; ++j) well_formed = got[r * T + j] == -1;
        }
        garbage.check(well_formed, "call " + std::to_string(it) + ": candidates out of range");
        continue;
      }
      if (candidates.verdict(s, valid, it)) {
        candidates.check(got == want && count == want_count && ngram == want_ngram && start == want_start,
                         "call " + std::to_string(it) + ": candidates differ");
      }
    } else {  // lookup
      std::vector<int64_t> length(indexed);
      int64_t max_ngram = randint(1, std::max<int64_t>(table_ngram, 1) + 1), max_tokens = pick_size(0, 6);
      if (batch > 0 && chance(0.25)) {
        const int64_t b = randint(0, batch);
        length[b] = chance(0.7) ? randint(0, L + 1) : outside(0, L + 1);
      }
      if (chance(0.05)) max_ngram = chance(0.5) ? 0 : table_ngram + 1;
      bool valid = state_ok && max_ngram >= 1 && max_ngram <= table_ngram && max_tokens >= 0;
      for (int64_t b = 0; valid && b < batch; ++b) valid = length[b] >= 0 && length[b] <= L;
      const int64_t T = alloc(max_tokens);
      std::vector<int64_t> want(B * T, -1), want_count(B, 0);
      for (int64_t b = 0; valid && b < batch; ++b) {
        const int64_t* h = history.data() + b * L;
        const int64_t len = length[b];
        for (int64_t n = std::min(max_ngram, len - 1); valid && n >= 1; --n) {
          // The table holds the most recent indexed end of this n-gram; it must be len itself.
          if (last_end(h, len, n, n, indexed[b]) != len) {
            valid = false;
            break;
          }
          const int64_t e = last_end(h, len, n, n, len - 1);
          if (e == 0) continue;
          want_count[b] = std::min(T, len - e);
          std::copy(h + e, h + e + want_count[b], want.begin() + b * T);
          break;
        }
      }
      std::vector<int64_t> got(B * T, -77), count(B, -77);
      const Status s = k::ngram_lookup(table.data(), batch, table_ngram, slots, history.data(), capacity, length.data(),
                                       max_ngram, max_tokens, got.data(), count.data());
      if (corrupt) {
        ++garbage.calls;
        garbage.ok += s.ok;
        bool well_formed = true;  // whatever a corrupted table says, the outputs stay in their ranges
        for (int64_t b = 0; s.ok && b < batch; ++b) {
          well_formed = well_formed && count[b] >= 0 && count[b] <= T;
          for (int64_t j = std::max<int64_t>(count[b], 0); well_formed && j < T; ++j) well_formed = got[b * T + j] == -1;
        }
        garbage.check(well_formed, "call " + std::to_string(it) + ": outputs out of range");
        continue;
      }
      if (lookup.verdict(s, valid, it)) {
        lookup.check(got == want && count == want_count, "call " + std::to_string(it) + ": outputs differ");
      }
    }
  }
}

void fuzz_ngram(int64_t episodes) {
  Tally append("ngram_index_append"), lookup("ngram_lookup"), candidates("ngram_candidates"),
      garbage("ngram ops, corrupted tables");
  int64_t it = 0;
  for (int64_t e = 0; e < episodes; ++e) ngram_episode(append, lookup, candidates, garbage, it);
}

}  // namespace

int main(int argc, char** argv) {
  const bench::Options opt = bench::parse_options(argc, argv);
  bench::seed(opt.seed);
  const int64_t iters = opt.quick ? 2500 : 20000;
  std::printf("fuzzing the kernels of kernels/*.h (seed %llu, %lld calls per kernel)\n",
              static_cast<unsigned long long>(opt.seed), static_cast<long long>(iters));
  if (bench::selected(opt, "build_draft_tree")) {
    fuzz_draft_tree<int32_t>(iters);
    fuzz_draft_tree<int64_t>(iters);
  }
  if (bench::selected(opt, "update_adjacency")) {
    fuzz_update_adjacency<int32_t, int64_t>(iters);
    fuzz_update_adjacency<int64_t, int32_t>(iters);
  }
  if (bench::selected(opt, "verify_greedy")) fuzz_verify_greedy(iters);
  if (bench::selected(opt, "verify_sample")) fuzz_verify_sample(iters);
  if (bench::selected(opt, "compact_kv")) {
    fuzz_compact_kv<uint16_t>(iters);
    fuzz_compact_kv<uint64_t>(iters);
  }
  if (bench::selected(opt, "tree_attention")) {
    fuzz_tree_attention<float>(iters, "float");
    fuzz_tree_attention<k::float16>(iters / 2, "float16");
    fuzz_tree_attention<k::bfloat16>(iters / 2, "bfloat16");
  }
  if (bench::selected(opt, "merge_attention_states")) {
    fuzz_merge_attention_states<float>(iters, "float");
    fuzz_merge_attention_states<k::bfloat16>(iters / 2, "bfloat16");
  }
  if (bench::selected(opt, "graft_chain")) fuzz_graft_chain(iters);
  if (bench::selected(opt, "ngram")) fuzz_ngram(iters / 4);
  if (bench::selected(opt, "skinny_linear")) fuzz_skinny_linear(iters);
  if (bench::selected(opt, "rms_norm")) fuzz_rms_norm(iters);
  if (bench::selected(opt, "rotary_embedding")) fuzz_rotary(iters);
  if (bench::selected(opt, "greedy_topk")) {
    fuzz_greedy_topk<float>(iters, "float");
    fuzz_greedy_topk<k::bfloat16>(iters / 2, "bfloat16");
    fuzz_greedy_topk<k::float16>(iters / 2, "float16");
  }
  return bench::exit_status();
}
