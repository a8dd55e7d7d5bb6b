"""Emitting accepted tokens: stopping criteria (max length, EOS, stop strings) applied token by token
inside an accepted path, and the streamer fed once per step."""

from __future__ import annotations

import torch


class Emitter:
    """Appends accepted tokens to the sequence, stopping exactly where ``stopping`` says (an HF
    ``StoppingCriteriaList``), and streams what was appended."""

    def __init__(self, stopping, streamer=None):
        self.stopping, self.streamer = stopping, streamer

    def prompt(self, input_ids: torch.Tensor) -> None:
        if self.streamer is not None:
            self.streamer.put(input_ids.cpu())

    def emit(self, seq: torch.Tensor, new_tokens: torch.Tensor) -> tuple[torch.Tensor, bool, int]:
        """(the longer sequence, whether generation is done, how many tokens were appended)."""
        emitted, done = [], False
        for t in new_tokens.view(-1):
            seq = torch.cat([seq, t.view(1, 1)], dim=1)
            emitted.append(t)
            if bool(self.stopping(seq, None).any()):
                done = True
                break
        if self.streamer is not None and emitted:
            self.streamer.put(torch.stack(emitted).cpu())
        return seq, done, len(emitted)

    def end(self) -> None:
        if self.streamer is not None:
            self.streamer.end()
