"""ops.rms_norm and ops.rotary_embedding against transformers' own Llama RMS norm and rotary embedding
(the code they stand in for in lean_forward.py) and the oracle's operation-by-operation versions:
equal bit for bit in float32 and bfloat16, on random inputs and strided q/k views; bad input raises
naming the argument."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from token_recycling import ops
from token_recycling.testing import reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 576), (2, 7, 64), (5, 96), (3, 1, 1, 8), (1, 0, 32)])
def test_rms_norm_equals_transformers(dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    norm = LlamaRMSNorm(shape[-1], eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=g) * 2)
        for scale in (1e-3, 1.0, 300.0):
            x = (torch.randn(shape, generator=g) * scale).to(dtype)
            want = norm(x)
            got = ops.rms_norm(x, norm.weight, norm.variance_epsilon)
            assert got.dtype == want.dtype and got.shape == want.shape
            assert torch.equal(got, want), (dtype, shape, scale, (got.float() - want.float()).abs().max())
            assert torch.equal(reference.rms_norm(x, norm.weight, norm.variance_epsilon), want)


def test_rms_norm_takes_a_strided_x():
    x = torch.randn(4, 10, 80).bfloat16()[:, ::3, 8:72]
    w = torch.randn(64).bfloat16()
    norm = LlamaRMSNorm(64, eps=1e-6).bfloat16()
    with torch.no_grad():
        norm.weight.copy_(w)
        assert torch.equal(ops.rms_norm(x, w, 1e-6), norm(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,tokens,q_heads,kv_heads,dim", [(1, 1, 9, 3, 64), (2, 5, 4, 2, 32), (1, 7, 3, 1, 2)])
def test_rotary_embedding_equals_transformers(dtype, batch, tokens, q_heads, kv_heads, dim):
    g = torch.Generator().manual_seed(batch * 100 + tokens * 10 + dim)
    # q and k as the attention layer makes them: view(batch, tokens, heads, dim).transpose(1, 2)
    q = torch.randn(batch, tokens, q_heads * dim, generator=g).to(dtype).view(batch, tokens, q_heads, dim).transpose(1, 2)
    k = torch.randn(batch, tokens, kv_heads * dim, generator=g).to(dtype).view(batch, tokens, kv_heads, dim).transpose(1, 2)
    angles = torch.rand(batch, tokens, dim // 2, generator=g) * 50
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)  # unsqueezes cos/sin at dim 1
    got_q = ops.rotary_embedding(q, cos.unsqueeze(1), sin.unsqueeze(1))
    got_k = ops.rotary_embedding(k, cos.unsqueeze(1), sin.unsqueeze(1))
    assert got_q.is_contiguous() and got_q.dtype == dtype
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    assert torch.equal(reference.rotary_embedding(q, cos.unsqueeze(1), sin.unsqueeze(1)), want_q)


def test_bad_input_names_the_argument():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="weight"):
        ops.rms_norm(x, torch.randn(7), 1e-5)
    with pytest.raises((ValueError, TypeError, RuntimeError), match="weight"):
        ops.rms_norm(x, torch.randn(8).bfloat16(), 1e-5)
    with pytest.raises((ValueError, TypeError, RuntimeError), match="x"):
        ops.rms_norm(x.long(), torch.randn(8), 1e-5)
    q = torch.randn(1, 2, 3, 8)
    cos = torch.randn(1, 1, 3, 8)
    with pytest.raises(ValueError, match="sin"):
        ops.rotary_embedding(q, cos, torch.randn(1, 1, 4, 8))
    with pytest.raises(ValueError, match="cos"):
        ops.rotary_embedding(q, torch.randn(1, 2, 3, 8), cos)
    with pytest.raises(ValueError, match="even"):
        ops.rotary_embedding(torch.randn(1, 2, 3, 7), torch.randn(1, 1, 3, 7), torch.randn(1, 1, 3, 7))
    with pytest.raises(ValueError, match="x"):
        ops.rotary_embedding(torch.randn(2, 3, 8), cos, cos)


def test_opcheck():
    x = torch.randn(3, 16)
    torch.library.opcheck(torch.ops.token_recycling.rms_norm, (x, torch.randn(16), 1e-5))
    torch.library.opcheck(torch.ops.token_recycling.rms_norm, (torch.randn(16, 3).T, torch.randn(16), 1e-5))
    q = torch.randn(1, 2, 3, 8)
    cs = torch.randn(1, 1, 3, 8)
    torch.library.opcheck(torch.ops.token_recycling.rotary_embedding, (q, cs, cs))
