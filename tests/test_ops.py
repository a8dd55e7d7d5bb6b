"""Every op against reference.py on random inputs (CPU), opcheck, and the bad-input contract."""

import pytest
import torch
from conftest import ancestor_mask, random_tree

import token_recycling  # noqa: F401
from token_recycling import ops
from token_recycling.testing import reference

SIZES = [1, 2, 7, 81]


@pytest.mark.parametrize("mdtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("batch", [1, 3])
def test_build_draft_tree_matches_reference(gen, mdtype, n, batch):
    V, k = 50, 8
    matrix = torch.randint(0, V, (V, k), generator=gen).to(mdtype)
    parents, ranks = random_tree(n, gen, k, chain_bias=0.5)
    roots = torch.randint(0, V, (batch,), generator=gen)
    roots[-1] = V - 1  # the last row of the matrix
    got = ops.build_draft_tree(matrix, roots, parents, ranks)
    assert got.dtype == torch.int64 and got.shape == (batch, n)
    assert torch.equal(got, reference.build_draft_tree(matrix, roots, parents, ranks))


@pytest.mark.parametrize("mdtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("cdtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("batch,n", [(1, 1), (1, 81), (4, 17)])
def test_update_adjacency_last_occurrence_wins(gen, mdtype, cdtype, batch, n):
    V, k = 13, 8  # tiny vocab: many duplicate tokens
    matrix = torch.randint(0, V, (V, k), generator=gen).to(mdtype)
    tokens = torch.randint(0, V, (batch, n), generator=gen)
    cand = torch.randint(0, V, (batch, n, k), generator=gen).to(cdtype)
    expect = matrix.clone()
    reference.update_adjacency(expect, tokens, cand)
    ops.update_adjacency(matrix, tokens, cand)
    assert torch.equal(matrix, expect)


def _predictions_that_match(tokens, parents, gen, p_match):
    """Predictions that often equal a child's token, so long paths get accepted."""
    batch, n = tokens.shape
    pred = torch.randint(0, 20, (batch, n), generator=gen)
    for b in range(batch):
        for i in range(1, n):
            if torch.rand(1, generator=gen).item() < p_match:
                pred[b, int(parents[i])] = tokens[b, i]
    return pred


@pytest.mark.parametrize("n", SIZES + [200])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("p_match", [0.0, 0.5, 1.0])
def test_verify_greedy_matches_reference(gen, n, batch, p_match):
    parents, _ = random_tree(n, gen, chain_bias=0.6)
    tokens = torch.randint(0, 5, (batch, n), generator=gen)  # small alphabet: ties between paths
    pred = _predictions_that_match(tokens, parents, gen, p_match)
    got = ops.verify_greedy(tokens, pred, parents)
    want = reference.verify_greedy(tokens, pred, parents)
    for g_, w_ in zip(got, want):
        assert torch.equal(g_, w_)
    assert (got[0] >= 1).all()


def test_verify_greedy_per_row_trees(gen):
    batch, n = 3, 30
    parents = torch.stack([random_tree(n, gen, chain_bias=0.5)[0] for _ in range(batch)])
    tokens = torch.randint(0, 3, (batch, n), generator=gen)
    pred = torch.randint(0, 3, (batch, n), generator=gen)
    for g_, w_ in zip(ops.verify_greedy(tokens, pred, parents), reference.verify_greedy(tokens, pred, parents)):
        assert torch.equal(g_, w_)


def test_verify_greedy_prefers_smallest_index_on_ties():
    # Two depth-1 children both match; node 1 must win.
    parents = torch.tensor([-1, 0, 0], dtype=torch.int32)
    tokens = torch.tensor([[9, 4, 4]])
    pred = torch.tensor([[4, 7, 8]])
    accept_len, nodes, bonus = ops.verify_greedy(tokens, pred, parents)
    assert accept_len.tolist() == [2] and nodes.tolist() == [[0, 1]] and bonus.tolist() == [7]


def _random_caches(gen, batch, seq, layers, dtype, heads=3, dim=5):
    caches = []
    for layer in range(layers):
        for d in (dim, dim + 2):  # keys and values may differ in head_dim
            c = torch.randn(batch, heads, seq, d, generator=gen).to(dtype)
            if layer % 2:  # a non-contiguous cache: [B, S, H, D] storage seen as [B, H, S, D]
                c = c.transpose(1, 2).contiguous().transpose(1, 2)
            caches.append(c)
    return caches


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("batch", [1, 3])
def test_compact_kv_matches_reference(gen, dtype, batch):
    n_tree, seq = 20, 64
    parents, _ = random_tree(n_tree, gen, chain_bias=0.7)
    tokens = torch.randint(0, 3, (batch, n_tree), generator=gen)
    pred = _predictions_that_match(tokens, parents, gen, 0.7)
    accept_len, nodes, _ = ops.verify_greedy(tokens, pred, parents)
    prefix = torch.randint(0, seq - n_tree + 1, (batch,), generator=gen)
    caches = _random_caches(gen, batch, seq, 3, dtype)
    expect = [c.clone() for c in caches]
    reference.compact_kv(expect, prefix, nodes, accept_len)
    ops.compact_kv(caches, prefix, nodes, accept_len)
    for c, e in zip(caches, expect):
        assert torch.equal(c, e)


def test_compact_kv_any_permutation_reads_before_writes(gen):
    caches = _random_caches(gen, 1, 16, 1, torch.float32)
    nodes = torch.tensor([[3, 2, 1, 0]])  # reversed: naive in-place copying would clobber sources
    expect = [c.clone() for c in caches]
    reference.compact_kv(expect, torch.tensor([4]), nodes, torch.tensor([4]))
    ops.compact_kv(caches, torch.tensor([4]), nodes, torch.tensor([4]))
    for c, e in zip(caches, expect):
        assert torch.equal(c, e)


def _attention_inputs(gen, dtype, batch, hq, hkv, n, prefix_max, d):
    seq = prefix_max + n + 3
    q = torch.randn(batch, hq, n, d, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, hkv, seq, d, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, hkv, seq, d, generator=gen, dtype=torch.float64)
    prefix = torch.randint(0, prefix_max + 1, (batch,), generator=gen)
    parents, _ = random_tree(n, gen, chain_bias=0.5)
    return q, k, v, prefix, ancestor_mask(parents)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch,hq,hkv,n,prefix_max,d", [
    (1, 4, 4, 1, 0, 16), (2, 8, 2, 17, 40, 64), (1, 6, 3, 81, 100, 32),
    # the CPU's vectorized path (head_dim % 8 == 0): SmolLM2's heads, a head_dim of 32 + 32 + 8 + 8,
    # row and key counts that leave remainders; head_dim 12 takes the portable path in every dtype
    (1, 9, 3, 4, 203, 64), (2, 5, 5, 3, 37, 80), (2, 4, 2, 6, 25, 12)])
