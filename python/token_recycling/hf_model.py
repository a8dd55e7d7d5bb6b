"""Glue to a stock transformers 5.x causal LM: support checks, the verification forward (4-D tree
mask + positions), and compaction of the model's own cache object in place."""

from __future__ import annotations

import inspect

import torch

from . import ops

# Attention implementations that take a custom 4-D additive mask as given.
MASK_4D_IMPLEMENTATIONS = ("eager", "sdpa")


def forward_params(model) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def cache_kwarg(model) -> str:
    """transformers 5.x renamed `past_key_values` to `cache`; accept both."""
    return "cache" if "cache" in forward_params(model) else "past_key_values"


def attn_implementation(model) -> str:
    return getattr(model.config, "_attn_implementation", None) or "eager"


def check_supported(model, extra_implementations: tuple[str, ...] = ()) -> None:
    """Raise a clear error for a model the tree forward cannot drive."""
    name = type(model).__name__
    params = forward_params(model)
    missing = {"attention_mask", "position_ids", "input_ids"} - params
    if missing or not ({"cache", "past_key_values"} & params):
        raise ValueError(f"{name} cannot be used with TokenRecycler: its forward() lacks "
                         f"{sorted(missing) or ['a cache argument']} (a decoder-only causal LM is required)")
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(f"{name} is an encoder-decoder model; TokenRecycler drives decoder-only causal LMs")
    impl = attn_implementation(model)
    if impl not in MASK_4D_IMPLEMENTATIONS + extra_implementations:
        raise ValueError(
            f"{name} uses attn_implementation={impl!r}, which does not accept the custom 4-D tree attention "
            f"mask that verification needs. Load the model with attn_implementation='sdpa' or 'eager' "
            f"(or call model.set_attn_implementation('sdpa')).")
    if model.get_output_embeddings() is None:
        raise ValueError(f"{name} has no output embeddings (LM head); TokenRecycler needs logits over the vocab")


def vocab_size(model) -> int:
    """Width of the logits, which is what token ids index (may exceed the tokenizer's vocab)."""
    head = model.get_output_embeddings()
    return int(head.weight.shape[0])


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def cache_layers(cache) -> list:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise ValueError(f"unsupported cache type {type(cache).__name__}: expected a transformers 5.x Cache")
    return layers


def check_cache(cache, forwarded: int) -> None:
    """Refuse caches whose layers cannot be compacted in place (linear attention, full sliding windows)."""
    for i, layer in enumerate(cache_layers(cache)):
        if not getattr(layer, "is_initialized", True):
            continue
        if not hasattr(layer, "keys") or not isinstance(getattr(layer, "keys", None), torch.Tensor):
            raise NotImplementedError(f"cache layer {i} ({type(layer).__name__}) has no key/value tensors to compact")
        window = getattr(layer, "sliding_window", None)
        if window is not None and layer.get_seq_length() + forwarded >= window:
            raise NotImplementedError(
                f"the context ({layer.get_seq_length()} + {forwarded} tree tokens) reaches the sliding window "
                f"({window}) of cache layer {i}; TokenRecycler does not compact rolled sliding-window caches yet")


def compact_cache(cache, prefix_len: torch.Tensor, accepted_nodes: torch.Tensor, accept_len: torch.Tensor,
                  accepted: int, forwarded: int) -> None:
    """Keep the accepted path right after the prefix (one compact_kv call for all layers), then drop
    the rest of the forwarded tree from every layer."""
    tensors = []
    for layer in cache_layers(cache):
        if getattr(layer, "is_initialized", True) and isinstance(getattr(layer, "keys", None), torch.Tensor):
            tensors += [layer.keys, layer.values]
    if tensors:
        ops.compact_kv(tensors, prefix_len, accepted_nodes, accept_len)
    cache.crop(-(forwarded - accepted))


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


def static_capacity(cache) -> int | None:
    """The fixed length of a static cache (None for a dynamic one)."""
    lengths = {getattr(layer, "max_cache_len", None) for layer in cache_layers(cache)}
    if None in lengths:
        return None
    if len(lengths) != 1:
        raise NotImplementedError("static caches with layers of different lengths are not supported")
    return lengths.pop()
