"""Multi-process runs (tensor parallel under torchrun): every drafting decision must be the same on
every rank, or the ranks forward drafts of different sizes into the same collectives and hang.

Decisions are made from data that is already identical everywhere (accepted tokens, the matrix)
and from timings; timings differ per rank, so every timing that feeds a decision goes through
:func:`agree`, which hands every rank rank 0's values.
"""

from __future__ import annotations

import torch


def active() -> bool:
    """True inside an initialized torch.distributed group of more than one process."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def agree(values: list[float]) -> list[float]:
    """``values`` as rank 0 measured them, on every rank (unchanged in a single process)."""
    if not active():
        return values
    dist = torch.distributed
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return t.cpu().tolist()
