"""Tree attention as a transformers attention backend, registered as ``"token_recycling"``.

Protocol with the decode loop. In a verification forward the loop passes ``attention_mask`` as a
4-D bool tensor ``[1, 1, N, N]`` (or ``[B, 1, N, N]`` expanded from one, stride 0 along the batch):
the tree mask, ``mask[i, j]`` = node i may see node j; and the keyword argument
``tree_prefix_len`` (``PREFIX_KWARG``): the prefix length P, an int or a LongTensor ``[B]`` (on the
CPU or on the model's device; a device tensor costs no host sync). transformers hands a 4-D mask and
extra forward keywords to the attention function untouched. The keys and values that function
receives are the cache ``[B, Hkv, S, D]`` with the prefix at ``[0, P)`` and the N tree nodes at
``[P, P + N)``; anything after them (the unused tail of a static cache) is never attended to. A tree
mask without ``tree_prefix_len`` is an error, never a guess (``S - N`` is wrong for a static cache).
Every other call (prefill, plain decoding, padding masks, dense tree masks) goes to transformers' sdpa
function, and mask creation for this implementation is sdpa's; except that a masked call of several
query rows on the CPU with grouped-query heads runs torch's sdpa with ``enable_gqa`` (``gqa_sdpa``):
transformers would copy K/V once per query head (repeat_kv) because a mask is given, which costs a
verification forward of SmolLM2-135M about 3 ms. The decode loop's CPU default sends the bare tree
mask to our kernel where its vectorized CPU path runs (``cpu_kernel_vectorized``: "tree-kernel"),
else the dense mask through ``gqa_sdpa`` ("dense-gqa").

Batches of rows of different lengths (step.py, cache.py): ``attention_mask`` is ``[B, 1, N, N]`` with one
tree per row, ``tree_prefix_len`` a LongTensor ``[B]`` (row b's cached tokens, at ``[0, P_b)``) and
``tree_start`` (``START_KWARG``) the int slot where every row's tree block begins (the cache length
before the forward, ``>= max P_b``); keys between a row's prefix and ``tree_start`` are never
attended. A per-row mask without ``tree_prefix_len`` is not a tree (a padded prefill's mask).

Sliding-window and soft-capped attention are not handled by the tree kernel: such calls take the
dense path with the equivalent mask (window.dense_tree_mask: the window counted from each node's own
position). The dense path is sdpa, or the model's own eager attention for soft-capped logits (Gemma 2),
which sdpa cannot apply.

Two paths for a tree forward (``choose_path``):
  single    ops.tree_attention: one kernel over prefix and tree block.
  two-part  the prefix (every node sees all of it: no mask) through a FlashAttention-class kernel
            that returns the log-sum-exp, GQA folded into query rows (q ``[B, Hkv, G*N, D]`` against
            k/v ``[B, Hkv, P, D]``: no repeat_kv); the N x N tree block through ops.tree_attention_lse;
            the two merged by ops.merge_attention_states. On CUDA the prefix kernel is torch's flash
            SDPA (fp16/bf16); on the CPU, torch's CPU flash SDPA.
Which path (``choose_path``, the rule ``path_rule``): two-part when the prefix is a host int of at
least the rule's minimum prefix, every op it needs exists on the device, and (CUDA) the dtype is
fp16/bf16 (torch's flash kernel takes 16-bit inputs only); the single kernel otherwise. The minimum
prefix (``two_part_min_prefix``), first match wins:
  1. env ``TOKEN_RECYCLING_TWO_PART_MIN_PREFIX`` (``TWO_PART_MIN_PREFIX``): one threshold for every
     device, heads and tree size (0 or 1: always two-part where it can run; a huge value: never);
  2. a measured table (``path_table``): JSON from bench/attention_vs_sdpa.py ``--rule-json`` on a GPU,
     read from env ``TOKEN_RECYCLING_ATTENTION_TABLE`` (a path) or ``attention_paths.json`` beside this
     file. For its device type it gives, per GQA group size (query heads per K/V head) and tree size,
     the smallest measured prefix from which two-part won at every longer prefix measured (or never);
  3. the defaults, until a GPU has measured both: CUDA ``DEFAULT_CUDA_MIN_PREFIX`` (4096: above a few
     thousand keys the prefix is the work, and two-part runs it through FlashAttention's own kernel,
     where the single kernel has no cp.async pipeline and keeps its accumulator in shared memory; an
     estimate from reading the kernels, not a measurement); the CPU never (the single kernel stays
     the CPU's path, as it was before the rule).
A prefix on the device (a LongTensor: the CUDA-graph step, graph_step.py) always takes the single
kernel: reading its value would wait for the GPU, and the prefix part needs it on the host to slice the
keys (a captured graph would also freeze one slice). The single kernel reads it on the device, and its
split-K plan, sized for the static cache's capacity, splits only the live prefix (tree_attention.cuh).
Per-row trees and a common ``tree_start`` (batched decoding) take the single kernel too.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from pathlib import Path
from typing import Callable

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from . import ops, window
from ._extension import WITH_CUDA

NAME = "token_recycling"
PREFIX_KWARG = "tree_prefix_len"
START_KWARG = "tree_start"

# A set env threshold overrides the table and the defaults (None: not set).
TWO_PART_MIN_PREFIX: int | None = (int(os.environ["TOKEN_RECYCLING_TWO_PART_MIN_PREFIX"])
                                   if os.environ.get("TOKEN_RECYCLING_TWO_PART_MIN_PREFIX") else None)
DEFAULT_CUDA_MIN_PREFIX = 4096
NEVER = 2**62
TABLE_ENV = "TOKEN_RECYCLING_ATTENTION_TABLE"
TABLE_FILE = Path(__file__).with_name("attention_paths.json")
_CUDA_HEAD_DIMS = (64, 80, 96, 128, 256)
_CUDA_MAX_NODES = 256


def tree_mask_of(attention_mask: torch.Tensor | None, query: torch.Tensor,
                 key: torch.Tensor, per_row: bool = False) -> torch.Tensor | None:
    """The ``[N, N]`` tree mask when ``attention_mask`` follows the protocol, or ``[B, N, N]`` for one
    tree per row when ``per_row`` (a prefix length came with it), else None."""
    if attention_mask is None or attention_mask.dtype != torch.bool or attention_mask.dim() != 4:
        return None
    n = query.shape[2]
    if tuple(attention_mask.shape[1:]) != (1, n, n) or key.shape[2] < n:
        return None
    if attention_mask.shape[0] != 1 and attention_mask.stride(0) != 0:
        return attention_mask[:, 0] if per_row else None  # one tree per row (step.py), else a padding mask
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
    return attention_for(query, key, attention_mask, scaling, dropout, kwargs)(module, query, key, value), None


def attention_for(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                  scaling: float | None = None, dropout: float = 0.0, kwargs: dict | None = None
                  ) -> Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """What :func:`tree_attention_forward` runs for a query and key of these shapes and these
    arguments, as ``f(module, query, key, value) -> [B, N, Hq, D]`` with the rest decided once: the
    path, the mask on the device, the prefix tensor, the scale. A forward whose layers share the
    shapes and arguments (lean_forward.py) decides once and calls ``f`` in every layer."""
    kwargs = dict(kwargs or {})
    prefix = kwargs.pop(PREFIX_KWARG, None)
    start = kwargs.pop(START_KWARG, None)
    tree = tree_mask_of(attention_mask, query, key, per_row=prefix is not None)
    if tree is not None and prefix is None and key.shape[2] == query.shape[2]:
        tree = None  # N keys only (a padded one-row prefill): the square mask is the dense one, either way
    if tree is None:
        return _dense_call(attention_mask, dropout, scaling, kwargs)
    batch, n, key_len = query.shape[0], query.shape[2], key.shape[2]
    window_size = kwargs.get("sliding_window")
    if window_size is not None:
        if tree.dim() == 3 or start is not None:
            raise NotImplementedError("sliding-window layers take one tree at the end of the cache (batch size 1)")
        # A sliding-window layer (window.WindowLayer) holds the window's end with the tree last, so its own
        # prefix is key_len - N (not the model's); the dense path applies the window along each node's path.
        dense = window.dense_tree_mask(tree.to(query.device), key_len, window_size)
        return _dense_call(dense, dropout, scaling, kwargs)
    prefix_len = prefix_tensor(prefix, batch, n, key_len, query.device)
    start = tree_start_of(start, n, key_len)
    tree = tree.to(query.device)
    if dropout > 0.0 or not _kernel_can_run(query, kwargs):
        return _dense_call(dense_mask(tree, prefix_len, key_len, start), dropout, scaling, kwargs)
    scale = float(query.shape[-1] ** -0.5 if scaling is None else scaling)
    if start < 0 and tree.dim() == 2 and choose_path(prefix, query, key) == "two-part":
        return lambda module, q, k, v: two_part_attention(q, k, v, prefix, tree, scale).transpose(1, 2).contiguous()
    return lambda module, q, k, v: ops.tree_attention(q, k, v, prefix_len, tree, scale,
                                                      start).transpose(1, 2).contiguous()


def _dense_call(mask: torch.Tensor | None, dropout: float, scaling: float | None, kwargs: dict):
    return lambda module, q, k, v: dense_attention(module, q, k, v, mask, dropout=dropout, scaling=scaling,
                                                   **kwargs)[0]


def dense_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    """sdpa, or for soft-capped logits (which sdpa refuses) the eager attention of the module's own
    modeling file, with the mask made additive (None, sdpa's implied causal mask, made explicit).

    A masked multi-row call on the CPU folds grouped-query heads into sdpa (``gqa_sdpa``) where
    transformers would copy K/V once per query head (repeat_kv) because a mask is given."""
    if kwargs.get("softcap") is None:
        if gqa_folds(query, key, attention_mask, kwargs):
            return gqa_sdpa(query, key, value, attention_mask, kwargs.get("scaling"), kwargs.get("dropout", 0.0))
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


def gqa_folds(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, kwargs: dict) -> bool:
    """Whether ``gqa_sdpa`` takes this call: a mask, several query rows (transformers packs one-row
    queries itself), more query heads than K/V heads, on the CPU (CUDA's sdpa falls back to its math
    kernel for a masked GQA call), and no extra term sdpa would have to add (position bias, sinks)."""
    return (attention_mask is not None and query.device.type == "cpu" and query.shape[2] > 1
            and query.shape[1] != key.shape[1] and query.shape[1] % key.shape[1] == 0
            and query.shape[-1] == key.shape[-1] and attention_mask.dim() == 4
            and kwargs.get("position_bias") is None and kwargs.get("s_aux") is None
            and not kwargs.get("output_attentions", False))


def gqa_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor,
             scaling: float | None, dropout: float = 0.0) -> tuple[torch.Tensor, None]:
    """torch's sdpa with ``enable_gqa``: query ``[B, Hq, N, D]`` over key/value ``[B, Hkv, S, D]``,
    no K/V copy; a 4-D bool or additive mask. Returns ``([B, N, Hq, D], None)``."""
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           dropout_p=dropout, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def _has_kernel(op: str, device: torch.device) -> bool:
    key = "CPU" if device.type == "cpu" else device.type.upper()
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"token_recycling::{op}", key)


@functools.cache
def path_table(path: str | None = None) -> dict | None:
    """The measured table (module doc), or None where there is none. Format::

        {"device_type": "cuda", "device": "NVIDIA H100 80GB HBM3", "dtype": "bfloat16",
         "rules": [{"group": 4, "max_nodes": 16, "two_part_min_prefix": 2048},
                   {"group": 1, "max_nodes": 128, "two_part_min_prefix": null}, ...]}

    ``two_part_min_prefix`` null: the single kernel at every prefix measured. A file that cannot be read
    or parsed is an error, not a silent default."""
    path = path or os.environ.get(TABLE_ENV) or (str(TABLE_FILE) if TABLE_FILE.is_file() else None)
    if path is None:
        return None
    with open(path) as f:
        table = json.load(f)
    rules = table.get("rules")
    if not isinstance(rules, list) or not all({"group", "max_nodes", "two_part_min_prefix"} <= set(r) for r in rules):
        raise ValueError(f"{path}: an attention path table needs rules of group, max_nodes and two_part_min_prefix")
    return table


def two_part_min_prefix(q_heads: int, kv_heads: int, nodes: int, device_type: str, table: dict | None = None) -> int:
    """The smallest prefix that takes the two-part path for this shape and device (module doc);
    ``NEVER`` when none does. ``table``: the measured table (default: ``path_table()``)."""
    if TWO_PART_MIN_PREFIX is not None:
        return max(TWO_PART_MIN_PREFIX, 1)
    table = path_table() if table is None else table
    if table is not None and table.get("device_type", "cuda") == device_type and table["rules"]:
        group = q_heads // max(kv_heads, 1)
        groups = sorted({r["group"] for r in table["rules"]}, key=lambda g: (abs(g - group), g))
        rows = sorted((r for r in table["rules"] if r["group"] == groups[0]), key=lambda r: r["max_nodes"])
        # The smallest measured tree size that holds this tree, else the largest measured.
        row = next((r for r in rows if nodes <= r["max_nodes"]), rows[-1])
        found = row["two_part_min_prefix"]
        return NEVER if found is None else max(int(found), 1)
    if device_type == "cuda":
        return DEFAULT_CUDA_MIN_PREFIX
    return NEVER


def path_rule(prefix: int, q_heads: int, kv_heads: int, nodes: int, device_type: str, dtype: torch.dtype,
              table: dict | None = None) -> str:
    """"two-part" or "single" for a host prefix of ``prefix`` keys, by the numbers alone (the ops'
    availability is ``choose_path``'s to check)."""
    if device_type == "cuda" and dtype not in (torch.float16, torch.bfloat16):
        return "single"  # torch's flash kernel takes 16-bit inputs only
    if prefix < two_part_min_prefix(q_heads, kv_heads, nodes, device_type, table):
        return "single"
    return "two-part"


def choose_path(prefix, query: torch.Tensor, key: torch.Tensor | None = None) -> str:
    """"two-part" or "single" (see the module doc) for query ``[B, Hq, N, D]`` over key ``[B, Hkv, S, D]``
    (``key`` None: as many K/V heads as query heads). A device-tensor prefix: "single", with no sync."""
    if isinstance(prefix, torch.Tensor):
        return "single"
    kv_heads = query.shape[1] if key is None else key.shape[1]
    if path_rule(prefix, query.shape[1], kv_heads, query.shape[2], query.device.type, query.dtype) != "two-part":
        return "single"
    if not (_has_kernel("tree_attention_lse", query.device) and _has_kernel("merge_attention_states", query.device)):
        return "single"
    return "two-part"


def prefix_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """Unmasked attention with its log-sum-exp: q [B, H, L, D] over k, v [B, H, P, D] (P >= 1) ->
    (out [B, H, L, D], lse [B, H, L] float32), through torch's flash SDPA kernels."""
    if q.device.type == "cuda":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
    return out, lse.float()


def two_part_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, prefix: int,
                       tree: torch.Tensor, scale: float) -> torch.Tensor:
    """Tree attention as prefix (flash, LSE) + tree block (ours, LSE), merged: [B, Hq, N, D]."""
    batch, hq, n, d = query.shape
    hkv = key.shape[1]
    group = hq // hkv
    # Query head h = hk * group + g reads kv head hk: fold the group into query rows.
    folded = query.reshape(batch, hkv, group * n, d)
    out_p, lse_p = prefix_attention_lse(folded, key[:, :, :prefix], value[:, :, :prefix], scale)
    zero = torch.zeros(batch, dtype=torch.long)
    out_t, lse_t = ops.tree_attention_lse(query, key[:, :, prefix:prefix + n], value[:, :, prefix:prefix + n],
                                          zero, tree, scale)
    out, _ = ops.merge_attention_states(out_p.reshape(batch, hq, n, d), lse_p.reshape(batch, hq, n), out_t, lse_t)
    return out


def prefix_tensor(prefix, batch: int, n: int, key_len: int, device: torch.device) -> torch.Tensor:
    """``tree_prefix_len`` as the op's LongTensor [B]. An int is checked here and stays on the CPU (the
    op checks it there, without waiting for the GPU); a tensor is passed as given (the op checks it)."""
    if prefix is None:
        raise ValueError(f"a tree-attention forward (a bool [1, 1, N, N] attention_mask) needs the keyword "
                         f"argument {PREFIX_KWARG}= (the prefix length); the keys ({key_len}) may hold more than "
                         f"prefix + N, e.g. a static cache's whole buffer. If it was passed, this model does not "
                         f"forward keyword arguments to its attention function")
    if isinstance(prefix, torch.Tensor):
        if prefix.dtype != torch.long or prefix.dim() > 1 or prefix.numel() not in (1, batch):
            raise ValueError(f"{PREFIX_KWARG} must be an int or a LongTensor [batch] or [1], got "
                             f"{prefix.dtype} {tuple(prefix.shape)}")
        if prefix.device.type not in ("cpu", device.type):
            raise ValueError(f"{PREFIX_KWARG} must be on the CPU or on {device}, got {prefix.device}")
        return prefix.reshape(-1).expand(batch)
    if isinstance(prefix, bool) or not isinstance(prefix, int):
        raise TypeError(f"{PREFIX_KWARG} must be an int or a LongTensor, got {type(prefix).__name__}")
    if prefix < 0 or prefix + n > key_len:
        raise ValueError(f"{PREFIX_KWARG}={prefix} does not fit: the {n} tree nodes must lie within the "
                         f"{key_len} keys")
    return torch.full((batch,), prefix, dtype=torch.long)


def tree_start_of(start, n: int, key_len: int) -> int:
    """``tree_start`` as the op's int (-1: each row's tree right after its prefix)."""
    if start is None:
        return -1
    if isinstance(start, bool) or not isinstance(start, int):
        raise TypeError(f"{START_KWARG} must be an int, got {type(start).__name__}")
    if start < 0 or start + n > key_len:
        raise ValueError(f"{START_KWARG}={start} does not fit: the {n} tree nodes must lie within the {key_len} keys")
    return start


def dense_mask(tree: torch.Tensor, prefix_len: torch.Tensor, key_len: int, start: int = -1) -> torch.Tensor:
    """The equivalent dense bool mask [B, 1, N, key_len], built on the device without a host sync:
    key j is visible to node i of row b when j < P_b, or T <= j < T + N and tree[(b,) i, j - T], with
    T = ``start`` (or P_b when start < 0). ``tree``: [N, N] or [B, N, N]."""
    device = tree.device
    n = tree.shape[-1]
    keys = torch.arange(key_len, device=device)
    prefix = prefix_len.to(device).view(-1, 1)
    rel = keys - (prefix if start < 0 else torch.full_like(prefix, start))  # [B, key_len]
    in_tree = (rel >= 0) & (rel < n)
    index = rel.clamp(0, n - 1)
    if tree.dim() == 3:
        from_tree = torch.gather(tree, 2, index[:, None, :].expand(-1, n, -1))  # [B, N, key_len]
    else:
        from_tree = tree[:, index].permute(1, 0, 2)
    from_tree = from_tree & in_tree[:, None, :]
    return ((keys < prefix)[:, None, :] | from_tree)[:, None]


def register() -> None:
    """Registers the attention function and its mask function with transformers (idempotent)."""
    AttentionInterface.register(NAME, tree_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def use_tree_attention(model) -> bool:
    """Switches ``model`` (a transformers PreTrainedModel) to this attention; True when it took effect.

    Models that do not dispatch attention through ``AttentionInterface`` keep their implementation.
    The switch lasts until switched back: the decode step uses :func:`entered` instead.
    """
    register()
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, KeyError, AttributeError):
        return False
    return getattr(model.config, "_attn_implementation", None) == NAME


def can_use(model) -> bool:
    """Whether ``model`` can run this attention (it dispatches through ``AttentionInterface``). The
    model is left with the implementation it had."""
    before = getattr(model.config, "_attn_implementation", None)
    if before == NAME:
        return True
    try:
        return use_tree_attention(model)
    finally:
        _switch(model, before)


def _switch(model, implementation) -> None:
    if implementation is not None and getattr(model.config, "_attn_implementation", None) != implementation:
        model.set_attn_implementation(implementation)


@contextlib.contextmanager
def entered(model, enabled: bool = True):
    """Within the block ``model`` runs this attention (every call but tree forwards still goes to sdpa);
    on exit it has the implementation it had before, also after an exception. ``enabled`` False: a
    no-op."""
    before = getattr(model.config, "_attn_implementation", None)
    if enabled and before != NAME and not use_tree_attention(model):
        _switch(model, before)
        raise ValueError(f"{type(model).__name__} does not dispatch attention through transformers' "
                         f"AttentionInterface")
    try:
        yield model
    finally:
        if enabled:
            _switch(model, before)


def cpu_kernel_vectorized(model) -> bool:
    """Whether ops.tree_attention takes its vectorized CPU path for ``model``'s attention: float32 or
    bf16, head_dim a multiple of 8, and a CPU with AVX2/FMA (the check skinny_linear's path makes
    too). The portable path is the slow reference, so the CPU default uses the kernel only then."""
    if not ops.skinny_linear_vectorized():
        return False
    param = next(model.parameters(), None)
    if param is None or param.device.type != "cpu" or param.dtype not in (torch.float32, torch.bfloat16):
        return False
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head_dim = getattr(config, "head_dim", None)
    if head_dim is None:
        heads = getattr(config, "num_attention_heads", 0)
        head_dim = config.hidden_size // heads if heads else 0
    return head_dim > 0 and head_dim % 8 == 0


@contextlib.contextmanager
def transformers_sdpa(model):
    """Within the block a model switched to this backend by its user runs transformers' own sdpa
    attention (a recycler switches a model only for the length of its own calls); e.g. for HF
    baselines in a benchmark, which must run as users have them. Other models are left as they are."""
    switched = getattr(model.config, "_attn_implementation", None) == NAME
    if switched:
        model.set_attn_implementation("sdpa")
    try:
        yield model
    finally:
        if switched:
            model.set_attn_implementation(NAME)


register()
