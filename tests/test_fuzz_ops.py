"""Every ``torch.ops.token_recycling`` op (CPU) called with thousands of random inputs, valid and not.

Each case is built valid and then, about half the time, given one fault: a wrong dtype, rank or
size, an out-of-range id, a negative or too large length or prefix (int64 extremes included), a
broken tree, an empty tree, a non-contiguous in-place argument, an index out of step with its
lengths, or a Python value where a tensor goes. Valid inputs are often empty (batch 0, no keys)
or non-contiguous. A valid call must return what ``token_recycling.testing.reference`` returns (attention:
within float tolerance of a float64 reference); a faulty one must raise ValueError or TypeError
naming the op (RuntimeError only for the faults torch's schema check rejects before our code
runs), and the in-place ops must leave their tensors untouched. A kernel that read or wrote out of
bounds would crash the process (``bench/cpp/fuzz_kernels.cpp`` fuzzes the same kernels under
AddressSanitizer). Each test draws a fresh seed and names it in any failure.
"""

from __future__ import annotations

import dataclasses
import platform
import random
from typing import Callable

import pytest
import torch

import token_recycling  # noqa: F401  (loads the ops)
from token_recycling.testing import reference
from token_recycling.ngram import new_ngram_table

OPS = torch.ops.token_recycling
CALLS = 600  # per op; about 7500 calls in all (a few seconds)
I64_MIN, I64_MAX = -(2**63), 2**63 - 1
I32_MIN, I32_MAX = -(2**31), 2**31 - 1
ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.int8, torch.int16, torch.int32, torch.int64,
              torch.bool, torch.uint8]


@dataclasses.dataclass
class Case:
    args: list
    fault: str | None = None                  # None: valid input
    raises: tuple = (ValueError,)             # what a faulty call must raise
    check: Callable | None = None             # valid input: checks the op's result against the reference
    unchanged: list = dataclasses.field(default_factory=list)  # tensors a faulty call must not touch


def drive(op: str, make: Callable[[random.Random, torch.Generator], Case]) -> None:
    seed = random.randrange(2**31)
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    accepted = rejected = 0
    for i in range(CALLS):
        case = make(rng, gen)
        where = f"{op} call {i} (seed {seed}), fault {case.fault!r}"
        before = [t.clone() for t in case.unchanged]
        try:
            out = getattr(OPS, op)(*case.args)
        except (ValueError, TypeError, RuntimeError) as exc:
            assert case.fault is not None, f"{where}: valid input raised {type(exc).__name__}: {exc}"
            assert isinstance(exc, case.raises), f"{where}: raised {type(exc).__name__} ({exc}), want {case.raises}"
            assert op in str(exc), f"{where}: the message does not name the op: {exc}"
            for t, b in zip(case.unchanged, before):
                assert torch.equal(t, b), f"{where}: an in-place argument changed on bad input"
            rejected += 1
            continue
        assert case.fault is None, f"{where}: accepted"
        case.check(out)
        accepted += 1
    assert accepted > CALLS // 5 and rejected > CALLS // 5, (op, seed, accepted, rejected)


# ------------------------------------------------------------------------------------- helpers

def ints(gen, lo, hi, shape, dtype=torch.long):
    if hi <= lo or 0 in shape:
        return torch.full(shape, lo, dtype=dtype)
    return torch.randint(lo, hi, shape, generator=gen, dtype=dtype)


def bad_id(rng, hi, int32=False):
    """A value outside [0, hi): next to the range, far from it, or at the integer extremes."""
    lo_ext, hi_ext = (I32_MIN, I32_MAX) if int32 else (I64_MIN, I64_MAX)
    return rng.choice([-1, hi, hi + rng.randrange(1, 100), -rng.randrange(2, 100), lo_ext, hi_ext])


def tree(rng, n):
    return [-1] + [rng.randrange(max(0, i - 6), i) for i in range(1, n)]


def break_tree(rng, parents):
    i = rng.randrange(len(parents))
    parents[i] = rng.choice([0, 1, -2, I32_MAX]) if i == 0 else rng.choice([i, i + 1, -1, -2, I32_MIN, I32_MAX])


def scramble(t, rng):
    """The same values, often in a non-contiguous tensor (strided, transposed or offset)."""
    if t.dim() == 0 or t.numel() < 2 or rng.random() < 0.5:
        return t
    kind = rng.randrange(3)
    if kind == 0:  # every other element of a wider tensor
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    if kind == 1 and t.dim() >= 2:  # column-major storage
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    big = torch.zeros(t.shape[0] + 1, *t.shape[1:], dtype=t.dtype)  # a storage offset
    big[1:] = t
    return big[1:]


def wrong_dtype(rng, t, allowed):
    return t.to(rng.choice([d for d in ALL_DTYPES if d not in allowed]))


def python_value_fault(rng, case):
    """A Python int where a tensor goes: torch's schema check raises RuntimeError before our code."""
    case.args[rng.choice([i for i, a in enumerate(case.args) if isinstance(a, torch.Tensor)])] = 3
    case.fault, case.raises = "python value", (RuntimeError,)


def equal(a, b, where=""):
    assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"{where}: {a} != {b}"


# -------------------------------------------------------------------------------- build_draft_tree

