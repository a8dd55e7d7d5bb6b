"""Glue to a stock transformers 5.x causal LM: support checks, sizes and dtypes, and the verification
forward (one model call over the whole tree: its mask and positions). The cache lives in cache.py."""

from __future__ import annotations

import inspect

import torch

from . import cache as kv
from . import lean_forward, window

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
    check_device_map(model)
    if model.get_output_embeddings() is None:
        raise ValueError(f"{name} has no output embeddings (LM head); TokenRecycler needs logits over the vocab")


def check_device_map(model) -> None:
    """A ``device_map`` that keeps execution on one device (everything on one GPU, or layers offloaded to
    CPU RAM or disk and brought in by accelerate's hooks) works; one that runs layers on several
    accelerators is refused: the KV cache would then live on several devices, which compaction does
    not handle (tensor parallel under torchrun is the supported way to use several GPUs)."""
    device_map = getattr(model, "hf_device_map", None) or {}
    devices = {str(d) for d in device_map.values() if str(d) not in ("cpu", "disk", "meta")}
    devices = {f"cuda:{d}" if d.isdigit() else d for d in devices}
    if len(devices) > 1:
        raise ValueError(
            f"{type(model).__name__} was loaded with a device_map that runs its layers on {len(devices)} devices "
            f"({', '.join(sorted(devices))}); TokenRecycler needs the whole KV cache on one device. Load it on one "
            f"device (layers may be offloaded to 'cpu' or 'disk'), or split it over GPUs with tensor parallel: "
            f"from_pretrained(..., tp_plan='auto') under torchrun.")


def vocab_size(model) -> int:
    """Width of the logits, which is what token ids index (may exceed the tokenizer's vocab)."""
    head = model.get_output_embeddings()
    return int(head.weight.shape[0])


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def forward_tree(model, tokens: torch.Tensor, depths: torch.Tensor, tree: torch.Tensor, prefix, cache,
                 tree_attention: bool, cache_kwarg: str, start: int | None = None,
                 lean: bool | lean_forward.Parts = False) -> torch.Tensor:
    """One forward of every row's draft tree: tokens/depths ``[B, N]``, tree ``[B, N, N]`` bool (node i
    sees node j). Row b's node i sits at position ``prefix[b] + depth(i)``, seeing row b's prefix and
    its ancestors. Returns logits ``[B, N, V]``; the cache gains N slots.

    ``prefix``: an int (one row), or a LongTensor ``[B]`` (host, or on the device: no host sync).
    ``start``: the slot where every row's tree begins (cache.py's layout); None: right after the
    prefix (one row; sliding-window layers need this).

    With ``tree_attention`` the mask is the bare tree block and the prefix length (and ``start``) go
    along as keyword arguments (the protocol of hf_attention.py; the window is taken from the layer);
    otherwise a dense additive mask over the keys, or one per layer type with sliding-window layers
    (window.py). ``lean``: through lean_forward.forward (the same logits; see :func:`lean_usable`), with
    the model's parts looked up there or, given a ``lean_forward.Parts``, earlier."""
    batch, n = tokens.shape
    extra = {}
    if tree_attention:
        from .hf_attention import PREFIX_KWARG, START_KWARG
        mask = tree.view(batch, 1, n, n) if batch > 1 else tree.view(1, 1, n, n)
        extra[PREFIX_KWARG] = prefix
        if start is not None:
            extra[START_KWARG] = start
    elif start is None:
        mask = kv.TreeMask(tree[0], model_dtype(model), tokens.device)(int(prefix), kv.static_capacity(cache))
        mask = window.attention_mask(model, cache, tree[0], mask)  # per layer type, with window layers
    else:
        mask = kv.rows_mask(tree, prefix, start, model_dtype(model), kv.static_capacity(cache))
    offset = prefix.to(tokens.device).view(-1, 1) if isinstance(prefix, torch.Tensor) else prefix
    if lean:
        parts = lean if isinstance(lean, lean_forward.Parts) else None
        return lean_forward.forward(model, tokens, mask, depths + offset, cache, parts=parts, **extra)
    out = model(input_ids=tokens, attention_mask=mask, position_ids=depths + offset, use_cache=True,
                **{cache_kwarg: cache}, **extra)
    return out.logits


def lean_usable(model, tree_attention: bool, cache_kwarg: str) -> bool:
    """Whether :func:`forward_tree` may take ``lean=True`` for ``model`` now: lean_forward.usable, whose
    once-per-model check forwards a small tree both ways (as the decode loop would) and compares."""
    def both(lean):
        return lambda tokens, depths, tree, prefix, cache: forward_tree(
            model, tokens, depths, tree, prefix, cache, tree_attention, cache_kwarg, lean=lean)

    return lean_forward.usable(model, lambda: lean_forward.agrees(model, both(False), both(True), vocab_size(model)))