def test_tree_attention_error_bound(gen, dtype, batch, hq, hkv, n, prefix_max, d):
    q64, k64, v64, prefix, mask = _attention_inputs(gen, dtype, batch, hq, hkv, n, prefix_max, d)
    scale = d ** -0.5
    exact = reference.tree_attention(q64, k64, v64, prefix, mask, scale)
    q, k, v = (t.to(dtype) for t in (q64, k64, v64))
    ours = ops.tree_attention(q, k, v, prefix, mask, scale)
    torch_same = reference.tree_attention(q, k, v, prefix, mask, scale)
    # Compare against the fp64 result of the *rounded* inputs, so only arithmetic error counts.
    exact_rounded = reference.tree_attention(q.double(), k.double(), v.double(), prefix, mask, scale)
    our_err = (ours.double() - exact_rounded).abs().max().item()
    torch_err = (torch_same.double() - exact_rounded).abs().max().item()
    assert ours.dtype == dtype and ours.shape == q.shape
    assert our_err <= 2 * torch_err + 1e-6, (our_err, torch_err)
    assert (ours.double() - exact).abs().max().item() < (0.05 if dtype != torch.float32 else 1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,hq,hkv,n,d", [(1, 9, 3, 8, 64), (1, 9, 3, 2, 64), (2, 4, 1, 7, 12)])
def test_tree_attention_same_bits_at_any_thread_count(gen, dtype, batch, hq, hkv, n, d):
    """The CPU adapter cuts each (row, kv head) pair into node ranges when the pairs alone would leave
    threads idle (3 kv heads on 2 threads); a node's output and lse do not depend on the cut."""
    q64, k64, v64, prefix, mask = _attention_inputs(gen, dtype, batch, hq, hkv, n, 60, d)
    q, k, v = (t.to(dtype) for t in (q64, k64, v64))
    threads = torch.get_num_threads()
    try:
        results = []
        for t in (1, 2, 3, 5):
            torch.set_num_threads(t)
            results.append(ops.tree_attention_lse(q, k, v, prefix, mask, d ** -0.5))
    finally:
        torch.set_num_threads(threads)
    for out, lse in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(lse, results[0][1])
    exact = reference.tree_attention(q.double(), k.double(), v.double(), prefix, mask, d ** -0.5)
    assert (results[0][0].double() - exact).abs().max().item() < (1e-4 if dtype == torch.float32 else 0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tree_attention_strided_inputs(gen, dtype):
    """q, k, v not contiguous along head_dim (the portable path) or along other dims only (the
    vectorized one): both as the fp64 reference."""
    q64, k64, v64, prefix, mask = _attention_inputs(gen, dtype, 2, 6, 2, 5, 30, 16)
    exact = reference.tree_attention(q64, k64, v64, prefix, mask, 0.25)
    for layout in ("heads-last", "head-dim-strided"):
        if layout == "heads-last":  # [B, S, H, D] storage viewed as [B, H, S, D]
            q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2).to(dtype) for t in (q64, k64, v64))
        else:  # every other element of a twice-as-wide head_dim
            q, k, v = (torch.stack([t, t], -1).to(dtype).flatten(-2)[..., ::2] for t in (q64, k64, v64))
            assert q.stride(-1) == 2
        ours = ops.tree_attention(q, k, v, prefix, mask, 0.25)
        assert (ours.double() - exact).abs().max().item() < (1e-4 if dtype == torch.float32 else 0.05), layout


