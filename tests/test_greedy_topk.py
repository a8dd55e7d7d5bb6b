"""ops.greedy_topk: each position's top-k ids ranked by logit, ties by the lower id, NaN first: its
first id is torch.argmax's, the rest what recycling stores. Exact against reference.greedy_topk (two
stable sorts in float64) and against torch.argmax / torch.topk's values."""

from __future__ import annotations

import pytest
import torch

from token_recycling import ops, verify
from token_recycling.testing import reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,k", [((49152,), 8), ((3, 1000), 1), ((1, 5, 320), 8), ((2, 3, 77), 64),
                                     ((4, 9), 9), ((1, 0, 50), 4)])
def test_equals_reference_and_argmax(dtype, shape, k, gen):
    logits = torch.randn(*shape, generator=gen).to(dtype)
    got = ops.greedy_topk(logits, k)
    assert got.dtype == torch.long and got.shape == (*shape[:-1], k)
    assert torch.equal(got, reference.greedy_topk(logits, k))
    if logits.numel():
        assert torch.equal(got[..., 0], logits.argmax(-1))
        assert torch.equal(logits.gather(-1, got), logits.topk(k, dim=-1).values)  # the same values as topk


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_take_the_lower_id(dtype, gen):
    """Small integer logits: most of the top-k tie; argmax's first-index rule throughout."""
    logits = torch.randint(-3, 4, (6, 500), generator=gen).to(dtype)
    got = ops.greedy_topk(logits, 8)
    assert torch.equal(got, reference.greedy_topk(logits, 8))
    assert torch.equal(got[:, 0], logits.argmax(-1))
    for row, ids in zip(logits, got):  # within equal values, ids ascend
        v = row[ids]
        assert all(ids[j] < ids[j + 1] for j in range(7) if v[j] == v[j + 1])


def test_nan_and_inf():
    logits = torch.zeros(2, 100)
    logits[0, [70, 12]] = float("nan")
    logits[0, 5] = float("inf")
    logits[1, [40, 41]] = float("inf")
    logits[1, 3] = -float("inf")
    got = ops.greedy_topk(logits, 4)
    assert got[0].tolist() == [12, 70, 5, 0]  # NaN first (lower id first), then +inf, then the ties at 0
    assert got[1].tolist() == [40, 41, 0, 1]
    assert torch.equal(got, reference.greedy_topk(logits, 4))
    assert torch.equal(got[:, 0], logits.argmax(-1))


def test_strided_input(gen):
    wide = torch.randn(3, 2, 400, generator=gen)
    logits = wide[:, 1, ::2]  # non-contiguous rows and elements
    assert torch.equal(ops.greedy_topk(logits, 8), reference.greedy_topk(logits.contiguous(), 8))


def test_bad_input_names_the_argument():
    with pytest.raises(TypeError, match="greedy_topk.*logits"):
        ops.greedy_topk(torch.zeros(3, 10, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="greedy_topk.*k"):
        ops.greedy_topk(torch.zeros(3, 10), 11)
    with pytest.raises(ValueError, match="greedy_topk.*k"):
        ops.greedy_topk(torch.zeros(3, 100), 65)
    with pytest.raises(ValueError, match="greedy_topk.*k"):
        ops.greedy_topk(torch.zeros(3, 10), 0)
    with pytest.raises(ValueError, match="greedy_topk.*logits"):
        ops.greedy_topk(torch.tensor(1.0), 1)


def test_opcheck(gen):
    torch.library.opcheck(torch.ops.token_recycling.greedy_topk, (torch.randn(2, 3, 50, generator=gen), 8))
    torch.library.opcheck(torch.ops.token_recycling.greedy_topk,
                          (torch.randn(4, 33, generator=gen).to(torch.bfloat16), 1))


def test_the_verifier_uses_it_on_the_cpu(monkeypatch, gen):
    """greedy_and_candidates takes the op on the CPU; k beyond the op's limit falls back to torch."""
    calls = []
    real = ops.greedy_topk
    monkeypatch.setattr(ops, "greedy_topk", lambda logits, k: calls.append(k) or real(logits, k))
    logits = torch.randint(-2, 3, (1, 4, 200), generator=gen).float()
    greedy, cand = verify.greedy_and_candidates(logits, 8)
    assert calls == [8]
    assert torch.equal(greedy, logits.argmax(-1)) and torch.equal(cand, reference.greedy_topk(logits, 8))
    greedy, cand = verify.greedy_and_candidates(logits, 100)
    assert calls == [8] and torch.equal(greedy, logits.argmax(-1)) and cand.shape == (1, 4, 100)