def make_build_draft_tree(rng, gen):
    V, k, B, N = rng.randrange(0, 30), rng.randrange(1, 6), rng.randrange(0, 4), rng.randrange(1, 20)
    B = B if V > 0 else 0
    mdtype = rng.choice([torch.int32, torch.int64])
    matrix = ints(gen, 0, V, (V, k), mdtype)
    parents, ranks = tree(rng, N), [rng.randrange(-5, 50)] + [rng.randrange(k) for _ in range(N - 1)]
    roots = ints(gen, 0, V, (B,))
    fault = rng.choice([None] * 9 + ["dtype", "rank", "ranks size", "k = 0", "no nodes", "tree", "rank id", "root id",
                                     "matrix entry", "python"])
    raises = (ValueError,)
    if fault == "tree":
        break_tree(rng, parents)
    elif fault == "rank id" and N > 1:
        ranks[rng.randrange(1, N)] = bad_id(rng, k, int32=True)
    elif fault == "root id" and B > 0:
        roots[rng.randrange(B)] = bad_id(rng, V)
    elif fault == "matrix entry" and V > 0:
        for _ in range(rng.randrange(1, 4)):
            matrix[rng.randrange(V), rng.randrange(k)] = bad_id(rng, V, int32=mdtype == torch.int32)
    elif fault in ("rank id", "root id", "matrix entry"):
        fault = None
    args = [matrix, roots, torch.tensor(parents, dtype=torch.int32), torch.tensor(ranks, dtype=torch.int32)]
    if fault == "dtype":
        i = rng.randrange(4)
        args[i] = wrong_dtype(rng, args[i], [[torch.int32, torch.int64], [torch.int64], [torch.int32], [torch.int32]][i])
        raises = (TypeError,)
    elif fault == "rank":
        i = rng.randrange(4)
        args[i] = args[i].unsqueeze(0)
    elif fault == "ranks size":
        args[3] = torch.cat([args[3], args[3][:1]])
    elif fault == "k = 0":
        args[0] = matrix[:, :0]
    elif fault == "no nodes":
        args[2], args[3] = args[2][:0], args[3][:0]
    if fault == "matrix entry":  # a bad entry is an error only where the walk reads it
        try:
            reference_tokens = reference.build_draft_tree(matrix, roots, args[2], args[3])
            fault = None if bool(((reference_tokens >= 0) & (reference_tokens < V)).all()) else fault
        except IndexError:
            pass
    case = Case(args, fault, raises)
    if fault == "python":
        python_value_fault(rng, case)
    if case.fault is None:
        case.args = [scramble(a, rng) for a in args]
        want = reference.build_draft_tree(*args)
        case.check = lambda out: equal(out, want, "build_draft_tree")
    return case


def test_fuzz_build_draft_tree():
    drive("build_draft_tree", make_build_draft_tree)


# -------------------------------------------------------------------------------- update_adjacency

def make_update_adjacency(rng, gen):
    V, k, B, N = rng.randrange(1, 30), rng.randrange(0, 5), rng.randrange(0, 4), rng.randrange(0, 20)
    mdtype, cdtype = rng.choice([torch.int32, torch.int64]), rng.choice([torch.int32, torch.int64])
    matrix = ints(gen, -3, 50, (V, k), mdtype)
    tokens = ints(gen, 0, min(V, 6), (B, N))  # few distinct tokens: the last occurrence must win
    cand = ints(gen, 0, V, (B, N, k), cdtype)
    fault = rng.choice([None] * 8 + ["dtype", "rank", "size", "token id", "candidate id", "non-contiguous matrix",
                                     "python"])
    raises = (ValueError,)
    if fault == "token id" and tokens.numel():
        tokens.view(-1)[rng.randrange(tokens.numel())] = bad_id(rng, V)
    elif fault == "candidate id" and cand.numel():
        cand.view(-1)[rng.randrange(cand.numel())] = bad_id(rng, V, int32=cdtype == torch.int32)
    elif fault in ("token id", "candidate id"):
        fault = None
    args = [matrix, tokens, cand]
    if fault == "dtype":
        i = rng.randrange(3)
        args[i] = wrong_dtype(rng, args[i], [[torch.int32, torch.int64], [torch.int64], [torch.int32, torch.int64]][i])
        raises = (TypeError,)
    elif fault == "rank":
        i = rng.randrange(3)
        args[i] = args[i].unsqueeze(0)
    elif fault == "size":
        d = rng.randrange(3)
        shape = list(cand.shape)
        shape[d] += 1
        args[2] = ints(gen, 0, V, tuple(shape), cdtype)
    elif fault == "non-contiguous matrix":
        if V < 2 or k < 2:  # a transposed [1, k] or [V, 1] tensor is still contiguous
            fault = None
        else:
            args[0] = matrix.t().contiguous().t()
    case = Case(args, fault, raises, unchanged=[args[0]] if isinstance(args[0], torch.Tensor) else [])
    if fault == "python":
        python_value_fault(rng, case)
        case.unchanged = [a for a in case.args[:1] if isinstance(a, torch.Tensor)]
    if case.fault is None:
        case.args = [matrix, scramble(tokens, rng), scramble(cand, rng)]
        want = matrix.clone()
        reference.update_adjacency(want, tokens, cand)
        case.check = lambda out: equal(matrix, want, "update_adjacency")
    return case


def test_fuzz_update_adjacency():
    drive("update_adjacency", make_update_adjacency)


# ----------------------------------------------------------------------------------- verify_greedy

def make_verify_greedy(rng, gen):
    B, N, per_row = rng.randrange(0, 4), rng.randrange(1, 25), rng.random() < 0.3
    trees = [tree(rng, N) for _ in range(B if per_row else 1)]
    tokens = ints(gen, 0, 3, (B, N))
    preds = ints(gen, 0, 3, (B, N))
    for b in range(B):  # predictions that often equal a child's token: long accepted paths
        par = trees[b if per_row else 0]
        for i in range(1, N):
            if rng.random() < 0.5:
                preds[b, par[i]] = tokens[b, i]
    if B and N and rng.random() < 0.1:
        preds.view(-1)[rng.randrange(B * N)] = rng.choice([I64_MIN, I64_MAX])  # predictions are any int64
    fault = rng.choice([None] * 8 + ["dtype", "rank", "shape", "parents rows", "parents size", "tree", "no nodes",
                                     "python"])
    raises = (ValueError,)
    if fault == "tree" and trees:
        break_tree(rng, rng.choice(trees))
    elif fault == "tree":
        fault = None
    parents = torch.tensor(trees, dtype=torch.int32).reshape(len(trees), N)
    parents = parents if per_row else parents[0]
    args = [tokens, preds, parents]
    if fault == "dtype":
        i = rng.randrange(3)
        args[i] = wrong_dtype(rng, args[i], [[torch.int64], [torch.int64], [torch.int32]][i])
        raises = (TypeError,)
    elif fault == "rank":
        i = rng.randrange(3)
        args[i] = args[i].unsqueeze(0).unsqueeze(0)
    elif fault == "shape":
        args[1] = ints(gen, 0, 3, (B, N + 1))
    elif fault == "parents rows":
        args[2] = torch.tensor([tree(rng, N)] * (B + 1), dtype=torch.int32)
    elif fault == "parents size":
        args[2] = torch.tensor(tree(rng, N + 1), dtype=torch.int32)
    elif fault == "no nodes":
        args = [tokens[:, :0], preds[:, :0], parents[..., :0]]
    case = Case(args, fault, raises)
    if fault == "python":
        python_value_fault(rng, case)
    if case.fault is None:
        case.args = [scramble(a, rng) for a in args]
        want = reference.verify_greedy(*args)
        case.check = lambda out: [equal(o, w, "verify_greedy") for o, w in zip(out, want)]
    return case


