// A small benchmark and check harness with no dependencies: options, random inputs, timing,
// one-line reports and a failure count that becomes the exit status.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

namespace bench {

struct Options {
  bool quick = false;   // tiny shapes, few repetitions: for CI on a CPU, finishes in seconds
  uint64_t seed = 1;
  std::string only;     // run only the sections whose name contains this
  bool small = false;   // the smallest shapes only, as in the host emulation (checks under a sanitizer)
};

inline Options parse_options(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--quick") o.quick = true;
    else if (a.rfind("--seed=", 0) == 0) o.seed = std::stoull(a.substr(7));
    else if (a.rfind("--only=", 0) == 0) o.only = a.substr(7);
    else if (a == "--small") o.small = true;
    else {
      std::fprintf(stderr, "usage: %s [--quick] [--small] [--seed=N] [--only=NAME]\n", argv[0]);
      std::exit(2);
    }
  }
  return o;
}

inline bool selected(const Options& o, const std::string& name) {
  return o.only.empty() || name.find(o.only) != std::string::npos;
}

inline std::mt19937_64& rng() {
  static std::mt19937_64 g(1);
  return g;
}
inline void seed(uint64_t s) { rng().seed(s); }
inline int64_t randint(int64_t lo, int64_t hi) {  // [lo, hi)
  return std::uniform_int_distribution<int64_t>(lo, hi - 1)(rng());
}
inline float randn() { return std::normal_distribution<float>(0.f, 1.f)(rng()); }

// A random tree of n nodes in topological order (parents[i] < i), ranks in [0, k).
inline void random_tree(int64_t n, int64_t k, std::vector<int32_t>& parents, std::vector<int32_t>& ranks) {
  parents.assign(n, -1);
  ranks.assign(n, 0);
  for (int64_t i = 1; i < n; ++i) {
    parents[i] = static_cast<int32_t>(randint(std::max<int64_t>(0, i - 12), i));  // keeps trees a few levels deep
    ranks[i] = static_cast<int32_t>(randint(0, k));
  }
}

// Failures are counted, printed, and returned by exit_status().
inline int& failures() {
  static int n = 0;
  return n;
}
inline void expect(bool ok, const std::string& what) {
  if (!ok) {
    ++failures();
    std::printf("FAIL  %s\n", what.c_str());
  }
}
// Prints "ok  name" at the end of a scope in which no check failed.
class Section {
 public:
  explicit Section(std::string name) : name_(std::move(name)), start_(failures()) {}
  ~Section() {
    if (failures() == start_) std::printf("ok    %s\n", name_.c_str());
    std::fflush(stdout);
  }

 private:
  std::string name_;
  int start_;
};
inline int exit_status() {
  if (failures() > 0) std::printf("%d check(s) failed\n", failures());
  return failures() > 0 ? 1 : 0;
}

// Median wall time of fn over reps calls, after one warm-up call.
inline double time_host(const std::function<void()>& fn, int reps) {
  fn();
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    const auto a = std::chrono::steady_clock::now();
    fn();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

inline void print_header() {
  std::printf("%-7s %-18s %-46s %12s %10s %10s\n", "device", "op", "shape", "us/call", "GB/s", "TFLOP/s");
}
// bytes: memory the op must move at least; flops: 0 when not meaningful.
inline void print_row(const char* device, const char* op, const std::string& shape, double seconds, double bytes,
                      double flops) {
  std::printf("%-7s %-18s %-46s %12.2f %10.2f %10s\n", device, op, shape.c_str(), seconds * 1e6, bytes / seconds / 1e9,
              flops > 0 ? std::to_string(flops / seconds / 1e12).substr(0, 6).c_str() : "-");
  std::fflush(stdout);
}

}  // namespace bench
