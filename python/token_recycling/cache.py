"""The model's own KV cache during tree decoding, for one row or many: its layout, the tree's
attention mask over it, what fits in a static cache, compaction of the accepted paths into place
(one compact_kv call for all rows and layers), and finished rows leaving it.

Layout. Row b holds its ``P_b`` cached tokens contiguously in slots ``[0, P_b)`` (after a
left-padded prefill its KV is shifted left once by its pad count: :func:`left_align`). The cache is
``L = max_b P_b`` long; row b's slots ``[P_b, L)`` are garbage, never attended. A step writes every
row's padded tree at the common slots ``[L, L + N)`` (transformers caches append at one length for
the whole batch); row b's node i sits at position ``P_b + depth(i)`` and sees keys ``[0, P_b)`` and
its ancestors in ``[L, L + N)``. Compaction moves row b's accepted nodes to ``[P_b, P_b + a_b)`` and
the cache is cut to ``max_b (P_b + a_b)``. So the waste of row b is ``L - P_b``: at most the length
difference between the longest and the shortest row, never growing with the number of steps. With
one row, ``L = P`` and the tree sits right after the prefix.
"""

from __future__ import annotations

import torch

from . import ops, window


def new_cache(model, static_len: int | None = None):
    """An empty cache for ``model`` (what ``rec.generate`` uses): a DynamicCache, or a StaticCache of
    ``static_len`` positions (graph-ready steps)."""
    from transformers import DynamicCache, StaticCache
    if static_len is not None:
        return StaticCache(config=model.config, max_cache_len=static_len)
    return DynamicCache(config=model.config)


def cache_layers(cache) -> list:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise ValueError(f"unsupported cache type {type(cache).__name__}: expected a transformers 5.x Cache")
    return layers


def check_cache(cache, forwarded: int) -> None:
    """Refuse caches whose layers cannot be compacted in place (linear attention). Sliding-window
    layers are window.WindowLayer (window.prepare): compacted at their own offset, bounded by the window."""
    for i, layer in enumerate(cache_layers(cache)):
        if not getattr(layer, "is_initialized", True):
            continue
        if not hasattr(layer, "keys") or not isinstance(getattr(layer, "keys", None), torch.Tensor):
            raise NotImplementedError(f"cache layer {i} ({type(layer).__name__}) has no key/value tensors to compact")
        if getattr(layer, "is_sliding", False) and not window.is_window(layer):
            raise NotImplementedError(f"cache layer {i} ({type(layer).__name__}) is a sliding-window layer that "
                                      f"window.prepare did not convert")


def kv_tensors(cache) -> list[torch.Tensor]:
    """Every key and value tensor [B, H, S, D] of the cache (one compact_kv call for all layers)."""
    out = []
    for layer in cache_layers(cache):
        if getattr(layer, "is_initialized", True) and isinstance(getattr(layer, "keys", None), torch.Tensor):
            out.extend([layer.keys, layer.values])
    return out


def compact(cache, prefix_len: torch.Tensor, accepted_nodes: torch.Tensor, accept_len: torch.Tensor, *,
            moved: bool, length: int, keep: int) -> None:
    """Row b's accepted nodes (``accepted_nodes[b]``, read at slot ``prefix_len[b] + node``) move to
    ``[prefix_len[b], prefix_len[b] + accept_len[b])`` in one compact_kv call for all layers (window
    layers, which hold only the window's end, in a second call at their own prefix); then the cache,
    ``length`` slots long, is cut to ``keep`` (window layers trim back to the window). ``moved``
    False (one row that accepted its root alone, most steps): nothing moves, only the cut."""
    groups: dict[tuple, list[torch.Tensor]] = {}  # one call per (offset, length): compact_kv's caches agree in shape
    for layer in cache_layers(cache) if moved else ():
        if getattr(layer, "is_initialized", True) and isinstance(getattr(layer, "keys", None), torch.Tensor):
            groups.setdefault((window.offset(layer), layer.keys.shape[-2]), []).extend([layer.keys, layer.values])
    for (offset, _), tensors in groups.items():
        device = tensors[0].device
        ops.compact_kv(tensors, (prefix_len - offset if offset else prefix_len).to(device), accepted_nodes.to(device),
                       accept_len.to(device))
    crop(cache, keep, length)


def crop(cache, keep: int, length: int) -> None:
    """Cut a cache of ``length`` slots (every row) to its first ``keep``."""
    if keep < length:
        trim(cache, length - keep)


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