def test_fuzz_verify_greedy():
    drive("verify_greedy", make_verify_greedy)


# -------------------------------------------------------------------------------------- compact_kv

CACHE_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int8, torch.int64, torch.bool]


def make_compact_kv(rng, gen):
    B, S, W = rng.randrange(0, 4), rng.randrange(0, 20), rng.randrange(0, 7)
    dtype = rng.choice(CACHE_DTYPES)
    caches = []
    for _ in range(rng.randrange(1, 4)):
        H, D = rng.randrange(0, 3), rng.randrange(0, 6)
        c = torch.randint(-100, 100, (B, H, S, D), generator=gen).to(dtype)
        caches.append(scramble(c, rng) if rng.random() < 0.5 else c.transpose(1, 2).contiguous().transpose(1, 2))
    prefix = torch.tensor([rng.randrange(S + 1) for _ in range(B)], dtype=torch.long)
    length = torch.tensor([rng.randrange(min(W, S - int(p)) + 1) for p in prefix], dtype=torch.long)
    nodes = torch.full((B, W), -1, dtype=torch.long)
    for b in range(B):
        for j in range(int(length[b])):
            nodes[b, j] = rng.randrange(S - int(prefix[b]))
        if W and rng.random() < 0.2:
            nodes[b, W - 1] = rng.choice([I64_MIN, I64_MAX]) if length[b] < W else nodes[b, W - 1]  # padding: not read
    fault = rng.choice([None] * 8 + ["no caches", "rank", "batch", "seq", "cache dtype", "index dtype", "index rank",
                                     "index size", "prefix", "accept_len", "node", "16-byte elements", "python"])
    raises = (ValueError,)
    if fault == "prefix" and B:
        prefix[rng.randrange(B)] = bad_id(rng, S + 1)
    elif fault == "accept_len" and B:
        length[rng.randrange(B)] = bad_id(rng, W + 1)
    elif fault == "node" and B and int(length.max()) > 0:
        b = int(length.argmax())
        nodes[b, rng.randrange(int(length[b]))] = bad_id(rng, S - int(prefix[b]))
        if rng.random() < 0.3:
            nodes[b, 0], prefix[b] = I64_MAX, max(int(prefix[b]), 1)  # prefix + node overflows int64
    elif fault in ("prefix", "accept_len", "node"):
        fault = None
    indices = [prefix, nodes, length]
    if fault == "no caches":
        caches = []
    elif fault == "rank":
        caches[-1] = caches[-1].flatten(0, 1)
    elif fault == "batch":
        caches.append(torch.zeros(B + 1, 1, S, 2, dtype=dtype))
    elif fault == "seq":
        caches.append(torch.zeros(B, 1, S + 1, 2, dtype=dtype))
    elif fault == "cache dtype":
        caches.append(torch.zeros(B, 1, S, 2, dtype=rng.choice([d for d in CACHE_DTYPES if d != dtype])))
        raises = (TypeError,)
    elif fault == "16-byte elements":
        caches = [torch.zeros(B, 1, S, 2, dtype=torch.complex128)]
        raises = (TypeError,)
    elif fault == "index dtype":
        i = rng.randrange(3)
        indices[i] = indices[i].int()
        raises = (TypeError,)
    elif fault == "index rank":
        i = rng.randrange(3)
        indices[i] = indices[i].unsqueeze(0)
    elif fault == "index size":
        i = rng.randrange(3)
        indices[i] = torch.cat([indices[i], indices[i].new_zeros(1, *indices[i].shape[1:])])
    case = Case([caches, *indices], fault, raises, unchanged=list(caches))
    if fault == "python":
        case.args[rng.randrange(1, 4)] = 3
        case.fault, case.raises = fault, (RuntimeError,)
    if case.fault is None:
        want = [c.clone() for c in caches]
        reference.compact_kv(want, prefix, nodes, length)
        case.args = [caches, scramble(prefix, rng), scramble(nodes, rng), scramble(length, rng)]
        case.check = lambda out: [equal(c, w, "compact_kv") for c, w in zip(caches, want)]
    return case


def test_fuzz_compact_kv():
    drive("compact_kv", make_compact_kv)


# ---------------------------------------------------------------------------------- tree_attention

