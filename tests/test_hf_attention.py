"""The "token_recycling" transformers attention backend (hf_attention.py), on a tiny random Llama.

A verification forward with the [1, 1, N, N] tree mask must give the logits of an eager forward with
the equivalent dense additive mask [1, 1, N, P + N]; every other forward goes to sdpa. Runs on the
CPU (the op has a CPU kernel) and, when available, on CUDA.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache  # noqa: E402

import token_recycling  # noqa: E402
from token_recycling import hf_attention, make_tree  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and token_recycling.WITH_CUDA else [])


def tiny_llama(device: str, head_dim: int | None = None) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, head_dim=head_dim or 16)
    return LlamaForCausalLM(config).to(device=device, dtype=torch.float32).eval()


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls that reach ops.tree_attention through the backend."""
    calls = []
    real = hf_attention.ops.tree_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(hf_attention.ops, "tree_attention", counting)
    return calls


def verify_logits(model, implementation: str, prefix: torch.Tensor, tree_tokens: torch.Tensor,
                  positions: torch.Tensor, mask: torch.Tensor, static_len: int | None = None,
                  **extra) -> torch.Tensor:
    """Prefill the prefix with sdpa, then forward the tree with `implementation` and `mask`
    (into a StaticCache of `static_len` positions when given, else a DynamicCache)."""
    model.set_attn_implementation("sdpa")
    cache = DynamicCache() if static_len is None else StaticCache(config=model.config, max_cache_len=static_len)
    with torch.no_grad():
        model(prefix, past_key_values=cache, use_cache=True)
        if implementation == hf_attention.NAME:
            assert hf_attention.use_tree_attention(model)
        else:
            model.set_attn_implementation(implementation)
        return model(tree_tokens, attention_mask=mask, position_ids=positions, past_key_values=cache,
                     use_cache=True, **extra).logits


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("static_tail", [None, 0, 13])
@pytest.mark.parametrize("prefix_kind", ["int", "tensor"])
@pytest.mark.parametrize("batch,prefix_len,tree_name", [(1, 1, "paper-16"), (1, 23, "paper"), (3, 9, "chain-4")])
def test_tree_forward_equals_eager_with_dense_mask(device, batch, prefix_len, tree_name, static_tail, prefix_kind,
                                                   kernel_calls):
    """static_tail: None = DynamicCache (keys = prefix + N); else a StaticCache with that many unused
    positions after the tree (the backend must attend to [0, prefix + N) only)."""
    head_dim = 64 if device == "cuda" else 16  # the CUDA kernel's smallest head_dim
    model = tiny_llama(device, head_dim)
    tree = make_tree(tree_name)
    n = tree.num_nodes
    gen = torch.Generator().manual_seed(prefix_len)
    prefix = torch.randint(0, 128, (batch, prefix_len), generator=gen).to(device)
    tree_tokens = torch.randint(0, 128, (batch, n), generator=gen).to(device)
    positions = (prefix_len + tree.depths).expand(batch, n).to(device)
    static_len = None if static_tail is None else prefix_len + n + static_tail
    key_len = static_len or prefix_len + n
    dense = torch.full((1, 1, n, key_len), torch.finfo(torch.float32).min, device=device)
    dense[..., :prefix_len] = 0.0
    dense[..., prefix_len:prefix_len + n].masked_fill_(tree.mask.to(device), 0.0)

    expected = verify_logits(model, "eager", prefix, tree_tokens, positions, dense, static_len)
    tree_mask = tree.mask.to(device)[None, None].expand(batch, 1, n, n)  # one tree for every row
    given = prefix_len if prefix_kind == "int" else torch.tensor([prefix_len], device=device)
    got = verify_logits(model, hf_attention.NAME, prefix, tree_tokens, positions, tree_mask, static_len,
                        **{hf_attention.PREFIX_KWARG: given})

    assert len(kernel_calls) == model.config.num_hidden_layers
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("static_len", [None, 40])
def test_tree_mask_without_prefix_len_is_refused(static_len):
    """Never a guess: without tree_prefix_len the backend cannot tell a static cache's tail from the tree."""
    model = tiny_llama("cpu")
    tree = make_tree("chain-4")
    n = tree.num_nodes
    with pytest.raises(ValueError, match=hf_attention.PREFIX_KWARG):
        verify_logits(model, hf_attention.NAME, torch.tensor([[3, 4, 5]]), torch.tensor([[6] * n]),
                      (3 + tree.depths).view(1, -1), tree.mask[None, None], static_len)


@pytest.mark.parametrize("prefix_len,key_len", [(0, 5), (3, 8), (3, 20), (7, 12)])
def test_dense_fallback_mask(prefix_len, key_len):
    """The sdpa fallback's dense mask, built on the device from a tensor prefix, against a loop."""
    n = 5
    tree = torch.rand(n, n, generator=torch.Generator().manual_seed(key_len)) > 0.4
    got = hf_attention.dense_mask(tree, torch.tensor([prefix_len, prefix_len]), key_len)
    want = torch.zeros(2, 1, n, key_len, dtype=torch.bool)
    for i in range(n):
        for j in range(key_len):
            want[:, 0, i, j] = j < prefix_len or (prefix_len <= j < prefix_len + n and bool(tree[i, j - prefix_len]))
    assert torch.equal(got, want)


