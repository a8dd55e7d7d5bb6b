// GPU benchmarks of the kernels in kernels/cuda, timed with CUDA events (launches only: the ops'
// one error read-back per call is not included). Correctness is tr_cuda_check's job.
// Every timed call runs with a cold L2: before each call a buffer larger than the L2 (256 MB, or
// twice the L2 where that is more) is written, outside the events that time the call. So a kernel's
// GB/s is HBM traffic, never L2 hits (back-to-back calls at prefixes up to 8k would otherwise find
// their K/V in H100's 50 MB L2 and report more than HBM peak). Each call is timed alone, so a row
// also carries about one launch's latency (a few microseconds: it matters for the small kernels only).
#include <algorithm>
#include <cmath>
#include <functional>
#include <memory>
#include <vector>

#include "../../kernels/cuda/compact_kv.cuh"
#include "../../kernels/cuda/draft_tree.cuh"
#include "../../kernels/cuda/tree_attention.cuh"
#include "../../kernels/cuda/update_adjacency.cuh"
#include "../../kernels/cuda/verify_greedy.cuh"
#include "benchmarks.h"
#include "device_buffer.h"
#include "harness.h"
#include "shapes.h"

namespace bench {
namespace {

namespace k = token_recycling::kernels;
namespace kc = token_recycling::kernels::cuda;

// Writes a buffer larger than the L2 cache, evicting what earlier calls left there.
class L2Flush {
 public:
  L2Flush() {
    int device = 0, l2 = 0;
    cuda_ok(cudaGetDevice(&device), "device");
    cuda_ok(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device), "L2 size");
    bytes_ = std::max<size_t>(size_t{256} << 20, 2 * static_cast<size_t>(l2));
    cuda_ok(cudaMalloc(&buffer_, bytes_), "L2 flush buffer");
  }
  ~L2Flush() { cudaFree(buffer_); }
  L2Flush(const L2Flush&) = delete;
  L2Flush& operator=(const L2Flush&) = delete;
  void operator()() {
    cuda_ok(cudaMemsetAsync(buffer_, ++value_ & 0xff, bytes_, nullptr), "L2 flush");
  }
  size_t bytes() const { return bytes_; }

