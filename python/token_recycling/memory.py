"""Suffix memory: every earlier request's prompt and output, shared by every row and every request
that drafts through one :class:`~token_recycling.draft.Drafter`, searched for the longest earlier match
of the context's suffix and the continuation most of those matches went on with.

SuffixDecoding keeps a suffix tree over earlier outputs for the same reason: answers repeat each
other's phrases, and a continuation seen several times after a long match is a good draft. Here the
index is a sorted array (numpy, on the host), which is enough because every match is anchored by
the context's last two tokens:

    store  int32 [capacity]: the remembered sequences one after another, each after a separator (-1);
                             unused slots hold -1 too, so a read past a sequence stops there
    keys   int64 [n]: for every store position p with two tokens of its sequence before it and one
                      at p, the bigram before p, packed as ``store[p-2] << 32 | store[p-1]``; sorted
    starts int32 [n]: those positions p, in the order of ``keys`` (equal keys: ascending p)

A lookup finds the range of the context's last bigram in ``keys`` (binary search), takes its last
``MAX_OCCURRENCES`` positions, measures how far back each matches the context (up to ``MAX_MATCH``
tokens, one vectorised comparison), keeps the longest, and walks forward from them: each next token
is the one most of the still-agreeing occurrences have (ties: the latest in the store). What comes
back is the chain, the match length and its *support* (how many occurrences agreed on the first
token): the policy's chain statistics are kept by both (policy.ChainStats).

Cap and eviction. The memory holds at most ``capacity`` tokens. Each remembered sequence is one
entry of an LRU list; a lookup that drafts from a sequence marks it used. When an insertion passes
the cap, the least recently used sequences are dropped until the memory is at three quarters of
it, and the arrays are rebuilt in LRU order (so "latest in the store" is also "most recently
used"); the rebuild is O(n log n) in numpy and happens once per quarter of the cap inserted.
Insertion is O(n) (a sorted insert: one memmove of the index), lookup O(log n + occurrences x
match). The current request's own tokens are not here: its n-gram index (ngram.NgramIndex) serves
them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

MAX_MATCH = 32          # tokens compared backwards from the context's end
MAX_OCCURRENCES = 64    # the most recent occurrences of the anchor bigram that are compared
SEPARATOR = -1
_STEPS = np.arange(max(MAX_MATCH, 256), dtype=np.int64)


@dataclass(frozen=True)
class MemoryMatch:
    """A continuation found in the suffix memory."""

    tokens: list[int]   # the continuation, most frequent token first at each position
    match: int          # tokens of the context's suffix that matched (2..MAX_MATCH)
    support: int        # occurrences of that match that went on with tokens[0]
    occurrences: int    # occurrences of that match compared (support <= occurrences)


class SuffixMemory:
    """Earlier requests' token sequences (prompt and output), at most ``capacity`` tokens; 0 keeps nothing."""

    def __init__(self, capacity: int):
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 0:
            raise ValueError(f"ngram_history (the suffix memory's capacity in tokens) must be an int >= 0, "
                             f"got {capacity!r}")
        self.capacity = capacity
        self._clear()

    def _clear(self) -> None:
        self.store = np.full(256, SEPARATOR, dtype=np.int32)
        self.end = 1  # the next sequence starts here; store[end - 1] is the separator before it
        self.keys = np.zeros(0, dtype=np.int64)
        self.starts = np.zeros(0, dtype=np.int32)
        self.segments: OrderedDict[int, tuple[int, int]] = OrderedDict()  # id -> (start, length), LRU first
        self._seg_starts = np.zeros(0, dtype=np.int64)  # starts of the segments in store order
        self._seg_ids: list[int] = []
        self._next_id = 0
        self.remembered = 0  # tokens remembered (separators not counted)

    # ------------------------------------------------------------------ size
    def __len__(self) -> int:
        return self.remembered

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays and the LRU list (a Python dict entry and tuple taken as 100 bytes)."""
        return (self.store.nbytes + self.keys.nbytes + self.starts.nbytes + self._seg_starts.nbytes
                + 100 * len(self.segments) + 8 * len(self._seg_ids))

    @property
    def bytes_per_token(self) -> float:
        """``nbytes`` per remembered token (0.0 when empty)."""
        return self.nbytes / self.remembered if self.remembered else 0.0

    # ------------------------------------------------------------------ insertion
    def add(self, tokens) -> None:
        """Remember one sequence (a request's prompt and output; any shape, flattened). A sequence
        longer than the capacity keeps its last ``capacity`` tokens."""
        if not self.capacity:
            return
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.detach().to("cpu")
        t = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if t.size == 0:
            return
        if t.min() < 0 or t.max() >= 2**31:
            raise ValueError("tokens must be token ids in [0, 2**31)")
        t = t[-self.capacity:]
        if self.remembered + t.size > self.capacity:
            self._evict(self.remembered + t.size - self.capacity)
        self._append(t.astype(np.int32), self._next_id)
        self._next_id += 1

    def _append(self, t: np.ndarray, seg_id: int) -> None:
        n = t.size
        start = self.end  # store[start - 1] is the separator before it
        need = start + n + 1 + _STEPS.size  # the separator after it, and room to read past the end
        if need > self.store.size:
            grown = np.full(max(need, self.store.size * 3 // 2), SEPARATOR, dtype=np.int32)
            grown[: self.end] = self.store[: self.end]
            self.store = grown
        self.store[start: start + n] = t
        self.end = start + n + 1
        self.segments[seg_id] = (start, n)
        self._seg_starts = np.append(self._seg_starts, start)
        self._seg_ids.append(seg_id)
        self.remembered += n
        if n >= 3:
            keys, pos = _bigram_index(t, start)
            order = np.argsort(keys, kind="stable")
            keys, pos = keys[order], pos[order]
            at = np.searchsorted(self.keys, keys, side="right")  # after equal keys: ascending positions
            self.keys = np.insert(self.keys, at, keys)
            self.starts = np.insert(self.starts, at, pos)

    def _evict(self, at_least: int) -> None:
        """Drop least recently used sequences (at least ``at_least`` tokens, down to 3/4 of the cap),
        then rebuild the arrays from the rest in LRU order."""
        target = min(self.capacity * 3 // 4, self.capacity - at_least)
        survivors, total = [], 0
        for seg_id, (start, n) in reversed(self.segments.items()):  # most recently used first
            if total + n > target:
                break
            survivors.append((seg_id, self.store[start: start + n].copy()))
            total += n
        survivors.reverse()
        next_id = self._next_id
        self._clear()
        self._next_id = next_id
        if survivors:
            self._rebuild(survivors)

    def _rebuild(self, survivors: list[tuple[int, np.ndarray]]) -> None:
        """The arrays of ``survivors`` [(id, tokens)], laid out in that order (least recently used first)."""
        lengths = np.array([t.size for _, t in survivors], dtype=np.int64)
        starts = 1 + np.concatenate([[0], np.cumsum(lengths + 1)[:-1]])
        self.end = int(starts[-1] + lengths[-1] + 1)
        self.store = np.full(max(self.end + _STEPS.size, 256), SEPARATOR, dtype=np.int32)
        all_keys, all_pos = [], []
        for (seg_id, t), start in zip(survivors, starts.tolist()):
            n = t.size
            self.store[start: start + n] = t
            self.segments[seg_id] = (start, n)
            if n >= 3:
                keys, pos = _bigram_index(t, start)
                all_keys.append(keys)
                all_pos.append(pos)
        self._seg_starts = starts.astype(np.int64)
        self._seg_ids = [seg_id for seg_id, _ in survivors]
        self.remembered = int(lengths.sum())
        if all_keys:
            keys, pos = np.concatenate(all_keys), np.concatenate(all_pos)
            order = np.argsort(keys, kind="stable")  # positions ascend within a key
            self.keys, self.starts = keys[order], pos[order]

    # ------------------------------------------------------------------ lookup
    def lookup(self, context: np.ndarray, max_tokens: int, touch: bool = True) -> MemoryMatch | None:
        """The continuation of the longest earlier match of ``context``'s suffix (a 1-D int array, its
        last MAX_MATCH tokens are enough), at most ``max_tokens`` long; None when even its last two
        tokens were never seen. ``touch``: mark the sequence drafted from as recently used."""
        m = min(len(context), MAX_MATCH)
        if m < 2 or not self.keys.size or max_tokens < 1:
            return None
        key = (int(context[-2]) << 32) | int(context[-1])
        lo, hi = np.searchsorted(self.keys, (key, key + 1)).tolist()
        if lo == hi:
            return None
        occ = self.starts[max(lo, hi - MAX_OCCURRENCES): hi].astype(np.int64)
        if m > 2:
            want = np.asarray(context[-m:], dtype=np.int64)[::-1]
            before = self.store[occ[:, None] - 1 - _STEPS[:m]]  # [occurrences, m]: tokens before each
            match = np.minimum.accumulate(before == want, axis=1).sum(1)
            best = int(match.max())
            occ = occ[match == best]
        else:
            best = 2
        max_tokens = min(max_tokens, _STEPS.size)
        rows = self.store[occ[:, None] + _STEPS[:max_tokens]]  # [occurrences, max_tokens], -1 past the end
        chain, support, src = _frequent_path(rows)
        if not chain:
            return None
        if touch and self.segments:
            seg = self._seg_ids[int(np.searchsorted(self._seg_starts, occ[src], side="right")) - 1]
            self.segments.move_to_end(seg)
        return MemoryMatch(chain, best, support, len(occ))

    def reset(self) -> None:
        """Forget everything remembered."""
        self._clear()

    # ------------------------------------------------------------------ save / load
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The remembered sequences in LRU order (least recently used first), for a save beside the
        matrix: ``memory_tokens`` int32 (concatenated) and ``memory_lengths`` int64. Empty: {}."""
        if not self.segments:
            return {}
        parts = [self.store[start: start + n] for start, n in self.segments.values()]
        return {"memory_tokens": torch.from_numpy(np.concatenate(parts).astype(np.int32)),
                "memory_lengths": torch.tensor([n for _, n in self.segments.values()], dtype=torch.long)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Replace the memory with saved sequences (``state_tensors``' layout); those past the
        capacity, least recently used first, are left out."""
        self._clear()
        if not self.capacity or "memory_tokens" not in tensors:
            return
        tokens = tensors["memory_tokens"].to(torch.int64).numpy()
        lengths = tensors["memory_lengths"].to(torch.int64).numpy()
        if lengths.ndim != 1 or (lengths < 0).any() or int(lengths.sum()) != tokens.size:
            raise ValueError(f"memory_lengths (sum {int(lengths.sum())}) do not add up to memory_tokens "
                             f"({tokens.size})")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**31):
            raise ValueError("memory_tokens hold values that are not token ids")
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        seqs = [tokens[bounds[i]: bounds[i + 1]] for i in range(lengths.size) if lengths[i]]
        kept, total = [], 0
        for t in reversed(seqs):  # the most recently used fit first
            t = t[-self.capacity:]
            if total + t.size > self.capacity:
                break
            kept.append(t)
            total += t.size
        kept.reverse()
        if kept:
            self._rebuild([(i, t.astype(np.int32)) for i, t in enumerate(kept)])
            self._next_id = len(kept)


def _bigram_index(t: np.ndarray, start: int) -> tuple[np.ndarray, np.ndarray]:
    """For a sequence ``t`` (n >= 3 tokens) stored from ``start``: the key of every position with two
    tokens of the sequence before it (the bigram before it, packed as in ``keys``) and that position."""
    t64 = t.astype(np.int64)
    return (t64[:-2] << 32) | t64[1:-1], np.arange(start + 2, start + t.size, dtype=np.int32)


def most_frequent(values: np.ndarray) -> tuple[int, int]:
    """(the value that occurs most often in ``values``, oldest first; among equals the latest one;
    how often it occurs). ``values`` must not be empty."""
    found, first_seen, counts = np.unique(values[::-1], return_index=True, return_counts=True)
    best = np.lexsort((first_seen, -counts))[0]  # most often; then the first seen in reverse order
    return int(found[best]), int(counts[best])


def _frequent_path(rows: np.ndarray) -> tuple[list[int], int, int]:
    """(the path most rows follow, token by token; how many rows agreed on its first token; the
    index of the latest row on that path). Rows: continuations, -1 where one ends."""
    active = np.arange(rows.shape[0])
    chain: list[int] = []
    support = 0
    for j in range(rows.shape[1]):
        col = rows[active, j]
        last = int(col[-1])
        if (col == last).all():
            tok, agree = last, active
        else:
            valid = col[col >= 0]
            if not valid.size:
                break
            tok, _ = most_frequent(valid)
            agree = active[col == tok]
        if tok < 0:
            break
        if j == 0:
            support = agree.size
        chain.append(tok)
        active = agree
        if active.size == 1:  # one row left: the rest of it
            rest = rows[active[0], j + 1:]
            stop = np.flatnonzero(rest < 0)
            chain.extend(rest[: stop[0] if stop.size else rest.size].tolist())
            break
    return chain, support, int(active[-1]) if chain else 0
