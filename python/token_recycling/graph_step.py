"""A graph-ready verification forward (``TokenRecycler(..., cuda_graphs=True)``).

What CUDA-graph capture needs from a step, and how this module provides it:
  - fixed shapes: the draft is padded to a bucket size (``BUCKETS``); padding nodes see only
    themselves, no real node sees them, and their logits are dropped, so they change nothing;
  - fixed addresses: a static cache (transformers' StaticCache writes at its device-side
    ``cumulative_length``) and tree attention reading the prefix length from a device tensor
    (``tree_prefix_len``), positions computed on the device from it;
  - no host syncs inside the forward.
One capture per bucket (``torch.cuda.CUDAGraph``) replays with new inputs copied into the captured
buffers. On the CPU, and on CUDA until every op in the forward is sync-free (the CUDA tree-attention
adapter still reads its device error flag back when prefix_len is on the device), the same padded
forward runs uncaptured: ``captured`` stays False and says so.
"""

from __future__ import annotations

import torch

from . import cache as kv

BUCKETS = (8, 16, 32, 64, 128)


def bucket_for(n: int, room: int | None = None) -> int | None:
    """The smallest bucket holding n nodes (and at most ``room``), else the largest that fits room;
    None when no bucket fits."""
    fitting = [b for b in BUCKETS if room is None or b <= room]
    if not fitting:
        return None
    return next((b for b in fitting if b >= n), fitting[-1])


def padded_mask(mask: torch.Tensor, size: int) -> torch.Tensor:
    """The [size, size] mask: the draft's block, padding nodes seeing only themselves."""
    n = mask.shape[0]
    out = torch.eye(size, dtype=torch.bool, device=mask.device)
    out[:n, :n] = mask
    return out


class GraphStep:
    """Padded, device-prefix verification forwards for one model with a static cache."""

    def __init__(self, model, cache_kwarg: str):
        self.model, self.cache_kwarg = model, cache_kwarg
        self.captured = False  # see the module doc: capture is not enabled yet
        self.buckets_used: set[int] = set()
        self.padded_forwards = 0  # forwards with padding nodes (bucket > draft)

    def fit(self, cache, prefix: int, draft):
        """(draft cut to what one bucket can hold in the cache's room, that bucket's size)."""
        capacity = kv.static_capacity(cache)
        if capacity is None:
            raise ValueError("cuda_graphs=True needs a static cache (generate(..., cache_implementation='static'))")
        size = bucket_for(draft.size, capacity - prefix)
        if size is None:  # less room than the smallest bucket: forward exactly what fits, unpadded
            return kv.fit(cache, prefix, draft), None
        return (draft.truncate(size) if draft.size > size else draft), size

    def forward(self, draft, prefix_len: torch.Tensor, cache, size: int | None) -> torch.Tensor:
        """Logits [1, N, V] of the draft's N nodes; the cache gains ``size`` (or N) entries."""
        from .hf_attention import PREFIX_KWARG
        n = draft.size
        size = size or n
        self.buckets_used.add(size)
        self.padded_forwards += size > n
        tokens = torch.zeros(1, size, dtype=draft.tokens.dtype, device=draft.tokens.device)
        tokens[:, :n] = draft.tokens
        depths = torch.zeros(size, dtype=draft.depths.dtype, device=draft.depths.device)
        depths[:n] = draft.depths
        mask = padded_mask(draft.mask, size).view(1, 1, size, size)
        positions = (depths + prefix_len).view(1, -1)
        out = self.model(input_ids=tokens, attention_mask=mask, position_ids=positions, use_cache=True,
                         **{self.cache_kwarg: cache, PREFIX_KWARG: prefix_len})
        return out.logits[:, :n]
