"""ops.skinny_linear against float64 on random inputs (float32 and bf16), its bad-input contract, and
skinny.routed in the decode loop (fp32 output still equal to model.generate(do_sample=False); bf16
routed too)."""

import pytest
import torch
from models import private_copy, tiny_model

from token_recycling import TokenRecycler, ops, skinny


def _errors(x, w, b, vectorized):
    """(our max error vs float64, torch float32's max error vs float64)."""
    exact = x.double() @ w.double().T + (b.double() if b is not None else 0)
    ours = ops.skinny_linear(x, w, b, vectorized)
    theirs = torch.nn.functional.linear(x, w, b)
    assert ours.shape == exact.shape and ours.dtype == torch.float32
    return (ours.double() - exact).abs().max().item(), (theirs.double() - exact).abs().max().item()


@pytest.mark.parametrize("vectorized", [True, False])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 12, 17])
def test_matches_float64_on_random_inputs(n, vectorized):
    g = torch.Generator().manual_seed(n)
    for out_f, in_f in [(1, 1), (7, 3), (33, 8), (64, 13), (96, 64), (129, 200)]:
        for with_bias in (False, True):
            x = torch.randn(n, in_f, generator=g)
            w = torch.randn(out_f, in_f, generator=g)
            b = torch.randn(out_f, generator=g) if with_bias else None
            ours, theirs = _errors(x, w, b, vectorized)
            # FlashAttention's rule: within a small multiple of the same-precision torch error.
            assert ours <= 4 * theirs + 1e-6 * (in_f ** 0.5), (n, out_f, in_f, with_bias, ours, theirs)


@pytest.mark.parametrize("vectorized", [True, False])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 12])
def test_bf16_matches_float64_on_random_inputs(n, vectorized):
    """bf16 in, bf16 out (rounded once from a float32 sum): against float64 on the same bf16 values,
    within a small multiple of torch's own bf16 linear's error. The shapes reach every tile width
    (16, 8 and 4 weight rows, then single rows) with prefetching on and off, and (1030, 96) is split
    between threads at a multiple of 4 that is not one of 16."""
    g = torch.Generator().manual_seed(100 + n)
    for out_f, in_f in [(1, 1), (7, 3), (33, 8), (64, 13), (96, 64), (129, 200), (40, 576), (1030, 96)]:
        for with_bias in (False, True):
            x = torch.randn(n, in_f, generator=g).bfloat16()
            w = torch.randn(out_f, in_f, generator=g).bfloat16()
            b = torch.randn(out_f, generator=g).bfloat16() if with_bias else None
            exact = x.double() @ w.double().T + (b.double() if b is not None else 0)
            ours = ops.skinny_linear(x, w, b, vectorized)
            theirs = torch.nn.functional.linear(x, w, b)
            assert ours.dtype == torch.bfloat16 and ours.shape == exact.shape
            err, ref = (ours.double() - exact).abs().max().item(), (theirs.double() - exact).abs().max().item()
            # One rounding to bf16 (2^-8 relative) dominates both; the float32 sums differ in order only.
            assert err <= 2 * ref + 1e-6 * in_f, (n, out_f, in_f, with_bias, err, ref)
            # And against our own float32 path on the same values: the same sum, rounded once.
            f32 = ops.skinny_linear(x.float(), w.float(), b.float() if b is not None else None, vectorized)
            torch.testing.assert_close(ours.float(), f32.bfloat16().float(), rtol=2**-7, atol=1e-6 * in_f)


def test_strided_rows_and_weight_views():
    g = torch.Generator().manual_seed(3)
    big = torch.randn(6, 80, generator=g)
    x = big[::2, 5:69]  # rows strided, elements contiguous
    wbig = torch.randn(50, 70, generator=g)
    w = wbig[:, 3:67]  # weight rows strided
    ours, theirs = _errors(x, w, None, True)
    assert ours <= 4 * theirs + 1e-5
    ours, theirs = _errors(torch.randn(1, 64, generator=g).expand(4, 64), w, None, True)  # overlapping rows
    assert ours <= 4 * theirs + 1e-5
    xt = torch.randn(64, 3, generator=g).T  # elements not contiguous: copied first
    ours, theirs = _errors(xt, w, None, True)
    assert ours <= 4 * theirs + 1e-5
    # bf16: strided rows and a strided weight view.
    xb, wb = big.bfloat16()[::2, 5:69], wbig.bfloat16()[:, 3:67]
    got = ops.skinny_linear(xb, wb)
    want = ops.skinny_linear(xb.contiguous().float(), wb.contiguous().float()).bfloat16()
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-5)


