"""The CUDA implementations of every op against the CPU ones (equal for the integer ops), attention
against an fp64 reference (error within a small multiple of a same-precision torch reference's),
opcheck on CUDA, and bad input on CUDA (the CPU's exception and message, nothing written).

Everything here skips without an NVIDIA GPU and a CUDA build of token_recycling.
"""

from __future__ import annotations

import pytest
import torch

from conftest import ancestor_mask

import token_recycling
from token_recycling import ops
from token_recycling.testing import reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available() or not token_recycling.WITH_CUDA,
                       reason="needs an NVIDIA GPU and a CUDA build of token_recycling"),
]

CUDA = "cuda"


def random_tree(n: int, gen: torch.Generator, k: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """parents (parents[i] < i, a few levels deep) and ranks, int32 on the CPU."""
    parents = [-1] + [int(torch.randint(max(0, i - 12), i, (1,), generator=gen)) for i in range(1, n)]
    ranks = torch.randint(0, k, (n,), generator=gen, dtype=torch.int32)
    ranks[0] = 0
    return torch.tensor(parents, dtype=torch.int32), ranks


def to_cuda(args):
    if isinstance(args, torch.Tensor):
        return args.to(CUDA)
    if isinstance(args, (list, tuple)):
        return type(args)(to_cuda(a) for a in args)
    return args


def same_error(fn, cpu_args, cuda_args, exc=ValueError):
    """fn raises exc with the same message on the CPU and on CUDA."""
    with pytest.raises(exc) as on_cpu:
        fn(*cpu_args)
    with pytest.raises(exc) as on_cuda:
        fn(*cuda_args)
    assert str(on_cuda.value).splitlines()[0] == str(on_cpu.value).splitlines()[0]


# ----------------------------------------------------------------------------------- build_draft_tree
@pytest.mark.parametrize("matrix_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("batch,n,vocab,k", [(1, 1, 7, 1), (1, 81, 32000, 8), (5, 81, 300, 8), (2, 300, 50, 3)])
def test_build_draft_tree_equals_cpu(matrix_dtype, batch, n, vocab, k):
    gen = torch.Generator().manual_seed(n + batch)
    matrix = torch.randint(0, vocab, (vocab, k), generator=gen).to(matrix_dtype)
    roots = torch.randint(0, vocab, (batch,), generator=gen)
    parents, ranks = random_tree(n, gen, k)
    expected = ops.build_draft_tree(matrix, roots, parents, ranks)
    got = ops.build_draft_tree(*to_cuda((matrix, roots, parents, ranks)))
    assert got.device.type == "cuda"
    assert torch.equal(got.cpu(), expected)
    assert torch.equal(expected, reference.build_draft_tree(matrix, roots, parents, ranks))


def test_build_draft_tree_bad_input_matches_cpu():
    gen = torch.Generator().manual_seed(0)
    vocab, k, n = 40, 4, 20
    matrix = torch.randint(0, vocab, (vocab, k), generator=gen, dtype=torch.int32)
    roots = torch.randint(0, vocab, (3,), generator=gen)
    parents, ranks = random_tree(n, gen, k)
    cases = []
    bad_roots = roots.clone()
    bad_roots[2] = vocab
    cases.append((matrix, bad_roots, parents, ranks))
    bad_ranks = ranks.clone()
    bad_ranks[n - 1] = k
    cases.append((matrix, roots, parents, bad_ranks))
    bad_parents = parents.clone()
    bad_parents[n - 1] = n - 1
    cases.append((matrix, roots, bad_parents, ranks))
    bad_parents = parents.clone()
    bad_parents[0] = 0
    cases.append((matrix, roots, bad_parents, ranks))
    bad_matrix = matrix.clone()
    bad_matrix[roots[0], ranks[1]] = -5  # node 1 hangs off the root
    one_child = parents.clone()
    one_child[1] = 0
    cases.append((bad_matrix, roots[:1], one_child, ranks))
    cases.append((matrix, roots, parents[:0], ranks[:0]))  # no nodes
    for args in cases:
        same_error(ops.build_draft_tree, args, to_cuda(args))
    with pytest.raises(ValueError, match="is on cpu"):
        ops.build_draft_tree(matrix.to(CUDA), roots, parents.to(CUDA), ranks.to(CUDA))


# ----------------------------------------------------------------------------------- verify_greedy
@pytest.mark.parametrize("batch,n,per_row", [(1, 1, False), (4, 81, False), (3, 40, True), (2, 300, False)])
def test_verify_greedy_equals_cpu(batch, n, per_row):
    gen = torch.Generator().manual_seed(batch * n)
    tokens = torch.randint(0, 3, (batch, n), generator=gen)  # few symbols: long accepted paths
    predictions = torch.randint(0, 3, (batch, n), generator=gen)
    trees = [random_tree(n, gen)[0] for _ in range(batch if per_row else 1)]
    parents = torch.stack(trees) if per_row else trees[0]
    expected = ops.verify_greedy(tokens, predictions, parents)
    got = ops.verify_greedy(*to_cuda((tokens, predictions, parents)))
    for g, e in zip(got, expected):
        assert g.device.type == "cuda" and g.is_contiguous()
        assert torch.equal(g.cpu(), e)


def test_verify_greedy_bad_input_matches_cpu():
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 3, (2, 12), generator=gen)
    predictions = torch.randint(0, 3, (2, 12), generator=gen)
    parents = random_tree(12, gen)[0]
    for bad in (parents.clone().index_fill_(0, torch.tensor([7]), 9),
                parents.clone().index_fill_(0, torch.tensor([0]), 3),
                torch.stack([parents, parents.clone().index_fill_(0, torch.tensor([5]), -2)])):
        args = (tokens, predictions, bad)
        same_error(ops.verify_greedy, args, to_cuda(args))


# ----------------------------------------------------------------------------------- update_adjacency
@pytest.mark.parametrize("matrix_dtype,cand_dtype", [(torch.int32, torch.int64), (torch.int64, torch.int32)])
@pytest.mark.parametrize("batch,n,vocab", [(1, 1, 5), (1, 81, 32000), (4, 81, 60), (16, 300, 40)])
def test_update_adjacency_equals_cpu(matrix_dtype, cand_dtype, batch, n, vocab):
    gen = torch.Generator().manual_seed(batch + n + vocab)
    k = 8
    matrix = torch.randint(0, vocab, (vocab, k), generator=gen).to(matrix_dtype)
    tokens = torch.randint(0, vocab, (batch, n), generator=gen)  # small vocabularies: duplicates
    candidates = torch.randint(0, vocab, (batch, n, k), generator=gen).to(cand_dtype)
    expected = matrix.clone()
    ops.update_adjacency(expected, tokens, candidates)
    got = matrix.to(CUDA)
    ops.update_adjacency(got, *to_cuda((tokens, candidates)))
    assert torch.equal(got.cpu(), expected)


def test_update_adjacency_bad_input_matches_cpu_and_writes_nothing():
    gen = torch.Generator().manual_seed(2)
    matrix = torch.randint(0, 30, (30, 4), generator=gen)
    tokens = torch.randint(0, 30, (2, 9), generator=gen)
    candidates = torch.randint(0, 30, (2, 9, 4), generator=gen)
    bad_tokens = tokens.clone()
    bad_tokens[1, 3] = 30
    bad_cand = candidates.clone()
    bad_cand[0, 8, 2] = -1
    for t, c in ((bad_tokens, candidates), (tokens, bad_cand)):
        on_cuda = matrix.to(CUDA)
        same_error(ops.update_adjacency, (matrix.clone(), t, c), (on_cuda, t.to(CUDA), c.to(CUDA)))
        assert torch.equal(on_cuda.cpu(), matrix)


# ----------------------------------------------------------------------------------- compact_kv
def make_caches(batch, seq, dtype, gen):
    """Layer caches as a model may hold them, most not contiguous; call with a device to get them there
    (the views are taken on the device, so the layouts survive the move)."""
    layouts = [((8, seq + 5, 128), lambda t: t[:, :, :seq]),  # a slice of a longer cache
               ((2, seq, 64), lambda t: t),
               ((seq, 4, 32), lambda t: t.transpose(1, 2)),  # [B, S, H, D] storage
               ((2, seq, 96), lambda t: t[..., ::2]),  # strided head_dim
               ((3, seq, 80), lambda t: t)]
    bases = [(torch.randn(batch, *shape, generator=gen) * 50).to(dtype) for shape, _ in layouts]
    return lambda device: [view(base.to(device)) for base, (_, view) in zip(bases, layouts)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.int8])
