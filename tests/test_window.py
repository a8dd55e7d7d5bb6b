"""Sliding-window and hybrid models (window.py): lossless at contexts many times the window, with the
window layers' cache bounded by the window plus the forwarded tree."""

import pytest
import torch
from models import WINDOW, WINDOW_ARCHS, tiny_model

from token_recycling import TokenRecycler, window
from token_recycling.tree import make_tree

NEW_TOKENS = 110

# Each architecture runs every prompt length; the settings rotate so that each architecture sees
# both trees, tree attention on and off, and dynamic and static caches in every combination. With a
# static cache and tree attention the full layers' keys are the whole static buffer: the backend is
# given the prefix length (it never takes key length - N), and the window layers (window.WindowLayer,
# dynamic) take the window path with the tree last in their keys.
RUNS = [  # (prompt length, tree, tree attention, cache)
    (10, "auto", False, "static"),
    (10, "paper", True, "static"),
    (40, "paper", True, "dynamic"),
    (150, "auto", True, "dynamic"),
    (150, "paper", False, "static"),
    (150, "auto", True, "static"),
]


def _prompt(vocab: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", WINDOW_ARCHS)
def test_lossless_past_the_window(arch):
    model = tiny_model(arch)
    impl = model.config._attn_implementation
    want = {}
    for length in sorted({r[0] for r in RUNS}):
        ids = _prompt(model.config.vocab_size, length, seed=length)
        want[length] = (ids, model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False))
    accepted = []
    try:
        for length, tree, tree_attention, cache in RUNS:
            ids, expected = want[length]
            rec = TokenRecycler(model, tree=tree, tree_attention=tree_attention)
            if cache == "static":
                got = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, custom_generate=rec,
                                     cache_implementation="static")
            else:
                got = rec.generate(ids, max_new_tokens=NEW_TOKENS)
            assert torch.equal(got, expected), (arch, length, tree, tree_attention, cache)
            assert rec.attention == ("tree-kernel" if tree_attention else "model")
            accepted.append(rec.stats.mean_accepted)
            model.set_attn_implementation(impl)
    finally:
        model.set_attn_implementation(impl)
    assert max(accepted) > 1.5, "drafts were hardly accepted: compaction past the window went untested"


def test_the_window_changes_the_output():
    """Guards the test above: without its window the same model generates something else from the
    first token on, so a recycler that ignored the window could not pass."""
    ids = _prompt(320, 40, seed=40)
    with_window = tiny_model("gemma3").generate(ids, max_new_tokens=4, do_sample=False)
    without = tiny_model("gemma3", window=4096).generate(ids, max_new_tokens=4, do_sample=False)
    assert with_window[0, 40] != without[0, 40]


@pytest.mark.parametrize("arch", ["mistral-window", "gemma2"])
def test_window_layers_stay_bounded(arch, monkeypatch):
    """At a context 20 times the window, every window layer holds window - 1 positions between steps and
    at most that plus the forwarded tokens during a forward; full layers hold the whole context."""
    model = tiny_model(arch)
    held, forwarded = [], []
    real_update, real_crop = window.WindowLayer.update, window.WindowLayer.crop

    def update(self, keys, values, *args, **kwargs):
        out = real_update(self, keys, values, *args, **kwargs)
        held.append(self.stored())
        forwarded.append(keys.shape[-2])
        return out

    between = []

    def crop(self, n):
        real_crop(self, n)
        between.append(self.stored())

    monkeypatch.setattr(window.WindowLayer, "update", update)
    monkeypatch.setattr(window.WindowLayer, "crop", crop)
    ids = _prompt(model.config.vocab_size, 20, seed=3)
    rec = TokenRecycler(model, tree="paper")
    out = model.generate(ids, max_new_tokens=300, do_sample=False, custom_generate=rec,
                         return_dict_in_generate=True)
    total = out.sequences.shape[1] - 1  # the last token is not in the cache yet
    assert total > 15 * WINDOW
    assert between and max(between) == WINDOW - 1
    assert all(h <= WINDOW - 1 + f for h, f in zip(held[1:], forwarded[1:]))  # [0] is the prefill
    # The cache may hold a few accepted tokens past max_new_tokens (the last step's overshoot).
    lengths = {layer.get_seq_length() for layer in out.past_key_values.layers}
    assert len(lengths) == 1 and lengths.pop() >= total
    assert all(layer.stored() == WINDOW - 1 for layer in out.past_key_values.layers if window.is_window(layer))


def _reference_window_mask(parents: list[int], stored: int, window_size: int) -> torch.Tensor:
    """From positions: node i at prefix + depth(i) sees stored key j (position prefix - stored + j)
    and its ancestors (itself included) whose position is > its own - window."""
    n = len(parents)
    depth, ancestors = [0] * n, [set() for _ in range(n)]
    for i in range(n):
        ancestors[i] = {i}
        if parents[i] >= 0:
            depth[i] = depth[parents[i]] + 1
            ancestors[i] |= ancestors[parents[i]]
    mask = torch.zeros(n, stored + n, dtype=torch.bool)
    for i in range(n):
        pos = stored + depth[i]  # positions counted from the first stored key
        for j in range(stored):
            mask[i, j] = j > pos - window_size
        for a in ancestors[i]:
            mask[i, stored + a] = stored + depth[a] > pos - window_size
    return mask


@pytest.mark.parametrize("stored", [0, 3, WINDOW - 1])
def test_window_mask_matches_positions(stored):
    tree = make_tree("paper", 8)  # depth 6
    chain = [-1] + list(range(20))  # deeper than the window
    for parents in (tree.parents.tolist(), chain):
        n = len(parents)
        bool_tree = _reference_window_mask(parents, 0, 10 ** 6)[:, :n]
        for size in (4, WINDOW):
            want = _reference_window_mask(parents, stored, size)
            assert torch.equal(window.window_bool_mask(bool_tree, stored, size), want)
            assert torch.equal(window.dense_tree_mask(bool_tree, stored + n, size)[0, 0], want)


def test_window_layer_compacts_and_crops():
    layer = window.WindowLayer(sliding_window=5)
    k = torch.arange(12.0).view(1, 1, 12, 1)
    layer.update(k, k)  # a prefill of 12: all returned, the next update keeps the last 4
    assert layer.get_mask_sizes(3) == (7, 8)
    keys, _ = layer.update(k[:, :, :3] + 100, k[:, :, :3] + 100)
    assert keys.view(-1).tolist() == [8, 9, 10, 11, 100, 101, 102] and window.offset(layer) == 8
    layer.crop(-2)  # keep one tree node, trim back to the window
    assert layer.keys.view(-1).tolist() == [9, 10, 11, 100] and layer.get_seq_length() == 13
    with pytest.raises(ValueError, match="negative"):
        layer.crop(1)
    with pytest.raises(ValueError, match="cannot crop"):
        layer.crop(-5)


def test_prepare_converts_every_kind_of_sliding_cache():
    from transformers import DynamicCache, StaticCache
    model = tiny_model("qwen2-window")  # layer 0 full, layer 1 windowed
    for cache in (DynamicCache(config=model.config), StaticCache(config=model.config, max_cache_len=64),
                  DynamicCache()):
        window.prepare(model, cache)
        assert not window.is_window(cache.layers[0]) and window.is_window(cache.layers[1])
        assert cache.layers[1].sliding_window == WINDOW
