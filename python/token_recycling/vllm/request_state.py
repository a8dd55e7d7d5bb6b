"""Per-request drafting state inside a vLLM proposer, found again by the request's own tokens.

vLLM hands a custom proposer each step only the batch's token rows (``token_ids_cpu``), their
lengths and the tokens just sampled; it does not say which request sits in which row, and rows move
when requests finish, are preempted or resume. So a request's state is keyed by its content: at
the end of a step the state is stored under ``state_key(tokens, n)`` (n = the length it was
drafted at); the next step looks it up under the length the row had before this step's tokens
(``n - len(sampled)``) and checks that the indexed tokens are really the row's tokens. A state
that no row claims in a step is dropped, so the states never outnumber the batch, and a request
that comes back (resumed after preemption, or two rows with identical tokens) simply gets a fresh
state rebuilt from its tokens. A wrong or missing state can only cost draft quality, never output:
vLLM's rejection sampler verifies every draft.

The n-gram index covers at most the last ``window`` tokens of a request, so its memory is bounded
(about ``max_ngram * 2 * window * 24`` bytes: 0.8 MB for the defaults 4 and 4096).
"""

from __future__ import annotations

import numpy as np
import torch

from .. import ops
from ..ngram import NgramIndex

KEY_TAIL = 8  # tokens of the end of the context in a state's key (the index check is exact anyway)
MATCH_CAP = 64  # match lengths are measured up to this many tokens


def state_key(tokens: np.ndarray, length: int) -> tuple:
    """The key a request's state is stored under when its context is ``tokens[:length]``."""
    return (length, tokens[max(0, length - KEY_TAIL):length].tobytes())


def _capacity(length: int, window: int) -> int:
    cap = 64
    while cap < 2 * length:
        cap *= 2
    return max(length, min(cap, window))


class RequestState:
    """The n-gram index of one request's context (its last ``window`` tokens at most) and the draft
    proposed for it at the last step."""

    def __init__(self, tokens: np.ndarray, length: int, max_ngram: int, window: int):
        self.max_ngram, self.window = max_ngram, window
        self.drafts: list[int] = []   # proposed at the last step, after `length` tokens
        self.from_ngram = 0           # how many of them (a prefix) came from the n-gram chain
        self._rebuild(tokens, length)

    @property
    def length(self) -> int:
        """Tokens of the request seen so far (absolute, not just the window)."""
        return self.offset + int(self.index.lengths[0])

    def matches(self, tokens: np.ndarray, length: int) -> bool:
        """Whether this state indexes exactly ``tokens[:length]`` (its window of it)."""
        if length != self.length:
            return False
        held = self.index.history[0, : length - self.offset].numpy()
        return bool(np.array_equal(held, tokens[self.offset:length]))

    def advance(self, tokens: np.ndarray, length: int) -> None:
        """Index ``tokens[self.length:length]``, the tokens accepted since the last step."""
        old = self.length
        if length < old:
            raise ValueError(f"a request cannot shrink: {old} -> {length} tokens")
        if length == old:
            return
        if length - self.offset > self.index.capacity:
            self._rebuild(tokens, length)
            return
        new = torch.from_numpy(np.ascontiguousarray(tokens[old:length], dtype=np.int64)).view(1, -1)
        self.index.extend(new)

    def continuation(self, max_tokens: int) -> tuple[list[int], int]:
        """(up to max_tokens tokens that followed the most recent earlier occurrence of the
        context's longest suffix of up to max_ngram tokens, how many tokens that occurrence
        matches the context's end by, counted back up to MATCH_CAP); ([], 0) when the last token
        never occurred before."""
        index = self.index
        held = int(index.lengths[0])
        if held < 2:
            return [], 0
        chain, count, _, start = ops.ngram_candidates(index.table, index.history, index.lengths, self.max_ngram,
                                                      max_tokens, 1)
        c = int(count[0, 0])
        if c == 0:
            return [], 0
        end = int(start[0, 0])  # the occurrence ends where its continuation starts
        hist = index.history[0].numpy()
        span = min(end, MATCH_CAP)
        earlier = hist[end - span:end][::-1]
        latest = hist[held - span:held][::-1]
        differ = np.flatnonzero(earlier != latest)
        match = int(differ[0]) if differ.size else span
        return chain[0, 0, :c].tolist(), match

    def _rebuild(self, tokens: np.ndarray, length: int) -> None:
        keep = length if length <= self.window else self.window // 2
        self.offset = length - keep
        self.index = NgramIndex(1, _capacity(keep, self.window), self.max_ngram)
        if keep:
            tail = np.ascontiguousarray(tokens[self.offset:length], dtype=np.int64)
            self.index.extend(torch.from_numpy(tail).view(1, -1))

    @property
    def nbytes(self) -> int:
        return (self.index.table.numel() + self.index.history.numel()) * 8
