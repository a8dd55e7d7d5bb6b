// Context n-gram index for hybrid drafts: "where did the current suffix of the context last occur
// earlier, and what followed it?" answered exactly in O(max_ngram) probes, with an index that is
// updated incrementally as tokens are appended (amortised O(1) per token for each n).
//
// CPU only, and deliberately so: this is host-side integer work on a few thousand tokens per row
// (microseconds per call); a CUDA version would cost more in launches than it saves.
//
// The state is plain int64 tensors that the caller owns (all zeros = empty), so any framework can
// allocate and keep it:
//   history [B, L]: the tokens of each row; L is the capacity. history[b, :len] must not change
//                   once indexed (append only; zero the table to start again).
//   table   [B, max_ngram, S, 3]: S a power of two greater than L. Plane (b, n - 1) is an
//                   open-addressing hash table of the n-grams of row b. A slot is
//                   {key, last, prev}: key = ngram_hash() of the n-gram's tokens (bit-cast to int64),
//                   last = the end (exclusive) of its most recent indexed occurrence, prev = the end
//                   of the occurrence before that (0: none). last == 0 marks an empty slot (a real
//                   end is >= n >= 1). Probing is linear from key & (S - 1). Each slot holds one
//                   distinct n-gram: a key hit is checked token by token against
//                   history[last - n : last], and a mismatch (a 64-bit collision) probes on.
//                   At most L - n + 1 distinct n-grams exist, so with S > L a probe always ends.
// The table indexes exactly the n-grams ending at positions 1..len of a row. Both ops check that
// this holds where they touch it (an index that lags or leads the given lengths is an error, not
// a silently wrong draft) and check every position read from the table before dereferencing it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "status.h"

namespace token_recycling::kernels {

namespace ngram_detail {

// splitmix64's finaliser: every input bit affects every output bit.
inline uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// Hash of the n-gram ending at `end`, built backwards one token at a time: the (n+1)-gram's hash
// extends the n-gram's, so all n = 1..max_ngram cost O(max_ngram) together.
inline uint64_t extend_hash(uint64_t h, int64_t token) {
  return mix64(h ^ (static_cast<uint64_t>(token) + 0x9e3779b97f4a7c15ULL));
}
constexpr uint64_t kHashSeed = 0x2545f4914f6cdd1dULL;

inline bool same_tokens(const int64_t* a, const int64_t* b, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if (a[i] != b[i]) return false;
  }
  return true;
}

// One (row, n) plane of the table together with the row's history.
struct Plane {
  const int64_t* slots;   // [S, 3]
  int64_t num_slots;      // S, a power of two
  const int64_t* tokens;  // history row, [capacity]
  int64_t capacity;
  int64_t n;

  int64_t last(int64_t s) const { return slots[s * 3 + 1]; }

  // Finds the slot holding the n-gram history[end - n : end], or the empty slot where it would go.
  // *found says which. Fails only for a table that is full or holds impossible positions.
  Status find(uint64_t key, int64_t end, int64_t* slot, bool* found) const {
    const int64_t mask = num_slots - 1;
    int64_t s = static_cast<int64_t>(key & static_cast<uint64_t>(mask));
    for (int64_t probes = 0; probes < num_slots; ++probes, s = (s + 1) & mask) {
      const int64_t at = last(s);
      if (at == 0) {
        *slot = s;
        *found = false;
        return Status::Ok();
      }
      if (static_cast<uint64_t>(slots[s * 3]) != key) continue;
      if (at < n || at > capacity) return corrupt(s, "last", at, n, capacity);
      if (same_tokens(tokens + at - n, tokens + end - n, n)) {
        *slot = s;
        *found = true;
        return Status::Ok();
      }
    }
    return Status::Error("the " + std::to_string(n) +
                         "-gram plane is full: it holds more n-grams than the history has (the table is corrupted)");
  }

