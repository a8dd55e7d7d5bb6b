"""Proposer settings. vLLM hands a custom proposer only its engine config, so the settings that
are ours come from environment variables (the engine's worker processes inherit them).

| variable | default | meaning |
|---|---|---|
| ``TOKEN_RECYCLING_MATRIX`` | unset | safetensors file: loaded at start when it exists (a warm server), saved every ``TOKEN_RECYCLING_SAVE_EVERY`` seconds when it changed (an idle server too), on SIGINT and SIGTERM and at exit; every save atomic (keeper.py) |
| ``TOKEN_RECYCLING_SAVE_EVERY`` | 300 | seconds between periodic saves of the matrix (0: only on a signal and at exit) |
| ``TOKEN_RECYCLING_TOPK`` | 8 | candidates kept per token in the adjacency matrix |
| ``TOKEN_RECYCLING_RECYCLE`` | ``topk`` | ``topk``: rows := the model's top-k at every verified position (the paper); ``accepted``: rows learn from accepted tokens only |
| ``TOKEN_RECYCLING_MAX_NGRAM`` | 4 | longest suffix the n-gram index looks up (the policy's chain statistics are kept per matched length up to it; a saved policy carries over between engines when both use the same) |
| ``TOKEN_RECYCLING_NGRAM_WINDOW`` | 4096 | the n-gram index covers at most the last this-many tokens of a request (bounded memory) |
| ``TOKEN_RECYCLING_MEMORY`` | 262144 | the suffix memory's capacity in tokens: finished requests' tokens (their n-gram window), shared by every request, least recently used forgotten first, saved with the matrix (0: none) |

How long each request's chain is, and how much of it comes from an n-gram candidate, is the
drafter's policy's choice (Policy.decide_chain), not a setting; ``TOKEN_RECYCLING_MIN_MATCH``, the
fixed match threshold that stood in for it, is no longer read (a warning says so when it is set).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

RECYCLE_MODES = ("topk", "accepted")


def _int_env(name: str, default: int, low: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


@dataclass(frozen=True)
class ProposerOptions:
    matrix_path: str | None = None
    save_every: int = 300
    topk: int = 8
    recycle: str = "topk"
    max_ngram: int = 4
    ngram_window: int = 4096
    memory: int = 262144

    def __post_init__(self):
        if self.recycle not in RECYCLE_MODES:
            raise ValueError(f"recycle must be one of {RECYCLE_MODES}, got {self.recycle!r}")
        if self.topk < 1 or self.max_ngram < 1 or self.save_every < 0:
            raise ValueError(f"topk and max_ngram must be >= 1 and save_every >= 0: {self}")
        if self.memory < 0:
            raise ValueError(f"memory must be >= 0, got {self.memory}")
        if self.ngram_window < 64:
            raise ValueError(f"ngram_window must be >= 64, got {self.ngram_window}")

    @classmethod
    def from_env(cls) -> "ProposerOptions":
        recycle = os.environ.get("TOKEN_RECYCLING_RECYCLE", "topk") or "topk"
        if recycle not in RECYCLE_MODES:
            raise ValueError(f"TOKEN_RECYCLING_RECYCLE must be one of {RECYCLE_MODES}, got {recycle!r}")
        if os.environ.get("TOKEN_RECYCLING_MIN_MATCH"):
            warnings.warn("TOKEN_RECYCLING_MIN_MATCH is no longer read: the drafter's policy chooses each "
                          "request's chain from its statistics", stacklevel=2)
        return cls(matrix_path=os.environ.get("TOKEN_RECYCLING_MATRIX") or None,
                   save_every=_int_env("TOKEN_RECYCLING_SAVE_EVERY", 300, 0),
                   topk=_int_env("TOKEN_RECYCLING_TOPK", 8, 1),
                   recycle=recycle,
                   max_ngram=_int_env("TOKEN_RECYCLING_MAX_NGRAM", 4, 1),
                   ngram_window=_int_env("TOKEN_RECYCLING_NGRAM_WINDOW", 4096, 64),
                   memory=_int_env("TOKEN_RECYCLING_MEMORY", 262144, 0))
