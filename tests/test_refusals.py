"""What TokenRecycler does not do is refused with an error naming the argument, before any decoding;
generate() options that it cannot honour are refused rather than ignored, and those that work are
shown to work (against HF's own generate())."""

import copy

import pytest
import torch
from models import private_copy, tiny_model

from token_recycling import TokenRecycler

IDS = torch.tensor([[5, 9, 17, 5, 9]])


def test_a_prefilled_cache_is_refused():
    from transformers import DynamicCache, StaticCache
    model = tiny_model("llama")
    rec = TokenRecycler(model)
    for cache in (DynamicCache(config=model.config), StaticCache(config=model.config, max_cache_len=64)):
        model(IDS, past_key_values=cache, use_cache=True)
        assert cache.get_seq_length() == IDS.shape[1]
        with pytest.raises(NotImplementedError, match="starts from an empty cache; a pre-filled cache was given"):
            model.generate(torch.cat([IDS, IDS], dim=1), max_new_tokens=4, do_sample=False, custom_generate=rec,
                           past_key_values=cache)
    window_model = tiny_model("gemma3")  # its sliding layers are converted first: refused there
    cache = DynamicCache(config=window_model.config)
    window_model(IDS, past_key_values=cache, use_cache=True)
    with pytest.raises(NotImplementedError, match="pre-filled cache"):
        window_model.generate(torch.cat([IDS, IDS], dim=1), max_new_tokens=4, do_sample=False,
                              custom_generate=TokenRecycler(window_model), past_key_values=cache)


def test_beam_search_and_other_decoding_methods_are_refused():
    model = tiny_model("llama")
    rec = TokenRecycler(model)
    with pytest.raises(NotImplementedError, match=r"beam search \(num_beams must be 1\)"):
        model.generate(IDS, max_new_tokens=4, num_beams=2, custom_generate=rec)
    with pytest.raises(NotImplementedError, match=r"beam search \(num_beams must be 1\)"):
        model.generate(IDS, max_new_tokens=4, num_beams=2, do_sample=True, custom_generate=rec)
    for kwargs, name in ((dict(penalty_alpha=0.6, top_k=4), "penalty_alpha"),
                         (dict(dola_layers="low"), "dola_layers"),
                         (dict(prompt_lookup_num_tokens=3), "prompt_lookup_num_tokens")):
        with pytest.raises(NotImplementedError, match=f"{name} selects another decoding method"):
            model.generate(IDS, max_new_tokens=4, custom_generate=rec, **kwargs)
    with pytest.raises(TypeError, match="num_beams"):  # rec.generate names its options; others are a TypeError
        rec.generate(IDS, max_new_tokens=4, num_beams=2)


def test_a_recycler_built_for_another_model_is_refused():
    reference, model = private_copy("llama")
    rec = TokenRecycler(model)
    with pytest.raises(ValueError, match="this TokenRecycler was built for another model"):
        reference.generate(IDS, max_new_tokens=4, custom_generate=rec)  # the same weights, another object


@pytest.mark.parametrize("name", ["output_scores", "output_logits", "output_attentions", "output_hidden_states"])
def test_per_step_outputs_are_refused_not_dropped(name):
    model = tiny_model("llama")
    rec = TokenRecycler(model)
    with pytest.raises(NotImplementedError, match=f"{name}=True is not supported by TokenRecycler"):
        model.generate(IDS, max_new_tokens=4, do_sample=False, custom_generate=rec, return_dict_in_generate=True,
                       **{name: True})
    # Without return_dict_in_generate HF returns the sequences alone and so do we: nothing is dropped.
    want = model.generate(IDS, max_new_tokens=8, do_sample=False, **{name: True})
    got = model.generate(IDS, max_new_tokens=8, do_sample=False, custom_generate=rec, **{name: True})
    assert isinstance(got, torch.Tensor) and torch.equal(got, want)


def test_return_dict_in_generate_gives_the_sequences_and_the_cache():
    model = tiny_model("llama")
    rec = TokenRecycler(model, tree="paper")
    want = model.generate(IDS, max_new_tokens=20, do_sample=False)
    out = model.generate(IDS, max_new_tokens=20, do_sample=False, custom_generate=rec, return_dict_in_generate=True)
    assert torch.equal(out.sequences, want)
    assert out.past_key_values.get_seq_length() >= want.shape[1] - 1
    assert out.scores is None and out.logits is None


def test_num_return_sequences_samples_every_copy():
    """HF repeats the prompt num_return_sequences times before the call: each copy is a row of a batch,
    sampled on its own (with top_k=1 every row is greedy's; the sampling tests compare distributions)."""
    model = tiny_model("llama")
    rec = TokenRecycler(model)
    want = model.generate(IDS, max_new_tokens=12, do_sample=False)
    got = model.generate(IDS, max_new_tokens=12, do_sample=True, top_k=1, num_return_sequences=3, custom_generate=rec)
    assert torch.equal(got, want.expand(3, -1))
    assert len(rec.stats.rows) == 3
    torch.manual_seed(0)
    rows = model.generate(IDS, max_new_tokens=12, do_sample=True, num_return_sequences=8, custom_generate=rec)
    assert len({tuple(r) for r in rows.tolist()}) > 1, "copies were not sampled independently"


@pytest.mark.parametrize("arch", ["mistral-window", "gemma2"])
def test_window_models_with_padding(arch):
    """A sliding-window model decodes one row at a time: a batch is refused; a single left-padded row
    gives what HF gives for it."""
    model = tiny_model(arch)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), IDS], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(IDS)], dim=1)
    with pytest.raises(NotImplementedError, match="sliding-window models are decoded one row at a time"):
        TokenRecycler(model).generate(torch.cat([padded, padded]), attention_mask=torch.cat([mask, mask]))
    impl = model.config._attn_implementation
    want = model.generate(padded, attention_mask=mask, max_new_tokens=40, do_sample=False)
    try:
        rec = TokenRecycler(model, tree="paper")
        got = rec.generate(padded, attention_mask=mask, max_new_tokens=40)
    finally:
        model.set_attn_implementation(impl)
    assert torch.equal(got, want)
    assert rec.stats.mean_accepted > 1.0, "no draft accepted: compaction past the padding not exercised"


def test_a_static_cache_too_small_for_the_run_stops_it_with_an_error():
    from transformers import StaticCache
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 12))
    reference = copy.deepcopy(model)  # never given to a recycler
    rec = TokenRecycler(model)
    with pytest.raises(ValueError, match=r"the static cache \(30 positions\) is full at 30 tokens"):
        model.generate(ids, custom_generate=rec, past_key_values=StaticCache(config=model.config, max_cache_len=30),
                       max_new_tokens=40, min_new_tokens=40, do_sample=False)
    # Nothing is left behind: the recycler decodes on, equal to greedy.
    want = reference.generate(ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(model.generate(ids, custom_generate=rec, max_new_tokens=10, do_sample=False), want)
