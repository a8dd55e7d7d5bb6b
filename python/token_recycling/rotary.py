"""The rotary position embedding of a decode-step forward in fewer torch ops, bit for bit the same.

transformers applies rotary embeddings per layer as ``q * cos + rotate_half(q) * sin`` for q and
then for k, where ``rotate_half(x) = cat(-x2, x1)``: seven small ops per tensor. On a CPU forward of
a few tokens each op costs more to dispatch than to compute, and those small ops, not the linear
layers, are what does not get faster with more threads (bench/RESULTS.md, "Threads: the profile").
The same result in five ops for q and k together:

    qk = cat(q, k) over heads;  out = qk * cos + roll(qk, D/2) * sin_signed

``roll`` by half the head dimension gives ``cat(x2, x1)``, and ``sin_signed`` is sin with its first
half negated (made once per forward and shared by every layer), so ``x2 * -s1 == -x2 * s1``
exactly and every product and sum is the one transformers computes, rounded the same way in any
dtype.

:func:`entered` swaps a model family's ``apply_rotary_pos_emb`` for the length of one generate() call
(counted, so nested and concurrent calls restore it once, last), and only after checking on random
inputs that the model's own function and this one agree bit for bit: a family whose rotary differs
(partial rotary, interleaved pairs, other signatures) keeps its own.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import weakref

import torch

NAME = "apply_rotary_pos_emb"
_lock = threading.Lock()
_entered: dict[str, tuple[int, object]] = {}  # module name -> (calls inside, the function it had)
_agrees: dict[tuple, bool] = {}  # (function, dtype, heads, head_dim) -> same bits as fast_apply
_signed_cache: list = [None, None]  # [weakref to the last sin, its signed copy]


def _signed(sin: torch.Tensor) -> torch.Tensor:
    """sin with the first half of its last dimension negated (exact), cached for the forward's layers."""
    ref, signed = _signed_cache
    if ref is not None and ref() is sin:
        return signed
    half = sin.shape[-1] // 2
    sign = torch.ones(sin.shape[-1], dtype=sin.dtype, device=sin.device)
    sign[:half] = -1
    signed = sin * sign
    _signed_cache[:] = [weakref.ref(sin), signed]
    return signed


def fast_apply(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1):
    """transformers' ``apply_rotary_pos_emb`` for q [B, Hq, N, D] and k [B, Hk, N, D] (unsqueeze_dim 1)."""
    if unsqueeze_dim != 1 or q.dim() != 4 or k.dim() != 4 or q.shape[-1] % 2 or q.shape[-1] != k.shape[-1] \
            or q.dtype != k.dtype or cos.shape[-1] != q.shape[-1]:
        return _reference(q, k, cos, sin, unsqueeze_dim)
    heads = q.shape[1]
    qk = torch.cat((q, k), dim=1)
    out = qk * cos.unsqueeze(1) + torch.roll(qk, q.shape[-1] // 2, -1) * _signed(sin).unsqueeze(1)
    return out[:, :heads], out[:, heads:]


def _reference(q, k, cos, sin, unsqueeze_dim=1):
    """transformers' definition (what every family that uses rotate_half computes)."""
    def rotate_half(x):
        return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def _family(model):
    """The module defining the model's attention, where its layers look ``apply_rotary_pos_emb`` up."""
    for module in model.modules():
        name = type(module).__module__
        mod = sys.modules.get(name)
        if type(module).__name__.endswith("Attention") and mod is not None and callable(getattr(mod, NAME, None)):
            return mod
    return None


def _check(fn, model) -> bool:
    """Whether ``fn`` and :func:`fast_apply` give the same bits for this model's shapes and dtype."""
    c = model.config
    heads = getattr(c, "num_attention_heads", None)
    kv = getattr(c, "num_key_value_heads", None) or heads
    dim = getattr(c, "head_dim", None) or (c.hidden_size // heads if heads else None)
    dtype = next(model.parameters()).dtype
    key = (fn, dtype, heads, kv, dim)
    if key not in _agrees:
        ok = False
        try:
            if heads and dim:  # (a hub-kernel wrapper hides the signature: the call itself is the test)
                g = torch.Generator().manual_seed(0)
                q = torch.randn(2, heads, 5, dim, generator=g).to(dtype)
                k = torch.randn(2, kv, 5, dim, generator=g).to(dtype)
                angle = torch.randn(2, 5, dim, generator=g)
                cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
                with torch.no_grad():
                    want = fn(q.transpose(1, 2).contiguous().transpose(1, 2), k, cos, sin)
                    got = fast_apply(q, k, cos, sin)
                ok = all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(want, got))
        except Exception:  # a function with another contract: keep it
            ok = False
        _agrees[key] = ok
    return _agrees[key]


@contextlib.contextmanager
def entered(model, enabled: bool = True):
    """Inside: the model family's ``apply_rotary_pos_emb`` is :func:`fast_apply` where the two agree
    bit for bit on this model's shapes (else nothing changes). Restored when the last caller leaves."""
    mod = _family(model) if enabled else None
    swapped = False
    if mod is not None:
        with _lock:
            count, original = _entered.get(mod.__name__, (0, getattr(mod, NAME)))
            if count or (getattr(mod, NAME) is not fast_apply and _check(getattr(mod, NAME), model)):
                if not count:
                    setattr(mod, NAME, fast_apply)
                _entered[mod.__name__] = (count + 1, original)
                swapped = True
    try:
        yield swapped
    finally:
        if swapped:
            with _lock:
                count, original = _entered[mod.__name__]
                if count == 1:
                    setattr(mod, NAME, original)
                    del _entered[mod.__name__]
                else:
                    _entered[mod.__name__] = (count - 1, original)
