"""The verification forward of a Llama-family decoder without transformers' per-module Python.

transformers' modeling code runs every layer through ``nn.Module`` calls, keyword-deprecation
wrappers, the attention-interface lookup and output dataclasses. A verification forward of a few
tokens on a small CPU does little arithmetic per layer, so that Python is a large share of it:
SmolLM2-135M in bf16 at 2 threads forwards one token in about 26.6 ms through the model's own
forward and in about 21.3 ms here (bench/RESULTS.md).

:func:`forward` runs the same tensor operations in the same order as transformers' Llama and Qwen2
code, calling the model's own parts: the embedding, the rotary embedding, the linear layers (so the
``skinny_linear`` routing applies), the norms' weights, the activation, the cache's ``update``, the
mask function and the attention function transformers would pick. Its logits are therefore the same
bit for bit. That is not taken on trust: :func:`usable` checks it once per model, against the model's
own forward on a small tree, before the decode loop uses it, and a model that differs (another
transformers version, a remote-code variant) keeps its own forward. Two steps run fused, each equal
bit for bit to the operations it replaces: the RMS norms (``ops.rms_norm``: the squares' sum by ATen's
own ``sum``, in ``mean``'s order, the rest in passes of its own, instead of six operations) and the
rotary embedding of q and k (``ops.rotary_embedding``: one pass instead of seven operations each).
Models of other classes, with sliding-window layers, with hooks (accelerate's offloading, user
hooks), in training mode, on a device other than the CPU, or under tensor parallel always keep their
own forward.
``TOKEN_RECYCLING_LEAN_FORWARD=off`` turns it off.
"""

from __future__ import annotations

import copy
import os
import sys
import weakref

import torch

from . import ops, skinny

# Causal LM classes whose forward this module repeats (their modeling code was read for it).
CLASSES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
ENV = "TOKEN_RECYCLING_LEAN_FORWARD"

_verdicts: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def eligible(model) -> bool:
    """Whether ``model`` is of a class this module repeats, in a setting it covers (no check run)."""
    if os.environ.get(ENV, "").lower() in ("off", "0", "false", "no"):
        return False
    config = model.config
    if CLASSES.get(type(model).__name__) != getattr(config, "model_type", None) or model.training:
        return False
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        return False
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        return False
    from . import distributed
    if distributed.active():
        return False
    params = list(model.parameters())
    if not params or any(p.device.type != "cpu" for p in params):
        return False
    from torch.nn.modules import module as torch_module
    if any(getattr(torch_module, name, None) for name in
           ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_forward_hooks_always_called")):
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook") for m in model.modules())


def usable(model, check) -> bool:
    """Whether the decode loop may forward ``model`` with :func:`forward`: it is :func:`eligible`, and
    ``check()`` (run once per model and attention implementation, then remembered) found the logits
    of both forwards equal."""
    if not eligible(model):
        return False
    key = (model.config._attn_implementation, next(model.parameters()).dtype)
    verdicts = _verdicts.setdefault(model, {})
    if key not in verdicts:
        verdicts[key] = bool(check())
    return verdicts[key]


def _modeling(model):
    return sys.modules[type(model.model).__module__]


FUSED = (torch.float32, torch.bfloat16)  # dtypes of ops.rms_norm and ops.rotary_embedding


def _rms_norm(norm: tuple[torch.Tensor, float], x: torch.Tensor) -> torch.Tensor:
    # LlamaRMSNorm.forward / Qwen2RMSNorm.forward of a norm's (weight, variance_epsilon); ops.rms_norm
    # where the dtypes allow (the same bits)
    weight, eps = norm
    dtype = x.dtype
    if dtype in FUSED and weight.dtype is dtype:
        return ops.rms_norm(x, weight, eps)
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # apply_rotary_pos_emb for one of q, k; ops.rotary_embedding where the dtypes allow (the same bits)
    if x.dtype in FUSED and cos.dtype is x.dtype and sin.dtype is x.dtype and x.shape[-1] % 2 == 0:
        return ops.rotary_embedding(x, cos, sin)
    return (x * cos) + (_rotate_half(x) * sin)


class Parts:
    """A model's parts as :func:`forward` reads them, looked up once (per generate() call in the decode
    loop): an ``nn.Module`` attribute lookup goes through ``Module.__getattr__``, and a forward of a
    30-layer model would make some 600 of them. The linear layers are kept as modules and their
    ``forward`` read at each call, so routing entered later (skinny.routed) still applies."""

    def __init__(self, model):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        from . import hf_attention

        self.model = model
        self.modeling = _modeling(model)
        base = model.model
        self.config = config = base.config
        self.embed, self.rotary, self.head = base.embed_tokens, base.rotary_emb, model.lm_head
        self.norm = _norm(base.norm)
        self.attention = ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation,
                                                              self.modeling.eager_attention_forward)
        self.tree_backend = self.attention is hf_attention.tree_attention_forward
        self.layers = []
        for layer in base.layers[: config.num_hidden_layers]:
            attn, mlp = layer.self_attn, layer.mlp
            # Qwen2's attention differs from Llama's only in its sliding_window keyword
            extra = {"sliding_window": attn.sliding_window} if hasattr(attn, "sliding_window") else {}
            act = mlp.act_fn  # a module without hooks (eligible): calling it is calling its forward
            # q, k and v, and gate and up, each in one skinny_linear call where the routing allows
            qkv = skinny.joint([attn.q_proj, attn.k_proj, attn.v_proj])
            gate_up = skinny.joint([mlp.gate_proj, mlp.up_proj])
            self.layers.append((_norm(layer.input_layernorm), attn, qkv, attn.o_proj, attn.head_dim, attn.layer_idx,
                                attn.scaling, extra, _norm(layer.post_attention_layernorm), gate_up, mlp.down_proj,
                                getattr(act, "forward", act)))


