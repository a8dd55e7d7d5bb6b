"""Tree attention as a transformers attention backend, registered as ``"token_recycling"``.

Protocol with the decode loop. In a verification forward the loop passes ``attention_mask`` as a
4-D bool tensor ``[1, 1, N, N]`` (or ``[B, 1, N, N]`` expanded from one, stride 0 along the batch):
the tree mask, ``mask[i, j]`` = node i may see node j. transformers hands a 4-D mask to the
attention function untouched. The keys and values that function receives are the whole cache
``[B, Hkv, P + N, D]`` with the N tree nodes last, so the prefix is ``P = key_len - N``, the same for
every row. Every other call (prefill, plain decoding, padding masks) goes to transformers' sdpa
function, and mask creation for this implementation is sdpa's.

Sliding-window and soft-capped attention are not handled by the tree kernel: such calls take the
dense path with the equivalent mask (window.dense_tree_mask: the window counted from each node's own
position). The dense path is sdpa, or the model's own eager attention for soft-capped logits (Gemma 2),
which sdpa cannot apply.
"""

from __future__ import annotations

import sys

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from . import ops, window
from ._extension import WITH_CUDA

NAME = "token_recycling"

_CUDA_HEAD_DIMS = (64, 80, 96, 128, 256)
_CUDA_MAX_NODES = 256


def tree_mask_of(attention_mask: torch.Tensor | None, query: torch.Tensor,
                 key: torch.Tensor) -> torch.Tensor | None:
    """The ``[N, N]`` tree mask when ``attention_mask`` follows the protocol, else None."""
    if attention_mask is None or attention_mask.dtype != torch.bool or attention_mask.dim() != 4:
        return None
    n = query.shape[2]
    if tuple(attention_mask.shape[1:]) != (1, n, n) or key.shape[2] < n:
        return None
    if attention_mask.shape[0] != 1 and attention_mask.stride(0) != 0:
        return None  # one tree per row: not this protocol
    return attention_mask[0, 0]


def _kernel_can_run(query: torch.Tensor, kwargs: dict) -> bool:
    if query.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    if kwargs.get("softcap") is not None or kwargs.get("sliding_window") is not None or kwargs.get("s_aux") is not None:
        return False
    if query.device.type == "cpu":
        return True
    return (query.device.type == "cuda" and WITH_CUDA and query.shape[-1] in _CUDA_HEAD_DIMS
            and query.shape[2] <= _CUDA_MAX_NODES)


def tree_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                           **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: query ``[B, Hq, N, D]``, key/value ``[B, Hkv, S, D]``;
    returns ``([B, N, Hq, D], None)``."""
    tree = tree_mask_of(attention_mask, query, key)
    if tree is None:
        return dense_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    n, key_len = query.shape[2], key.shape[2]
    prefix = key_len - n
    if dropout > 0.0 or not _kernel_can_run(query, kwargs):
        dense = window.dense_tree_mask(tree.to(query.device), key_len, kwargs.get("sliding_window"))
        return dense_attention(module, query, key, value, dense, dropout=dropout, scaling=scaling, **kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    # prefix_len stays on the CPU: the op checks it there, without waiting for the GPU.
    prefix_len = torch.full((query.shape[0],), prefix, dtype=torch.long)
    out = ops.tree_attention(query, key, value, prefix_len, tree.to(query.device), float(scaling))
    return out.transpose(1, 2).contiguous(), None


def dense_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    """sdpa, or for soft-capped logits (which sdpa refuses) the eager attention of the module's own
    modeling file, with the mask made additive (None, sdpa's implied causal mask, made explicit)."""
    if kwargs.get("softcap") is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise NotImplementedError(f"{type(module).__name__} soft-caps attention logits and its module has no "
                                  f"eager_attention_forward to apply them")
    q_len, k_len = query.shape[2], key.shape[2]
    if attention_mask is None:
        attention_mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
        attention_mask = attention_mask.view(1, 1, q_len, k_len)
    if attention_mask.dtype == torch.bool:
        additive = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device)
        attention_mask = additive.masked_fill_(~attention_mask, torch.finfo(query.dtype).min)
    out, _ = eager(module, query, key, value, attention_mask, **kwargs)
    return out, None


def register() -> None:
    """Registers the attention function and its mask function with transformers (idempotent)."""
    AttentionInterface.register(NAME, tree_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def use_tree_attention(model) -> bool:
    """Switches ``model`` (a transformers PreTrainedModel) to this attention; True when it took effect.

    Models that do not dispatch attention through ``AttentionInterface`` keep their implementation.
    """
    register()
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, KeyError, AttributeError):
        return False
    return getattr(model.config, "_attn_implementation", None) == NAME


register()
