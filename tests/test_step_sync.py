"""step_sync.py: one host sync per decode step.

On the CPU the decode loop runs the code CUDA runs, so the count is proven here in two ways:
  - StepSync.fetch (the designated sync) is called exactly once per step;
  - a taint tracker (a TorchFunctionMode) marks every tensor computed from the model (its weights,
    the prompt, the cache, the logits, everything derived from them: what lives on the device on a
    GPU) and records every read of such a tensor to the host (tolist, item, int/bool/float, numpy,
    .cpu(), .to("cpu")) made inside the decode loop other than through StepSync.fetch. There must
    be none. A negative control checks that the tracker does catch a read.
On CUDA (skipped without a GPU): torch.cuda.set_sync_debug_mode("error") between one step's sync and
the next, deferred device errors raised at the sync point with the op's own message, and CUDA-graph
replay == uncaptured == greedy.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from models import private_copy
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakTensorKeyDictionary

from token_recycling import TokenRecycler, _testing, ops, step_sync, verify

READS = {"tolist", "item", "__int__", "__index__", "__float__", "__bool__", "__complex__", "numpy", "__array__"}
MUTATING_OPS = {"update_adjacency", "compact_kv", "ngram_index_append", "__setitem__"}


def _tensors(obj) -> list[torch.Tensor]:
    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]


def _to_cpu(args, kwargs) -> bool:
    targets = list(args[1:]) + [kwargs.get("device")]
    return any((isinstance(t, torch.device) and t.type == "cpu") or t == "cpu" for t in targets)


class DeviceReads(TorchFunctionMode):
    """Taint tracking of device-side values on the CPU (module doc)."""

    def __init__(self, seeds):
        super().__init__()
        self.tainted = WeakTensorKeyDictionary()
        for t in seeds:
            self.tainted[t] = True
        self.in_loop = False
        self.in_sync = False
        self.reads: list[str] = []

    def is_tainted(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t in self.tainted

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        inputs = _tensors((args, kwargs))
        dirty = any(t in self.tainted for t in inputs)
        if self.in_loop and not self.in_sync and args and self.is_tainted(args[0]) and name in READS:
            self.reads.append(f"{name} at {_caller()}")
        out = func(*args, **kwargs)
        if (dirty and not self.in_loop and (name == "cpu" or (name == "to" and _to_cpu(args, kwargs)))
                and isinstance(out, torch.Tensor)):
            return out.clone()  # outside the loop a copy to the host is allowed: on a GPU it is a new host tensor
        if dirty:
            for t in _tensors(out):
                self.tainted[t] = True
            mutated = name in MUTATING_OPS or (name.endswith("_") and not name.startswith("__"))
            if mutated and args:
                for t in _tensors(args[0]):
                    self.tainted[t] = True
            for t in _tensors(kwargs.get("out")):
                self.tainted[t] = True
        return out


def _caller() -> str:
    import traceback
    frames = [f for f in traceback.extract_stack()[:-2] if "token_recycling" in f.filename or "transformers" in f.filename]
    return " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in reversed(frames[-3:]))


@contextlib.contextmanager
def tracked(model, ids, monkeypatch):
    """The tracker around a generate() call, StepSync.fetch the one allowed read."""
    mode = DeviceReads([*model.parameters(), *model.buffers(), ids])
    fetch, enter, exit_ = step_sync.StepSync.fetch, step_sync.StepSync.__enter__, step_sync.StepSync.__exit__

    def counted_fetch(self, *tensors):
        mode.in_sync = True
        try:
            host = fetch(self, *tensors)
        finally:
            mode.in_sync = False
        for t in host:  # the host copies are host values
            mode.tainted.pop(t, None)
        return host

    def enter_(self):
        mode.in_loop = True
        return enter(self)

    def exit__(self, *exc):
        mode.in_loop = False
        return exit_(self, *exc)

    monkeypatch.setattr(step_sync.StepSync, "fetch", counted_fetch)
    monkeypatch.setattr(step_sync.StepSync, "__enter__", enter_)
    monkeypatch.setattr(step_sync.StepSync, "__exit__", exit__)
    with mode:
        yield mode


def sdpa_copy(arch="llama"):
    return private_copy(arch)


CASES = {
    "paper-16": dict(tree="paper-16"),
    "auto": dict(tree="auto"),
    "tree-attention": dict(tree="paper-16", tree_attention=True),
    "graph-step": dict(tree="paper-16", cuda_graphs=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_one_sync_per_step(case, monkeypatch):
    reference, model = sdpa_copy()
    rec = TokenRecycler(model, **CASES[case])
    ids = torch.randint(3, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    want = reference.generate(ids, max_new_tokens=40, do_sample=False)
    with tracked(model, ids, monkeypatch) as mode, _testing.counting() as counts:
        got = (model.generate(ids, max_new_tokens=40, do_sample=False, custom_generate=rec,
                              cache_implementation="static")
               if CASES[case].get("cuda_graphs") else rec.generate(ids, max_new_tokens=40))
    assert torch.equal(got, want)
    assert rec.stats.steps > 1 and rec.stats.mean_accepted > 1.0
    assert counts.syncs == rec.stats.steps  # the designated point: once per step
    assert mode.reads == [], "device values read outside the step's sync:\n" + "\n".join(mode.reads)


@pytest.mark.parametrize("tree", ["paper-16", "auto"])
def test_one_sync_per_step_for_a_batch(tree, monkeypatch):
    """Rows of different lengths (left-padded), one of them finishing early: still one sync per step
    for the whole batch, and nothing else read back."""
    reference, model = sdpa_copy()
    g = torch.Generator().manual_seed(2)
    lengths = (9, 3, 14)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, ids.shape[1] - n:] = torch.randint(3, model.config.vocab_size, (n,), generator=g)
        mask[b, ids.shape[1] - n:] = 1
    want = reference.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False)
    rec = TokenRecycler(model, tree=tree)
    with tracked(model, ids, monkeypatch) as mode, _testing.counting() as counts:
        got = rec.generate(ids, attention_mask=mask, max_new_tokens=40)
    assert torch.equal(got, want)
    assert rec.stats.steps > 1 and max(r.mean_accepted for r in rec.stats.rows) > 1.0
    assert counts.syncs == rec.stats.steps  # once per step, whatever B is
    assert mode.reads == [], "device values read outside the step's sync:\n" + "\n".join(mode.reads)


def test_sampling_one_sync_per_step(monkeypatch):
    """The sampling walk goes through the same point (its uniforms consumed once the count is back):
    same output as an untracked run with the same seed, one sync per step, no other read."""
    _, model = sdpa_copy()
    ids = torch.randint(3, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(3))
    kwargs = dict(max_new_tokens=32, do_sample=True, temperature=0.7, top_p=0.9)
    want = TokenRecycler(model, tree="paper-16").generate(ids, generator=torch.Generator().manual_seed(5), **kwargs)
    rec = TokenRecycler(model, tree="paper-16")
    with tracked(model, ids, monkeypatch) as mode, _testing.counting() as counts:
        got = rec.generate(ids, generator=torch.Generator().manual_seed(5), **kwargs)
    assert torch.equal(got, want)
    assert counts.syncs == rec.stats.steps > 1
    assert mode.reads == [], "device values read outside the step's sync:\n" + "\n".join(mode.reads)


def test_the_tracker_catches_a_read(monkeypatch):
    """Negative control: a verifier that looks at the logits on the host (as the old tie check did)."""
    _, model = sdpa_copy()
    rec = TokenRecycler(model, tree="paper-16")
    original = verify.greedy_and_candidates

    def peeking(logits, topk):
        bool((logits > 0).any())
        return original(logits, topk)

    monkeypatch.setattr(verify, "greedy_and_candidates", peeking)
    ids = torch.tensor([[5, 6, 7, 8]])
    with tracked(model, ids, monkeypatch) as mode:
        rec.generate(ids, max_new_tokens=8)
    assert mode.reads and all(r.startswith("__bool__") for r in mode.reads), mode.reads


def test_fetch_packs_and_returns_host_copies():
    sync = step_sync.StepSync("cpu")
    a, b = torch.tensor([3]), torch.arange(6, dtype=torch.int32).view(2, 3)
    with _testing.counting() as counts, sync:
        ha, hb = sync.fetch(a, b)
        sync.finish()
    assert counts.syncs == 1
    assert ha.tolist() == [3] and hb.tolist() == list(range(6)) and hb.dtype == torch.long


def test_deferred_error_api_on_the_cpu():
    assert ops.set_deferred_device_errors("cpu", True) is False  # CPU ops check at once: nothing to defer
    record = ops.take_device_errors("cpu")
    assert record.dtype == torch.long and record.tolist() == [0] * 6
    ops.raise_device_errors(record)  # no error: nothing raised
    with ops.deferred_device_errors("cpu"):
        with pytest.raises(ValueError, match="verify_greedy"):  # CPU ops still raise at once
            ops.verify_greedy(torch.tensor([[1, 2]]), torch.tensor([[1, 2]]), torch.tensor([-1, 5], dtype=torch.int32))
    bad = torch.tensor([3, 0, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="deferred device check"):
        ops.raise_device_errors(bad)
    with pytest.raises(TypeError, match="int64"):
        ops.raise_device_errors(bad.int())
    with pytest.raises(ValueError, match=r"\[6\]"):
        ops.raise_device_errors(torch.zeros(5, dtype=torch.long))


def test_pending_verdict_matches_the_op():
    """verify.pending builds the emitted tokens on the device; resolve() from host copies gives the
    path and tokens the op's outputs say (random trees, every accept length)."""
    g = torch.Generator().manual_seed(0)
    from conftest import random_tree
    for _ in range(50):
        n = int(torch.randint(1, 20, (1,), generator=g))
        parents, _ = random_tree(n, g)
        tokens = torch.randint(0, 4, (1, n), generator=g)
        preds = torch.randint(0, 4, (1, n), generator=g)
        accept_len, nodes, bonus = ops.verify_greedy(tokens, preds, parents)
        p = verify.pending(tokens, accept_len, nodes, bonus)
        v = p.resolve(*[t.reshape(-1).clone() for t in p.device_parts()])
        k = int(accept_len[0])
        path = nodes[0, :k]
        assert torch.equal(v.path, path)
        assert v.new_host.tolist() == tokens[0, path[1:]].tolist() + [int(bonus[0])]
        assert torch.equal(v.new_tokens, v.new_host) and v.accepted == k