def _norm(norm) -> tuple[torch.Tensor, float]:
    return norm.weight, norm.variance_epsilon


def forward(model, input_ids: torch.Tensor, attention_mask, position_ids: torch.Tensor, cache,
            parts: Parts | None = None, **kwargs) -> torch.Tensor:
    """Logits ``[B, N, V]`` of ``model(input_ids=..., attention_mask=..., position_ids=...,
    use_cache=True, cache=cache, **kwargs)``, computed as that call computes them (see the module
    docstring); ``kwargs`` reach the attention function as they would there. ``parts``: ``Parts(model)``
    made earlier (made here when not given).

    With this project's tree attention as the model's attention, what that function would decide per
    layer (the path, the mask, the prefix tensor: hf_attention.attention_for) is decided at the first
    layer and again only where a layer's shapes or scale differ."""
    from . import hf_attention

    parts = parts if parts is not None and parts.model is model else Parts(model)
    embeds = parts.embed.forward(input_ids)
    mask = parts.modeling.create_causal_mask(config=parts.config, inputs_embeds=embeds, attention_mask=attention_mask,
                                             cache=cache, position_ids=position_ids)
    cos, sin = parts.rotary.forward(embeds, position_ids=position_ids)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    attention = parts.attention
    layer_kwargs = {"position_ids": position_ids, "use_cache": True, **kwargs}
    attend, decided_for = None, None
    hidden = embeds
    for norm1, attn, qkv, o_proj, head_dim, layer_idx, scaling, extra, norm2, gate_up, down, act in parts.layers:
        # LlamaDecoderLayer.forward, LlamaAttention.forward, LlamaMLP.forward
        residual = hidden
        x = _rms_norm(norm1, hidden)
        shape = (*x.shape[:-1], -1, head_dim)
        q, k, v = qkv(x)
        q = q.view(shape).transpose(1, 2)
        k = k.view(shape).transpose(1, 2)
        v = v.view(shape).transpose(1, 2)
        q = _rotary(q, cos, sin)
        k = _rotary(k, cos, sin)
        k, v = cache.update(k, v, layer_idx, kwargs=layer_kwargs)
        if parts.tree_backend:
            key = (q.shape, k.shape, scaling)
            if key != decided_for:
                attend = hf_attention.attention_for(q, k, mask, scaling, 0.0, {**extra, **layer_kwargs})
                decided_for = key
            out = attend(attn, q, k, v)
        else:
            out, _ = attention(attn, q, k, v, mask, dropout=0.0, scaling=scaling, **extra, **layer_kwargs)
        out = o_proj.forward(out.reshape(*x.shape[:-1], -1).contiguous())
        hidden = residual + out
        residual = hidden
        x = _rms_norm(norm2, hidden)
        gate, up = gate_up(x)
        hidden = residual + down.forward(act(gate) * up)
    hidden = _rms_norm(parts.norm, hidden)
    return parts.head.forward(hidden)


@torch.no_grad()
def agrees(model, forward_stock, forward_lean, vocab: int) -> bool:
    """The check :func:`usable` runs: a 6-token prompt prefilled by the model's own forward, then a
    3-node tree (a chain of two and a sibling) forwarded both ways on copies of that cache;
    ``forward_stock(tokens, depths, tree, prefix, cache)`` and ``forward_lean(...)`` return logits."""
    from . import cache as kv
    from . import hf_model

    device = next(model.parameters()).device
    cache = kv.new_cache(model)
    prompt = (torch.arange(6, device=device) * 7 + 3).remainder(vocab).view(1, -1)
    model(input_ids=prompt, use_cache=True, **{hf_model.cache_kwarg(model): cache})
    tokens = (torch.tensor([[11, 13, 17]], device=device)).remainder(vocab)
    depths = torch.tensor([[0, 1, 1]], device=device)
    tree = torch.tensor([[[True, False, False], [True, True, False], [True, False, True]]], device=device)
    stock = forward_stock(tokens, depths, tree, 6, copy.deepcopy(cache))
    lean = forward_lean(tokens, depths, tree, 6, copy.deepcopy(cache))
    return stock.shape == lean.shape and bool(torch.equal(stock, lean))
