"""The KV cache of a batch of rows decoded together (batch.py): its layout, the verification
forward over it, compaction per row, and dropping finished rows.

Layout. Row b holds its ``P_b`` cached tokens contiguously in slots ``[0, P_b)`` (after the
left-padded prefill its KV is shifted left once by its pad count). The cache is ``L = max_b P_b``
long; row b's slots ``[P_b, L)`` are garbage, never attended. A step writes every row's padded
tree at the common slots ``[L, L + N)`` (transformers caches append at one length for the whole
batch); row b's node i sits at position ``P_b + depth(i)`` and sees keys ``[0, P_b)`` and its
ancestors in ``[L, L + N)``. Compaction moves row b's accepted nodes to ``[P_b, P_b + a_b)`` and
the cache is cropped to ``max_b (P_b + a_b)``. So the waste of row b is ``L - P_b``: at most the
length difference between the longest and the shortest row, never growing with the number of
steps (no re-packing needed); finished rows leave the batch (``keep_rows``), which shrinks it.
"""

from __future__ import annotations

import torch

from . import cache as kv
from . import ops


def kv_tensors(cache) -> list[torch.Tensor]:
    """Every key and value tensor [B, H, S, D] of the cache (one compact_kv call for all layers)."""
    out = []
    for layer in kv.cache_layers(cache):
        if getattr(layer, "is_initialized", True) and isinstance(getattr(layer, "keys", None), torch.Tensor):
            out.extend([layer.keys, layer.values])
    return out


def left_align(cache, pads: torch.Tensor) -> None:
    """After a left-padded prefill of length S: row b's valid KV ``[pads[b], S)`` moves to
    ``[0, S - pads[b])`` and the slots after it are zeroed (a padded query row's KV may be anything,
    and a masked key still multiplies its value by a zero weight)."""
    tensors = kv_tensors(cache)
    if not tensors or int(pads.max()) == 0:
        return
    s = tensors[0].shape[2]
    slots = torch.arange(s, device=pads.device).view(1, -1) + pads.view(-1, 1)  # [B, S]: source slot
    valid = slots < s
    for t in tensors:
        index = slots.clamp(max=s - 1).to(t.device).view(t.shape[0], 1, s, 1).expand_as(t)
        moved = t.gather(2, index) * valid.to(t.device).view(t.shape[0], 1, s, 1).to(t.dtype)
        t.copy_(moved)


def rows_mask(tree: torch.Tensor, cached: torch.Tensor, start: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive [B, 1, N, start + N] mask: row b's node i sees keys [0, cached[b]) and the tree
    nodes j at start + j with tree[b, i, j]; everything else gets the dtype's minimum."""
    batch, n = tree.shape[0], tree.shape[1]
    prefix = torch.arange(start, device=tree.device).view(1, 1, -1) < cached.to(tree.device).view(-1, 1, 1)
    visible = torch.cat([prefix.expand(batch, n, start), tree], dim=-1)
    mask = torch.zeros(visible.shape, dtype=dtype, device=tree.device).masked_fill_(~visible, torch.finfo(dtype).min)
    return mask.view(batch, 1, n, start + n)


def forward_rows(model, tokens: torch.Tensor, depths: torch.Tensor, tree: torch.Tensor, cached: torch.Tensor,
                 cache, tree_attention: bool, cache_kwarg: str) -> torch.Tensor:
    """One forward of every row's padded tree: tokens/depths [B, N], tree [B, N, N] bool, cached [B]
    (tokens each row holds in the cache). Returns logits [B, N, V]; the cache gains N slots."""
    from .hf_model import model_dtype
    start = cache.get_seq_length()
    extra = {}
    if tree_attention:
        from .hf_attention import PREFIX_KWARG, START_KWARG
        mask = tree.unsqueeze(1)
        extra = {PREFIX_KWARG: cached, START_KWARG: start}
    else:
        mask = rows_mask(tree, cached, start, model_dtype(model))
    positions = cached.to(tokens.device).view(-1, 1) + depths
    out = model(input_ids=tokens, attention_mask=mask, position_ids=positions, use_cache=True,
                **{cache_kwarg: cache}, **extra)
    return out.logits


def compact_rows(cache, cached: torch.Tensor, start: int, paths: list[torch.Tensor]) -> torch.Tensor:
    """Row b's accepted nodes (``paths[b]``, root first, indices into its tree at slot ``start``) move
    to ``[cached[b], cached[b] + len)``; the cache is cropped to the longest row. Returns the new
    ``cached`` [B]."""
    device = cached.device
    lengths = torch.tensor([p.numel() for p in paths], dtype=torch.long)
    width = max(int(lengths.max()), 1)
    nodes = torch.full((len(paths), width), -1, dtype=torch.long)
    shift = start - cached.cpu()
    for b, path in enumerate(paths):
        nodes[b, : path.numel()] = path.cpu() + shift[b]  # compact_kv reads at prefix_len[b] + node
    tensors = kv_tensors(cache)
    ops.compact_kv(tensors, cached.to(tensors[0].device), nodes.to(tensors[0].device), lengths.to(tensors[0].device))
    new = cached + lengths.to(device)
    crop(cache, int(new.max()))
    return new


def crop(cache, length: int) -> None:
    """Cut every layer to ``length`` slots (transformers' crop takes the count to remove)."""
    current = cache.get_seq_length()
    if length < current:
        kv.trim(cache, current - length)


def keep_rows(cache, keep: list[int]) -> None:
    """Only the rows ``keep`` stay in the cache (finished rows leave the batch)."""
    index = torch.tensor(keep, dtype=torch.long, device=kv_tensors(cache)[0].device)
    cache.batch_select_indices(index)
