"""Context n-gram drafts: the continuation of the longest suffix of the context seen before.

:class:`NgramIndex` keeps the state of :func:`ops.ngram_index_append` / :func:`ops.ngram_lookup`
(token history, lengths, hash table) for the decode loop: ``extend`` with the tokens each step
accepts, ``lookup`` for a chain to graft onto the draft tree (:func:`ops.graft_chain`). The state
lives on the CPU: the ops are host-side integer work on a few thousand tokens.

Earlier requests are not here: the Drafter's suffix memory (memory.py) holds them, shared.
"""

from __future__ import annotations

import numpy as np
import torch

from . import ops


def new_ngram_table(batch: int, capacity: int, max_ngram: int) -> torch.Tensor:
    """An empty table ``[batch, max_ngram, S, 3]`` int64 for histories of up to ``capacity`` tokens.

    ``S`` is the smallest power of two ``>= 2 * capacity``: the ops need ``S > capacity``, and a
    table at most half full keeps linear probes short.
    """
    if batch < 1 or capacity < 1 or max_ngram < 1:
        raise ValueError(f"batch, capacity and max_ngram must be >= 1, got {batch}, {capacity}, {max_ngram}")
    slots = 2
    while slots < 2 * capacity:
        slots *= 2
    return torch.zeros(batch, max_ngram, slots, 3, dtype=torch.long)


class NgramIndex:
    """Incremental n-gram index over ``batch`` growing token histories of at most ``capacity`` tokens.

    ``device`` is where :meth:`lookup` returns its tensors; ``extend`` takes tokens from anywhere.
    """

    def __init__(self, batch: int, capacity: int, max_ngram: int, device: torch.device | str | None = None):
        self.table = new_ngram_table(batch, capacity, max_ngram)
        self.history = torch.zeros(batch, capacity, dtype=torch.long)
        self.lengths = torch.zeros(batch, dtype=torch.long)
        self.max_ngram = max_ngram
        self.device = torch.device(device) if device is not None else torch.device("cpu")

    @property
    def capacity(self) -> int:
        return self.history.shape[1]

    def extend(self, tokens: torch.Tensor, counts: torch.Tensor | None = None) -> None:
        """Append ``tokens[b, :counts[b]]`` to row ``b`` (all of ``tokens [B, T]`` when counts is None)."""
        tokens = tokens.detach().to("cpu", torch.long)
        batch = self.history.shape[0]
        if tokens.dim() != 2 or tokens.shape[0] != batch:
            raise ValueError(f"tokens must be [batch={batch}, T], got shape {tuple(tokens.shape)}")
        width = tokens.shape[1]
        counts_list = [width] * batch if counts is None else [int(c) for c in counts.reshape(-1).tolist()]
        if len(counts_list) != batch or any(not 0 <= c <= width for c in counts_list):
            raise ValueError(f"counts must be [batch={batch}] in [0, T={width}], got {counts_list}")
        old = self.lengths.tolist()
        new = [lo + c for lo, c in zip(old, counts_list)]
        if max(new) > self.capacity:
            raise ValueError(f"NgramIndex holds at most {self.capacity} tokens per row; appending {counts_list} "
                             f"to {old} overflows it")
        for b, (lo, hi) in enumerate(zip(old, new)):
            if hi > lo:
                self.history[b, lo:hi] = tokens[b, : hi - lo]
        new_len = torch.tensor(new, dtype=torch.long)
        ops.ngram_index_append(self.table, self.history, self.lengths, new_len)
        self.lengths = new_len

    def lookup(self, max_tokens: int, max_ngram: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens [B, max_tokens] padded with -1, count [B])``: see :func:`ops.ngram_lookup`."""
        tokens, count = ops.ngram_lookup(self.table, self.history, self.lengths,
                                         self.max_ngram if max_ngram is None else max_ngram, max_tokens)
        return tokens.to(self.device), count.to(self.device)

    def occurrences(self, n: int, row: int = 0) -> np.ndarray:
        """The starts s (ascending) of the earlier occurrences of the last ``n`` tokens of ``row``,
        each with a token after it: ``history[row, s:s + n]`` is that suffix and ``s + n < length``."""
        length = int(self.lengths[row])
        if n < 1 or n >= length:
            return np.zeros(0, dtype=np.int64)
        h = self.history[row, :length].numpy()
        hit = h[: length - n] == h[length - n]
        for i in range(1, n):
            hit &= h[i: length - n + i] == h[length - n + i]
        return np.flatnonzero(hit)

    def reset(self) -> None:
        """Forget every row's history (keeps the memory)."""
        self.table.zero_()
        self.history.zero_()
        self.lengths.zero_()
