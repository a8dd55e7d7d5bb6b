"""graph_step.py: the graph-ready verification forward (bucketed, padded, device-side prefix over a
static cache) runs uncaptured on the CPU and is lossless (fp32 == greedy generate)."""


import pytest
import torch
from models import private_copy

from token_recycling import TokenRecycler, graph_step


def test_bucket_for():
    assert graph_step.bucket_for(1) == 8 and graph_step.bucket_for(8) == 8 and graph_step.bucket_for(9) == 16
    assert graph_step.bucket_for(81) == 128 and graph_step.bucket_for(200) == 128
    assert graph_step.bucket_for(81, room=70) == 64  # the draft is cut to 64 nodes
    assert graph_step.bucket_for(5, room=7) is None


def test_padded_mask_hides_padding():
    mask = torch.rand(5, 5, generator=torch.Generator().manual_seed(0)) > 0.5
    out = graph_step.padded_mask(mask, 8)
    assert torch.equal(out[:5, :5], mask)
    assert not out[:5, 5:].any() and not out[5:, :5].any()
    assert torch.equal(out[5:, 5:], torch.eye(3, dtype=torch.bool))


def graph_copy(arch):
    return private_copy(arch)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_graph_ready_step_is_lossless(arch):
    reference, model = graph_copy(arch)
    rec = TokenRecycler(model, tree="paper-16", cuda_graphs=True)
    assert rec.tree_attention and rec.graph is not None and not rec.graph.captured
    ids = torch.randint(3, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(4))
    want = reference.generate(ids, max_new_tokens=32, do_sample=False)
    assert torch.equal(rec.generate(ids, max_new_tokens=32), want)
    assert rec.stats.mean_accepted > 1.0
    got = model.generate(ids, max_new_tokens=32, do_sample=False, custom_generate=rec, cache_implementation="static")
    assert torch.equal(got, want)
    # Bucket sizes, except near the static cache's end (less room than the smallest bucket: exact).
    used = rec.graph.buckets_used
    assert used & set(graph_step.BUCKETS) and rec.graph.padded_forwards > 0
    assert all(s in graph_step.BUCKETS or s < graph_step.BUCKETS[0] for s in used), used


def test_graph_ready_step_needs_a_static_cache():
    _, model = graph_copy("llama")
    rec = TokenRecycler(model, tree="paper-16", cuda_graphs=True)
    with pytest.raises(ValueError, match="static cache"):
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=8, do_sample=False, custom_generate=rec)
    with pytest.raises(ValueError, match="tree_attention"):
        TokenRecycler(model, cuda_graphs=True, tree_attention=False)


def test_graph_step_reuses_static_buffers_per_bucket(monkeypatch):
    """Every forward of one bucket runs on the same input buffers (what a captured graph reads), and
    on the CPU the forward runs uncaptured, saying why."""
    reference, model = graph_copy("llama")
    seen: dict[int, set] = {}
    load = graph_step.Bucket.load

    def spy(self, draft, prefix_len):
        seen.setdefault(self.size, set()).add((self.tokens.data_ptr(), self.depths.data_ptr(), self.mask.data_ptr(),
                                               self.prefix_len.data_ptr()))
        return load(self, draft, prefix_len)

    monkeypatch.setattr(graph_step.Bucket, "load", spy)
    rec = TokenRecycler(model, tree="paper-16", cuda_graphs=True)
    ids = torch.randint(3, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(9))
    got = model.generate(ids, max_new_tokens=24, do_sample=False, custom_generate=rec, cache_implementation="static")
    assert torch.equal(got, reference.generate(ids, max_new_tokens=24, do_sample=False))
    assert seen and all(len(ptrs) == 1 for ptrs in seen.values()), seen
    assert rec.stats.steps > len(seen)  # buckets were reused
    assert not rec.graph.captured and rec.graph.captures == 0
    assert rec.graph.uncaptured_reason == "not on a CUDA device"
    assert not rec.graph._buckets  # released at the end of the call


def test_capture_blocker_names_the_reason():
    _, model = graph_copy("llama")
    from token_recycling import cache as kv
    cache = kv.new_cache(model, 64)
    assert graph_step.capture_blocker(model, cache) == "not on a CUDA device"
