"""tree='auto': counterfactual node statistics, the cost trade-off, and losslessness."""

import numpy as np
import torch
from models import tiny_model

from token_recycling import TokenRecycler
from token_recycling.auto_tree import AutoTree, CostModel, candidate_paths
from token_recycling.tree import DraftTree


def test_candidate_paths_form_a_tree():
    paths = candidate_paths(max_nodes=100, topk=8)
    assert len(paths) == 100
    DraftTree.from_paths(paths, topk=8)  # raises if not a tree


def _observe_top1_always(auto, steps, depth):
    """Every step: the true next tokens are always the rank-0 candidate, `depth` levels deep."""
    k = auto.topk
    for _ in range(steps):
        rows = np.arange(depth * k).reshape(depth, k) + 1000  # distinct tokens
        targets = rows[:, 0].copy()
        auto.observe(rows, targets)


def test_observe_counts_only_observable_levels():
    auto = AutoTree(topk=4, candidates=[[0], [1], [0, 0], [0, 1], [0, 0, 0]])
    rows = np.array([[10, 11, 12, 13], [20, 21, 22, 23]])
    auto.observe(rows, np.array([10, 21]))  # depth 1: rank 0 hit; depth 2: rank 1 hit; depth 3 unknown
    idx = {tuple(p): i + 1 for i, p in enumerate(auto.paths)}
    assert auto.den[idx[(0,)]] == 1 and auto.num[idx[(0,)]] == 1
    assert auto.den[idx[(1,)]] == 1 and auto.num[idx[(1,)]] == 0
    assert auto.den[idx[(0, 1)]] == 1 and auto.num[idx[(0, 1)]] == 1
    assert auto.den[idx[(0, 0)]] == 1 and auto.num[idx[(0, 0)]] == 0
    assert auto.den[idx[(0, 0, 0)]] == 0  # its parent did not match: nothing observed


def test_perfect_top1_chain_with_cheap_forwards_grows_deep():
    auto = AutoTree(topk=8)
    auto.cost = CostModel([1, 128], [1.0, 1.05])  # almost free extra tokens
    _observe_top1_always(auto, 300, depth=10)
    paths = auto.choose()
    assert [0] * 8 in paths and auto.expected_tokens > 8


def test_expensive_forwards_give_small_trees():
    auto = AutoTree(topk=8)
    auto.cost = CostModel([1, 128], [1.0, 64.0])  # every extra token costs half a forward
    _observe_top1_always(auto, 300, depth=2)
    assert len(auto.choose()) <= 3


def test_useless_chain_is_dropped_and_useful_chain_kept():
    auto = AutoTree(topk=8, max_chain=10)
    auto.cost = CostModel([1, 128], [1.0, 3.0])
    for _ in range(200):
        auto.observe_step(1.0, 20, chain_nodes=10, chain_accepted=0)
    auto.choose()
    assert auto.chain == 0
    for _ in range(2000):
        auto.observe_step(1.0, 20, chain_nodes=10, chain_accepted=8)
    auto.choose()
    assert auto.chain >= 6


def test_auto_tree_is_lossless_and_reports_its_choice(tmp_path):
    model = tiny_model("llama")
    rec = TokenRecycler(model)  # tree="auto", hybrid n-gram drafts on: the defaults
    ids = torch.tensor([[50, 51, 52, 50, 51]])
    for _ in range(3):
        want = model.generate(ids, max_new_tokens=60, do_sample=False)
        assert torch.equal(rec.generate(ids, max_new_tokens=60), want)
    s = rec.stats
    assert s.tree_size == rec.tree.num_nodes - 1 >= 1
    assert s.predicted_speedup is not None and s.measured_speedup is not None
    assert s.from_matrix + s.from_ngram == sum(n - 1 for n in s.accept_lengths)
    path = tmp_path / "auto.safetensors"
    rec.save(path)
    back = TokenRecycler.load(model, path)
    assert back.auto is not None and np.array_equal(back.auto.num, rec.auto.num)
    assert back.tree.paths == rec.tree.paths