def test_prefix_len_checks():
    with pytest.raises(ValueError, match="does not fit"):
        hf_attention.prefix_tensor(10, 1, 5, 12, torch.device("cpu"))
    with pytest.raises(TypeError, match=hf_attention.PREFIX_KWARG):
        hf_attention.prefix_tensor(2.0, 1, 5, 12, torch.device("cpu"))
    with pytest.raises(ValueError, match=hf_attention.PREFIX_KWARG):
        hf_attention.prefix_tensor(torch.tensor([1, 2, 3]), 2, 5, 12, torch.device("cpu"))
    assert torch.equal(hf_attention.prefix_tensor(torch.tensor([4]), 3, 5, 12, torch.device("cpu")),
                       torch.tensor([4, 4, 4]))


@pytest.mark.parametrize("device", DEVICES)
def test_other_forwards_go_to_sdpa(device, kernel_calls, gqa_calls):
    """Padded (masked) forwards go to sdpa: on the CPU folded (gqa_sdpa), on CUDA transformers' own."""
    model = tiny_llama(device)
    tokens = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1)).to(device)
    padding = torch.ones(2, 11, dtype=torch.long, device=device)
    padding[1, :3] = 0
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        expected = model(tokens, attention_mask=padding).logits
        assert hf_attention.use_tree_attention(model)
        got = model(tokens, attention_mask=padding).logits
    assert kernel_calls == []
    assert bool(gqa_calls) == (device == "cpu") and all(hq == 4 and hkv == 2 for hq, hkv, _ in gqa_calls)
    torch.testing.assert_close(got, expected)


def test_tree_mask_protocol():
    q = torch.zeros(2, 4, 5, 16)
    k = torch.zeros(2, 2, 12, 16)
    tree = torch.rand(5, 5) > 0.5
    assert torch.equal(hf_attention.tree_mask_of(tree[None, None], q, k), tree)
    assert torch.equal(hf_attention.tree_mask_of(tree[None, None].expand(2, 1, 5, 5), q, k), tree)
    assert hf_attention.tree_mask_of(tree[None, None].repeat(2, 1, 1, 1), q, k) is None  # per-row masks
    assert hf_attention.tree_mask_of(tree[None, None].float(), q, k) is None  # additive masks
    assert hf_attention.tree_mask_of(torch.ones(1, 1, 5, 12, dtype=torch.bool), q, k) is None  # dense masks
    assert hf_attention.tree_mask_of(None, q, k) is None


def test_use_tree_attention_switches_the_config():
    model = tiny_llama("cpu")
    assert hf_attention.use_tree_attention(model)
    assert model.config._attn_implementation == hf_attention.NAME


def test_recycler_with_tree_attention_is_lossless_on_cpu():
    """The decode loop through the tree-attention backend (our CPU kernel) == greedy generate."""
    import sys
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from models import private_copy

    from token_recycling import TokenRecycler

    reference, model = private_copy("qwen2")
    rec = TokenRecycler(model, tree="paper-16", tree_attention=True)
    assert rec.attention == "tree-kernel" and model.config._attn_implementation == "sdpa"
    ids = torch.tensor([[12, 13, 14, 12, 13]])
    for _ in range(2):
        assert torch.equal(rec.generate(ids, max_new_tokens=40),
                           reference.generate(ids, max_new_tokens=40, do_sample=False))
    assert rec.stats.mean_accepted > 1.0


@pytest.fixture
def gqa_calls(monkeypatch):
    """Counts the calls that take the CPU's folded grouped-query sdpa (hf_attention.gqa_sdpa)."""
    calls = []
    real = hf_attention.gqa_sdpa

    def counting(query, key, *args, **kwargs):
        calls.append((query.shape[1], key.shape[1], query.shape[2]))
        return real(query, key, *args, **kwargs)

    monkeypatch.setattr(hf_attention, "gqa_sdpa", counting)
    return calls


@pytest.mark.parametrize("additive", [False, True])
@pytest.mark.parametrize("n,key_len", [(2, 9), (5, 40), (12, 12)])
def test_gqa_sdpa_equals_repeated_heads(n, key_len, additive):
    """The folded call against sdpa on K/V repeated per query head (transformers' repeat_kv path), in
    float64 and float32; random masks with every row seeing at least one key."""
    g = torch.Generator().manual_seed(n * 100 + key_len)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-6)):
        q = torch.randn(2, 6, n, 16, generator=g, dtype=dtype)
        k = torch.randn(2, 2, key_len, 16, generator=g, dtype=dtype)
        v = torch.randn(2, 2, key_len, 16, generator=g, dtype=dtype)
        mask = torch.rand(2, 1, n, key_len, generator=g) > 0.5
        mask[..., 0] = True
        attn = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min) if additive else mask
        got, _ = hf_attention.gqa_sdpa(q, k, v, attn, 0.3)
        want = torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1), attn_mask=attn, scale=0.3)
        torch.testing.assert_close(got, want.transpose(1, 2), atol=tol, rtol=tol)