def keep_rows(cache, keep: list[int]) -> None:
    """Only the rows ``keep`` stay in the cache (finished rows leave the batch)."""
    for layer in cache_layers(cache):
        if not getattr(layer, "is_initialized", True) or not isinstance(getattr(layer, "keys", None), torch.Tensor):
            continue
        index = torch.tensor(keep, dtype=torch.long, device=layer.keys.device)
        if hasattr(layer, "batch_select_indices"):
            layer.batch_select_indices(index)
        else:  # a static layer: new buffers of the rows kept (no CUDA graph holds them at B > 1)
            layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
            if hasattr(layer, "max_batch_size"):
                layer.max_batch_size = len(keep)


def trim(cache, n: int) -> None:
    """Drop the last ``n`` positions of every layer: ``cache.crop(-n)``. transformers releases whose
    StaticLayer has no ``crop`` (5.17) get the same effect by moving its ``cumulative_length`` back in
    place (the next update overwrites the dropped slots; a captured CUDA graph keeps its address)."""
    layers = cache_layers(cache)
    if all(hasattr(layer, "crop") for layer in layers):
        cache.crop(-n)
        return
    for i, layer in enumerate(layers):
        if hasattr(layer, "crop"):
            layer.crop(-n)
        elif not getattr(layer, "is_initialized", True):
            continue
        elif isinstance(getattr(layer, "cumulative_length", None), torch.Tensor):
            layer.cumulative_length.sub_(n)
        else:
            raise NotImplementedError(f"cache layer {i} ({type(layer).__name__}) cannot drop positions: no crop()")


def static_capacity(cache) -> int | None:
    """The fixed length of a static cache (None for a dynamic one). Window layers are unbounded."""
    lengths = {getattr(layer, "max_cache_len", None) for layer in cache_layers(cache) if not window.is_window(layer)}
    if not lengths or None in lengths:
        return None
    if len(lengths) != 1:
        raise NotImplementedError("static caches with layers of different lengths are not supported")
    return lengths.pop()


def room(cache, length: int) -> int | None:
    """Slots left after ``length`` in a static cache (None for a dynamic one)."""
    capacity = static_capacity(cache)
    return None if capacity is None else capacity - length


def fit(cache, prefix: int, draft):
    """A static cache has a fixed length: near its end, forward only the first nodes that fit
    (nodes are in breadth-first order, so any prefix of them is a tree)."""
    left = room(cache, prefix)
    if left is None or draft.size <= left:
        return draft
    if left < 1:
        raise ValueError(f"the static cache ({static_capacity(cache)} positions) is full at {prefix} tokens")
    return draft.truncate(left)


class TreeMask:
    """The additive [1, 1, N, P + N] mask for a tree at prefix length P (prefix all visible)."""

    def __init__(self, tree_mask: torch.Tensor, dtype: torch.dtype, device: torch.device):
        self.n = tree_mask.shape[-1]
        self.dtype, self.device = dtype, device
        self.block = torch.zeros(tree_mask.shape, dtype=dtype, device=device)
        self.block.masked_fill_(~tree_mask.to(device), torch.finfo(dtype).min)

    def __call__(self, prefix_len: int, kv_len: int | None = None) -> torch.Tensor:
        """kv_len: the key length attention will see, when it is more than prefix + N (a static
        cache attends over its whole buffer: the unused tail is masked)."""
        lead = self.block.shape[:-2]
        prefix = torch.zeros(*lead, self.n, prefix_len, dtype=self.dtype, device=self.device)
        parts = [prefix, self.block]
        if kv_len is not None and kv_len > prefix_len + self.n:
            parts.append(torch.full((*lead, self.n, kv_len - prefix_len - self.n), torch.finfo(self.dtype).min,
                                    dtype=self.dtype, device=self.device))
        full = torch.cat(parts, dim=-1)
        return full.view(-1, 1, self.n, full.shape[-1])


def rows_mask(tree: torch.Tensor, cached: torch.Tensor, start: int, dtype: torch.dtype,
              kv_len: int | None = None) -> torch.Tensor:
    """The additive [B, 1, N, kv_len] mask of the layout above: row b's node i sees keys [0, cached[b])
    and the tree nodes j at start + j with tree[b, i, j]; everything else (the unused tail of a static
    cache too) gets the dtype's minimum. kv_len: start + N unless a static cache attends further."""
    batch, n = tree.shape[0], tree.shape[1]
    width = max(kv_len or 0, start + n)
    prefix = torch.arange(start, device=tree.device).view(1, 1, -1) < cached.to(tree.device).view(-1, 1, 1)
    parts = [prefix.expand(batch, n, start), tree]
    if width > start + n:
        parts.append(torch.zeros(batch, n, width - start - n, dtype=torch.bool, device=tree.device))
    visible = torch.cat(parts, dim=-1)
    mask = torch.zeros(visible.shape, dtype=dtype, device=tree.device).masked_fill_(~visible, torch.finfo(dtype).min)
    return mask.view(batch, 1, n, width)
