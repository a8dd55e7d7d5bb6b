"""rotary.fast_apply against transformers' definition, bit for bit, and rotary.entered's swap and restore."""

import sys
import threading
import types

import pytest
import torch

from models import tiny_model
from token_recycling import rotary


def hf_apply(q, k, cos, sin, unsqueeze_dim=1):
    # transformers' apply_rotary_pos_emb, written out here as the independent reference
    def rotate_half(x):
        x1 = x[..., : x.shape[-1] // 2]
        x2 = x[..., x.shape[-1] // 2:]
        return torch.cat((-x2, x1), dim=-1)
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,kv,dim,n,batch", [(9, 3, 64, 1, 1), (4, 4, 16, 7, 2), (8, 2, 128, 33, 3)])
def test_fast_apply_is_bit_for_bit_transformers(dtype, heads, kv, dim, n, batch, gen):
    q = torch.randn(batch, n, heads, dim, generator=gen).to(dtype).transpose(1, 2)  # a transposed view, as HF's
    k = torch.randn(batch, n, kv, dim, generator=gen).to(dtype).transpose(1, 2)
    angle = torch.randn(batch, n, dim, generator=gen) * 50
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    want = hf_apply(q, k, cos, sin)
    got = rotary.fast_apply(q, k, cos, sin)
    for w, g in zip(want, got):
        assert w.shape == g.shape and torch.equal(w, g)
    # Every layer of a forward shares sin: the signed copy is made once, and a new sin gets its own.
    again = rotary.fast_apply(q, k, cos, sin)
    assert torch.equal(again[0], want[0])
    sin2 = (angle + 1).sin().to(dtype)
    assert torch.equal(rotary.fast_apply(q, k, cos, sin2)[1], hf_apply(q, k, cos, sin2)[1])


def test_other_layouts_fall_back_to_the_definition(gen):
    q = torch.randn(2, 5, 4, 8, generator=gen)  # [B, N, H, D]: unsqueeze_dim=2
    k = torch.randn(2, 5, 2, 8, generator=gen)
    cos, sin = torch.randn(2, 5, 8, generator=gen), torch.randn(2, 5, 8, generator=gen)
    for w, g in zip(hf_apply(q, k, cos, sin, 2), rotary.fast_apply(q, k, cos, sin, 2)):
        assert torch.equal(w, g)


def family(model):
    return sys.modules[type(model.model.layers[0].self_attn).__module__]


def test_entered_swaps_for_the_call_and_restores(gen):
    model = tiny_model("llama")
    mod = family(model)
    original = mod.apply_rotary_pos_emb
    with rotary.entered(model) as swapped:
        assert swapped and mod.apply_rotary_pos_emb is rotary.fast_apply
        with rotary.entered(model):  # nested (another recycler's call): restored once, by the outer
            pass
        assert mod.apply_rotary_pos_emb is rotary.fast_apply
    assert mod.apply_rotary_pos_emb is original
    with pytest.raises(RuntimeError), rotary.entered(model):
        raise RuntimeError("inside")
    assert mod.apply_rotary_pos_emb is original
    with rotary.entered(model, enabled=False) as swapped:
        assert not swapped and mod.apply_rotary_pos_emb is original


def test_concurrent_calls_restore_the_original_once_all_left():
    model = tiny_model("llama")
    mod = family(model)
    original = mod.apply_rotary_pos_emb
    inside, leave = threading.Barrier(3, timeout=60), threading.Event()

    def call():
        with rotary.entered(model):
            inside.wait()
            leave.wait()

    threads = [threading.Thread(target=call, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    inside.wait()
    assert mod.apply_rotary_pos_emb is rotary.fast_apply
    leave.set()
    for t in threads:
        t.join()
    assert mod.apply_rotary_pos_emb is original


def test_a_family_with_another_rotary_keeps_its_own(monkeypatch):
    model = tiny_model("llama")
    mod = family(model)

    def interleaved(q, k, cos, sin, unsqueeze_dim=1):  # pairs (0, 1), (2, 3), ...: not rotate_half
        def rot(x):
            return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * cos + rot(q) * sin, k * cos + rot(k) * sin

    monkeypatch.setattr(mod, "apply_rotary_pos_emb", interleaved)
    with rotary.entered(model) as swapped:
        assert not swapped and mod.apply_rotary_pos_emb is interleaved


def test_generate_is_unchanged_with_the_swap():
    # The whole model through fast_apply gives the same logits, bit for bit, as through its own rotary.
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (2, 11))
    with torch.no_grad():
        want = model(ids).logits
        with rotary.entered(model) as swapped:
            got = model(ids).logits
    assert swapped and torch.equal(want, got)
