"""The model's own KV cache during tree decoding: the tree's attention mask over it, what fits in a
static cache, and compaction of the accepted path into place (one compact_kv call for all layers)."""

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


def compact(cache, prefix_len: torch.Tensor, accepted_nodes: torch.Tensor, accept_len: torch.Tensor,
            accepted: int, forwarded: int) -> None:
    """Keep the accepted path right after the prefix (one compact_kv call for all layers; window
    layers, which hold only the window's end, in a second call at their own prefix), then drop the
    rest of the forwarded tree from every layer (window layers trim back to the window). With the
    root alone accepted (``accepted == 1``, most steps) nothing moves: only the trim."""
    groups: dict[tuple, list[torch.Tensor]] = {}  # one call per (offset, length): compact_kv's caches agree in shape
    for layer in cache_layers(cache) if accepted > 1 else ():
        if getattr(layer, "is_initialized", True) and isinstance(getattr(layer, "keys", None), torch.Tensor):
            groups.setdefault((window.offset(layer), layer.keys.shape[-2]), []).extend([layer.keys, layer.values])
    for (offset, _), tensors in groups.items():
        ops.compact_kv(tensors, prefix_len - offset if offset else prefix_len, accepted_nodes, accept_len)
    trim(cache, forwarded - accepted)


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


def fit(cache, prefix: int, draft):
    """A static cache has a fixed length: near its end, forward only the first nodes that fit
    (nodes are in breadth-first order, so any prefix of them is a tree)."""
    capacity = static_capacity(cache)
    if capacity is None or prefix + draft.size <= capacity:
        return draft
    room = capacity - prefix
    if room < 1:
        raise ValueError(f"the static cache ({capacity} positions) is full at {prefix} tokens")
    return draft.truncate(room)


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