TOLERANCE = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def make_tree_attention(rng, gen, lse=False):
    B, Hkv, group, N, D = rng.randrange(0, 3), rng.randrange(1, 4), rng.randrange(1, 4), rng.randrange(0, 7), rng.randrange(0, 9)
    S, Hq = N + rng.randrange(0, 10), Hkv * group
    dtype = rng.choice([torch.float32, torch.float32, torch.float16, torch.bfloat16])
    q = torch.randn(B, N, Hq, D, generator=gen).to(dtype).transpose(1, 2)  # as a model's projection: not contiguous
    k = torch.randn(B, Hkv, S, D, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, S, D, generator=gen).to(dtype)
    prefix = torch.tensor([rng.randrange(S - N + 1) for _ in range(B)], dtype=torch.long)
    # one tree for every row, or one per row; the tree after each prefix, or at one slot for every row
    mask = torch.rand(*([B] if rng.random() < 0.3 else []), N, N, generator=gen) < 0.5
    start = -1
    if rng.random() < 0.3:
        start = rng.randrange(S - N + 1)
        prefix = torch.tensor([rng.randrange(start + 1) for _ in range(B)], dtype=torch.long)
    scale = rng.choice([0.1, 0.35, 1.0])
    fault = rng.choice([None] * 8 + ["q dtype", "kv dtype", "index dtype", "rank", "k != v", "batch", "head_dim",
                                     "heads", "no kv heads", "prefix size", "mask shape", "prefix", "python",
                                     "tree_start"])
    raises = (ValueError,)
    args = [q, k, v, prefix, mask, scale, start]
    if fault == "q dtype":
        args[:3] = [t.double() for t in args[:3]]
        raises = (TypeError,)
    elif fault == "kv dtype":
        args[rng.randrange(1, 3)] = k.to(rng.choice([d for d in TOLERANCE if d != dtype]))
        raises = (TypeError,)
    elif fault == "index dtype":
        i = rng.choice([3, 4])
        args[i] = args[i].int()
        raises = (TypeError,)
    elif fault == "rank":
        i = rng.randrange(5)
        args[i] = args[i].unsqueeze(0).unsqueeze(0) if i == 4 else args[i].unsqueeze(0)  # (masks may be 3-D)
    elif fault == "k != v":
        args[2] = torch.randn(B, Hkv, S + 1, D, generator=gen).to(dtype)
    elif fault == "batch":
        args[1] = args[2] = torch.randn(B + 1, Hkv, S, D, generator=gen).to(dtype)
    elif fault == "head_dim":
        args[1] = args[2] = torch.randn(B, Hkv, S, D + 1, generator=gen).to(dtype)
    elif fault == "heads":  # Hq is not a multiple of Hq + 1
        args[1] = args[2] = torch.randn(B, Hq + 1, S, D, generator=gen).to(dtype)
    elif fault == "no kv heads":
        args[1] = args[2] = torch.randn(B, 0, S, D, generator=gen).to(dtype)
    elif fault == "prefix size":
        args[3] = torch.zeros(B + 1, dtype=torch.long)
    elif fault == "mask shape":
        args[4] = torch.ones(*([B + 1] if rng.random() < 0.5 else []), N, N + 1, dtype=torch.bool)
    elif fault == "tree_start":  # past the keys, below -1, or before a row's prefix
        bad = [S - N + 1 + rng.randrange(4), -2 - rng.randrange(3)]
        if B and int(prefix.max()) > 0:
            bad.append(int(prefix.max()) - 1)
        args[6] = rng.choice(bad)
    elif fault == "prefix":
        if B:
            prefix[rng.randrange(B)] = bad_id(rng, S - N + 1 if start < 0 else start + 1)
        else:
            fault = None
    elif fault == "python":
        args[5] = "0.5"
        raises = (RuntimeError,)
    case = Case(args, fault, raises)
    if case.fault is None:
        case.args = [q, scramble(k, rng), scramble(v, rng), scramble(prefix, rng), scramble(mask, rng), scale, start]
        want, want_lse = reference.tree_attention_lse(q.double(), k.double(), v.double(), prefix, mask, scale, start)

        def check(result):
            out, got_lse = result if lse else (result, None)
            assert out.dtype == dtype and out.shape == q.shape
            close(out, want, TOLERANCE[dtype], "tree_attention")
            if lse:  # the log of each row's softmax denominator, -inf where a row sees no key
                assert got_lse.dtype == torch.float32 and got_lse.shape == q.shape[:3]
                close(got_lse, want_lse, 1e-4, "tree_attention_lse")
        case.check = check
    return case


def close(got, want, tol, what):
    """Equal -inf where want is -inf; elsewhere within tol relative to 1 + |want|."""
    if got.numel() == 0:
        return
    got, dead = got.double(), torch.isneginf(want)
    assert torch.equal(torch.isneginf(got), dead), f"{what}: -inf in the wrong places"
    err = ((got - want).abs() / (1 + want.abs()))[~dead]
    assert err.numel() == 0 or float(err.max()) <= tol, f"{what} off by {float(err.max())}"


def test_fuzz_tree_attention():
    drive("tree_attention", make_tree_attention)


def test_fuzz_tree_attention_lse():
    drive("tree_attention_lse", lambda rng, gen: make_tree_attention(rng, gen, lse=True))


# -------------------------------------------------------------------------- merge_attention_states

def make_merge_attention_states(rng, gen):
    B, H, N, D = rng.randrange(0, 3), rng.randrange(0, 4), rng.randrange(0, 6), rng.randrange(0, 9)
    dtype = rng.choice([torch.float32, torch.float32, torch.float16, torch.bfloat16])
    out_a = torch.randn(B, N, H, D, generator=gen).to(dtype).transpose(1, 2)  # as attention outputs often are
    out_b = torch.randn(B, H, N, D, generator=gen).to(dtype)

    def lse():
        x = torch.randn(B, H, N, generator=gen) * 10
        return x.masked_fill(torch.rand(B, H, N, generator=gen) < 0.2, float("-inf"))  # parts that saw no key
    lse_a, lse_b = lse(), lse()
    fault = rng.choice([None] * 8 + ["out dtype", "out_b dtype", "lse dtype", "rank", "out_b shape", "lse shape",
                                     "python"])
    raises = (ValueError,)
    args = [out_a, lse_a, out_b, lse_b]
    if fault == "out dtype":
        args[0], args[2] = out_a.double(), out_b.double()
        raises = (TypeError,)
    elif fault == "out_b dtype":
        args[2] = out_b.to(rng.choice([d for d in TOLERANCE if d != dtype]))
        raises = (TypeError,)
    elif fault == "lse dtype":
        i = rng.choice([1, 3])
        args[i] = args[i].to(rng.choice([torch.float64, torch.float16, torch.int64]))
        raises = (TypeError,)
    elif fault == "rank":
        i = rng.randrange(4)
        args[i] = args[i].unsqueeze(0)
    elif fault == "out_b shape":
        args[2] = torch.randn(B, H, N + 1, D, generator=gen).to(dtype)
    elif fault == "lse shape":
        i = rng.choice([1, 3])
        args[i] = torch.zeros(B, H, N + 1)
    case = Case(args, fault, raises)
    if fault == "python":
        python_value_fault(rng, case)
    if case.fault is None:
        want, want_lse = reference.merge_attention_states(out_a.double(), lse_a.double(), out_b.double(), lse_b.double())
        case.args = [scramble(a, rng) for a in args]

        def check(result):
            out, got_lse = result
            assert out.dtype == dtype and out.shape == out_a.shape and got_lse.dtype == torch.float32
            close(out, want, TOLERANCE[dtype], "merge_attention_states")
            close(got_lse, want_lse, 1e-5, "merge_attention_states lse")
        case.check = check
    return case


def test_fuzz_merge_attention_states():
    drive("merge_attention_states", make_merge_attention_states)


# ----------------------------------------------------------------------------------- verify_sample