def test_any_leading_shape_like_torch_linear():
    g = torch.Generator().manual_seed(4)
    w, b = torch.randn(10, 16, generator=g), torch.randn(10, generator=g)
    for shape in [(16,), (1, 3, 16), (2, 2, 16), (2, 0, 16)]:
        x = torch.randn(*shape, generator=g)
        got, want = ops.skinny_linear(x, w, b), torch.nn.functional.linear(x, w, b)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert ops.skinny_linear(torch.zeros(3, 0), torch.zeros(2, 0)).shape == (3, 2)
    assert ops.skinny_linear(torch.zeros(0), torch.zeros(2, 0)).shape == (2,)


def test_empty_sizes():
    assert ops.skinny_linear(torch.zeros(0, 4), torch.zeros(3, 4)).shape == (0, 3)
    assert ops.skinny_linear(torch.zeros(2, 4), torch.zeros(0, 4)).shape == (2, 0)
    assert torch.equal(ops.skinny_linear(torch.zeros(2, 0), torch.zeros(3, 0), torch.ones(3)), torch.ones(2, 3))


def test_vectorized_path_is_reported():
    assert isinstance(ops.skinny_linear_vectorized(), bool)
    from token_recycling.tools.models import cpu_flags
    if {"avx2", "fma"} <= cpu_flags():
        assert ops.skinny_linear_vectorized()


def test_bad_input_names_the_argument():
    x, w = torch.randn(2, 4), torch.randn(3, 4)
    with pytest.raises(TypeError, match="x must be Float"):
        ops.skinny_linear(x.double(), w)
    with pytest.raises(TypeError, match="weight must be Float or BFloat16"):
        ops.skinny_linear(x, w.half())
    with pytest.raises(TypeError, match="x must be BFloat16"):  # x and bias take the weight's dtype
        ops.skinny_linear(x, w.bfloat16())
    with pytest.raises(TypeError, match="bias must be BFloat16"):
        ops.skinny_linear(x.bfloat16(), w.bfloat16(), torch.randn(3))
    with pytest.raises(ValueError, match="weight.size\\(1\\) must be 4"):
        ops.skinny_linear(x, torch.randn(3, 5))
    with pytest.raises(ValueError, match="x must have at least 1 dimension"):
        ops.skinny_linear(torch.tensor(1.0), w)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        ops.skinny_linear(x, w.view(1, 3, 4))
    with pytest.raises(ValueError, match="bias.size\\(0\\) must be 3"):
        ops.skinny_linear(x, w, torch.randn(4))
    with pytest.raises(TypeError, match="bias must be Float"):
        ops.skinny_linear(x, w, torch.randn(3).double())


