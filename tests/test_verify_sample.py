"""verify_sample: the sampling walk over a draft tree == reference.verify_sample on random inputs
(exact: the draws are integer arithmetic), first child wins among equal tokens, opcheck, bad input,
and one draw follows the distribution it is given."""

import pytest
import torch
from conftest import random_tree

from token_recycling import ops
from token_recycling.testing import reference


def _inputs(gen, batch, n, vocab, hot=3, per_row=False, zeros=0.3):
    """Tree tokens from a small alphabet [0, hot) that also holds most of the mass: long walks."""
    if per_row:
        parents = torch.stack([random_tree(n, gen, chain_bias=0.6)[0] for _ in range(batch)])
    else:
        parents = random_tree(n, gen, chain_bias=0.6)[0]
    tokens = torch.randint(0, min(hot, vocab), (batch, n), generator=gen)
    probs = torch.rand(batch, n, vocab, generator=gen) ** 3
    probs[..., :hot] *= vocab
    probs[torch.rand(batch, n, vocab, generator=gen) < zeros] = 0.0  # never drawn
    probs[..., 0] += 1e-3  # no all-zero row
    uniforms = torch.rand(batch, n, generator=gen, dtype=torch.float64)
    return tokens, parents, probs, uniforms


@pytest.mark.parametrize("batch,n,vocab", [(1, 1, 1), (1, 2, 2), (3, 30, 3), (2, 64, 7), (2, 40, 1000),
                                           (1, 20, 50257)])
def test_verify_sample_matches_reference(gen, batch, n, vocab):
    tokens, parents, probs, uniforms = _inputs(gen, batch, n, vocab)
    got = ops.verify_sample(tokens, parents, probs, uniforms)
    want = reference.verify_sample(tokens, parents, probs, uniforms)
    for g_, w_ in zip(got, want):
        assert torch.equal(g_, w_)
    assert (got[0] >= 1).all()


def test_verify_sample_per_row_trees_and_long_walks(gen):
    tokens, parents, probs, uniforms = _inputs(gen, 4, 50, 4, per_row=True)
    got = ops.verify_sample(tokens, parents, probs, uniforms)
    for g_, w_ in zip(got, reference.verify_sample(tokens, parents, probs, uniforms)):
        assert torch.equal(g_, w_)


def test_verify_sample_walks_are_deep_enough_to_test_something(gen):
    lens = []
    for _ in range(10):
        tokens, parents, probs, uniforms = _inputs(gen, 2, 40, 3)
        lens += ops.verify_sample(tokens, parents, probs, uniforms)[0].tolist()
    assert max(lens) >= 3


def test_verify_sample_first_child_wins_and_bonus_is_the_last_draw():
    # Nodes 1 and 2 both hold token 4 under the root; the walk must go to node 1, never node 2.
    parents = torch.tensor([-1, 0, 0, 2, 1], dtype=torch.int32)
    tokens = torch.tensor([[9, 4, 4, 5, 6]])
    probs = torch.zeros(1, 5, 8)
    probs[0, 0, 4] = 1.0          # the root draws 4
    probs[0, 1, 7] = 1.0          # node 1 draws 7: no child holds it -> bonus 7
    probs[0, 2, 5] = 1.0          # node 2 (never visited) would draw 5 and go deeper
    probs[0, 3:, 0] = 1.0
    u = torch.full((1, 5), 0.5, dtype=torch.float64)
    accept_len, nodes, bonus = ops.verify_sample(tokens, parents, probs, u)
    assert accept_len.tolist() == [2] and nodes.tolist() == [[0, 1, -1]] and bonus.tolist() == [7]


def test_verify_sample_draw_is_inverse_cdf():
    # Weights 1, 0, 3 (unnormalised): u < 1/4 -> token 0, else token 2; token 1 is never drawn.
    probs = torch.tensor([[[1.0, 0.0, 3.0]]])
    parents, tokens = torch.tensor([-1], dtype=torch.int32), torch.tensor([[0]])
    for u, want in [(0.0, 0), (0.2499, 0), (0.2501, 2), (0.9999999, 2)]:  # within 2^-32 of 1/4: either
        bonus = ops.verify_sample(tokens, parents, probs, torch.tensor([[u]], dtype=torch.float64))[2]
        assert bonus.item() == want, u


def test_verify_sample_frequencies_follow_probs(gen):
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    n = 4000
    tokens = torch.zeros(n, 1, dtype=torch.long)
    u = torch.rand(n, 1, generator=gen, dtype=torch.float64)
    bonus = ops.verify_sample(tokens, torch.tensor([-1], dtype=torch.int32), probs.expand(n, 1, 5).contiguous(), u)[2]
    counts = torch.bincount(bonus, minlength=5).double()
    expected = probs.double() * n
    chi2 = (((counts[:4] - expected[:4]) ** 2) / expected[:4]).sum()
    assert counts[4] == 0 and chi2 < 21.1  # chi-square, 3 degrees of freedom, p = 1e-4


def test_verify_sample_opcheck(gen):
    tokens, parents, probs, uniforms = _inputs(gen, 2, 12, 6)
    torch.library.opcheck(torch.ops.token_recycling.verify_sample, (tokens, parents, probs, uniforms))


def test_verify_sample_rejects_bad_input():
    par = torch.tensor([-1, 0], dtype=torch.int32)
    tok = torch.zeros(1, 2, dtype=torch.long)
    probs = torch.ones(1, 2, 3)
    u = torch.zeros(1, 2, dtype=torch.float64)
    with pytest.raises(TypeError, match="probs"):
        ops.verify_sample(tok, par, probs.double(), u)
    with pytest.raises(TypeError, match="uniforms"):
        ops.verify_sample(tok, par, probs, u.float())
    with pytest.raises(ValueError, match="probs"):
        ops.verify_sample(tok, par, torch.ones(1, 3, 3), u)
    with pytest.raises(ValueError, match="uniforms"):
        ops.verify_sample(tok, par, probs, torch.zeros(1, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="parents"):
        ops.verify_sample(tok, torch.tensor([-1, 1], dtype=torch.int32), probs, u)
    with pytest.raises(ValueError, match=r"uniforms\[0, 0\] = 1.0+ is outside"):
        ops.verify_sample(tok, par, probs, torch.ones(1, 2, dtype=torch.float64))
    bad = probs.clone()
    bad[0, 0, 2] = float("nan")
    with pytest.raises(ValueError, match=r"probs\[0, 0\] holds a negative or non-finite weight at token 2"):
        ops.verify_sample(tok, par, bad, u)
    bad[0, 0, 2] = -1.0
    with pytest.raises(ValueError, match="negative or non-finite"):
        ops.verify_sample(tok, par, bad, u)
    with pytest.raises(ValueError, match=r"probs\[0, 0\] has no positive weight"):
        ops.verify_sample(tok, par, torch.zeros(1, 2, 3), u)
    with pytest.raises(ValueError, match="vocabulary"):
        ops.verify_sample(tok, par, torch.ones(1, 2, 0), u)