def make_verify_sample(rng, gen):
    B, N, V, per_row = rng.randrange(0, 4), rng.randrange(1, 15), rng.randrange(1, 6), rng.random() < 0.3
    trees = [tree(rng, N) for _ in range(B if per_row else 1)]
    tokens = ints(gen, 0, V, (B, N))  # a small vocabulary: the walk often goes deep
    probs = torch.rand(B, N, V, generator=gen).masked_fill(torch.rand(B, N, V, generator=gen) < 0.3, 0.0)
    probs[..., rng.randrange(V)] += 0.01  # every row has a positive weight
    uniforms = torch.rand(B, N, generator=gen, dtype=torch.float64)
    fault = rng.choice([None] * 8 + ["dtype", "rank", "probs shape", "uniforms shape", "no vocabulary", "tree",
                                     "no nodes", "bad weight", "no weight", "bad uniform", "python"])
    raises = (ValueError,)
    if fault in ("bad weight", "no weight", "bad uniform") and B == 0:
        fault = "tree"  # these need a row; a shared tree is checked even without rows
    if fault == "tree":
        if not trees:
            per_row, trees = False, [tree(rng, N)]
        break_tree(rng, rng.choice(trees))
    elif fault == "bad weight":  # at the root, which every walk reads
        probs[rng.randrange(B), 0, rng.randrange(V)] = rng.choice([-0.5, float("nan"), float("inf")])
    elif fault == "no weight":
        probs[rng.randrange(B), 0] = 0.0
    elif fault == "bad uniform":  # the first draw's
        uniforms[rng.randrange(B), 0] = rng.choice([-0.1, 1.0, 2.5, float("nan")])
    parents = torch.tensor(trees, dtype=torch.int32).reshape(len(trees), N)
    parents = parents if per_row else parents[0]
    args = [tokens, parents, probs, uniforms]
    if fault == "dtype":
        i = rng.randrange(4)
        args[i] = wrong_dtype(rng, args[i], [[torch.int64], [torch.int32], [torch.float32], [torch.float64]][i])
        raises = (TypeError,)
    elif fault == "rank":
        i = rng.randrange(4)
        args[i] = args[i].unsqueeze(0).unsqueeze(0)
    elif fault == "probs shape":
        args[2] = torch.rand(B, N + 1, V, generator=gen)
    elif fault == "uniforms shape":
        args[3] = torch.rand(B + 1, N, generator=gen, dtype=torch.float64)
    elif fault == "no vocabulary":
        args[2] = probs[..., :0]
    elif fault == "no nodes":
        args = [tokens[:, :0], parents[..., :0], probs[:, :0], uniforms[:, :0]]
    case = Case(args, fault, raises)
    if fault == "python":
        python_value_fault(rng, case)
    if case.fault is None:
        want = reference.verify_sample(*args)
        case.args = [scramble(a, rng) for a in args]
        case.check = lambda out: [equal(o, w, "verify_sample") for o, w in zip(out, want)]
    return case


def test_fuzz_verify_sample():
    drive("verify_sample", make_verify_sample)


# ------------------------------------------------------------------------------------- graft_chain

def make_graft_chain(rng, gen):
    B, N, C = rng.randrange(0, 4), rng.randrange(1, 15), rng.randrange(0, 8)
    parents = tree(rng, N)
    tree_tokens = ints(gen, 0, 4, (B, N))  # four symbols: chains often merge into the tree
    chain = torch.full((B, C), -1, dtype=torch.long)
    chain_len = torch.tensor([rng.randrange(C + 1) for _ in range(B)], dtype=torch.long)
    for b in range(B):
        chain[b, : int(chain_len[b])] = ints(gen, 0, 4, (int(chain_len[b]),))
    fault = rng.choice([None] * 8 + ["dtype", "rank", "parents size", "chain rows", "chain_len size", "no nodes",
                                     "tree", "tree token", "chain_len", "chain token", "python"])
    raises = (ValueError,)
    if fault == "tree":
        break_tree(rng, parents)
    elif fault == "tree token" and B:
        tree_tokens[rng.randrange(B), rng.randrange(N)] = rng.choice([-1, -7, I64_MIN])
    elif fault == "chain_len" and B:
        chain_len[rng.randrange(B)] = bad_id(rng, C + 1)
    elif fault == "chain token" and B and int(chain_len.max()) > 0:
        b = int(chain_len.argmax())
        chain[b, rng.randrange(int(chain_len[b]))] = rng.choice([-1, I64_MIN])
    elif fault in ("tree token", "chain_len", "chain token"):
        fault = None
    args = [tree_tokens, torch.tensor(parents, dtype=torch.int32), chain, chain_len]
    if fault == "dtype":
        i = rng.randrange(4)
        args[i] = wrong_dtype(rng, args[i], [[torch.int64], [torch.int32], [torch.int64], [torch.int64]][i])
        raises = (TypeError,)
    elif fault == "rank":
        i = rng.randrange(4)
        args[i] = args[i].unsqueeze(0)
    elif fault == "parents size":
        args[1] = torch.tensor(tree(rng, N + 1), dtype=torch.int32)
    elif fault == "chain rows":
        args[2] = torch.zeros(B + 1, C, dtype=torch.long)
    elif fault == "chain_len size":
        args[3] = torch.zeros(B + 1, dtype=torch.long)
    elif fault == "no nodes":
        args[0], args[1] = tree_tokens[:, :0], args[1][:0]
    case = Case(args, fault, raises)
    if fault == "python":
        python_value_fault(rng, case)
    if case.fault is None:
        want = reference.graft_chain(*args)
        case.args = [scramble(a, rng) for a in args]
        case.check = lambda out: [equal(o, w, "graft_chain") for o, w in zip(out, want)]
    return case


def test_fuzz_graft_chain():
    drive("graft_chain", make_graft_chain)


# ------------------------------------------------------------------------------------ n-gram index

class NgramState:
    """A table and history whose indexed lengths the test tracks, so appends and lookups can be
    made in step (valid) or out of step (an error) on purpose. Rebuilt now and then."""

    def __init__(self):
        self.table = None

    def renew(self, rng, gen, prefill):
        self.B, self.L, self.n = rng.randrange(1, 4), rng.randrange(1, 25), rng.randrange(1, 5)
        self.table = new_ngram_table(self.B, self.L, self.n)
        self.history = ints(gen, 0, rng.randrange(1, 5), (self.B, self.L))
        self.indexed = [rng.randrange(self.L + 1) if prefill else 0 for _ in range(self.B)]
        OPS.ngram_index_append(self.table, self.history, torch.zeros(self.B, dtype=torch.long),
                               torch.tensor(self.indexed))