def test_compact_kv_equals_cpu(dtype):
    gen = torch.Generator().manual_seed(3)
    batch, seq, n_tree, width = 3, 90, 20, 7
    caches = make_caches(batch, seq, dtype, gen)
    cpu, gpu = caches("cpu"), caches(CUDA)
    prefix = torch.randint(0, seq - n_tree + 1, (batch,), generator=gen)
    accept = torch.randint(0, width + 1, (batch,), generator=gen)
    nodes = torch.full((batch, width), -1)
    for b in range(batch):
        nodes[b, : accept[b]] = torch.randint(0, n_tree, (int(accept[b]),), generator=gen)  # any order, repeats
    ops.compact_kv(cpu, prefix, nodes, accept)
    ops.compact_kv(gpu, *to_cuda((prefix, nodes, accept)))
    for g, c in zip(gpu, cpu):
        assert torch.equal(g.cpu(), c)


def test_compact_kv_bad_input_matches_cpu_and_writes_nothing():
    gen = torch.Generator().manual_seed(4)
    batch, seq, width = 2, 40, 5
    prefix = torch.tensor([10, 20])
    accept = torch.tensor([5, 3])
    nodes = torch.tensor([[0, 1, 2, 3, 4], [0, 2, 4, -1, -1]])
    bad_nodes = nodes.clone()
    bad_nodes[1, 2] = seq - 20
    for p, a, nd in ((prefix, accept, bad_nodes), (prefix, torch.tensor([5, 6]), nodes),
                     (torch.tensor([-1, 20]), accept, nodes), (torch.tensor([10, 38]), accept, nodes)):
        caches = make_caches(batch, seq, torch.float16, gen)
        cpu, gpu = caches("cpu"), caches(CUDA)
        before = [g.clone() for g in gpu]
        same_error(ops.compact_kv, (cpu, p, nd, a), (gpu, p.to(CUDA), nd.to(CUDA), a.to(CUDA)))
        assert all(torch.equal(g, b) for g, b in zip(gpu, before))


