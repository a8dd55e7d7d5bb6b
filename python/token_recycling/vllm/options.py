"""Proposer settings. vLLM hands a custom proposer only its engine config, so the settings that
are ours come from environment variables (the engine's worker processes inherit them).

| variable | default | meaning |
|---|---|---|
| ``TOKEN_RECYCLING_MATRIX`` | unset | safetensors file: loaded at start when it exists (a warm server), saved every ``TOKEN_RECYCLING_SAVE_EVERY`` seconds and at exit |
| ``TOKEN_RECYCLING_SAVE_EVERY`` | 300 | seconds between saves of the matrix (0: only at exit) |
| ``TOKEN_RECYCLING_TOPK`` | 8 | candidates kept per token in the adjacency matrix |
| ``TOKEN_RECYCLING_RECYCLE`` | ``topk`` | ``topk``: rows := the model's top-k at every verified position (the paper); ``accepted``: rows learn from accepted tokens only |
| ``TOKEN_RECYCLING_MIN_MATCH`` | 3 | an n-gram match of at least this many tokens is trusted: draft its continuation |
| ``TOKEN_RECYCLING_MAX_NGRAM`` | 4 | longest suffix the n-gram index looks up (the match is then measured further back) |
| ``TOKEN_RECYCLING_NGRAM_WINDOW`` | 4096 | the n-gram index covers at most the last this-many tokens of a request (bounded memory) |
"""

from __future__ import annotations

import os
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
    min_match: int = 3
    max_ngram: int = 4
    ngram_window: int = 4096

    def __post_init__(self):
        if self.recycle not in RECYCLE_MODES:
            raise ValueError(f"recycle must be one of {RECYCLE_MODES}, got {self.recycle!r}")
        if self.topk < 1 or self.min_match < 1 or self.max_ngram < 1 or self.save_every < 0:
            raise ValueError(f"topk, min_match and max_ngram must be >= 1 and save_every >= 0: {self}")
        if self.ngram_window < 64:
            raise ValueError(f"ngram_window must be >= 64, got {self.ngram_window}")

    @classmethod
    def from_env(cls) -> "ProposerOptions":
        recycle = os.environ.get("TOKEN_RECYCLING_RECYCLE", "topk") or "topk"
        if recycle not in RECYCLE_MODES:
            raise ValueError(f"TOKEN_RECYCLING_RECYCLE must be one of {RECYCLE_MODES}, got {recycle!r}")
        return cls(matrix_path=os.environ.get("TOKEN_RECYCLING_MATRIX") or None,
                   save_every=_int_env("TOKEN_RECYCLING_SAVE_EVERY", 300, 0),
                   topk=_int_env("TOKEN_RECYCLING_TOPK", 8, 1),
                   recycle=recycle,
                   min_match=_int_env("TOKEN_RECYCLING_MIN_MATCH", 3, 1),
                   max_ngram=_int_env("TOKEN_RECYCLING_MAX_NGRAM", 4, 1),
                   ngram_window=_int_env("TOKEN_RECYCLING_NGRAM_WINDOW", 4096, 64))
