"""graft_chain against the plain-loop reference, its tree invariants, opcheck and bad inputs."""

import random

import pytest
import torch

from token_recycling import ops
from token_recycling.testing import reference
from token_recycling.tree import make_tree

LONG, INT = torch.long, torch.int32


def _random_parents(rng, n):
    return torch.tensor([-1] + [rng.randrange(i) for i in range(1, n)], dtype=INT)


def _random_case(rng, batch, n, c, vocab):
    parents = _random_parents(rng, n)
    tree_tokens = torch.tensor([[rng.randrange(vocab) for _ in range(n)] for _ in range(batch)])
    chain = torch.tensor([[rng.randrange(vocab) for _ in range(c)] for _ in range(batch)], dtype=LONG).view(batch, c)
    lens = [rng.randint(0, c) for _ in range(batch)]
    if batch > 1:
        lens[0], lens[-1] = 0, c  # always hit both ends
    chain_len = torch.tensor(lens)
    for b, length in enumerate(lens):
        chain[b, length:] = -1  # beyond chain_len: ignored, whatever it holds
    return tree_tokens, parents, chain, chain_len


def _assert_same(got, want):
    names = ("tokens", "parents", "depths", "tree_mask", "num_nodes")
    for name, g, w in zip(names, got, want):
        assert g.dtype == w.dtype and torch.equal(g, w), name


@pytest.mark.parametrize("seed", range(60))
def test_matches_reference_random(seed):
    rng = random.Random(seed)
    batch, n, c = rng.randint(1, 4), rng.choice([1, 1, 2, 5, 12, 30]), rng.choice([0, 1, 3, 6])
    case = _random_case(rng, batch, n, c, vocab=rng.choice([1, 2, 3]))  # small vocab: many merges
    _assert_same(ops.graft_chain(*case), reference.graft_chain(*case))


@pytest.mark.parametrize("seed", range(20))
def test_matches_reference_on_recycling_trees(seed):
    # Trees as the decode loop builds them; chains that follow a tree path for a while, then leave it.
    rng = random.Random(1000 + seed)
    vocab, k = 6, 3
    paths = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 1], [0, 0, 0, 0]]
    tree = make_tree(paths, topk=k)
    matrix = torch.randint(0, vocab, (vocab, k))
    batch = 3
    tree_tokens = ops.build_draft_tree(matrix, torch.randint(0, vocab, (batch,)), tree.parents, tree.ranks)
    c = 6
    chain = torch.randint(0, vocab, (batch, c))
    for b in range(batch):  # follow a random tree path for a few steps
        node, steps = 0, rng.randint(0, 4)
        for j in range(steps):
            kids = [i for i in range(tree.num_nodes) if int(tree.parents[i]) == node]
            if not kids:
                break
            node = rng.choice(kids)
            chain[b, j] = tree_tokens[b, node]
    chain_len = torch.tensor([rng.randint(0, c) for _ in range(batch)])
    case = (tree_tokens, tree.parents, chain, chain_len)
    _assert_same(ops.graft_chain(*case), reference.graft_chain(*case))


@pytest.mark.parametrize("seed", range(20))
def test_tree_invariants(seed):
    # Independent of the reference: the chain is a root path, nothing else changed, arrays agree.
    rng = random.Random(2000 + seed)
    batch, n, c = 3, rng.randint(1, 20), rng.randint(0, 7)
    tree_tokens, parents, chain, chain_len = _random_case(rng, batch, n, c, vocab=2)
    tokens, par, depths, mask, num = ops.graft_chain(tree_tokens, parents, chain, chain_len)
    m = n + c
    for b in range(batch):
        live = int(num[b])
        assert n <= live <= n + int(chain_len[b])
        assert torch.equal(tokens[b, :n], tree_tokens[b]) and torch.equal(par[b, :n], parents)
        paths = {}
        for i in range(m):
            p = int(par[b, i])
            assert (i == 0 and p == -1) or 0 <= p < i
            assert int(depths[b, i]) == (0 if i == 0 else int(depths[b, p]) + 1)
            ancestors = {i}
            j = p
            while j != -1:
                ancestors.add(j)
                j = int(par[b, j])
            assert mask[b, i].nonzero().flatten().tolist() == sorted(ancestors)
            paths[i] = (paths[p] if i else ()) + (int(tokens[b, i]),)
            if i >= live:
                assert p == 0 and int(tokens[b, i]) == int(tokens[b, 0])
        target = (int(tokens[b, 0]),) + tuple(chain[b, : int(chain_len[b])].tolist())
        assert any(paths[i] == target for i in range(live))
        # Appended nodes form one chain hanging below a tree node.
        for i in range(n + 1, live):
            assert int(par[b, i]) == i - 1