def state_faults(rng, gen, st, args, raises):
    """Faults of the shared (table, history) state; returns the fault name or None."""
    fault = rng.choice(["table dtype", "history dtype", "table rank", "slot width", "slots", "no planes",
                        "history rows", "lengths dtype", "lengths size"])
    if fault == "table dtype":
        args[0] = st.table.int()
    elif fault == "history dtype":
        args[1] = st.history.int()
    elif fault == "table rank":
        args[0] = st.table[:, 0]
    elif fault == "slot width":
        args[0] = st.table[..., :2].contiguous()
    elif fault == "slots":
        args[0] = torch.zeros(st.B, st.n, rng.choice([st.L, st.table.shape[2] + 1]), 3, dtype=torch.long)
    elif fault == "no planes":
        args[0] = st.table[:, :0].contiguous()
    elif fault == "history rows":
        args[1] = torch.cat([st.history, st.history[:1]])
    elif fault == "lengths dtype":
        args[2] = args[2].int()
    elif fault == "lengths size":
        args[2] = torch.cat([args[2], args[2][:1]])
    raises[0] = (TypeError,) if "dtype" in fault else (ValueError,)
    return fault


def make_ngram_index_append(st):
    def make(rng, gen):
        if st.table is None or rng.random() < 0.05:
            st.renew(rng, gen, prefill=False)
        lo = list(st.indexed)
        hi = [min(x + rng.randrange(0, 8), st.L) for x in lo]
        raises = [(ValueError,)]
        args = [st.table, st.history, None, None]
        fault = rng.choice([None] * 6 + ["state", "ahead", "behind", "past capacity", "shrinks", "negative token",
                                         "non-contiguous table", "python"])
        b = rng.randrange(st.B)
        if fault == "ahead":  # old_len past what the table indexes
            lo[b] = st.indexed[b] + 1
            hi[b] = max(hi[b], lo[b])
            if lo[b] > st.L:
                fault = None
                lo[b] = hi[b] = st.indexed[b]
        elif fault == "behind":  # old_len short of what the table indexes, with tokens to append
            if st.indexed[b] == 0:
                fault = None
            else:
                lo[b] = rng.randrange(st.indexed[b])
                hi[b] = max(hi[b], lo[b] + 1)
        elif fault == "past capacity":
            hi[b] = st.L + rng.choice([1, 5, I64_MAX - st.L])
        elif fault == "shrinks":
            hi[b] = lo[b] - rng.choice([1, 2, I64_MAX])
        elif fault == "negative token":  # in a copy: the index's own history stays clean
            if hi[b] == lo[b]:
                fault = None
            else:
                args[1] = st.history.clone()
                args[1][b, rng.randrange(lo[b], hi[b])] = -rng.randrange(1, 10)
        args[2:] = [torch.tensor(lo), torch.tensor(hi)]
        if fault == "state":
            fault = state_faults(rng, gen, st, args, raises)
        elif fault == "non-contiguous table":
            wide = torch.zeros(*st.table.shape[:-1], 6, dtype=torch.long)
            wide[..., ::2] = st.table
            args[0] = wide[..., ::2]
        case = Case(args, fault, raises[0], unchanged=[st.table])
        if fault == "python":
            python_value_fault(rng, case)
        if case.fault is None:
            def check(out, lo=lo, hi=hi):
                st.indexed = hi
                length = torch.tensor(hi)
                got = OPS.ngram_lookup(st.table, st.history, length, st.n, 6)
                want = reference.ngram_lookup_reference(st.history, length, st.n, 6)
                for g_, w_ in zip(got, want):
                    equal(g_, w_, "ngram_lookup after ngram_index_append")
            case.check = check
        return case
    return make


def make_ngram_lookup(st, candidates=False):
    """ngram_lookup, or ngram_candidates (several continuations) when candidates is set."""
    def make(rng, gen):
        if st.table is None or rng.random() < 0.05:
            st.renew(rng, gen, prefill=True)
        length = list(st.indexed)
        max_ngram, max_tokens, max_candidates = rng.randrange(1, st.n + 1), rng.randrange(1, 8), rng.randrange(1, 4)
        raises = [(ValueError,)]
        args = [st.table, st.history, None, max_ngram, max_tokens] + ([max_candidates] if candidates else [])
        fault = rng.choice([None] * 6 + ["state", "length", "ahead of the index", "max_ngram", "max_tokens", "python"]
                           + (["max_candidates"] if candidates else []))
        b = rng.randrange(st.B)
        if fault == "length":
            length[b] = bad_id(rng, st.L + 1)
        elif fault == "ahead of the index":  # a suffix the table has not indexed yet
            if st.indexed[b] + 1 > st.L or st.indexed[b] + 1 < 2:
                fault = None
            else:
                length[b] = rng.randrange(max(st.indexed[b] + 1, 2), st.L + 1)
        elif fault == "max_ngram":
            args[3] = rng.choice([0, -1, st.n + 1, I64_MIN])
        elif fault == "max_tokens":
            args[4] = rng.choice([0, -1, I64_MIN])
        elif fault == "max_candidates":
            args[5] = rng.choice([0, -1, I64_MIN])
        args[2] = torch.tensor(length)
        if fault == "state":
            fault = state_faults(rng, gen, st, args, raises)
        case = Case(args, fault, raises[0])
        if fault == "python":
            python_value_fault(rng, case)
        if case.fault is None:
            want = (reference.ngram_candidates_reference(st.history, args[2], max_ngram, max_tokens, max_candidates)
                    if candidates else reference.ngram_lookup_reference(st.history, args[2], max_ngram, max_tokens))
            case.args = [scramble(a, rng) if isinstance(a, torch.Tensor) else a for a in args]
            case.check = lambda out: [equal(g_, w_, "ngram_candidates" if candidates else "ngram_lookup")
                                      for g_, w_ in zip(out, want)]
        return case
    return make


def test_fuzz_ngram_index_append():
    drive("ngram_index_append", make_ngram_index_append(NgramState()))


def test_fuzz_ngram_lookup():
    drive("ngram_lookup", make_ngram_lookup(NgramState()))


def test_fuzz_ngram_candidates():
    drive("ngram_candidates", make_ngram_lookup(NgramState(), candidates=True))


# ----------------------------------------------------------------------------------- skinny_linear