# ----------------------------------------------------------------------------------- tree_attention
ATOL_FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def attention_inputs(batch, hq, hkv, n, seq, d, dtype, gen):
    """(views, mask): views(device) gives q, k, v there, laid out as a model has them: q [B, N, Hq, D]
    seen through a transpose, k and v slices of a longer cache."""
    q = torch.randn(batch, n, hq, d, generator=gen).to(dtype)
    k = torch.randn(batch, hkv, seq + 3, d, generator=gen).to(dtype)
    v = torch.randn(batch, hkv, seq + 3, d, generator=gen).to(dtype)
    mask = ancestor_mask(random_tree(n, gen)[0])
    mask[n - 1] = False  # with a zero prefix, node n-1 sees nothing

    def views(device):
        return q.to(device).transpose(1, 2), k.to(device)[:, :, :seq], v.to(device)[:, :, :seq]

    return views, mask


def assert_within_reference_rule(q, k, v, prefix, mask, scale, out):
    expected = reference.tree_attention(q.double(), k.double(), v.double(), prefix, mask, scale)
    same_precision = reference.tree_attention(q, k, v, prefix, mask, scale)
    ours = (out.cpu().double() - expected).abs().max().item()
    theirs = (same_precision.double() - expected).abs().max().item()
    assert ours <= 3 * theirs + ATOL_FLOOR[q.dtype], f"error {ours:.3g} vs torch's {theirs:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("batch,hq,hkv,n,prefix", [(2, 8, 2, 17, (700, 0)), (1, 4, 4, 1, (5,)),
                                                   (3, 6, 3, 81, (2500, 33, 0)), (1, 2, 1, 256, (300,))])
