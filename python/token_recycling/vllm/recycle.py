"""Recycling inside vLLM: where the matrix rows come from.

The paper sets the row of every token the model verified to the model's top-k next tokens at
that position. vLLM gives a custom proposer no logits, and its logits processors do not see the
draft positions under speculative decoding (only the bonus position), and sampler logprobs reach
the front end, not the proposer. What vLLM does give: ``load_model(model)`` hands every proposer the
target model, and the runner computes all of a step's logits with ``model.compute_logits(hidden)``,
one row per verified position (each request's root and drafts, in batch order) before sampling.
:class:`TopkCapture` wraps that method on the model instance and keeps the top-k ids of each such
call (on the model's device; ~0.1 ms on the CPU for a batch), which the proposer maps back to the
tokens it fed next step, and hands to ``Drafter.recycle``.

Without the hook (``TOKEN_RECYCLING_RECYCLE=accepted``, or a step whose rows cannot be mapped)
``Drafter.learn_accepted`` is the update: the row of each produced token gets the token that
followed it, shifted in as rank 0.
"""

from __future__ import annotations

import torch

MAX_CALLS = 8  # captures kept between two propose() calls


class TopkCapture:
    """Keeps the top-k ids of every ``compute_logits`` call since the last ``take()``."""

    def __init__(self, model, topk: int, vocab_size: int):
        self.topk, self.vocab_size = topk, vocab_size
        self.calls: list[torch.Tensor] = []
        original = model.compute_logits

        def compute_logits(*args, **kwargs):
            logits = original(*args, **kwargs)
            if isinstance(logits, torch.Tensor) and logits.dim() == 2 and logits.shape[0] > 0:
                k = min(self.topk, logits.shape[-1])
                self.calls.append(logits.topk(k, dim=-1).indices)
                del self.calls[:-MAX_CALLS]  # bounded even if the proposer is not called for a while
            return logits  # None on tensor-parallel ranks that do not gather the logits

        model.compute_logits = compute_logits  # the runner calls self.model.compute_logits(...)

    @classmethod
    def install(cls, model, topk: int, vocab_size: int) -> "TopkCapture | None":
        if model is None or not callable(getattr(model, "compute_logits", None)):
            return None
        return cls(model, topk, vocab_size)

    def take(self) -> list[torch.Tensor]:
        """The captures since the last take, oldest first, as int64 [rows, k] on the CPU. Normally
        the first is the step's sampling logits (the runner computes them before any prompt-logprob
        logits); a step that skipped the proposer (vLLM does near max_model_len) leaves an older
        one in front, so the caller picks the capture whose row count fits."""
        calls, self.calls = self.calls, []
        out = []
        for ids in calls[-MAX_CALLS:]:
            ids = ids.to("cpu", torch.long)
            if ids.shape[1] < self.topk:  # a tiny vocabulary: pad with token 0 (never accepted by luck)
                ids = torch.cat([ids, ids.new_zeros(ids.shape[0], self.topk - ids.shape[1])], dim=1)
            out.append(ids.masked_fill_(ids >= self.vocab_size, 0))  # padded vocab rows
        return out