def test_gqa_folds_only_where_it_applies():
    q, k = torch.zeros(1, 4, 3, 16), torch.zeros(1, 2, 10, 16)
    mask = torch.ones(1, 1, 3, 10, dtype=torch.bool)
    assert hf_attention.gqa_folds(q, k, mask, {})
    assert not hf_attention.gqa_folds(q, k, None, {})  # transformers folds unmasked calls itself
    assert not hf_attention.gqa_folds(q[:, :, :1], k, mask[:, :, :1], {})  # and packs one-row queries
    assert not hf_attention.gqa_folds(q, k[:, :1].expand(1, 4, 10, 16), mask, {})  # no groups
    assert not hf_attention.gqa_folds(q, k, mask, {"position_bias": torch.zeros(1)})
    assert not hf_attention.gqa_folds(q, k, mask, {"s_aux": torch.zeros(1)})
    assert not hf_attention.gqa_folds(q, k, mask.view(3, 10), {})


@pytest.mark.parametrize("vectorized", [True, False])
@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma"])
def test_recycler_cpu_default_is_lossless(arch, vectorized, gqa_calls, kernel_calls, monkeypatch):
    """The CPU default for sdpa models: the tree kernel where its vectorized path applies, else dense
    masks through the backend with grouped heads folded; fp32 output == greedy generate either way.
    tree_attention=False on another copy leaves its attention alone."""
    import sys
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from models import private_copy

    from token_recycling import TokenRecycler

    if vectorized and not hf_attention.ops.skinny_linear_vectorized():
        pytest.skip("this CPU has no AVX2/FMA: the kernel's vectorized path cannot run")
    if not vectorized:
        monkeypatch.setattr(hf_attention, "cpu_kernel_vectorized", lambda model: False)
    reference, model = private_copy(arch)
    assert model.config._attn_implementation == "sdpa"
    assert hf_attention.cpu_kernel_vectorized(model) == vectorized  # float32, head_dim 16
    rec = TokenRecycler(model, tree="paper-16")
    assert rec.attention == ("tree-kernel" if vectorized else "dense-gqa")
    assert rec.tree_attention == vectorized
    assert model.config._attn_implementation == "sdpa"  # switched only inside each call
    ids = torch.tensor([[12, 13, 14, 12, 13, 14, 12]])
    for _ in range(2):
        assert torch.equal(rec.generate(ids, max_new_tokens=40),
                           reference.generate(ids, max_new_tokens=40, do_sample=False)), arch
    assert rec.stats.mean_accepted > 1.0
    if vectorized:
        assert kernel_calls and gqa_calls == []
    else:
        assert gqa_calls and kernel_calls == []
        assert any(n > 1 for _, _, n in gqa_calls)

    _, untouched = private_copy(arch)
    plain = TokenRecycler(untouched, tree="paper-16", tree_attention=False)
    assert plain.attention == "model" and untouched.config._attn_implementation == "sdpa"
    assert model.config._attn_implementation == "sdpa"  # after the calls too
    # A model its user switched to the backend: dense masks asked for go through the backend.
    model.set_attn_implementation(hf_attention.NAME)
    assert TokenRecycler(model, tree_attention=False).attention == "dense-gqa"


def test_cpu_kernel_vectorized_needs_float_and_head_dim_multiple_of_8():
    """The CPU default takes the kernel only where its vectorized path runs (else it is the slow
    reference): float32/bf16 weights and head_dim % 8 == 0."""
    import sys
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from models import tiny_model

    if not hf_attention.ops.skinny_linear_vectorized():
        pytest.skip("this CPU has no AVX2/FMA")
    assert hf_attention.cpu_kernel_vectorized(tiny_model("llama"))  # head_dim 64 / 4 = 16
    assert hf_attention.cpu_kernel_vectorized(tiny_model("llama", dtype=torch.bfloat16))
    assert not hf_attention.cpu_kernel_vectorized(tiny_model("llama", dtype=torch.float16))
    odd = copy.deepcopy(tiny_model("qwen3"))  # tiny_model's models are shared: change a copy
    odd.config.head_dim = 12
    assert not hf_attention.cpu_kernel_vectorized(odd)


def test_recycler_cpu_default_leaves_eager_models_alone():
    import sys
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from models import private_copy

    from token_recycling import TokenRecycler

    _, model = private_copy("llama")
    model.set_attn_implementation("eager")
    rec = TokenRecycler(model)
    assert rec.attention == "model" and model.config._attn_implementation == "eager"
