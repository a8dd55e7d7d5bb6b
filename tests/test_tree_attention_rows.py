"""tree_attention / tree_attention_lse with rows of different lengths (a batch, step.py): one tree per row
([B, N, N] masks) and the tree block at one common slot (tree_start) after per-row prefixes."""

import pytest
import torch
from conftest import ancestor_mask, random_tree

from token_recycling import ops
from token_recycling.testing import reference
from token_recycling.hf_attention import dense_mask


def _inputs(gen, batch, hq, hkv, n, d, longest):
    start = longest + int(torch.randint(0, 3, (1,), generator=gen))  # the common tree slot, >= every prefix
    seq = start + n + int(torch.randint(0, 3, (1,), generator=gen))  # keys may run past the tree
    q = torch.randn(batch, hq, n, d, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, hkv, seq, d, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, hkv, seq, d, generator=gen, dtype=torch.float64)
    prefix = torch.randint(0, longest + 1, (batch,), generator=gen)
    masks = torch.stack([ancestor_mask(random_tree(n, gen, chain_bias=0.5)[0]) for _ in range(batch)])
    return q, k, v, prefix, masks, start


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch,hq,hkv,n,d,longest", [(1, 4, 4, 1, 16, 0), (3, 8, 2, 17, 64, 40), (5, 6, 3, 9, 32, 70)])
@pytest.mark.parametrize("lse", [False, True])
def test_rows_error_bound(gen, dtype, batch, hq, hkv, n, d, longest, lse):
    q64, k64, v64, prefix, masks, start = _inputs(gen, batch, hq, hkv, n, d, longest)
    scale = d ** -0.5
    q, k, v = (t.to(dtype) for t in (q64, k64, v64))
    exact = reference.tree_attention(q.double(), k.double(), v.double(), prefix, masks, scale, start)
    if lse:
        ours, our_lse = ops.tree_attention_lse(q, k, v, prefix, masks, scale, start)
        _, ref_lse = reference.tree_attention_lse(q.double(), k.double(), v.double(), prefix, masks, scale, start)
        assert (our_lse.double() - ref_lse).abs().max().item() < 1e-3
    else:
        ours = ops.tree_attention(q, k, v, prefix, masks, scale, start)
    torch_same = reference.tree_attention(q, k, v, prefix, masks, scale, start)
    our_err = (ours.double() - exact).abs().max().item()
    torch_err = (torch_same.double() - exact).abs().max().item()
    assert ours.dtype == dtype and ours.shape == q.shape
    assert our_err <= 2 * torch_err + 1e-6, (our_err, torch_err)


def test_rows_equal_one_row_at_a_time(gen):
    """Row b of a batched call == the same row alone with its tree right after its prefix (tree_start
    -1), once the keys between its prefix and tree_start are cut out."""
    q, k, v, prefix, masks, start = _inputs(gen, 4, 4, 2, 7, 16, 30)
    q, k, v = q.float(), k.float(), v.float()
    out = ops.tree_attention(q, k, v, prefix, masks, 0.25, start)
    for b in range(4):
        p = int(prefix[b])
        kb = torch.cat([k[b:b + 1, :, :p], k[b:b + 1, :, start:start + 7]], 2)
        vb = torch.cat([v[b:b + 1, :, :p], v[b:b + 1, :, start:start + 7]], 2)
        alone = ops.tree_attention(q[b:b + 1], kb, vb, prefix[b:b + 1], masks[b], 0.25)
        assert torch.allclose(out[b:b + 1], alone, atol=1e-5), b


def test_shared_mask_with_tree_start_and_default_stay_as_before(gen):
    q, k, v, prefix, masks, start = _inputs(gen, 2, 4, 4, 5, 8, 12)
    q, k, v = q.float(), k.float(), v.float()
    same = masks[0]
    assert torch.allclose(ops.tree_attention(q, k, v, prefix, same, 0.3, start),
                          ops.tree_attention(q, k, v, prefix, same.expand(2, 5, 5).contiguous(), 0.3, start))
    assert torch.equal(ops.tree_attention(q, k, v, prefix, same, 0.3),
                       ops.tree_attention(q, k, v, prefix, same, 0.3, -1))


def test_dense_mask_matches_the_reference_visibility(gen):
    _, k, _, prefix, masks, start = _inputs(gen, 3, 2, 2, 6, 8, 20)
    dense = dense_mask(masks, prefix, k.shape[2], start)
    for b in range(3):
        assert torch.equal(dense[b, 0], reference.tree_visible(prefix, masks, b, 6, k.shape[2], start))


def test_opcheck(gen):
    q, k, v, prefix, masks, start = _inputs(gen, 2, 4, 2, 9, 8, 6)
    q, k, v = q.float(), k.float(), v.float()
    torch.library.opcheck(torch.ops.token_recycling.tree_attention, (q, k, v, prefix, masks, 0.35, start))
    torch.library.opcheck(torch.ops.token_recycling.tree_attention_lse, (q, k, v, prefix, masks, 0.35, start))
    torch.library.opcheck(torch.ops.token_recycling.tree_attention, (q, k, v, prefix, masks[0], 0.35))


def test_bad_input(gen):
    q, k, v, prefix, masks, start = _inputs(gen, 2, 4, 2, 5, 8, 10)
    q, k, v = q.float(), k.float(), v.float()
    with pytest.raises(ValueError, match="tree_mask"):
        ops.tree_attention(q, k, v, prefix, masks[:1], 0.3, start)  # [1, N, N] for 2 rows
    with pytest.raises(ValueError, match="tree_start"):
        ops.tree_attention(q, k, v, prefix, masks, 0.3, k.shape[2] - 4)  # the tree runs past the keys
    with pytest.raises(ValueError, match="tree_start"):
        ops.tree_attention(q, k, v, prefix, masks, 0.3, -2)
    with pytest.raises(ValueError, match="prefix_len"):
        ops.tree_attention(q, k, v, torch.tensor([0, 11]), masks, 0.3, 10)  # a prefix past the tree slot
