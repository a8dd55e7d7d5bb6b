"""Emitting accepted tokens: stopping criteria (max length, EOS, stop strings) applied inside an
accepted path, and the streamer fed once per step.

The criteria transformers builds by default (MaxLengthCriteria, EosTokenCriteria) are evaluated once
per step over all the accepted tokens, with one device->host copy (``to_host``, which also brings
the tokens for the streamer), or none when the caller already holds the tokens on the host (the
decode loop passes the copy its step sync made, step_sync.py); any other criterion (stop strings, user criteria) is called token by
token, as generate() does, which costs one host sync per token.
"""

from __future__ import annotations

import torch

from ._testing import counters


def to_host(t: torch.Tensor) -> list:
    """The emitter's one designated device->host copy per step (counted for tests, _testing.py)."""
    if counters.enabled:
        counters.host_copies += 1
    return t.tolist()


def _known(stopping) -> bool:
    from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria
    return all(type(c) in (MaxLengthCriteria, EosTokenCriteria) for c in stopping or ())


def _eos_ids(stopping) -> set[int]:
    from transformers.generation.stopping_criteria import EosTokenCriteria
    return {t for c in stopping or () if type(c) is EosTokenCriteria for t in c.eos_token_id.reshape(-1).tolist()}


class Emitter:
    """Appends accepted tokens to the sequence, stopping exactly where ``stopping`` says (an HF
    ``StoppingCriteriaList``), and streams what was appended."""

    def __init__(self, stopping, streamer=None):
        self.stopping, self.streamer = stopping, streamer
        self.vectorized = _known(stopping)
        self._eos = _eos_ids(stopping) if self.vectorized else set()  # on the host, read once, before any step

    def prompt(self, input_ids: torch.Tensor) -> None:
        if self.streamer is not None:
            self.streamer.put(input_ids.cpu())

    def emit(self, seq: torch.Tensor, new_tokens: torch.Tensor,
             host_tokens: list[int] | None = None) -> tuple[torch.Tensor, bool, int]:
        """(the longer sequence, whether generation is done, how many tokens were appended).
        ``host_tokens``: the same tokens already on the host (then the default criteria read nothing back)."""
        new = new_tokens.view(-1)
        if self.vectorized and host_tokens is not None:
            count, done = self._cut_host(seq.shape[1], host_tokens)
            host = host_tokens
        elif self.vectorized:
            count, done, host = self._cut(seq.shape[1], new)
        else:
            count, done, host = self._cut_token_by_token(seq, new)
        seq = torch.cat([seq, new[:count].view(1, -1)], dim=1)
        if self.streamer is not None and count:
            self.streamer.put(torch.tensor(host[:count]))
        return seq, done, count

    def _cut(self, length: int, new: torch.Tensor) -> tuple[int, bool, list]:
        """Default criteria, once per step: the token count where the first one fires (one copy)."""
        from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria
        n = new.numel()
        stop_at = n + 1  # 1-based count of tokens after which a criterion fires; n + 1: none does
        eos_hits = []
        for c in self.stopping or ():
            if type(c) is MaxLengthCriteria:
                stop_at = min(stop_at, max(c.max_length - length, 1))
            elif type(c) is EosTokenCriteria:
                eos_hits.append(torch.isin(new, c.eos_token_id.to(new.device)))
        if eos_hits:
            hits = torch.stack(eos_hits).any(0)
            first = torch.where(hits, torch.arange(1, n + 1, device=new.device), n + 1).min()
            host = to_host(torch.cat([new, first.view(1)]))
            stop_at = min(stop_at, host.pop())
        else:
            host = to_host(new)
        count = min(stop_at, n)
        return count, stop_at <= n, host

    def _cut_host(self, length: int, host: list[int]) -> tuple[int, bool]:
        """_cut over tokens already on the host: no copy."""
        from transformers.generation.stopping_criteria import MaxLengthCriteria
        n = len(host)
        stop_at = next((i + 1 for i, t in enumerate(host) if t in self._eos), n + 1)
        for c in self.stopping or ():
            if type(c) is MaxLengthCriteria:
                stop_at = min(stop_at, max(c.max_length - length, 1))
        return min(stop_at, n), stop_at <= n

    def _cut_token_by_token(self, seq: torch.Tensor, new: torch.Tensor) -> tuple[int, bool, list]:
        for count in range(1, new.numel() + 1):
            if bool(self.stopping(torch.cat([seq, new[:count].view(1, -1)], dim=1), None).any()):
                return count, True, new[:count].tolist()
        return new.numel(), False, new.tolist()

    def end(self) -> None:
        if self.streamer is not None:
            self.streamer.end()
