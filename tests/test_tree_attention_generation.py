"""The CUDA path's Python on the CPU: the decode loop through the tree-attention backend
(hf_attention.py, our CPU kernel) is lossless (fp32 == greedy generate) for every tiny
architecture, with a dynamic cache (rec.generate and custom_generate) and a static cache
(custom_generate with cache_implementation="static", whose keys are the whole fixed buffer)."""


import pytest
import torch
from models import ARCHS, private_copy

from token_recycling import TokenRecycler, hf_attention


def tree_attention_copy(arch: str):
    """A copy of the tiny model (the shared one keeps sdpa) switched to the tree-attention backend."""
    return private_copy(arch)


@pytest.fixture
def kernel_calls(monkeypatch):
    calls = []
    real = hf_attention.ops.tree_attention

    def counting(q, k, v, prefix_len, tree_mask, scale, *tree_start):
        calls.append((q.shape[2], k.shape[2], int(prefix_len[0])))
        return real(q, k, v, prefix_len, tree_mask, scale, *tree_start)

    monkeypatch.setattr(hf_attention.ops, "tree_attention", counting)
    return calls


@pytest.mark.parametrize("arch", ARCHS)
def test_tree_attention_lossless_dynamic_and_static(arch, kernel_calls):
    reference, model = tree_attention_copy(arch)
    rec = TokenRecycler(model, tree="paper-16", tree_attention=True)
    assert model.config._attn_implementation == "sdpa"  # switched only inside each call
    ids = torch.randint(3, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(3))
    want = reference.generate(ids, max_new_tokens=32, do_sample=False)
    assert torch.equal(rec.generate(ids, max_new_tokens=32), want), arch
    assert rec.stats.mean_accepted > 1.0, "drafts were never accepted: compaction untested"
    assert torch.equal(model.generate(ids, max_new_tokens=32, do_sample=False, custom_generate=rec), want), arch
    kernel_calls.clear()
    got = model.generate(ids, max_new_tokens=32, do_sample=False, custom_generate=rec, cache_implementation="static")
    assert torch.equal(got, want), arch
    # The static cache's keys are its whole buffer: the kernel saw more keys than prefix + N.
    assert kernel_calls and any(keys > prefix + n for n, keys, prefix in kernel_calls)