 private:
  void* buffer_ = nullptr;
  size_t bytes_ = 0;
  int value_ = 0;
};

L2Flush& l2_flush() {
  static L2Flush flush;
  return flush;
}

// Mean seconds per call over `reps` calls, after one warm-up call; L2 flushed before each call,
// outside the timed interval (events around the call alone).
double time_device(const std::function<cudaError_t()>& fn, int reps) {
  cuda_ok(fn(), "warm-up");
  L2Flush& flush = l2_flush();
  std::vector<cudaEvent_t> starts(reps), stops(reps);
  for (int r = 0; r < reps; ++r) {
    cuda_ok(cudaEventCreate(&starts[r]), "event");
    cuda_ok(cudaEventCreate(&stops[r]), "event");
  }
  for (int r = 0; r < reps; ++r) {
    flush();
    cuda_ok(cudaEventRecord(starts[r]), "event");
    cuda_ok(fn(), "launch");
    cuda_ok(cudaEventRecord(stops[r]), "event");
  }
  cuda_ok(cudaEventSynchronize(stops[reps - 1]), "event");
  double total_ms = 0;
  for (int r = 0; r < reps; ++r) {
    float ms = 0;
    cuda_ok(cudaEventElapsedTime(&ms, starts[r], stops[r]), "event");
    total_ms += ms;
    cudaEventDestroy(starts[r]);
    cudaEventDestroy(stops[r]);
  }
  return total_ms / 1e3 / reps;
}

template <typename T>
std::vector<T> random_ints(size_t n, int64_t hi) {
  std::vector<T> v(n);
  for (auto& x : v) x = static_cast<T>(randint(0, hi));
  return v;
}

void draft_tree(const Options& o, const ModelShape& m, const Tree& tree, int64_t batch) {
  DeviceBuffer<int32_t> matrix(random_ints<int32_t>(m.vocab * m.topk, m.vocab));
  DeviceBuffer<int64_t> roots(random_ints<int64_t>(batch, m.vocab)), tokens(batch * tree.size());
  DeviceBuffer<int32_t> parents(tree.parents), ranks(tree.ranks);
  DeviceBuffer<kc::DeviceError> err(1);
  const double t = time_device([&] {
    return kc::build_draft_tree(matrix.get(), m.vocab, m.topk, roots.get(), batch, parents.get(), ranks.get(),
                                tree.size(), tokens.get(), err.get(), nullptr);
  }, o.quick ? 3 : 200);
  print_row("cuda", "build_draft_tree", shape_str({{"B", batch}, {"N", tree.size()}, {"V", m.vocab}}), t,
            batch * tree.size() * (8.0 + sizeof(int32_t)), 0);
}

void verify_greedy(const Options& o, const Tree& tree, int64_t batch) {
  const int64_t n = tree.size();
  DeviceBuffer<int64_t> tokens(random_ints<int64_t>(batch * n, 2)), preds(random_ints<int64_t>(batch * n, 2));
  DeviceBuffer<int64_t> len(batch), paths(batch * n), bonus(batch);
  DeviceBuffer<int32_t> parents(tree.parents), state(batch * n);
  DeviceBuffer<kc::DeviceError> err(1);
  const double t = time_device([&] {
    return kc::verify_greedy(tokens.get(), preds.get(), parents.get(), 0, batch, n, state.get(), len.get(), paths.get(),
                             bonus.get(), err.get(), nullptr);
  }, o.quick ? 3 : 200);
  print_row("cuda", "verify_greedy", shape_str({{"B", batch}, {"N", n}}), t, batch * n * 16.0, 0);
}

void update_adjacency(const Options& o, const ModelShape& m, int64_t count) {
  DeviceBuffer<int32_t> matrix(random_ints<int32_t>(m.vocab * m.topk, m.vocab));
  DeviceBuffer<int64_t> tokens(random_ints<int64_t>(count, m.vocab)), cand(random_ints<int64_t>(count * m.topk, m.vocab));
  DeviceBuffer<unsigned> last(m.vocab);
  DeviceBuffer<kc::DeviceError> err(1);
  const double t = time_device([&] {
    return kc::update_adjacency(matrix.get(), m.vocab, m.topk, tokens.get(), cand.get(), count, last.get(), err.get(),
                                nullptr);
  }, o.quick ? 3 : 200);
  print_row("cuda", "update_adjacency", shape_str({{"count", count}, {"V", m.vocab}, {"k", m.topk}}), t,
            count * (8.0 + m.topk * 12.0) + m.vocab * 4.0, 0);
}

void compact_kv(const Options& o, const ModelShape& m, int64_t batch, int64_t kv_heads, int64_t prefix, int64_t accept) {
  const int64_t tree = 81, seq = prefix + tree, width = 7, d = m.head_dim, tensors = 2 * m.layers;
  std::vector<std::unique_ptr<DeviceBuffer<uint16_t>>> caches;
  std::vector<k::KvTensor<uint16_t>> views;
  for (int64_t t = 0; t < tensors; ++t) {
    caches.push_back(std::make_unique<DeviceBuffer<uint16_t>>(batch * kv_heads * seq * d));
    views.push_back({caches.back()->get(), kv_heads, d, kv_heads * seq * d, seq * d, d, 1});
  }
  std::vector<int64_t> nodes(batch * width, -1);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t j = 0; j < accept; ++j) nodes[b * width + j] = j == 0 ? 0 : nodes[b * width + j - 1] + randint(1, 4);
  DeviceBuffer<k::KvTensor<uint16_t>> d_views(views);
  DeviceBuffer<int64_t> d_prefix(std::vector<int64_t>(batch, prefix)), d_nodes(nodes), d_len(std::vector<int64_t>(batch, accept));
  DeviceBuffer<kc::DeviceError> err(1);
  const double t = time_device([&] {
    return kc::compact_kv(d_views.get(), views.data(), tensors, batch, seq, d_prefix.get(), d_nodes.get(), width,
                          d_len.get(), err.get(), nullptr);
  }, o.quick ? 3 : 100);
  print_row("cuda", "compact_kv",
            shape_str({{"L", m.layers}, {"B", batch}, {"Hkv", kv_heads}, {"D", d}, {"P", prefix}, {"accept", accept}}), t,
            2.0 * tensors * batch * kv_heads * accept * d * sizeof(uint16_t), 0);
}

