"""tree='auto': counterfactual node statistics, the per-step cost trade-off, and losslessness."""

import numpy as np
import pytest
import torch
from models import tiny_model

from token_recycling import TokenRecycler
from token_recycling.auto_tree import AutoTree, CostModel, candidate_paths
from token_recycling.policy import Policy
from token_recycling.tree import DraftTree, best_subtree


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
        auto.score_nodes(rows, targets)


def test_observe_counts_only_observable_levels():
    auto = AutoTree(topk=4, candidates=[[0], [1], [0, 0], [0, 1], [0, 0, 0]])
    rows = np.array([[10, 11, 12, 13], [20, 21, 22, 23]])
    auto.score_nodes(rows, np.array([10, 21]))  # depth 1: rank 0 hit; depth 2: rank 1 hit; depth 3 unknown
    idx = {tuple(p): i + 1 for i, p in enumerate(auto.paths)}
    assert auto.den[idx[(0,)]] == 1 and auto.num[idx[(0,)]] == 1
    assert auto.den[idx[(1,)]] == 1 and auto.num[idx[(1,)]] == 0
    assert auto.den[idx[(0, 1)]] == 1 and auto.num[idx[(0, 1)]] == 1
    assert auto.den[idx[(0, 0)]] == 1 and auto.num[idx[(0, 0)]] == 0
    assert auto.den[idx[(0, 0, 0)]] == 0  # its parent did not match: nothing observed


def test_best_order_is_best_subtree_order():
    # The O(n log n) order must equal tree.best_subtree's pick order on any statistics.
    rng = np.random.default_rng(0)
    auto = AutoTree(topk=8, candidates=candidate_paths(max_nodes=60, topk=8))
    auto.den = rng.integers(0, 50, len(auto.den)).astype(float)
    auto.num = np.floor(auto.den * rng.random(len(auto.den)))
    order, gains = auto.best_order()
    rate = auto.rates()
    want = best_subtree(auto.paths, rate[1:].tolist(), len(auto.paths), in_pick_order=True)
    assert order == want
    index = {tuple(p): i + 1 for i, p in enumerate(auto.paths)}
    assert np.allclose(gains, np.cumsum([rate[index[tuple(p)]] for p in want]))


def _policy(cost_sizes, cost_seconds, max_chain=10):
    policy = Policy(topk=8, max_chain=max_chain, max_ngram=4)
    policy.cost.set_curve(CostModel(cost_sizes, cost_seconds, context=10**6))  # never re-measured
    return policy


def test_perfect_top1_chain_with_cheap_forwards_grows_deep():
    policy = _policy([1, 128], [1.0, 1.05])  # almost free extra tokens
    _observe_top1_always(policy.auto, 300, depth=10)
    plan = policy.decide([], run=0)
    paths = policy.tree_paths(plan.tree_nodes)
    assert [0] * 8 in paths and plan.expected > 8 and plan.chains == []


def test_expensive_forwards_give_small_trees():
    policy = _policy([1, 128], [1.0, 64.0])  # every extra token costs half a forward
    _observe_top1_always(policy.auto, 300, depth=2)
    assert policy.decide([], run=0).tree_nodes <= 3


def _observe_chain(policy, candidate, actual, run, steps):
    for _ in range(steps):
        plan = policy.decide([(candidate, 4)], run=run)
        policy.score_plan(plan, actual)


def test_useless_chain_is_dropped_and_trusted_chain_drafted_long():
    policy = _policy([1, 128], [1.0, 3.0])
    cand = list(range(100, 110))
    _observe_chain(policy, cand, [7] * 11, run=0, steps=200)  # never right after a failed run
    assert policy.decide([(cand, 4)], run=0).chains[0] == []
    _observe_chain(policy, cand, cand + [7], run=4, steps=200)  # always right in a copy run
    plan = policy.decide([(cand, 4)], run=4)
    assert plan.chains[0] == cand and plan.tree_nodes <= 4  # long chain, tiny tree
    assert policy.decide([(cand, 4)], run=0).chains[0] == []  # the other bucket keeps its own verdict


def test_auto_tree_is_lossless_and_reports_its_choice(tmp_path):
    model = tiny_model("llama")
    # tree="auto", hybrid n-gram drafts on: the defaults, except that the same prompt three times would
    # find its whole answer in the earlier outputs (ngram_history), and the policy then rightly drops
    # the matrix tree; this test is about the tree's choice and report.
    rec = TokenRecycler(model, ngram_history=0)
    ids = torch.tensor([[50, 51, 52, 50, 51]])
    for _ in range(3):
        want = model.generate(ids, max_new_tokens=60, do_sample=False)
        assert torch.equal(rec.generate(ids, max_new_tokens=60), want)
    s = rec.stats
    # The report is the last step's tree (which may be none where the n-gram chain alone pays: the
    # prompt repeats, and a continuation then goes on with its period); some step drafted from the matrix.
    assert s.tree_size == rec.tree.num_nodes - 1 and max(s.matrix_nodes) > 1
    assert s.predicted_speedup is not None and s.measured_speedup is not None
    assert s.from_matrix + s.from_ngram == sum(n - 1 for n in s.accept_lengths)
    assert len(s.chain_tokens) == len(s.match) == len(s.expected) == s.steps and s.decision_seconds > 0
    assert s.from_ngram == sum(s.ngram_accepted)
    path = tmp_path / "auto.safetensors"
    rec.save(path)
    back = TokenRecycler.load(model, path)
    assert back.auto is not None and np.array_equal(back.auto.num, rec.auto.num)
    assert np.array_equal(back.drafter.policy.chain.num, rec.drafter.policy.chain.num)
    assert back.tree.paths == rec.tree.paths
    # the per-source calibration comes back with the outcomes behind it
    policy, loaded = rec.drafter.policy, back.drafter.policy
    assert any(policy.outcomes.values())
    assert {s: list(o) for s, o in loaded.outcomes.items()} == {s: list(o) for s, o in policy.outcomes.items()}
    assert loaded.calibration == pytest.approx(policy.calibration)
