"""Two-part tree attention: the prefix through torch's flash SDPA with its log-sum-exp (GQA folded
into query rows), the tree block through ops.tree_attention_lse, merged by ops.merge_attention_states.
Each op against an fp64 reference within the test rule (error <= 2x a same-precision torch
reference's + eps); the whole decomposition against fp64; and the decode loop through it lossless."""


import pytest
import torch
from conftest import ancestor_mask, random_tree
from models import private_copy

from token_recycling import TokenRecycler, hf_attention, ops
from token_recycling.testing import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LOOSE = {torch.float32: 1e-4, torch.float16: 0.02, torch.bfloat16: 0.05}


def within_rule(ours, same_precision, exact, what):
    our_err = (ours.double() - exact).abs().max().item()
    torch_err = (same_precision.double() - exact).abs().max().item()
    assert our_err <= 2 * torch_err + 1e-6, (what, our_err, torch_err)


def poisoned_lse(gen, shape, dead_fraction=0.2):
    lse = torch.randn(shape, generator=gen, dtype=torch.float64) * 4
    lse[torch.rand(shape, generator=gen) < dead_fraction] = float("-inf")
    return lse


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 8), (2, 4, 17, 64), (1, 3, 81, 32)])
def test_merge_attention_states_vs_fp64(gen, dtype, shape):
    a64 = torch.randn(shape, generator=gen, dtype=torch.float64)
    b64 = torch.randn(shape, generator=gen, dtype=torch.float64)
    la, lb = poisoned_lse(gen, shape[:3]), poisoned_lse(gen, shape[:3])
    a, b = a64.to(dtype), b64.to(dtype)
    la32, lb32 = la.float(), lb.float()
    out, lse = ops.merge_attention_states(a, la32, b.transpose(2, 3).contiguous().transpose(2, 3), lb32)  # strides
    exact, exact_lse = reference.merge_attention_states(a.double(), la32.double(), b.double(), lb32.double())
    same, _ = reference.merge_attention_states(a, la32, b, lb32)
    assert out.dtype == dtype and out.shape == a.shape and lse.dtype == torch.float32
    within_rule(out, same, exact, "out")
    dead = (la32 == float("-inf")) & (lb32 == float("-inf"))
    assert torch.equal(out[dead], torch.zeros_like(out[dead]))
    assert bool((lse[dead] == float("-inf")).all())
    torch.testing.assert_close(lse[~dead].double(), exact_lse[~dead], rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,hq,hkv,n,prefix_max,d", [(1, 4, 4, 1, 0, 16), (2, 8, 2, 17, 40, 64)])
def test_tree_attention_lse_vs_fp64(gen, dtype, batch, hq, hkv, n, prefix_max, d):
    seq = prefix_max + n + 3
    q64 = torch.randn(batch, hq, n, d, generator=gen, dtype=torch.float64)
    k64 = torch.randn(batch, hkv, seq, d, generator=gen, dtype=torch.float64)
    v64 = torch.randn(batch, hkv, seq, d, generator=gen, dtype=torch.float64)
    prefix = torch.randint(0, prefix_max + 1, (batch,), generator=gen)
    mask = ancestor_mask(random_tree(n, gen, chain_bias=0.5)[0])
    q, k, v = (t.to(dtype) for t in (q64, k64, v64))
    scale = d ** -0.5
    out, lse = ops.tree_attention_lse(q, k, v, prefix, mask, scale)
    exact, exact_lse = reference.tree_attention_lse(q.double(), k.double(), v.double(), prefix, mask, scale)
    same, _ = reference.tree_attention_lse(q, k, v, prefix, mask, scale)
    within_rule(out, same, exact, "out")
    assert torch.equal(out, ops.tree_attention(q, k, v, prefix, mask, scale))  # the same kernel
    torch.testing.assert_close(lse.double(), exact_lse, rtol=1e-5, atol=1e-4)


def test_lse_of_a_row_that_sees_nothing_is_minus_inf():
    q, k = torch.randn(1, 2, 2, 8), torch.randn(1, 2, 2, 8)
    mask = torch.tensor([[True, False], [False, False]])
    out, lse = ops.tree_attention_lse(q, k, k.clone(), torch.tensor([0]), mask, 0.3)
    assert torch.equal(out[0, :, 1], torch.zeros(2, 8)) and bool((lse[0, :, 1] == float("-inf")).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv,n,prefix,d", [(4, 4, 1, 1, 16), (8, 2, 17, 40, 64), (6, 3, 81, 130, 32)])
def test_two_part_attention_vs_fp64(gen, dtype, hq, hkv, n, prefix, d):
    """The whole decomposition (prefix flash + tree block + merge) against fp64 single-pass attention;
    the keys run past prefix + N (a static cache's unused tail must not be seen)."""
    seq = prefix + n + 5
    q64 = torch.randn(1, hq, n, d, generator=gen, dtype=torch.float64)
    k64 = torch.randn(1, hkv, seq, d, generator=gen, dtype=torch.float64)
    v64 = torch.randn(1, hkv, seq, d, generator=gen, dtype=torch.float64)
    mask = ancestor_mask(random_tree(n, gen, chain_bias=0.5)[0])
    q, k, v = (t.to(dtype) for t in (q64, k64, v64))
    scale = d ** -0.5
    ours = hf_attention.two_part_attention(q, k, v, prefix, mask, scale)
    p = torch.tensor([prefix])
    exact = reference.tree_attention(q.double(), k.double(), v.double(), p, mask, scale)
    same = reference.tree_attention(q, k, v, p, mask, scale)
    assert ours.dtype == dtype and ours.shape == q.shape
    within_rule(ours, same, exact, "two-part")


def test_ops_opcheck(gen):
    q = torch.randn(1, 4, 5, 16, generator=gen)
    k = torch.randn(1, 2, 9, 16, generator=gen)
    mask = ancestor_mask(random_tree(5, gen)[0])
    torch.library.opcheck(torch.ops.token_recycling.tree_attention_lse.default,
                          (q, k, k.clone(), torch.tensor([3]), mask, 0.25))
    lse = torch.randn(1, 4, 5, generator=gen)
    torch.library.opcheck(torch.ops.token_recycling.merge_attention_states.default, (q, lse, q.clone() + 1, -lse))


def test_merge_attention_states_rejects_bad_input():
    a, lse = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3)
    with pytest.raises(TypeError, match="lse_a"):
        ops.merge_attention_states(a, lse.double(), a, lse)
    with pytest.raises(TypeError, match="out_b"):
        ops.merge_attention_states(a, lse, a.half(), lse)
    with pytest.raises(ValueError, match="lse_b"):
        ops.merge_attention_states(a, lse, a, lse[:, :, :2])
    with pytest.raises(ValueError, match="out_b"):
        ops.merge_attention_states(a, lse, a[:, :1], lse)


@pytest.fixture
def no_table(monkeypatch):
    """The rule's defaults: no env threshold, no measured table."""
    monkeypatch.setattr(hf_attention, "TWO_PART_MIN_PREFIX", None)
    monkeypatch.setattr(hf_attention, "path_table", lambda path=None: None)


TABLE = {"device_type": "cuda", "device": "test GPU", "dtype": "bfloat16",
         "rules": [{"group": 4, "max_nodes": 16, "two_part_min_prefix": 2048},
                   {"group": 4, "max_nodes": 81, "two_part_min_prefix": 8192},
                   {"group": 4, "max_nodes": 128, "two_part_min_prefix": None},
                   {"group": 1, "max_nodes": 128, "two_part_min_prefix": 1024}]}


def test_rule_defaults(no_table):
    """Until a GPU table exists: two-part on CUDA in 16 bits from a prefix of 4096, never in fp32;
    the CPU keeps the single kernel at any prefix."""
    rule = hf_attention.path_rule
    assert hf_attention.DEFAULT_CUDA_MIN_PREFIX == 4096
    for dtype in (torch.float16, torch.bfloat16):
        assert rule(4095, 32, 8, 81, "cuda", dtype) == "single"
        assert rule(4096, 32, 8, 81, "cuda", dtype) == "two-part"
        assert rule(32768, 32, 32, 16, "cuda", dtype) == "two-part"
    assert rule(32768, 32, 8, 81, "cuda", torch.float32) == "single"
    for dtype in DTYPES:
        assert rule(10**6, 32, 8, 81, "cpu", dtype) == "single"


def test_rule_from_a_table(no_table):
    """The table's threshold for the nearest GQA group and the smallest measured tree that holds the
    tree (else the largest); null: never; another device type's table: the defaults."""
    rule = hf_attention.path_rule
    bf16 = torch.bfloat16
    assert rule(2047, 32, 8, 16, "cuda", bf16, TABLE) == "single"
    assert rule(2048, 32, 8, 16, "cuda", bf16, TABLE) == "two-part"
    assert rule(2048, 32, 8, 17, "cuda", bf16, TABLE) == "single"   # 17 nodes: the 81-node row
    assert rule(8192, 32, 8, 64, "cuda", bf16, TABLE) == "two-part"
    assert rule(10**6, 32, 8, 100, "cuda", bf16, TABLE) == "single"  # the 128-node row: never
    assert rule(10**6, 32, 8, 200, "cuda", bf16, TABLE) == "single"  # past the table: its largest tree
    assert rule(1024, 32, 32, 81, "cuda", bf16, TABLE) == "two-part"  # MHA: group 1
    assert rule(1024, 28, 28, 81, "cuda", bf16, TABLE) == "two-part"
    assert rule(1023, 32, 16, 16, "cuda", bf16, TABLE) == "single"  # group 2: the nearest measured is 1
    assert rule(1024, 32, 16, 16, "cuda", bf16, TABLE) == "two-part"
    assert rule(32768, 32, 8, 16, "cuda", torch.float32, TABLE) == "single"
    cpu_table = dict(TABLE, device_type="cpu")
    assert hf_attention.two_part_min_prefix(32, 8, 16, "cuda", cpu_table) == 4096  # not this device's: defaults
    assert hf_attention.two_part_min_prefix(32, 8, 16, "cpu", cpu_table) == 2048


def test_env_threshold_overrides_table_and_defaults(monkeypatch):
    monkeypatch.setattr(hf_attention, "TWO_PART_MIN_PREFIX", 100)
    assert hf_attention.path_rule(99, 4, 4, 5, "cpu", torch.float32, TABLE) == "single"
    assert hf_attention.path_rule(100, 4, 4, 5, "cpu", torch.float32, TABLE) == "two-part"
    assert hf_attention.path_rule(100, 32, 8, 128, "cuda", torch.bfloat16, TABLE) == "two-part"
    assert hf_attention.path_rule(10**6, 32, 8, 128, "cuda", torch.float32, TABLE) == "single"


def test_choose_path(monkeypatch):
    q = torch.randn(1, 4, 5, 16)
    k = torch.randn(1, 2, 9, 16)
    monkeypatch.setattr(hf_attention, "TWO_PART_MIN_PREFIX", 100)
    assert hf_attention.choose_path(99, q) == "single"
    assert hf_attention.choose_path(100, q) == "two-part"
    assert hf_attention.choose_path(100, q, k) == "two-part"
    monkeypatch.setattr(hf_attention, "TWO_PART_MIN_PREFIX", 1)
    # A prefix on the device (the graph step) takes the single kernel at any threshold: no sync.
    assert hf_attention.choose_path(torch.tensor([500]), q) == "single"


def test_path_table_file(tmp_path, monkeypatch):
    """The table is read from TOKEN_RECYCLING_ATTENTION_TABLE (or the package's attention_paths.json);
    a malformed one is an error. bench/attention_vs_sdpa.py's rule_table writes the format read here."""
    import importlib.util
    from pathlib import Path
    path = tmp_path / "paths.json"
    script = Path(__file__).resolve().parent.parent / "bench" / "attention_vs_sdpa.py"
    if not script.is_file():
        pytest.skip("needs the source tree's bench/")
    spec = importlib.util.spec_from_file_location("attention_vs_sdpa", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = [{"hq": 32, "hkv": 8, "n": 81, "prefix": p, "dtype": "bfloat16", "ours_ms": 1.0, "two_ms": t}
            for p, t in ((1024, 1.5), (2048, 0.9), (4096, 1.1), (8192, 0.8), (16384, 0.7))]
    rows += [{"hq": 32, "hkv": 32, "n": 81, "prefix": p, "dtype": "bfloat16", "ours_ms": 1.0, "two_ms": t}
             for p, t in ((1024, 1.5), (2048, float("nan")))]
    table = bench.rule_table(rows, "cuda", "test GPU")
    assert table["rules"] == [{"group": 1, "max_nodes": 81, "two_part_min_prefix": None},
                              {"group": 4, "max_nodes": 81, "two_part_min_prefix": 8192}]
    path.write_text(__import__("json").dumps(table))
    monkeypatch.setenv(hf_attention.TABLE_ENV, str(path))
    hf_attention.path_table.cache_clear()
    try:
        assert hf_attention.path_table() == table
        monkeypatch.setattr(hf_attention, "TWO_PART_MIN_PREFIX", None)
        assert hf_attention.two_part_min_prefix(32, 8, 81, "cuda") == 8192
        assert hf_attention.two_part_min_prefix(32, 32, 81, "cuda") == hf_attention.NEVER
        assert hf_attention.two_part_min_prefix(32, 8, 81, "cpu") == hf_attention.NEVER
        path.write_text('{"rules": [{"group": 4}]}')
        with pytest.raises(ValueError, match="rules"):
            hf_attention.path_table(str(path))
    finally:
        hf_attention.path_table.cache_clear()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv,n,prefix", [(8, 2, 17, 300), (4, 4, 81, 1000), (6, 3, 128, 64)])
def test_both_paths_agree_through_the_backend(gen, monkeypatch, dtype, hq, hkv, n, prefix):
    """The backend's forward, once routed to the single kernel and once to two-part by the rule:
    the same attention (within the test rule against fp64), and the rule decided which ran."""
    d = 64
    q64 = torch.randn(1, hq, n, d, generator=gen, dtype=torch.float64)
    k64 = torch.randn(1, hkv, prefix + n + 4, d, generator=gen, dtype=torch.float64)
    v64 = torch.randn(1, hkv, prefix + n + 4, d, generator=gen, dtype=torch.float64)
    tree = ancestor_mask(random_tree(n, gen, chain_bias=0.5)[0])
    q, k, v = (t.to(dtype) for t in (q64, k64, v64))
    calls = []
    real = hf_attention.two_part_attention
    monkeypatch.setattr(hf_attention, "two_part_attention", lambda *a: calls.append(1) or real(*a))
    outs = {}
    for threshold, path in ((prefix + 1, "single"), (prefix, "two-part")):
        monkeypatch.setattr(hf_attention, "TWO_PART_MIN_PREFIX", threshold)
        assert hf_attention.choose_path(prefix, q, k) == path
        before = len(calls)
        out, _ = hf_attention.tree_attention_forward(None, q, k, v, tree.view(1, 1, n, n), scaling=d ** -0.5,
                                                     **{hf_attention.PREFIX_KWARG: prefix})
        assert len(calls) - before == (path == "two-part")
        outs[path] = out.transpose(1, 2)
    p = torch.tensor([prefix])
    exact = reference.tree_attention(q.double(), k.double(), v.double(), p, tree, d ** -0.5)
    same = reference.tree_attention(q, k, v, p, tree, d ** -0.5)
    within_rule(outs["single"], same, exact, "single")
    within_rule(outs["two-part"], same, exact, "two-part")
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(outs["two-part"], outs["single"], rtol=tol, atol=tol)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_two_part_decode_is_lossless(arch, monkeypatch):
    """Every verification forward with a prefix takes the two-part path: fp32 output == greedy."""
    reference_model, model = private_copy(arch)
    monkeypatch.setattr(hf_attention, "TWO_PART_MIN_PREFIX", 1)
    paths = []
    real = hf_attention.two_part_attention
    monkeypatch.setattr(hf_attention, "two_part_attention", lambda *a: paths.append(1) or real(*a))
    rec = TokenRecycler(model, tree="paper-16", tree_attention=True)
    ids = torch.randint(3, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(5))
    want = reference_model.generate(ids, max_new_tokens=32, do_sample=False)
    assert torch.equal(rec.generate(ids, max_new_tokens=32), want)
    got = model.generate(ids, max_new_tokens=32, do_sample=False, custom_generate=rec, cache_implementation="static")
    assert torch.equal(got, want)
    assert paths and rec.stats.mean_accepted > 1.0


CUDA = torch.cuda.is_available() and __import__("token_recycling").WITH_CUDA
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a GPU and a CUDA build")


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_attention_states_cuda_equals_cpu(gen, dtype):
    a, b = (torch.randn(2, 8, 81, 128, generator=gen).to(dtype) for _ in range(2))
    la, lb = poisoned_lse(gen, (2, 8, 81)).float(), poisoned_lse(gen, (2, 8, 81)).float()
    want, want_lse = ops.merge_attention_states(a, la, b, lb)
    got, got_lse = ops.merge_attention_states(a.cuda(), la.cuda(), b.cuda().transpose(2, 3).contiguous().transpose(2, 3),
                                              lb.cuda())
    torch.testing.assert_close(got.cpu(), want, rtol=1e-3, atol=1e-3 if dtype == torch.float32 else 1e-2)
    torch.testing.assert_close(got_lse.cpu(), want_lse, rtol=1e-5, atol=1e-4)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,prefix", [(32, 8, 1000), (32, 32, 300), (8, 1, 5000)])
def test_two_part_attention_cuda_vs_fp64(gen, dtype, hq, hkv, prefix):
    n, d = 81, 128
    q64 = torch.randn(1, hq, n, d, generator=gen, dtype=torch.float64)
    k64 = torch.randn(1, hkv, prefix + n + 7, d, generator=gen, dtype=torch.float64)
    v64 = torch.randn(1, hkv, prefix + n + 7, d, generator=gen, dtype=torch.float64)
    mask = ancestor_mask(random_tree(n, gen, chain_bias=0.5)[0])
    q, k, v = (t.to(dtype) for t in (q64, k64, v64))
    scale = d ** -0.5
    ours = hf_attention.two_part_attention(q.cuda(), k.cuda(), v.cuda(), prefix, mask.cuda(), scale).cpu()
    lse_out, lse = ops.tree_attention_lse(q.cuda(), k.cuda(), v.cuda(), torch.tensor([prefix]), mask.cuda(), scale)
    p = torch.tensor([prefix])
    exact, exact_lse = reference.tree_attention_lse(q.double(), k.double(), v.double(), p, mask, scale)
    same = reference.tree_attention(q, k, v, p, mask, scale)
    within_rule(ours, same, exact, "two-part on CUDA")
    within_rule(lse_out.cpu(), same, exact, "tree_attention_lse on CUDA")
    torch.testing.assert_close(lse.cpu().double(), exact_lse, rtol=1e-4, atol=1e-3)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("live", [1, 300, 3000])
def test_tree_attention_cuda_device_prefix_in_a_large_capacity(gen, dtype, live):
    """The graph step's call: the prefix on the device, keys of a static cache's whole capacity (the
    split-K plan is sized by it; the kernel splits only the live keys): == the host-prefix call."""
    hq, hkv, n, d, capacity = 32, 8, 81, 128, 16384
    q = torch.randn(1, hq, n, d, generator=gen).to(dtype).cuda()
    k, v = (torch.randn(1, hkv, capacity, d, generator=gen).to(dtype).cuda() for _ in range(2))
    mask = ancestor_mask(random_tree(n, gen, chain_bias=0.5)[0]).cuda()
    scale = d ** -0.5
    on_device = ops.tree_attention(q, k, v, torch.tensor([live], device="cuda"), mask, scale)
    on_host = ops.tree_attention(q, k[:, :, :live + n], v[:, :, :live + n], torch.tensor([live]), mask, scale)
    p = torch.tensor([live])
    qc, kc, vc = q.cpu(), k[:, :, :live + n].cpu(), v[:, :, :live + n].cpu()  # the keys past them are never seen
    exact = reference.tree_attention(qc.double(), kc.double(), vc.double(), p, mask.cpu(), scale)
    same = reference.tree_attention(qc, kc, vc, p, mask.cpu(), scale)
    within_rule(on_device.cpu(), same, exact, "device prefix, capacity keys")
    torch.testing.assert_close(on_device, on_host, rtol=1e-3, atol=1e-3 if dtype == torch.float32 else 2e-2)


@needs_cuda
def test_cuda_backend_routes_by_the_rule(gen, monkeypatch):
    """On CUDA in bf16, with the defaults: a host prefix of 4096 or more takes two-part, a shorter one
    or a device prefix the single kernel; each within the test rule against fp64."""
    monkeypatch.setattr(hf_attention, "TWO_PART_MIN_PREFIX", None)
    monkeypatch.setattr(hf_attention, "path_table", lambda path=None: None)
    calls = []
    real = hf_attention.two_part_attention
    monkeypatch.setattr(hf_attention, "two_part_attention", lambda *a: calls.append(1) or real(*a))
    hq, hkv, n, d = 32, 8, 81, 128
    for prefix, on_device, want in ((4095, False, 0), (4096, False, 1), (6000, True, 0)):
        q = torch.randn(1, hq, n, d, generator=gen, dtype=torch.float64)
        k, v = (torch.randn(1, hkv, prefix + n + 3, d, generator=gen, dtype=torch.float64) for _ in range(2))
        tree = ancestor_mask(random_tree(n, gen, chain_bias=0.5)[0])
        qb, kb, vb = (t.to(torch.bfloat16) for t in (q, k, v))
        p = torch.tensor([prefix], device="cuda") if on_device else prefix
        before = len(calls)
        out, _ = hf_attention.tree_attention_forward(None, qb.cuda(), kb.cuda(), vb.cuda(),
                                                     tree.cuda().view(1, 1, n, n), scaling=d ** -0.5,
                                                     **{hf_attention.PREFIX_KWARG: p})
        assert len(calls) - before == want, (prefix, on_device)
        pt = torch.tensor([prefix])
        exact = reference.tree_attention(qb.double(), kb.double(), vb.double(), pt, tree, d ** -0.5)
        same = reference.tree_attention(qb, kb, vb, pt, tree, d ** -0.5)
        within_rule(out.transpose(1, 2).cpu(), same, exact, f"prefix {prefix}")