# ----------------------------------------------------------------------------------- CUDA (skipped here)
cuda = pytest.mark.skipif(not torch.cuda.is_available() or not torch._C._dispatch_has_kernel_for_dispatch_key(
    "token_recycling::tree_attention", "CUDA"), reason="needs a GPU and the CUDA build")


def _cuda_copy(arch="llama"):
    """(the model on the CPU, a copy on the GPU): head_dim 64, which the CUDA tree-attention kernel
    takes (the tiny test models' 16 would send every tree forward to the dense path)."""
    import transformers as tf
    cfg_cls, model_cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}[arch]
    torch.manual_seed(0)
    cfg = cfg_cls(vocab_size=320, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  intermediate_size=256, max_position_embeddings=512)
    cfg.bos_token_id, cfg.eos_token_id = 1, 2
    reference = model_cls._from_config(cfg, attn_implementation="sdpa", dtype=torch.float32).eval()
    with torch.no_grad():
        reference.get_output_embeddings().weight.mul_(8.0)
    model = copy.deepcopy(reference).to("cuda")
    return reference, model


@cuda
@pytest.mark.parametrize("graphs", [False, True])
def test_cuda_no_sync_between_step_syncs(graphs, monkeypatch):
    """Between the end of one step's sync and the start of the next (and the loop's end) nothing may
    wait for the GPU: torch raises on any sync in that window. Graph captures (first use of a
    bucket per call) are let through: they synchronize by design."""
    from token_recycling import graph_step
    reference, model = _cuda_copy()
    rec = TokenRecycler(model, tree="paper-16", tree_attention=True, cuda_graphs=graphs)
    ids = torch.randint(3, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    want = reference.generate(ids, max_new_tokens=40, do_sample=False)
    fetch, finish = step_sync.StepSync.fetch, step_sync.StepSync.finish
    capture = graph_step.Bucket.capture

    def fetch_(self, *t):
        torch.cuda.set_sync_debug_mode(0)
        try:
            return fetch(self, *t)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    def finish_(self):
        torch.cuda.set_sync_debug_mode(0)
        return finish(self)

    def capture_(self, *a, **k):
        torch.cuda.set_sync_debug_mode(0)
        try:
            return capture(self, *a, **k)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    monkeypatch.setattr(step_sync.StepSync, "fetch", fetch_)
    monkeypatch.setattr(step_sync.StepSync, "finish", finish_)
    monkeypatch.setattr(graph_step.Bucket, "capture", capture_)
    try:
        if graphs:
            got = model.generate(ids.cuda(), max_new_tokens=40, do_sample=False, custom_generate=rec,
                                 cache_implementation="static")
        else:
            got = rec.generate(ids.cuda(), max_new_tokens=40)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(got.cpu(), want)


@cuda
def test_cuda_deferred_errors_name_the_op():
    """An op whose check is deferred raises at the read with the message an immediate check gives."""
    matrix = torch.zeros(10, 4, dtype=torch.int32, device="cuda")
    parents = torch.tensor([-1, 0, 0], dtype=torch.int32, device="cuda")
    ranks = torch.tensor([0, 1, 2], dtype=torch.int32, device="cuda")
    roots = torch.tensor([12], device="cuda")  # out of the vocab: only the kernel sees it
    with pytest.raises(ValueError) as immediate:
        ops.build_draft_tree(matrix, roots, parents, ranks)
    with ops.deferred_device_errors("cuda"):
        ops.build_draft_tree(matrix, roots, parents, ranks)  # returns without waiting
        record = ops.take_device_errors("cuda").cpu()
    with pytest.raises(ValueError) as deferred:
        ops.raise_device_errors(record)
    assert str(immediate.value).split("\n")[0] in str(deferred.value)
    assert ops.take_device_errors("cuda").cpu().tolist() == [0] * 6  # taken: cleared
    # verify_greedy under deferral: all N columns, -1 past the path
    tokens = torch.tensor([[1, 2, 3]], device="cuda")
    with ops.deferred_device_errors("cuda"):
        _, nodes, _ = ops.verify_greedy(tokens, tokens, parents)
    assert nodes.shape == (1, 3)


@cuda
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_cuda_graph_replay_is_lossless(arch):
    """Captured == uncaptured == greedy (fp32), and the graphs were really replayed."""
    reference, model = _cuda_copy(arch)
    ids = torch.randint(3, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(2))
    want = reference.generate(ids, max_new_tokens=48, do_sample=False)
    outs = {}
    for capture in (True, False):
        rec = TokenRecycler(model, tree="paper-16", cuda_graphs=True)
        rec.graph.capture = capture
        outs[capture] = model.generate(ids.cuda(), max_new_tokens=48, do_sample=False, custom_generate=rec,
                                       cache_implementation="static").cpu()
        if capture:
            assert rec.graph.captures > 0, rec.graph.uncaptured_reason
    assert torch.equal(outs[True], outs[False]) and torch.equal(outs[True], want)
