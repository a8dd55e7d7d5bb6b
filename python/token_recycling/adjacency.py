"""The adjacency matrix: for every token, the top-k next tokens the model last predicted after it.

It starts empty (all zeros: every candidate is token 0, which verification simply rejects), persists
across calls (hot start) and is saved with safetensors together with its vocab size, k and,
optionally, the draft tree and tree statistics.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file


class AdjacencyMatrix:
    def __init__(self, vocab_size: int, topk: int = 8, device: torch.device | str = "cpu"):
        if vocab_size <= 0 or topk <= 0:
            raise ValueError(f"vocab_size and topk must be positive, got {vocab_size}, {topk}")
        self.vocab_size, self.topk = int(vocab_size), int(topk)
        self.table = torch.zeros(self.vocab_size, self.topk, dtype=torch.int32, device=device)

    def reset(self) -> None:
        self.table.zero_()

    @property
    def nbytes(self) -> int:
        return self.table.numel() * self.table.element_size()

    def save(self, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
        meta = {"format": "token-recycling/1", "vocab_size": str(self.vocab_size), "topk": str(self.topk),
                "extra": json.dumps(extra or {})}
        save_file({"matrix": self.table.cpu().contiguous()}, os.fspath(path), metadata=meta)

    @staticmethod
    def read(path: str | os.PathLike, vocab_size: int, topk: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Load a saved matrix, refusing one made for another vocab or k. Returns (table, extra)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no token-recycling matrix file at {path!r}")
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                table = f.get_tensor("matrix")
        except Exception as exc:  # not a safetensors file, or no "matrix" inside
            raise ValueError(f"{path!r} is not a token-recycling matrix file ({exc})") from exc
        if meta.get("format") != "token-recycling/1":
            raise ValueError(f"{path!r} is not a token-recycling matrix file (format {meta.get('format')!r})")
        v, k = int(meta["vocab_size"]), int(meta["topk"])
        if (v, k) != (vocab_size, topk) or tuple(table.shape) != (v, k):
            raise ValueError(f"{path!r} holds a matrix for vocab_size={v}, k={k}, but this model/recycler "
                             f"needs vocab_size={vocab_size}, k={topk}")
        if table.dtype != torch.int32 or (table.numel() and (table.min() < 0 or table.max() >= v)):
            raise ValueError(f"{path!r} holds token ids outside [0, {v}) or of dtype {table.dtype}")
        return table, json.loads(meta.get("extra", "{}"))