  // A slot whose position field is outside [lo, hi]: the table was not built by ngram_index_append.
  Status corrupt(int64_t s, const char* field, int64_t value, int64_t lo, int64_t hi) const {
    return Status::Error("table slot " + std::to_string(s) + " of the " + std::to_string(n) + "-gram plane has " +
                         field + " = " + std::to_string(value) + ", outside [" + std::to_string(lo) + ", " +
                         std::to_string(hi) + "] (the table is corrupted)");
  }
};

inline int64_t plane_offset(int64_t max_ngram, int64_t num_slots, int64_t b, int64_t n) {
  return (b * max_ngram + (n - 1)) * num_slots * 3;
}

inline Plane plane_of(const int64_t* table, int64_t max_ngram, int64_t num_slots, const int64_t* history,
                      int64_t capacity, int64_t b, int64_t n) {
  return {table + plane_offset(max_ngram, num_slots, b, n), num_slots, history + b * capacity, capacity, n};
}

inline std::string row_msg(const char* what, int64_t b, int64_t value) {
  return std::string(what) + "[" + std::to_string(b) + "] = " + std::to_string(value);
}

}  // namespace ngram_detail

// The hash of tokens[0:n] as the table stores it (for callers that want to inspect a table).
inline uint64_t ngram_hash(const int64_t* tokens, int64_t n) {
  uint64_t h = ngram_detail::kHashSeed;
  for (int64_t i = n - 1; i >= 0; --i) h = ngram_detail::extend_hash(h, tokens[i]);
  return h;
}

// Indexes the n-grams (n = 1..max_ngram) ending at positions old_len[b] + 1 .. new_len[b] of each
// row. old_len[b] must be the length the table already indexes. Checks the inputs and that length
// before writing anything (only a corrupted table can still fail midway).
// table: [batch, max_ngram, num_slots, 3]; history: [batch, capacity]; old_len, new_len: [batch].
inline Status ngram_index_append(int64_t* table, int64_t batch, int64_t max_ngram, int64_t num_slots,
                                 const int64_t* history, int64_t capacity, const int64_t* old_len,
                                 const int64_t* new_len) {
  using namespace ngram_detail;
  if (num_slots <= capacity || (num_slots & (num_slots - 1)) != 0) {
    return Status::Error("the table has " + std::to_string(num_slots) +
                         " slots per n; it needs a power of two greater than the capacity " + std::to_string(capacity));
  }
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t lo = old_len[b], hi = new_len[b];
    if (lo < 0 || lo > capacity) return OutOfRange("old_len", b, lo, 0, capacity + 1);
    if (hi > capacity) {
      return Status::Error(row_msg("new_len", b, hi) + " exceeds the capacity " + std::to_string(capacity) +
                           " (history.size(1)); create the index with room for prompt + new tokens");
    }
    if (hi < lo) return Status::Error(row_msg("new_len", b, hi) + " is less than " + row_msg("old_len", b, lo));
    const int64_t* row = history + b * capacity;
    for (int64_t i = lo; i < hi; ++i) {
      if (row[i] < 0) return Status::Error("history[" + std::to_string(b) + ", " + std::to_string(i) + "] = " +
                                           std::to_string(row[i]) + " is not a token id (negative)");
    }
    // The table must index exactly history[b, :lo]: the unigram ending at lo was indexed last at lo,
    // and the one ending at lo + 1 not yet at or after lo + 1.
    const Plane unigrams = plane_of(table, max_ngram, num_slots, history, capacity, b, 1);
    int64_t slot = 0;
    bool found = false;
    if (lo >= 1) {
      Status s = unigrams.find(extend_hash(kHashSeed, row[lo - 1]), lo, &slot, &found);
      if (!s.ok) return s;
      if (!found || unigrams.last(slot) != lo) {
        return Status::Error("the table does not index row " + std::to_string(b) + " exactly up to " +
                             row_msg("old_len", b, lo) + " (tokens skipped or appended twice, or history changed)");
      }
    }
    if (hi > lo) {
      Status s = unigrams.find(extend_hash(kHashSeed, row[lo]), lo + 1, &slot, &found);
      if (!s.ok) return s;
      if (found && unigrams.last(slot) > lo) {
        return Status::Error("the table already indexes row " + std::to_string(b) + " beyond " +
                             row_msg("old_len", b, lo) + " (appended twice?)");
      }
    }
  }
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t* row = history + b * capacity;
    for (int64_t end = old_len[b] + 1; end <= new_len[b]; ++end) {
      uint64_t key = kHashSeed;
      for (int64_t n = 1; n <= std::min(max_ngram, end); ++n) {
        key = extend_hash(key, row[end - n]);
        const Plane plane = plane_of(table, max_ngram, num_slots, history, capacity, b, n);
        int64_t slot = 0;
        bool found = false;
        Status s = plane.find(key, end, &slot, &found);
        if (!s.ok) return s;
        int64_t* entry = table + plane_offset(max_ngram, num_slots, b, n) + slot * 3;
        if (!found) {
          entry[0] = static_cast<int64_t>(key);
          entry[1] = end;
          entry[2] = 0;
        } else {
          if (entry[1] >= end) return plane.corrupt(slot, "last", entry[1], n, end - 1);
          entry[2] = entry[1];
          entry[1] = end;
        }
      }
    }
  }
  return Status::Ok();
}

