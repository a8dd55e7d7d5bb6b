"""Sliding-window attention layers during tree decoding (Mistral, Gemma 2/3, Qwen2 with a window, ...).

A window layer's query at position p sees the keys at positions > p - window (transformers'
``sliding_window_overlay``). In a verification forward node i sits at position prefix + depth(i), so
it sees the last ``window - depth(i) - 1`` positions of the context, and those of its ancestors
less than ``window`` levels above it.

The cache. Between steps a window layer keeps only the last ``window - 1`` positions (all that the
next query can see), as transformers' own sliding caches do, so its memory is bounded by the window
plus the tree at any context length. transformers' sliding layers cannot take tree decoding's
operations (a static one rolls the tree over the context it still needs; a dynamic one refuses to
crop once past the window), so :func:`prepare` replaces them, before the prefill, with a
:class:`WindowLayer`: a forward appends the tree after the kept positions, compaction moves the
accepted path into place (its own prefix: :func:`offset`), and ``crop`` drops the rest and trims
back to the window.

The mask. Models with both layer types take a dict of 4-D masks keyed by layer type
(``full_attention`` / ``sliding_attention``); a model whose layers are all windowed (Mistral) takes
the window mask alone. :func:`attention_mask` builds it; :func:`dense_tree_mask` is the same
window applied to the bool tree block of the tree-attention backend (hf_attention.py).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

FULL, SLIDING = "full_attention", "sliding_attention"


class WindowLayer(DynamicLayer):
    """A sliding-window cache layer that tree decoding can compact and crop.

    Holds the keys and values of positions ``[cumulative_length - stored, cumulative_length)``:
    between steps at most ``sliding_window - 1`` of them; during a forward those plus the new tokens.
    """

    is_sliding = True

    def __init__(self, sliding_window: int, **kwargs):
        super().__init__()
        self.sliding_window = int(sliding_window)
        self.cumulative_length = 0

    @property
    def kept(self) -> int:
        """How many past positions the next query can see: ``window - 1``."""
        return self.sliding_window - 1

    def _trim(self) -> None:
        if self.stored() > self.kept:
            self.keys = self.keys[:, :, self.keys.shape[-2] - self.kept:].contiguous()
            self.values = self.values[:, :, self.values.shape[-2] - self.kept:].contiguous()

    def stored(self) -> int:
        return self.keys.shape[-2] if self.is_initialized and self.keys.numel() else 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append the new tokens after the kept window; returns every key and value held."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._trim()
        self.cumulative_length += key_states.shape[-2]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """For transformers' own masks (prefill, plain decoding): what ``update`` will return."""
        visible = min(self.stored(), self.kept)
        return visible + query_length, self.cumulative_length - visible

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return self.sliding_window

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` positions (a negative int, as transformers' crop takes
        it), then trim back to the window."""
        if tokens_to_remove > 0:
            raise ValueError(f"WindowLayer.crop takes a negative count of tokens to remove, got {tokens_to_remove}")
        remove = -tokens_to_remove
        if remove > self.stored():
            raise ValueError(f"cannot crop {remove} positions from a window layer holding {self.stored()}")
        if remove:
            self.keys = self.keys[:, :, :self.keys.shape[-2] - remove]
            self.values = self.values[:, :, :self.values.shape[-2] - remove]
            self.cumulative_length -= remove
        self._trim()

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0


def _layer_types(model) -> list[str]:
    config = _config(model)
    types = getattr(config, "layer_types", None)
    if types is None:
        window = getattr(config, "sliding_window", None)
        types = [SLIDING if window is not None else FULL] * config.num_hidden_layers
    return list(types)


def prepare(model, cache) -> None:
    """Before the prefill: every sliding-window layer of ``cache`` (dynamic or static) becomes an
    empty :class:`WindowLayer` with its window. Other layer types are left as they are."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        return
    types = _layer_types(model)
    if SLIDING in types and len(layers) < len(types) and not any(layer.is_initialized for layer in layers):
        # A cache built without the config (DynamicCache()) adds full layers as the model fills it.
        layers.extend(DynamicLayer() for _ in range(len(types) - len(layers)))
        for i, kind in enumerate(types):
            if kind == SLIDING and type(layers[i]) is DynamicLayer:
                layers[i] = WindowLayer(_config(model).sliding_window)
    for i, layer in enumerate(layers):
        if isinstance(layer, WindowLayer) or not getattr(layer, "is_sliding", False):
            continue
        kind = types[i] if i < len(types) else None
        if kind != SLIDING:
            raise NotImplementedError(f"cache layer {i} ({type(layer).__name__}, layer type {kind!r}) limits "
                                      f"attention in a way TokenRecycler does not implement (only sliding windows)")
        if getattr(layer, "is_initialized", False) and layer.get_seq_length():
            raise NotImplementedError("TokenRecycler starts from an empty cache; a pre-filled cache was given")
        # A static sliding layer is min(window, max_cache_len) long and does not keep its window.
        layers[i] = WindowLayer(getattr(layer, "sliding_window", None) or _config(model).sliding_window)


def _config(model):
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def is_window(layer) -> bool:
    return isinstance(layer, WindowLayer)


def window_layers(cache) -> list[WindowLayer]:
    return [layer for layer in getattr(cache, "layers", ()) if isinstance(layer, WindowLayer)]


def offset(layer) -> int:
    """Positions a layer no longer holds at its front: its index of position p is p - offset."""
    if isinstance(layer, WindowLayer):
        return layer.cumulative_length - layer.stored()
    return 0


def _window_of(cache) -> tuple[int, int]:
    """(window, stored positions) shared by every window layer of ``cache``."""
    layers = window_layers(cache)
    windows = {layer.sliding_window for layer in layers}
    stored = {min(layer.stored(), layer.kept) for layer in layers}
    if len(windows) != 1 or len(stored) != 1:
        raise NotImplementedError(f"window layers with different windows or lengths: {windows}, {stored}")
    return windows.pop(), stored.pop()


def window_bool_mask(tree: torch.Tensor, stored: int, window: int) -> torch.Tensor:
    """[N, stored + N] bool: node i (depth d_i = its ancestors) sees the stored key j (position
    prefix - stored + j) when j > stored + d_i - window, and its ancestor a when d_i - d_a < window."""
    n = tree.shape[-1]
    depths = tree.sum(-1) - 1
    j = torch.arange(stored, device=tree.device)
    past = j.view(1, -1) > (stored + depths - window).view(-1, 1)
    near = (depths.view(-1, 1) - depths.view(1, -1)) < window
    return torch.cat([past, tree & near], dim=-1).view(n, stored + n)


def dense_tree_mask(tree: torch.Tensor, key_len: int, window: int | None) -> torch.Tensor:
    """[1, 1, N, key_len] bool from the bool tree block [N, N], the tree last in the keys."""
    n = tree.shape[-1]
    if window is None:
        dense = torch.ones(n, key_len, dtype=torch.bool, device=tree.device)
        dense[:, key_len - n:] = tree
    else:
        dense = window_bool_mask(tree, key_len - n, window)
    return dense.view(1, 1, n, key_len)


def attention_mask(model, cache, tree: torch.Tensor, full_mask: torch.Tensor):
    """The verification mask for ``model``: ``full_mask`` (the dense additive mask of the full
    layers) alone without window layers, the window mask alone when every layer is windowed, else a
    dict keyed by layer type."""
    if not window_layers(cache):
        return full_mask
    window, stored = _window_of(cache)
    additive = torch.zeros(tree.shape[0], stored + tree.shape[0], dtype=full_mask.dtype, device=full_mask.device)
    additive.masked_fill_(~window_bool_mask(tree.to(full_mask.device), stored, window),
                          torch.finfo(full_mask.dtype).min)
    sliding = additive.view(1, 1, *additive.shape)
    types = set(_layer_types(model))
    if types == {SLIDING}:
        return sliding
    return {kind: sliding if kind == SLIDING else full_mask for kind in types}