def test_tree_attention_within_fp64_reference_rule(dtype, d, batch, hq, hkv, n, prefix):
    gen = torch.Generator().manual_seed(d + n)
    seq = max(prefix) + n + 4
    views, mask = attention_inputs(batch, hq, hkv, n, seq, d, dtype, gen)
    q, k, v = views("cpu")
    prefix_len = torch.tensor(prefix)
    scale = d ** -0.5
    for p in (prefix_len.to(CUDA), prefix_len):  # prefix on the GPU (checked by the kernel) or on the CPU
        out = ops.tree_attention(*views(CUDA), p, mask.to(CUDA), scale)
        assert out.shape == q.shape and out.dtype == dtype
        assert_within_reference_rule(q, k, v, prefix_len, mask, scale, out)
        for b in range(batch):
            if prefix[b] == 0 and n > 1:
                assert torch.count_nonzero(out[b, :, n - 1]) == 0  # sees no key


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tree_attention_llama_shapes(dtype):
    gen = torch.Generator().manual_seed(7)
    n, prefix = 81, 4096
    views, mask = attention_inputs(1, 32, 8, n, prefix + n, 128, dtype, gen)
    q, k, v = views("cpu")
    prefix_len = torch.tensor([prefix])
    out = ops.tree_attention(*views(CUDA), prefix_len, mask.to(CUDA), 128 ** -0.5)
    assert_within_reference_rule(q, k, v, prefix_len, mask, 128 ** -0.5, out)


def test_tree_attention_bad_input():
    gen = torch.Generator().manual_seed(8)
    views, mask = attention_inputs(2, 4, 2, 10, 50, 64, torch.float16, gen)
    for prefix in (torch.tensor([40, 41]), torch.tensor([-1, 0])):
        args = (*views("cpu"), prefix, mask, 0.125)
        same_error(ops.tree_attention, args, to_cuda(args))  # prefix on the GPU: reported by the kernel
        same_error(ops.tree_attention, args, (*views(CUDA), prefix, mask.to(CUDA), 0.125))  # on the CPU
    qc, kc, vc = views(CUDA)
    with pytest.raises(ValueError, match="head_dim must be"):
        ops.tree_attention(qc[..., :48], kc[..., :48], vc[..., :48], torch.tensor([3, 3]), mask.to(CUDA), 0.1)
    big = torch.zeros(1, 1, 257, 64, device=CUDA)
    with pytest.raises(ValueError, match="at most 256 tree nodes"):
        ops.tree_attention(big, big, big, torch.tensor([0]), torch.ones(257, 257, dtype=torch.bool, device=CUDA), 0.1)
    with pytest.raises(ValueError, match="is on cpu"):
        ops.tree_attention(qc, kc, vc, torch.tensor([3, 3]), mask, 0.1)


# ----------------------------------------------------------------------------------- opcheck
def opcheck_cases():
    gen = torch.Generator().manual_seed(9)
    parents, ranks = random_tree(12, gen, 4)
    matrix = torch.randint(0, 30, (30, 4), generator=gen, dtype=torch.int32)
    tokens = torch.randint(0, 30, (2, 12), generator=gen)
    views, mask = attention_inputs(2, 4, 2, 12, 40, 64, torch.bfloat16, gen)
    q, k, v = views("cpu")
    caches = [torch.randn(2, 2, 40, 64, generator=gen) for _ in range(4)]
    return {
        "build_draft_tree": (matrix, torch.tensor([1, 2]), parents, ranks),
        "verify_greedy": (tokens, torch.randint(0, 30, (2, 12), generator=gen), parents),
        "update_adjacency": (matrix, tokens, torch.randint(0, 30, (2, 12, 4), generator=gen)),
        "compact_kv": (caches, torch.tensor([10, 20]), torch.tensor([[0, 3, 5], [0, 1, -1]]), torch.tensor([3, 2])),
        "tree_attention": (q, k, v, torch.tensor([20, 28]), mask, 0.125),
    }


@pytest.mark.parametrize("name", ["build_draft_tree", "verify_greedy", "update_adjacency", "compact_kv",
                                  "tree_attention", "tree_attention_host_prefix"])
def test_opcheck_on_cuda(name):
    cases = opcheck_cases()
    if name == "tree_attention_host_prefix":  # q, k, v on the GPU, prefix_len on the CPU
        q, k, v, prefix, mask, scale = cases["tree_attention"]
        args = (*to_cuda((q, k, v)), prefix, mask.to(CUDA), scale)
        name = "tree_attention"
    else:
        args = to_cuda(cases[name])
    torch.library.opcheck(getattr(torch.ops.token_recycling, name).default, args)