// For each row, with len = length[b] and h = history[b]: for n = max_ngram down to 1, the most
// recent earlier occurrence of the suffix h[len - n : len] (the largest end e < len with
// h[e - n : e] == it); the first n that has one gives tokens[b, :count[b]] = h[e : min(e +
// max_tokens, len)]. count[b] = 0 when no n does. tokens is padded with -1.
// The table must index exactly history[b, :length[b]] (checked for every suffix it looks up).
// table: [batch, table_ngram, num_slots, 3]; max_ngram <= table_ngram; tokens: [batch, max_tokens].
inline Status ngram_lookup(const int64_t* table, int64_t batch, int64_t table_ngram, int64_t num_slots,
                           const int64_t* history, int64_t capacity, const int64_t* length, int64_t max_ngram,
                           int64_t max_tokens, int64_t* tokens, int64_t* count) {
  using namespace ngram_detail;
  if (num_slots <= capacity || (num_slots & (num_slots - 1)) != 0) {
    return Status::Error("the table has " + std::to_string(num_slots) +
                         " slots per n; it needs a power of two greater than the capacity " + std::to_string(capacity));
  }
  if (max_ngram < 1 || max_ngram > table_ngram) {
    return Status::Error("max_ngram = " + std::to_string(max_ngram) + " is outside [1, " +
                         std::to_string(table_ngram) + "] (the table's max_ngram)");
  }
  for (int64_t b = 0; b < batch; ++b) {
    if (length[b] < 0 || length[b] > capacity) return OutOfRange("length", b, length[b], 0, capacity + 1);
  }
  std::vector<uint64_t> keys;
  for (int64_t b = 0; b < batch; ++b) {
    int64_t* out = tokens + b * max_tokens;
    std::fill(out, out + max_tokens, int64_t{-1});
    count[b] = 0;
    const int64_t len = length[b];
    const int64_t* row = history + b * capacity;
    // An earlier occurrence ends at e >= n and e < len, so n <= len - 1.
    const int64_t top = std::min(max_ngram, len - 1);
    if (top < 1) continue;
    keys.assign(top, kHashSeed);
    for (int64_t n = 1; n <= top; ++n) keys[n - 1] = extend_hash(n > 1 ? keys[n - 2] : kHashSeed, row[len - n]);
    for (int64_t n = top; n >= 1; --n) {
      const Plane plane = plane_of(table, table_ngram, num_slots, history, capacity, b, n);
      int64_t slot = 0;
      bool found = false;
      Status s = plane.find(keys[n - 1], len, &slot, &found);
      if (!s.ok) return s;
      if (!found || plane.last(slot) != len) {
        return Status::Error("the table does not index row " + std::to_string(b) + " exactly up to " +
                             row_msg("length", b, len) + " (call ngram_index_append with the new tokens first)");
      }
      const int64_t e = plane.slots[slot * 3 + 2];
      if (e == 0) continue;
      if (e < n || e >= len) return plane.corrupt(slot, "prev", e, n, len - 1);
      if (!same_tokens(row + e - n, row + len - n, n)) {
        return Status::Error("table slot " + std::to_string(slot) + " of the " + std::to_string(n) +
                             "-gram plane has prev = " + std::to_string(e) + ", an occurrence of other tokens "
                             "(the table is corrupted)");
      }
      const int64_t c = std::min(max_tokens, len - e);
      std::copy(row + e, row + e + c, out);
      count[b] = c;
      break;
    }
  }
  return Status::Ok();
}

