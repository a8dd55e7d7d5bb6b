"""cache.trim drops the last n positions of every layer, also where a transformers release's static
layer has no crop() (5.17: the first GPU run's static-cache failures), by moving its cumulative_length."""

from types import SimpleNamespace

import pytest
import torch
from models import tiny_model

from token_recycling import cache as kv


def test_trim_equals_crop_on_real_caches():
    model = tiny_model("llama")
    ids = torch.randint(3, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    for static in (None, 32):
        cache = kv.new_cache(model, static)
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        assert cache.get_seq_length() == 9
        kv.trim(cache, 3)
        assert cache.get_seq_length() == 6, static


def test_trim_moves_cumulative_length_where_a_static_layer_has_no_crop():
    length = torch.tensor(9)
    address = length.data_ptr()
    cropped = []
    static = SimpleNamespace(keys=torch.zeros(1, 1, 16, 4), values=torch.zeros(1, 1, 16, 4), cumulative_length=length)
    dynamic = SimpleNamespace(keys=torch.zeros(1, 1, 9, 4), crop=cropped.append)
    not_started = SimpleNamespace(is_initialized=False)
    kv.trim(SimpleNamespace(layers=[static, dynamic, not_started]), 3)
    assert int(static.cumulative_length) == 6 and static.cumulative_length.data_ptr() == address  # in place
    assert cropped == [-3]


def test_trim_refuses_a_layer_it_cannot_shorten():
    with pytest.raises(NotImplementedError, match="layer 0"):
        kv.trim(SimpleNamespace(layers=[SimpleNamespace(keys=torch.zeros(1))]), 1)