template <typename T>
void tree_attention(const Options& o, const char* type, const ModelShape& m, int64_t batch, int64_t kv_heads,
                    const Tree& tree, int64_t prefix) {
  const int64_t n = tree.size(), d = m.head_dim, hq = m.q_heads, seq = prefix + n;
  auto random_values = [](size_t count) {
    std::vector<T> v(count);
    for (auto& x : v) x = k::from_float<T>(randn());
    return v;
  };
  DeviceBuffer<T> q(random_values(batch * hq * n * d)), kk(random_values(batch * kv_heads * seq * d)),
      v(random_values(batch * kv_heads * seq * d)), out(batch * hq * n * d);
  std::vector<uint8_t> mask(n * n, 0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = i; j != -1; j = tree.parents[j]) mask[i * n + j] = 1;
  DeviceBuffer<uint8_t> d_mask(mask);
  DeviceBuffer<kc::DeviceError> err(1);
  const k::TreeAttentionShape shape{batch, hq, kv_heads, n, seq, d};
  const kc::TreeAttentionArgs<T> args{q.get(), kk.get(), v.get(), out.get(), hq * n * d, n * d, d,
                                      kv_heads * seq * d, seq * d, d, kv_heads * seq * d, seq * d, d,
                                      shape, nullptr, prefix, d_mask.get(), 1.f / std::sqrt(static_cast<float>(d))};
  int device = 0, sms = 0;
  cuda_ok(cudaGetDevice(&device), "device");
  cuda_ok(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "device");
  const kc::TreeAttentionPlan plan = kc::plan_tree_attention<T>(shape, seq, sms);
  DeviceBuffer<unsigned char> workspace(plan.workspace_bytes);
  const double t = time_device([&] { return kc::tree_attention<T>(args, plan, workspace.get(), err.get(), nullptr); },
                               o.quick ? 3 : (prefix >= 16384 ? 10 : 30));
  const std::string shape_text =
      std::string(type) + " " + shape_str({{"B", batch}, {"Hq", hq}, {"Hkv", kv_heads}, {"N", n}, {"D", d}, {"P", prefix}, {"chunks", plan.chunks}});
  print_row("cuda", "tree_attention", shape_text, t, 2.0 * batch * kv_heads * seq * d * sizeof(T) + 2.0 * q.bytes(),
            4.0 * batch * hq * n * seq * d);
}

}  // namespace

void run_cuda_benchmarks(const Options& o) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("(no CUDA device: CUDA benchmarks skipped)\n");
    return;
  }
  std::printf("(cuda rows: L2 flushed before each timed call, %zu MB written outside the timing)\n",
              l2_flush().bytes() >> 20);
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
    for (int64_t kv_heads : {8, 32}) compact_kv(o, m, 1, kv_heads, o.quick ? 32 : 2048, 6);
    if (!o.quick) compact_kv(o, m, 8, 8, 2048, 6);
  }
  if (selected(o, "tree_attention")) {
    const std::vector<int64_t> prefixes = o.quick ? std::vector<int64_t>{40} : std::vector<int64_t>{512, 2048, 8192, 32768};
    for (int64_t kv_heads : {8, 32})
      for (int64_t p : prefixes) tree_attention<k::bfloat16>(o, "bf16", m, 1, kv_heads, tree, p);
    if (!o.quick) {
      tree_attention<k::float16>(o, "fp16", m, 1, 8, tree, 2048);
      tree_attention<float>(o, "fp32", m, 1, 8, tree, 2048);
      tree_attention<k::bfloat16>(o, "bf16", m, 4, 8, tree, 2048);
    }
  }
}

}  // namespace bench
