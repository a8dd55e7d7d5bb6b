#include "../kernels/ngram_index.h"

#include "checks.h"
#include "ops.h"

namespace token_recycling {

namespace {

// table [B, max_ngram, S, 3] int64 and history [B, L] int64 with the same B, on one device.
void check_ngram_state(const at::Tensor& table, const at::Tensor& history, const char* op) {
  check_dtype(table, {at::kLong}, op, "table");
  check_dtype(history, {at::kLong}, op, "history");
  check_dim(table, 4, op, "table");
  check_dim(history, 2, op, "history");
  check_size(table, 0, history.size(0), op, "table", "batch of history");
  check_size(table, 3, 3, op, "table", "slot = {key, last, prev}");
  TORCH_CHECK_VALUE(table.size(1) >= 1, op, ": table has max_ngram = 0 planes");
  const int64_t slots = table.size(2), capacity = history.size(1);
  TORCH_CHECK_VALUE(slots > capacity && (slots & (slots - 1)) == 0, op, ": table.size(2) = ", slots,
                    " slots per n; it must be a power of two greater than the capacity history.size(1) = ", capacity);
  check_device(history, table.device(), op, "history");
}

void check_lengths(const at::Tensor& len, const at::Tensor& table, const char* op, const char* name) {
  check_dtype(len, {at::kLong}, op, name);
  check_dim(len, 1, op, name);
  check_size(len, 0, table.size(0), op, name, "one length per row");
  check_device(len, table.device(), op, name);
}

}  // namespace

void ngram_index_append_cpu(at::Tensor& table, const at::Tensor& history, const at::Tensor& old_len,
                            const at::Tensor& new_len) {
  constexpr const char* op = "ngram_index_append";
  check_ngram_state(table, history, op);
  check_lengths(old_len, table, op, "old_len");
  check_lengths(new_len, table, op, "new_len");
  TORCH_CHECK_VALUE(table.is_contiguous(), op, ": table must be contiguous (it is updated in place)");

  const auto h = history.contiguous(), lo = old_len.contiguous(), hi = new_len.contiguous();
  throw_if_error(kernels::ngram_index_append(table.data_ptr<int64_t>(), table.size(0), table.size(1), table.size(2),
                                             h.data_ptr<int64_t>(), h.size(1), lo.data_ptr<int64_t>(),
                                             hi.data_ptr<int64_t>()),
                 op);
}

std::tuple<at::Tensor, at::Tensor> ngram_lookup_cpu(const at::Tensor& table, const at::Tensor& history,
                                                    const at::Tensor& length, int64_t max_ngram,
                                                    int64_t max_tokens) {
  constexpr const char* op = "ngram_lookup";
  check_ngram_state(table, history, op);
  check_lengths(length, table, op, "length");
  TORCH_CHECK_VALUE(max_ngram >= 1 && max_ngram <= table.size(1), op, ": max_ngram = ", max_ngram,
                    " is outside [1, ", table.size(1), "] (the table's max_ngram, table.size(1))");
  TORCH_CHECK_VALUE(max_tokens >= 1, op, ": max_tokens must be at least 1, got ", max_tokens);

  const auto t = table.contiguous(), h = history.contiguous(), len = length.contiguous();
  const int64_t B = table.size(0);
  auto tokens = at::empty({B, max_tokens}, history.options());
  auto count = at::empty({B}, history.options());
  throw_if_error(kernels::ngram_lookup(t.data_ptr<int64_t>(), B, t.size(1), t.size(2), h.data_ptr<int64_t>(),
                                       h.size(1), len.data_ptr<int64_t>(), max_ngram, max_tokens,
                                       tokens.data_ptr<int64_t>(), count.data_ptr<int64_t>()),
                 op);
  return {tokens, count};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ngram_candidates_cpu(
    const at::Tensor& table, const at::Tensor& history, const at::Tensor& length, int64_t max_ngram,
    int64_t max_tokens, int64_t max_candidates) {
  constexpr const char* op = "ngram_candidates";
  check_ngram_state(table, history, op);
  check_lengths(length, table, op, "length");
  TORCH_CHECK_VALUE(max_ngram >= 1 && max_ngram <= table.size(1), op, ": max_ngram = ", max_ngram,
                    " is outside [1, ", table.size(1), "] (the table's max_ngram, table.size(1))");
  TORCH_CHECK_VALUE(max_tokens >= 1, op, ": max_tokens must be at least 1, got ", max_tokens);
  TORCH_CHECK_VALUE(max_candidates >= 1, op, ": max_candidates must be at least 1, got ", max_candidates);

  const auto t = table.contiguous(), h = history.contiguous(), len = length.contiguous();
  const int64_t B = table.size(0);
  auto tokens = at::empty({B, max_candidates, max_tokens}, history.options());
  auto count = at::empty({B, max_candidates}, history.options());
  auto ngram = at::empty({B, max_candidates}, history.options());
  auto start = at::empty({B, max_candidates}, history.options());
  throw_if_error(kernels::ngram_candidates(t.data_ptr<int64_t>(), B, t.size(1), t.size(2), h.data_ptr<int64_t>(),
                                           h.size(1), len.data_ptr<int64_t>(), max_ngram, max_tokens, max_candidates,
                                           tokens.data_ptr<int64_t>(), count.data_ptr<int64_t>(),
                                           ngram.data_ptr<int64_t>(), start.data_ptr<int64_t>()),
                 op);
  return {tokens, count, ngram, start};
}

}  // namespace token_recycling