// Up to max_candidates different continuations for each row, longest match first: for n =
// max_ngram down to 1, the earlier occurrences of the suffix h[len - n : len], most recent first
// (the table gives the most recent, as in ngram_lookup; older ones are found by scanning the
// history backwards, O(len * n) per n, only while candidates are missing), each give the
// continuation h[e : min(e + max_tokens, len)]. It becomes the next candidate unless it repeats
// a candidate already taken (equal over the shorter of the two), so the candidates differ
// somewhere and each can add draft nodes the others do not. Candidate 0 is ngram_lookup's answer.
// Outputs, per row b and candidate j (unused ones: count 0, ngram 0, start 0, tokens -1):
// tokens[b, j, :count[b, j]], ngram[b, j] = the matched suffix length n, start[b, j] = e.
// table: [batch, table_ngram, num_slots, 3]; tokens: [batch, max_candidates, max_tokens];
// count, ngram, start: [batch, max_candidates].
inline Status ngram_candidates(const int64_t* table, int64_t batch, int64_t table_ngram, int64_t num_slots,
                               const int64_t* history, int64_t capacity, const int64_t* length, int64_t max_ngram,
                               int64_t max_tokens, int64_t max_candidates, int64_t* tokens, int64_t* count,
                               int64_t* ngram, int64_t* start) {
  using namespace ngram_detail;
  if (num_slots <= capacity || (num_slots & (num_slots - 1)) != 0) {
    return Status::Error("the table has " + std::to_string(num_slots) +
                         " slots per n; it needs a power of two greater than the capacity " + std::to_string(capacity));
  }
  if (max_ngram < 1 || max_ngram > table_ngram) {
    return Status::Error("max_ngram = " + std::to_string(max_ngram) + " is outside [1, " +
                         std::to_string(table_ngram) + "] (the table's max_ngram)");
  }
  if (max_tokens < 1 || max_candidates < 1) {
    return Status::Error("max_tokens and max_candidates must be at least 1");
  }
  for (int64_t b = 0; b < batch; ++b) {
    if (length[b] < 0 || length[b] > capacity) return OutOfRange("length", b, length[b], 0, capacity + 1);
  }
  std::vector<uint64_t> keys;
  for (int64_t b = 0; b < batch; ++b) {
    int64_t* out = tokens + b * max_candidates * max_tokens;
    std::fill(out, out + max_candidates * max_tokens, int64_t{-1});
    std::fill(count + b * max_candidates, count + (b + 1) * max_candidates, int64_t{0});
    std::fill(ngram + b * max_candidates, ngram + (b + 1) * max_candidates, int64_t{0});
    std::fill(start + b * max_candidates, start + (b + 1) * max_candidates, int64_t{0});
    const int64_t len = length[b];
    const int64_t* row = history + b * capacity;
    const int64_t top = std::min(max_ngram, len - 1);
    if (top < 1) continue;
    keys.assign(top, kHashSeed);
    for (int64_t n = 1; n <= top; ++n) keys[n - 1] = extend_hash(n > 1 ? keys[n - 2] : kHashSeed, row[len - n]);
    int64_t taken = 0;
    for (int64_t n = top; n >= 1 && taken < max_candidates; --n) {
      const Plane plane = plane_of(table, table_ngram, num_slots, history, capacity, b, n);
      int64_t slot = 0;
      bool found = false;
      Status s = plane.find(keys[n - 1], len, &slot, &found);
      if (!s.ok) return s;
      if (!found || plane.last(slot) != len) {
        return Status::Error("the table does not index row " + std::to_string(b) + " exactly up to " +
                             row_msg("length", b, len) + " (call ngram_index_append with the new tokens first)");
      }
      const int64_t e = plane.slots[slot * 3 + 2];
      if (e == 0) continue;
      if (e < n || e >= len) return plane.corrupt(slot, "prev", e, n, len - 1);
      if (!same_tokens(row + e - n, row + len - n, n)) {
        return Status::Error("table slot " + std::to_string(slot) + " of the " + std::to_string(n) +
                             "-gram plane has prev = " + std::to_string(e) + ", an occurrence of other tokens "
                             "(the table is corrupted)");
      }
      for (int64_t x = e; x >= n && taken < max_candidates; --x) {
        if (x != e && !same_tokens(row + x - n, row + len - n, n)) continue;  // older occurrences
        const int64_t c = std::min(max_tokens, len - x);
        bool repeats = false;
        for (int64_t j = 0; j < taken && !repeats; ++j) {
          repeats = same_tokens(row + x, out + j * max_tokens, std::min(c, count[b * max_candidates + j]));
        }
        if (repeats) continue;
        std::copy(row + x, row + x + c, out + taken * max_tokens);
        count[b * max_candidates + taken] = c;
        ngram[b * max_candidates + taken] = n;
        start[b * max_candidates + taken] = x;
        ++taken;
      }
    }
  }
  return Status::Ok();
}

}  // namespace token_recycling::kernels
