"""lean_forward: the verification forward without transformers' per-module Python gives the model's
own logits bit for bit, is used only where its once-per-model check says so, and every other model
keeps its own forward."""

import pytest
import torch
from models import private_copy, tiny_model

from token_recycling import TokenRecycler, hf_model, lean_forward


def _tree_inputs(vocab: int):
    tokens = torch.tensor([[5, 9, 17, 23, 4]]) % vocab
    depths = torch.tensor([[0, 1, 1, 2, 3]])
    tree = torch.tensor([[[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0], [1, 1, 0, 1, 1]]],
                        dtype=torch.bool)
    return tokens, depths, tree


def _prefilled(model, length: int = 12):
    from token_recycling import cache as kv
    cache = kv.new_cache(model)
    ids = (torch.arange(length) * 5 + 3).remainder(model.config.vocab_size).view(1, -1)
    model(input_ids=ids, use_cache=True, **{hf_model.cache_kwarg(model): cache})
    return cache


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tree_attention", [True, False])
def test_logits_equal_the_models_own_forward(arch, dtype, tree_attention):
    from token_recycling import hf_attention

    model = tiny_model(arch, dtype=dtype)
    with hf_attention.entered(model, enabled=tree_attention):
        assert lean_forward.eligible(model)
        tokens, depths, tree = _tree_inputs(model.config.vocab_size)
        kwarg = hf_model.cache_kwarg(model)
        stock_cache, lean_cache = _prefilled(model), _prefilled(model)
        stock = hf_model.forward_tree(model, tokens, depths, tree, 12, stock_cache, tree_attention, kwarg)
        lean = hf_model.forward_tree(model, tokens, depths, tree, 12, lean_cache, tree_attention, kwarg, lean=True)
        assert torch.equal(stock, lean)
        for a, b in zip(stock_cache.layers, lean_cache.layers):  # the cache gained the same keys and values
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q, k and v have biases
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_joint_projections_under_routing_give_the_same_logits(arch, dtype, monkeypatch):
    """Under skinny_linear routing the lean forward runs q/k/v and gate/up as one skinny_linear_cat
    call each (skinny.joint); the model's own forward runs them one by one: the logits and the cache
    are equal bit for bit, and the joint calls did run."""
    from token_recycling import skinny

    if not skinny.available():
        pytest.skip("skinny_linear has no vectorized path on this CPU: routing is off")
    model = tiny_model(arch, dtype=dtype)
    calls = []
    real = skinny._cat_op()
    monkeypatch.setattr(skinny, "_cat_op", lambda: lambda *a: calls.append(len(a[1])) or real(*a))
    with skinny.routed(model), torch.no_grad():  # routing takes inference calls only
        tokens, depths, tree = _tree_inputs(model.config.vocab_size)
        kwarg = hf_model.cache_kwarg(model)
        stock_cache, lean_cache = _prefilled(model), _prefilled(model)
        stock = hf_model.forward_tree(model, tokens, depths, tree, 12, stock_cache, False, kwarg)
        assert not calls
        lean = hf_model.forward_tree(model, tokens, depths, tree, 12, lean_cache, False, kwarg, lean=True)
    assert calls == [3, 2] * model.config.num_hidden_layers
    assert torch.equal(stock, lean)
    for a, b in zip(stock_cache.layers, lean_cache.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    calls.clear()  # outside the routing: each layer's own forward
    with torch.no_grad():
        lean_forward.forward(model, tokens, None, depths + 12, _prefilled(model))
    assert not calls


def test_the_decode_loop_uses_it_and_stays_lossless():
    model, reference = tiny_model("llama"), private_copy("llama")[1]
    rec = TokenRecycler(model)
    ids = torch.tensor([[5, 9, 17, 5, 9, 17, 5]])
    got = rec.generate(ids, max_new_tokens=40)
    assert rec._decoder.lean
    assert torch.equal(got, reference.generate(ids, max_new_tokens=40, do_sample=False))


@pytest.mark.parametrize("arch", ["qwen3", "gemma", "phi3", "mistral-window"])
def test_other_classes_keep_their_own_forward(arch):
    model = tiny_model(arch)
    assert not lean_forward.eligible(model)
    rec = TokenRecycler(model)
    rec.generate(torch.tensor([[5, 9, 17]]), max_new_tokens=8)
    assert not rec._decoder.lean


def test_hooks_training_and_the_switch_keep_the_models_forward(monkeypatch):
    model = tiny_model("llama")
    assert lean_forward.eligible(model)
    handle = model.model.layers[0].mlp.register_forward_hook(lambda *a: None)
    try:
        assert not lean_forward.eligible(model)  # a hook would be skipped
    finally:
        handle.remove()
    model.train()
    try:
        assert not lean_forward.eligible(model)
    finally:
        model.eval()
    monkeypatch.setenv(lean_forward.ENV, "off")
    assert not lean_forward.eligible(model)
    rec = TokenRecycler(model)
    rec.generate(torch.tensor([[5, 9, 17]]), max_new_tokens=8)
    assert not rec._decoder.lean


def test_a_model_whose_logits_differ_is_not_used(monkeypatch):
    """The check compares the two forwards: a forward that differs in the last bit fails it, and the
    verdict is kept for the model."""
    model = tiny_model("qwen2", seed=3)
    real = lean_forward.forward

    def off_by_a_bit(*args, **kwargs):
        logits = real(*args, **kwargs)
        return torch.nextafter(logits, torch.full_like(logits, float("inf")))

    monkeypatch.setattr(lean_forward, "forward", off_by_a_bit)
    assert not hf_model.lean_usable(model, False, hf_model.cache_kwarg(model))
    monkeypatch.setattr(lean_forward, "forward", real)
    assert not hf_model.lean_usable(model, False, hf_model.cache_kwarg(model))  # remembered for this model
    lean_forward._verdicts.pop(model)
    assert hf_model.lean_usable(model, False, hf_model.cache_kwarg(model))


def test_the_benchs_forward_count_leaves_it_on():
    from token_recycling.tools.bench import count_forwards

    model = tiny_model("llama")
    rec = TokenRecycler(model, tree="paper")  # a fixed tree: no cost curve is measured
    lean_forward._verdicts.pop(model, None)  # the check runs in this call
    with count_forwards(model) as forwards:
        rec.generate(torch.tensor([[5, 9, 17, 5, 9]]), max_new_tokens=12)
    assert rec._decoder.lean and forwards[0] == rec.stats.steps + 1 + 3  # prefill, steps, the check's three
    assert "forward" not in model.get_input_embeddings().__dict__  # the model is as it was