def test_merges_fully_and_appends_fully():
    parents = torch.tensor([-1, 0, 0, 1, 3], dtype=INT)
    tree_tokens = torch.tensor([[7, 1, 2, 1, 5]])
    on_path = ops.graft_chain(tree_tokens, parents, torch.tensor([[1, 1, 5]]), torch.tensor([3]))
    assert int(on_path[4][0]) == 5  # nothing appended
    off_path = ops.graft_chain(tree_tokens, parents, torch.tensor([[3, 1, 5]]), torch.tensor([3]))
    assert int(off_path[4][0]) == 8 and off_path[1][0, 5:].tolist() == [0, 5, 6]


def test_opcheck():
    rng = random.Random(5)
    case = _random_case(rng, 3, 9, 4, vocab=2)
    torch.library.opcheck(torch.ops.token_recycling.graft_chain.default, case)
    case = _random_case(rng, 2, 1, 0, vocab=2)
    torch.library.opcheck(torch.ops.token_recycling.graft_chain.default, case)


def test_bad_inputs():
    rng = random.Random(9)
    tree_tokens, parents, chain, chain_len = _random_case(rng, 2, 6, 3, vocab=3)
    g = ops.graft_chain
    with pytest.raises(TypeError, match="tree_tokens"):
        g(tree_tokens.int(), parents, chain, chain_len)
    with pytest.raises(TypeError, match="parents"):
        g(tree_tokens, parents.long(), chain, chain_len)
    with pytest.raises(TypeError, match="chain"):
        g(tree_tokens, parents, chain.int(), chain_len)
    with pytest.raises(TypeError, match="chain_len"):
        g(tree_tokens, parents, chain, chain_len.int())
    with pytest.raises(ValueError, match="one parent per tree node"):
        g(tree_tokens, torch.cat([parents, parents[1:2]]), chain, chain_len)
    with pytest.raises(ValueError, match="batch"):
        g(tree_tokens, parents, chain[:1], chain_len)
    with pytest.raises(ValueError, match="one length per row"):
        g(tree_tokens, parents, chain, chain_len[:1])
    with pytest.raises(ValueError, match="2-D"):
        g(tree_tokens[0], parents, chain, chain_len)
    with pytest.raises(ValueError, match="no nodes"):
        g(tree_tokens[:, :0], parents[:0], chain, chain_len)
    with pytest.raises(ValueError, match="chain_len"):
        g(tree_tokens, parents, chain, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="chain_len"):
        g(tree_tokens, parents, chain, torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="negative"):
        g(tree_tokens, parents, torch.tensor([[0, -2, 0], [0, 0, 0]]), torch.tensor([2, 0]))
    g(tree_tokens, parents, torch.tensor([[0, -2, 0], [0, 0, 0]]), torch.tensor([1, 0]))  # beyond chain_len: fine
    bad_tree = tree_tokens.clone()
    bad_tree[1, 3] = -1
    with pytest.raises(ValueError, match="negative"):
        g(bad_tree, parents, chain, chain_len)
    bad_parents = parents.clone()
    bad_parents[4] = 4
    with pytest.raises(ValueError, match="topological"):
        g(tree_tokens, bad_parents, chain, chain_len)
    bad_parents = parents.clone()
    bad_parents[0] = 0
    with pytest.raises(ValueError, match="root"):
        g(tree_tokens, bad_parents, chain, chain_len)