def test_opcheck():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 16, generator=g), torch.randn(10, 16, generator=g), torch.randn(10, generator=g)
    torch.library.opcheck(torch.ops.token_recycling.skinny_linear, (x, w, b, True))
    torch.library.opcheck(torch.ops.token_recycling.skinny_linear, (x, w, None, False))
    torch.library.opcheck(torch.ops.token_recycling.skinny_linear, (x.bfloat16(), w.bfloat16(), b.bfloat16(), True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vectorized", [True, False])
def test_cat_is_the_separate_calls_side_by_side(dtype, vectorized):
    """skinny_linear_cat: equal bit for bit to the separate calls concatenated (so a fused projection
    changes no logit), and within rounding of float64. Sizes that are not multiples of 4 and
    a part of 1030 rows make the threads' split fall inside and between parts."""
    g = torch.Generator().manual_seed(7)
    for n in (1, 2, 3, 5, 8, 16):
        for outs in [(7,), (5, 3), (192, 33, 1030), (576, 192, 192), (64, 1, 40)]:
            for with_bias in (False, True):
                x = torch.randn(2, n, 96, generator=g).to(dtype)
                ws = [torch.randn(o, 96, generator=g).to(dtype) for o in outs]
                bs = [torch.randn(o, generator=g).to(dtype) for o in outs] if with_bias else []
                got = ops.skinny_linear_cat(x, ws, bs, vectorized)
                parts = [ops.skinny_linear(x, w, bs[i] if bs else None, vectorized) for i, w in enumerate(ws)]
                assert torch.equal(got, torch.cat(parts, -1)), (n, outs, with_bias)
                exact = torch.cat([x.double() @ w.double().T + (bs[i].double() if bs else 0)
                                   for i, w in enumerate(ws)], -1)
                tol = 2**-7 * exact.abs().max().item() if dtype is torch.bfloat16 else 1e-4
                assert (got.double() - exact).abs().max().item() <= tol


def test_cat_bad_input_names_the_argument():
    x, w = torch.randn(2, 4), torch.randn(3, 4)
    with pytest.raises(ValueError, match="weights must hold at least one weight"):
        ops.skinny_linear_cat(x, [])
    with pytest.raises(TypeError, match=r"weights\[1\] must have the dtype of the first weight"):
        ops.skinny_linear_cat(x, [w, w.bfloat16()])
    with pytest.raises(ValueError, match=r"weights\[1\].size\(1\) must be 4"):
        ops.skinny_linear_cat(x, [w, torch.randn(3, 5)])
    with pytest.raises(ValueError, match="biases must be empty or hold one bias per weight"):
        ops.skinny_linear_cat(x, [w, w], [torch.randn(3)])
    with pytest.raises(ValueError, match=r"biases\[1\].size\(0\) must be 2"):
        ops.skinny_linear_cat(x, [w, w[:2]], [torch.randn(3), torch.randn(3)])
    with pytest.raises(TypeError, match="x must be BFloat16"):
        ops.skinny_linear_cat(x, [w.bfloat16()])
    torch.library.opcheck(torch.ops.token_recycling.skinny_linear_cat, (x, [w, w[:1]], [], True))
    torch.library.opcheck(torch.ops.token_recycling.skinny_linear_cat, (x, [w, w[:1]], [w[:, 0], w[:1, 0]], False))


# ------------------------------------------------------------------------------ routing in a model
def test_routed_takes_few_row_forwards_only_and_restores_the_model(monkeypatch):
    model = tiny_model("llama")
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    rows_seen = []
    real = skinny._op()

    def spy(x, w, b=None, vectorized=True):
        rows_seen.append(x.numel() // x.shape[-1])
        return real(x, w, b, vectorized)

    monkeypatch.setattr(skinny, "_op", lambda: spy)
    ids = torch.randint(3, 300, (1, 20))
    with torch.no_grad():
        want = {n: model(ids[:, :n]).logits for n in (1, 3, 20)}
        with skinny.routed(model) as patched:
            assert patched == len(linears) > 0
            got = {n: model(ids[:, :n]).logits for n in (1, 3, 20)}
            assert rows_seen == [1] * len(linears) + [3] * len(linears)  # 20 rows (a prefill) stay with torch
            with torch.enable_grad():
                model(ids[:, :3])  # autograd on: torch's linear
            assert len(rows_seen) == 2 * len(linears)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-5)
    assert all("forward" not in m.__dict__ for m in linears)
    assert not any(m in skinny._routes for m in linears)  # joint() sees no routing left behind
    rows_seen.clear()
    with torch.no_grad():
        model(ids[:, :3])
    assert rows_seen == []
    with torch.no_grad(), skinny.routed(model, min_rows=2):  # one row with torch when asked
        model(ids[:, :1])
    assert rows_seen == []


def test_routed_off_and_other_dtypes_are_untouched():
    model = tiny_model("llama")
    with skinny.routed(model, enabled=False) as patched:
        assert patched == 0
    half = tiny_model("llama", dtype=torch.float16)
    assert not skinny.applies(half)
    with pytest.raises(ValueError, match="skinny_linear=True needs"):
        TokenRecycler(half, skinny_linear=True)
    with pytest.raises(TypeError, match="skinny_linear must be"):
        TokenRecycler(model, skinny_linear="yes")
    assert TokenRecycler(half).skinny_linear is False
    bf16 = tiny_model("llama", dtype=torch.bfloat16)
    assert skinny.applies(bf16)
    assert TokenRecycler(bf16).skinny_linear is skinny.available()


def test_routed_bf16_model_matches_torch_within_rounding(monkeypatch):
    """A bf16 model's few-row forwards go through the op and give torch's logits up to bf16 rounding
    (the sums differ in order; each linear's output is rounded once, as torch's is)."""
    model = tiny_model("llama", dtype=torch.bfloat16)
    rows_seen = []
    real = skinny._op()
    monkeypatch.setattr(skinny, "_op", lambda: lambda x, *a: rows_seen.append(x.dtype) or real(x, *a))
    ids = torch.randint(3, 300, (1, 5))
    with torch.no_grad():
        want = model(ids).logits.float()
        with skinny.routed(model):
            got = model(ids).logits.float()
    assert rows_seen and set(rows_seen) == {torch.bfloat16}
    # A few bf16 ulps of the logits' scale (a tiny random model: logits of order 0.1-1).
    assert (got - want).abs().max().item() <= 0.05 * want.abs().max().item() + 1e-2


needs_packing = pytest.mark.skipif(not (torch.backends.mkldnn.is_available()
                                         and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                                    reason="oneDNN has no native bf16 path on this CPU: routing does not pack")


@needs_packing
def test_bf16_rows_above_the_limit_take_the_packed_weight_and_match_torch(monkeypatch):
    model = tiny_model("llama", dtype=torch.bfloat16)
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    calls = []
    real = skinny._packed_op()
    monkeypatch.setattr(skinny, "_packed_op", lambda: lambda x, w, *a: calls.append((x.shape, w)) or real(x, w, *a))
    monkeypatch.delenv(skinny.PACK_ENV, raising=False)
    assert skinny.packs(model)
    ids = torch.randint(3, 300, (1, 20))
    with torch.no_grad():
        want = {n: model(ids[:, :n]).logits for n in (3, 20)}
        with skinny.routed(model, max_rows=4):
            got = {n: model(ids[:, :n]).logits for n in (3, 20)}  # 3 rows: skinny_linear; 20: packed
    assert len(calls) == len(linears) and all(shape[-2] == 20 for shape, _ in calls)
    assert all(w.is_mkldnn for _, w in calls)
    torch.testing.assert_close(got[20], want[20], rtol=0, atol=0)  # the same oneDNN product, packed once
    assert (got[3].float() - want[3].float()).abs().max().item() <= 0.05 * want[3].float().abs().max().item() + 1e-2
    assert all("forward" not in m.__dict__ for m in linears)  # the model is as it was


@needs_packing
def test_a_packed_weight_is_made_once_and_again_after_an_in_place_change(monkeypatch):
    model = tiny_model("llama", dtype=torch.bfloat16)
    layer = next(m for m in model.modules() if type(m) is torch.nn.Linear)
    first = skinny.packed_weight(layer.weight)
    assert skinny.packed_weight(layer.weight) is first
    x = torch.randn(9, layer.weight.shape[1], dtype=torch.bfloat16)
    with torch.no_grad():
        layer.weight.mul_(2)
    second = skinny.packed_weight(layer.weight)
    assert second is not first
    got = skinny._packed_op()(x, second, None, "none", [], "")
    torch.testing.assert_close(got, torch.nn.functional.linear(x, layer.weight), rtol=0, atol=0)


def test_packing_is_off_when_asked_for_float32_and_when_memory_is_short(monkeypatch):
    bf16 = tiny_model("llama", dtype=torch.bfloat16)
    monkeypatch.setenv(skinny.PACK_ENV, "off")
    assert not skinny.packs(bf16)
    monkeypatch.delenv(skinny.PACK_ENV)
    assert not skinny.packs(tiny_model("llama"))  # float32 weights: torch's product, as before
    monkeypatch.setattr(skinny, "_memory_available", lambda: 1000)
    assert not skinny.packs(bf16)
    monkeypatch.setattr(skinny, "_memory_available", lambda: None)
    assert not skinny.packs(bf16)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
@pytest.mark.parametrize("tree", ["auto", "paper-16", "chain-4"])
def test_lossless_with_skinny_linear(arch, tree, monkeypatch):
    model, reference = tiny_model(arch), private_copy(arch)[1]  # the reference: never given to a recycler
    calls = []
    real = skinny._op()
    monkeypatch.setattr(skinny, "_op", lambda: lambda *a, **k: calls.append(1) or real(*a, **k))
    rec = TokenRecycler(model, tree=tree, skinny_linear=True)
    g = torch.Generator().manual_seed(5)
    accepted = []
    for n in (1, 6, 25):
        ids = torch.randint(3, model.config.vocab_size, (1, n), generator=g)
        want = reference.generate(ids, max_new_tokens=30, do_sample=False)
        assert torch.equal(rec.generate(ids, max_new_tokens=30), want), (arch, tree, n)
        accepted.append(rec.stats.mean_accepted)
    assert calls, "no forward went through skinny_linear: the test would not exercise it"
    assert max(accepted) > 1.0
    assert all("forward" not in m.__dict__ for m in model.modules())