def make_skinny_linear(rng, gen):
    n, out, inf = rng.randrange(0, 14), rng.randrange(0, 20), rng.randrange(0, 40)
    lead = rng.choice([(n,), (n,), (1, n), (2, n // 2)])  # x [..., in]
    x, w = torch.randn(*lead, inf, generator=gen), torch.randn(out, inf, generator=gen)
    bias = torch.randn(out, generator=gen) if rng.random() < 0.5 else None
    args = [x, w, bias, rng.random() < 0.5]
    fault = rng.choice([None] * 6 + ["dtype", "rank", "in_features", "bias size", "python"])
    raises = (ValueError,)
    if fault == "dtype":
        i = rng.choice([0, 1] + ([2] if bias is not None else []))
        args[i], raises = wrong_dtype(rng, args[i], [torch.float32]), (TypeError,)
    elif fault == "rank":  # x: any rank >= 1 ([..., in]); weight: 2-D
        if rng.random() < 0.3:
            args[0] = x.sum()
        else:
            args[1] = w.unsqueeze(0) if rng.random() < 0.5 else w.reshape(-1)
    elif fault == "in_features":
        args[1] = torch.randn(out, inf + rng.randrange(1, 4), generator=gen)
    elif fault == "bias size":
        args[2] = torch.randn(out + rng.choice([-1, 1, 2]) if out > 0 else 1, generator=gen)
    case = Case(args, fault, raises)
    if fault == "python":
        python_value_fault(rng, case)
    if case.fault is None:
        want = reference.skinny_linear(x, w, bias)
        case.args = [scramble(x, rng), scramble(w, rng), bias, args[3]]
        case.check = lambda got: torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * (1 + inf ** 0.5))
    return case


def test_fuzz_skinny_linear():
    drive("skinny_linear", make_skinny_linear)


def make_skinny_linear_cat(rng, gen):
    n, inf, parts = rng.randrange(0, 14), rng.randrange(0, 40), rng.randrange(1, 4)
    lead = rng.choice([(n,), (1, n), (2, n // 2)])
    x = torch.randn(*lead, inf, generator=gen)
    ws = [torch.randn(rng.randrange(0, 20), inf, generator=gen) for _ in range(parts)]
    bs = [torch.randn(w.shape[0], generator=gen) for w in ws] if rng.random() < 0.5 else []
    args = [x, ws, bs, rng.random() < 0.5]
    fault = rng.choice([None] * 6 + ["dtype", "in_features", "bias size", "bias count", "no weight"])
    raises = (ValueError,)
    if fault == "dtype":
        i = rng.randrange(parts)
        args[1] = [wrong_dtype(rng, w, [torch.float32]) if j == i else w for j, w in enumerate(ws)]
        raises = (TypeError,)
    elif fault == "in_features":
        i = rng.randrange(parts)
        args[1] = [torch.randn(w.shape[0], inf + rng.randrange(1, 4), generator=gen) if j == i else w
                   for j, w in enumerate(ws)]
    elif fault == "bias size":
        i = rng.randrange(parts)
        args[2] = [torch.randn(w.shape[0] + rng.choice([1, 2]), generator=gen) if j == i else torch.randn(w.shape[0])
                   for j, w in enumerate(ws)]
    elif fault == "bias count":
        args[2] = [torch.randn(w.shape[0], generator=gen) for w in ws] + [torch.randn(1)]
    elif fault == "no weight":
        args[1], args[2] = [], []
    case = Case(args, fault, raises)
    if fault is None:
        want = torch.cat([reference.skinny_linear(x, w, bs[i] if bs else None) for i, w in enumerate(ws)], -1)
        case.args = [scramble(x, rng), [scramble(w, rng) for w in ws], bs, args[3]]
        case.check = lambda got: torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * (1 + inf ** 0.5))
    return case


def test_fuzz_skinny_linear_cat():
    drive("skinny_linear_cat", make_skinny_linear_cat)


def make_skinny_linear_vectorized(rng, gen):
    from token_recycling.tools.models import cpu_flags
    want = {"avx2", "fma"} <= cpu_flags() and platform.machine() in ("x86_64", "AMD64")
    case = Case([], check=lambda got: assert_equal_bool(got, want))
    if rng.random() < 0.5:
        case.args, case.fault, case.raises = [rng.choice([0, True, torch.zeros(1)])], "an argument", (RuntimeError,)
    return case


def assert_equal_bool(got, want):
    assert got is want, (got, want)


def test_fuzz_skinny_linear_vectorized():
    drive("skinny_linear_vectorized", make_skinny_linear_vectorized)


# ------------------------------------------------------------------------------------- greedy_topk

def make_greedy_topk(rng, gen):
    vocab = rng.randrange(0, 120)
    lead = rng.choice([(), (rng.randrange(0, 5),), (1, rng.randrange(0, 5)), (2, rng.randrange(0, 3))])
    dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16])
    logits = ints(gen, -4, 5, (*lead, vocab)).to(dtype)  # small integers: many ties
    if logits.numel() and rng.random() < 0.3:
        flat = logits.view(-1)
        flat[ints(gen, 0, flat.numel(), (3,))] = rng.choice([float("nan"), float("inf"), -float("inf")])
    k = rng.randrange(1, min(vocab, 64) + 1) if vocab else 1
    args = [logits, k]
    fault = rng.choice([None] * 5 + ["dtype", "k", "rank", "python"])
    raises = (ValueError,)
    if fault == "dtype":
        args[0], raises = wrong_dtype(rng, logits, [torch.float32, torch.bfloat16, torch.float16]), (TypeError,)
    elif fault == "k":
        args[1] = rng.choice([0, -1, vocab + rng.randrange(1, 3), 65, I64_MIN, I64_MAX])
        if 1 <= args[1] <= min(vocab, 64):
            args[1] = 0
    elif fault == "rank":
        args[0] = torch.tensor(1.0)
    if fault is None and vocab == 0:
        fault = "k"  # no k fits an empty vocabulary
    case = Case(args, fault, raises)
    if fault == "python":
        python_value_fault(rng, case)
    if case.fault is None:
        want = reference.greedy_topk(logits, k)
        case.args = [scramble(logits, rng), k]
        case.check = lambda got: equal(got, want, "greedy_topk")
    return case


def test_fuzz_greedy_topk():
    drive("greedy_topk", make_greedy_topk)


# ------------------------------------------------------------------------- rms_norm, rotary_embedding

def make_rms_norm(rng, gen):
    dim = rng.randrange(0, 40)
    lead = rng.choice([(), (rng.randrange(0, 4),), (rng.randrange(1, 3), rng.randrange(0, 4))])
    dtype = rng.choice([torch.float32, torch.bfloat16])
    x = (torch.randn((*lead, dim), generator=gen) * rng.choice([1e-3, 1.0, 100.0])).to(dtype)
    weight = torch.randn(dim, generator=gen).to(dtype)
    eps = rng.choice([1e-5, 1e-6])
    args = [x, weight, eps]
    fault = rng.choice([None] * 5 + ["dtype", "weight", "weight dtype", "rank", "python"])
    raises = (ValueError,)
    if fault == "dtype":
        args[0], raises = wrong_dtype(rng, x, [torch.float32, torch.bfloat16]), (TypeError,)
    elif fault == "weight":
        args[1] = torch.randn(dim + rng.choice([1, 2]), generator=gen).to(dtype)
    elif fault == "weight dtype":
        args[1], raises = weight.to(torch.bfloat16 if dtype == torch.float32 else torch.float32), (TypeError,)
    elif fault == "rank":
        args[0], args[1] = torch.tensor(1.0, dtype=dtype), torch.randn(1).to(dtype)
    case = Case(args, fault, raises)
    if fault == "python":
        python_value_fault(rng, case)
    if case.fault is None:
        want = reference.rms_norm(x, weight, eps)
        case.args = [scramble(x, rng), weight, eps]
        case.check = lambda got: equal(got, want, "rms_norm")
    return case


def test_fuzz_rms_norm():
    drive("rms_norm", make_rms_norm)


def make_rotary_embedding(rng, gen):
    b, h, n, d = rng.randrange(0, 3), rng.randrange(0, 4), rng.randrange(0, 5), 2 * rng.randrange(0, 9)
    dtype = rng.choice([torch.float32, torch.bfloat16])
    x = torch.randn(b, n, h, d, generator=gen).to(dtype).transpose(1, 2)  # as q and k are made
    if rng.random() < 0.3:
        x = x.contiguous()
    cos, sin = (torch.randn(b, 1, n, d, generator=gen).to(dtype) for _ in range(2))
    args = [x, cos, sin]
    fault = rng.choice([None] * 5 + ["dtype", "cos", "sin", "odd", "rank", "python"])
    raises = (ValueError,)
    if fault == "dtype":
        args[0], raises = wrong_dtype(rng, x, [torch.float32, torch.bfloat16]), (TypeError,)
    elif fault in ("cos", "sin"):
        bad = torch.randn(b, rng.choice([2, 3]), n, d, generator=gen).to(dtype)
        args[1 if fault == "cos" else 2] = bad
    elif fault == "odd":
        args = [torch.randn(b, h, n, d + 1, generator=gen).to(dtype)] + [torch.randn(b, 1, n, d + 1).to(dtype)] * 2
    elif fault == "rank":
        args[0] = torch.randn(h, n, d, generator=gen).to(dtype)
    case = Case(args, fault, raises)
    if fault == "python":
        python_value_fault(rng, case)
    if case.fault is None:
        want = reference.rotary_embedding(x, cos, sin)
        case.check = lambda got: equal(got, want, "rotary_embedding")
    return case


def test_fuzz_rotary_embedding():
    drive("rotary_embedding", make_rotary_embedding)


# ---------------------------------------------------------------------------- deferred device checks
# (the CPU side: the CUDA side is tested in test_step_sync.py and test_ops_cuda.py on a GPU)

NO_DEFERRED = [torch.device("meta")] + ([] if token_recycling.WITH_CUDA else [torch.device("cuda")])


def make_raise_device_errors(rng, gen):
    record = torch.zeros(6, dtype=torch.long)
    for w in rng.sample(range(1, 6), rng.randrange(0, 6)):  # the other words do not matter without a code
        record[w] = rng.choice([1, -1, I64_MIN, I64_MAX, rng.randrange(1000)])
    record[0] = rng.randrange(0, 50) << 32  # DeviceError::op in the high half; code (low half) 0
    case = Case([scramble(record, rng)], check=lambda out: None)
    if rng.random() < 0.5:
        fault = rng.randrange(4)
        if fault == 0:
            case.args[0] = record.clone()
            case.args[0][0] = (record[0] | rng.choice([1, 3, 17, I32_MAX]))  # a code: an error to raise
            case.fault = "error recorded"
        elif fault == 1:
            case.args[0], case.fault, case.raises = wrong_dtype(rng, record, [torch.long]), "dtype", (TypeError,)
        elif fault == 2:
            case.args[0] = rng.choice([torch.zeros(rng.choice([0, 5, 7, 12]), dtype=torch.long),
                                       torch.zeros(2, 3, dtype=torch.long), torch.zeros((), dtype=torch.long)])
            case.fault = "shape"
        else:
            python_value_fault(rng, case)
    return case


def make_take_device_errors(rng, gen):
    case = Case([torch.device("cpu")], check=lambda out: equal(out, torch.zeros(6, dtype=torch.long),
                                                               "take_device_errors"))
    if rng.random() < 0.5:
        case.args[0], case.fault = rng.choice(NO_DEFERRED), "device without deferred checks"
    return case


def make_set_deferred_device_errors(rng, gen):
    case = Case([torch.device("cpu"), rng.random() < 0.5], check=lambda out: assert_false(out))
    if rng.random() < 0.5:
        case.args[0], case.fault = rng.choice(NO_DEFERRED), "device without deferred checks"
    return case


def assert_false(out):
    assert out is False, out


def test_fuzz_raise_device_errors():
    drive("raise_device_errors", make_raise_device_errors)


def test_fuzz_take_device_errors():
    drive("take_device_errors", make_take_device_errors)


def test_fuzz_set_deferred_device_errors():
    drive("set_deferred_device_errors", make_set_deferred_device_errors)


# --------------------------------------------------------------------------------------- coverage

def test_every_op_is_fuzzed():
    registered = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("token_recycling::")}
    fuzzed = {name[len("test_fuzz_"):] for name in globals() if name.startswith("test_fuzz_")}
    assert registered == fuzzed, f"ops without a fuzz test: {registered - fuzzed}"


@pytest.mark.parametrize("op", ["build_draft_tree", "verify_greedy", "graft_chain"])
def test_drive_reports_a_wrong_verdict(op):
    """The harness can fail: valid cases labelled faulty are accepted by the op, and drive() says so."""
    def accepted_fault(rng, gen):
        case = {"build_draft_tree": make_build_draft_tree, "verify_greedy": make_verify_greedy,
                "graft_chain": make_graft_chain}[op](rng, gen)
        if case.fault is None:
            case.fault = "mislabelled"
        return case
    with pytest.raises(AssertionError, match="mislabelled"):
        drive(op, accepted_fault)