def test_tree_attention_row_that_sees_nothing_is_zero():
    for d in (8, 6):  # the vectorized path (on AVX2 CPUs) and the portable one
        q = torch.randn(1, 2, 2, d)
        k = torch.randn(1, 2, 2, d)
        mask = torch.tensor([[True, False], [False, False]])
        out, lse = ops.tree_attention_lse(q, k, k.clone(), torch.tensor([0]), mask, 0.3)
        assert torch.equal(out[0, :, 1], torch.zeros(2, d))
        assert torch.isinf(lse[0, :, 1]).all() and (lse[0, :, 1] < 0).all()
        assert torch.equal(ops.tree_attention(q, k, k.clone(), torch.tensor([0]), mask, 0.3), out)


# ------------------------------------------------------------------------------------------ opcheck
def _opcheck_cases(gen):
    V, k = 30, 8
    matrix = torch.randint(0, V, (V, k), generator=gen, dtype=torch.int32)
    parents, ranks = random_tree(9, gen)
    roots = torch.randint(0, V, (2,), generator=gen)
    tokens = ops.build_draft_tree(matrix, roots, parents, ranks)
    pred = torch.randint(0, V, tokens.shape, generator=gen)
    accept_len, nodes, _ = ops.verify_greedy(tokens, pred, parents)
    caches = [torch.randn(2, 2, 20, 4, generator=gen) for _ in range(4)]
    q, kk, vv, prefix, mask = _attention_inputs(gen, torch.float32, 2, 4, 2, 9, 6, 8)
    return [
        (torch.ops.token_recycling.build_draft_tree, (matrix, roots, parents, ranks)),
        (torch.ops.token_recycling.update_adjacency,
         (matrix.clone(), tokens, torch.randint(0, V, (*tokens.shape, k), generator=gen))),
        (torch.ops.token_recycling.verify_greedy, (tokens, pred, parents)),
        (torch.ops.token_recycling.compact_kv, (caches, torch.tensor([3, 5]), nodes, accept_len)),
        (torch.ops.token_recycling.tree_attention, (q.float(), kk.float(), vv.float(), prefix, mask, 0.35)),
    ]


def test_opcheck_every_op(gen):
    for op, args in _opcheck_cases(gen):
        torch.library.opcheck(op, args)


# ---------------------------------------------------------------------------------------- bad input
def test_build_draft_tree_rejects_bad_input():
    V, k = 10, 4
    m = torch.zeros(V, k, dtype=torch.int32)
    par = torch.tensor([-1, 0, 1], dtype=torch.int32)
    rk = torch.tensor([0, 1, 3], dtype=torch.int32)
    r = torch.tensor([2])
    with pytest.raises(ValueError, match="roots"):
        ops.build_draft_tree(m, torch.tensor([V]), par, rk)
    with pytest.raises(ValueError, match="roots"):
        ops.build_draft_tree(m, torch.tensor([-1]), par, rk)
    with pytest.raises(ValueError, match="ranks"):
        ops.build_draft_tree(m, r, par, torch.tensor([0, 1, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="topological"):
        ops.build_draft_tree(m, r, torch.tensor([-1, 2, 0], dtype=torch.int32), rk)
    with pytest.raises(ValueError, match="parents\\[0\\]"):
        ops.build_draft_tree(m, r, torch.tensor([0, 0, 1], dtype=torch.int32), rk)
    with pytest.raises(TypeError, match="matrix"):
        ops.build_draft_tree(m.float(), r, par, rk)
    with pytest.raises(TypeError, match="roots"):
        ops.build_draft_tree(m, r.float(), par, rk)
    with pytest.raises(ValueError, match="ranks"):
        ops.build_draft_tree(m, r, par, rk[:2])
    bad = m.clone()
    bad[2, 1] = V + 5  # a corrupt matrix entry must not be used as a row index
    with pytest.raises(ValueError, match="matrix entry"):
        ops.build_draft_tree(bad, r, par, rk)


def test_update_adjacency_rejects_bad_input():
    m = torch.zeros(10, 4, dtype=torch.int32)
    t = torch.tensor([[1, 2]])
    c = torch.zeros(1, 2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="tokens"):
        ops.update_adjacency(m, torch.tensor([[1, 10]]), c)
    with pytest.raises(ValueError, match="tokens"):
        ops.update_adjacency(m, torch.tensor([[-3, 1]]), c)
    with pytest.raises(ValueError, match="candidates"):
        ops.update_adjacency(m, t, c - 1)
    with pytest.raises(ValueError, match="k"):
        ops.update_adjacency(m, t, torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="candidates"):
        ops.update_adjacency(m, t, c.float())
    before = m.clone()
    with pytest.raises(ValueError):
        ops.update_adjacency(m, torch.tensor([[1, 99]]), c + 1)
    assert torch.equal(m, before), "a rejected update must not write anything"


def test_verify_greedy_rejects_bad_input():
    par = torch.tensor([-1, 0], dtype=torch.int32)
    with pytest.raises(ValueError, match="shape"):
        ops.verify_greedy(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long), par)
    with pytest.raises(TypeError):
        ops.verify_greedy(torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.long), par)
    with pytest.raises(ValueError, match="topological"):
        ops.verify_greedy(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long),
                          torch.tensor([-1, 1], dtype=torch.int32))


def test_compact_kv_rejects_bad_input():
    caches = [torch.zeros(1, 2, 8, 4) for _ in range(2)]
    p, n = torch.tensor([4]), torch.tensor([2])
    with pytest.raises(ValueError, match="accepted_nodes"):
        ops.compact_kv(caches, p, torch.tensor([[0, 4]]), n)  # 4 + 4 = 8 is past the cache
    with pytest.raises(ValueError, match="accepted_nodes"):
        ops.compact_kv(caches, p, torch.tensor([[0, -1]]), n)
    with pytest.raises(ValueError, match="accept_len"):
        ops.compact_kv(caches, p, torch.tensor([[0, 1]]), torch.tensor([3]))
    with pytest.raises(ValueError, match="prefix_len"):
        ops.compact_kv(caches, torch.tensor([9]), torch.tensor([[0, 1]]), n)
    with pytest.raises(ValueError, match="empty"):
        ops.compact_kv([], p, torch.tensor([[0, 1]]), n)
    with pytest.raises(ValueError, match="B and S"):
        ops.compact_kv([caches[0], torch.zeros(1, 2, 9, 4)], p, torch.tensor([[0, 1]]), n)
    with pytest.raises(TypeError):
        ops.compact_kv([caches[0], torch.zeros(1, 2, 8, 4, dtype=torch.float16)], p, torch.tensor([[0, 1]]), n)


def test_tree_attention_rejects_bad_input():
    q, k = torch.randn(1, 3, 2, 8), torch.randn(1, 2, 6, 8)
    mask = torch.ones(2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="multiple"):
        ops.tree_attention(q, k, k, torch.tensor([0]), mask, 1.0)
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="prefix_len"):
        ops.tree_attention(q, k, k, torch.tensor([5]), mask, 1.0)
    with pytest.raises(TypeError, match="tree_mask"):
        ops.tree_attention(q, k, k, torch.tensor([0]), mask.float(), 1.0)
    with pytest.raises(TypeError):
        ops.tree_attention(q, k.half(), k.half(), torch.tensor([0]), mask, 1.0)
    with pytest.raises(ValueError, match="tree_mask"):
        ops.tree_attention(q, k, k, torch.tensor([0]), torch.ones(3, 3, dtype=torch.bool), 1.0)
