"""The per-step draft policy (policy.py): chain statistics, the context-following cost, several
n-gram candidates in one draft, and losslessness on every decision path."""

import json
import random

import numpy as np
import pytest
import torch
from models import tiny_model

from token_recycling import TokenRecycler
from token_recycling.auto_tree import CostModel
from token_recycling.ngram import NgramIndex
from token_recycling.policy import ChainStats, Plan, Policy, StepCost, agreement
from token_recycling.policy import median as policy_median


def test_chain_stats_count_positions_until_the_first_miss():
    stats = ChainStats(max_ngram=4, length=6)
    b = stats.bucket(0, 3, run=2)
    assert stats.score(b, [5, 6, 7, 8], [5, 6, 9, 8, 1]) == 2  # positions 1, 2 right, 3 wrong, 4 not observed
    assert stats.den[b, 1:5].tolist() == [1, 1, 1, 0] and stats.num[b, 1:5].tolist() == [1, 1, 0, 0]
    assert stats.score(b, [5, 6], [5]) == 1  # only as far as the produced tokens reach
    assert stats.den[b, 2] == 1
    e = stats.expected(b)
    assert e[0] == 0 and np.all(np.diff(e) >= 0) and e[1] <= 1.0


def test_memoized_curves_equal_fresh_ones_and_refuse_scoring():
    stats = ChainStats(max_ngram=4, length=6)
    rng = np.random.default_rng(0)
    stats.num[:] = rng.integers(0, 5, stats.num.shape)
    stats.den[:] = stats.num + rng.integers(0, 3, stats.num.shape)
    buckets = [stats.bucket(r, n, run) for r in range(2) for n in (1, 4) for run in (0, 3)]
    fresh = [stats.expected(b).copy() for b in buckets]
    with stats.memoized():
        first = [stats.expected(b) for b in buckets]
        assert all(stats.expected(b) is c for b, c in zip(buckets, first))  # computed once per bucket
        assert all(np.array_equal(c, f) for c, f in zip(first, fresh))
        with pytest.raises(ValueError):
            first[0][1] = 0.0  # shared: read-only
        with pytest.raises(RuntimeError, match="memoized"):
            stats.score(buckets[0], [1, 2], [1, 2])
    stats.score(buckets[0], [1, 2], [1, 3])  # outside the block: scored, and the next curve is fresh
    assert not np.array_equal(stats.expected(buckets[0]), fresh[0])


def test_chain_buckets_are_distinct():
    stats = ChainStats(max_ngram=4, length=4)
    agreements = [(1, 1), (2, 2), (2, 3), (1, 3)]  # (support, occurrences): one of each class
    keys = {stats.bucket(r, n, run, support=s, occurrences=o) for r in range(2) for n in range(1, 5)
            for run in (0, 1, 3, 4, 9) for s, o in agreements}
    assert len(keys) == 2 * 4 * 4 * 3  # rank x matched length x agreement x run bucket (0, 1-3, 4+)
    assert stats.bucket(0, 2, 0) == stats.bucket(0, 2, 0, support=1, occurrences=1)
    assert max(keys) < stats.memory_start


def test_agreement_classes():
    assert [agreement(s, o) for s, o in [(0, 0), (1, 1), (3, 3), (2, 4), (1, 4), (0, 2)]] == [0, 0, 1, 2, 3, 3]


def test_ngram_occurrences_are_the_earlier_matches_of_the_suffix():
    """NgramIndex.occurrences (what a context candidate's agreement is counted over) against a scan
    of the plain list."""
    rng = random.Random(0)
    for _ in range(200):
        seq = [rng.randrange(4) for _ in range(rng.randrange(1, 40))]
        index = NgramIndex(1, 64, 4)
        index.extend(torch.tensor([seq]))
        n = rng.randrange(1, 5)
        tail = seq[len(seq) - n:]
        starts = [s for s in range(len(seq) - n) if seq[s:s + n] == tail] if n < len(seq) else []
        assert index.occurrences(n).tolist() == starts, (seq, n)


def test_the_continuation_most_occurrences_agree_on_goes_first():
    """After ...5, where 5 went on as 1, 1, 1, then 2: the way most went on is drafted first (from
    its most recent occurrence), the most recent way second, each with its agreement."""
    from token_recycling.draft import Drafter, DraftState
    drafter = Drafter(16, torch.device("cpu"), max_ngram=3, ngram_tokens=8)
    state = DraftState(torch.tensor([[5, 1, 5, 1, 5, 1, 5, 2, 9, 5]]), 64, 3)
    (majority, n0, mem0, support0, occ0), (recent, n1, mem1, support1, occ1) = drafter._candidates(state)[:2]
    assert (n0, n1, mem0, mem1) == (1, 1, False, False)
    assert majority == [1, 5, 2, 9, 5, 1, 5, 2] and (support0, occ0) == (3, 4)  # from position 5, periodic
    assert recent == [2, 9, 5, 2, 9, 5, 2, 9] and (support1, occ1) == (1, 4)
    unanimous = DraftState(torch.tensor([[5, 1, 5, 1, 7, 5]]), 64, 3)
    cands = drafter._candidates(unanimous)
    assert cands[0][0][0] == 1 and cands[0][3:] == (2, 2)


def test_chain_statistics_without_agreement_load_into_every_agreement_class():
    stats = ChainStats(max_ngram=4, length=6)
    old_context = 2 * 4 * 3  # rank x matched length x run
    memory_rows = stats.num.shape[0] - stats.memory_start
    num = np.arange((old_context + memory_rows) * 7, dtype=float).reshape(-1, 7)
    stats.load_state({"num": num.tolist(), "den": (num + 1).tolist()})
    assert np.array_equal(stats.num[stats.memory_start:], num[old_context:])
    old = num[:old_context].reshape(2, 4, 3, 7)  # (rank, n, run)
    for s, o in [(1, 1), (2, 2), (2, 3), (1, 3)]:
        b = stats.bucket(1, 3, 4, support=s, occurrences=o)
        assert np.array_equal(stats.num[b], old[1, 2, 2]) and np.array_equal(stats.den[b], old[1, 2, 2] + 1)


def test_step_cost_ignores_one_outlier_and_follows_a_drift():
    cost = StepCost(window=9)
    cost.set_curve(CostModel([1, 64], [1.0, 2.0], context=100))
    for _ in range(8):
        cost.record_step(1, 1.0, 1.2)
    cost.record_step(1, 50.0, 51.0)  # one step hit by a noisy neighbour
    assert cost.scale == pytest.approx(1.0) and cost.overhead == pytest.approx(0.2)
    for _ in range(9):  # the context grew: every forward now takes 1.5x
        cost.record_step(64, 3.0, 3.2)
    assert cost.scale == pytest.approx(1.5) and float(cost(64)) == pytest.approx(3.2)
    assert cost.needs_measuring(100 * 2 + 256) and not cost.needs_measuring(300)


class FakeClock:
    """perf_counter for auto_tree: a forward of n tokens advances it by cost(n) seconds."""

    def __init__(self, cost):
        self.now, self.cost, self.calls = 0.0, cost, []

    def perf_counter(self):
        return self.now

    def forward(self, n):
        self.calls.append(n)
        self.now += self.cost(n)


def test_a_longer_context_rescales_the_curve_from_a_few_sizes(monkeypatch):
    from token_recycling import auto_tree
    old = CostModel([1, 4, 16, 64, 128], [1.0, 1.1, 1.5, 3.0, 5.0], context=100)
    # At the longer context attention costs more, the more so the more tokens: x1.2 at 1, x2 at 64.
    clock = FakeClock(lambda n: old(n) * (1.2 + 0.8 * (n - 1) / 63 if n <= 64 else 2.0))
    monkeypatch.setattr(auto_tree.time, "perf_counter", clock.perf_counter)
    new = auto_tree.remeasure_cost(clock.forward, old, context=900)
    assert sorted(set(clock.calls)) == [1, 16, 64] and len(clock.calls) == 6  # 3 sizes, best of 2
    assert new.sizes == old.sizes and new.context == 900
    assert new(1) == pytest.approx(1.2) and new(16) == pytest.approx(1.5 * (1.2 + 0.8 * 15 / 63))
    assert new(64) == pytest.approx(6.0) and new(128) == pytest.approx(10.0)  # the ratio at 64 goes on
    assert all(a <= b for a, b in zip(new.seconds, new.seconds[1:]))


@pytest.mark.measured_cost
def test_the_drafter_measures_the_whole_curve_once_then_rescales_it(monkeypatch):
    from token_recycling import auto_tree
    from token_recycling.draft import Drafter
    clock = FakeClock(lambda n: 0.01 * (1 + n / 16))
    monkeypatch.setattr(auto_tree.time, "perf_counter", clock.perf_counter)
    drafter = Drafter(320, torch.device("cpu"), "auto", 8)
    drafter.tune(clock.forward, prefix=50, capacity=None)
    full = len(clock.calls)
    # warm-up; sizes <= 16 five times, larger ones twice, until two in a row cost 4x size 1 (64, 96)
    assert max(clock.calls) == 96 and full == 1 + 5 * 5 + 2 * 5
    assert drafter.policy.cost.curve.sizes == [1, 2, 4, 8, 16, 24, 32, 48, 64, 96]
    assert drafter.policy.cost.curve(128) == pytest.approx(0.01 * (1 + 128 / 16))  # the last slope goes on
    drafter.tune(clock.forward, prefix=300, capacity=None)  # not yet twice the context (+256)
    assert len(clock.calls) == full
    drafter.tune(clock.forward, prefix=400, capacity=None)
    assert clock.calls[full:] == [1, 1, 16, 16, 64, 64]
    assert drafter.policy.cost.curve.context == 400
    drafter.tune(clock.forward, prefix=2000, capacity=2010)  # only size 1 fits a nearly full static cache
    assert clock.calls[full + 6:] == [1, 1]


def _draft_roots(draft):
    """Every root-to-leaf token path of a draft (as tuples, root excluded)."""
    tokens, parents = draft.tokens[0].tolist(), draft.parents.tolist()
    paths = []
    for i in range(1, len(tokens)):
        path, j = [], i
        while j > 0:
            path.append(tokens[j])
            j = parents[j]
        paths.append(tuple(reversed(path)))
    return set(paths)


def test_two_different_continuations_are_both_grafted():
    model = tiny_model("llama")
    rec = TokenRecycler(model)
    drafter = rec.drafter
    drafter.policy.cost.set_curve(CostModel([1, 128], [1.0, 1.01], context=10**6))  # extra tokens nearly free
    drafter.policy.chain.prior[:] = 0.95  # trust every candidate
    seq = torch.tensor([[9, 10, 11, 30, 31, 9, 10, 11, 40, 41, 42, 9, 10, 11]])
    state = drafter.start(seq, 64)
    draft = drafter.draft(state, torch.tensor([11]))
    paths = _draft_roots(draft)
    # The latest match's continuation reaches the context's end and goes on with its period (6).
    assert (40, 41, 42, 9, 10, 11, 40, 41, 42, 9) in paths and (30, 31, 9, 10, 11, 40) in paths
    assert draft.plan.match == 3 and len(draft.plan.chains) == 2
    assert draft.chain_tokens == draft.size - draft.tree_nodes > 0


def test_a_loop_is_drafted_a_whole_chain_long():
    # "5 6 7" repeating: the latest match of the suffix is one period back, so its continuation in the
    # context is 2 tokens long; copying goes on into the copied tokens, as prompt lookup's would.
    rec = TokenRecycler(tiny_model("llama"), ngram_tokens=8)
    seq = torch.tensor([[3, 4, 5, 6, 7, 5, 6, 7, 5, 6, 7, 5]])
    cands = rec.drafter._candidates(rec.drafter.start(seq, 64))
    assert cands[0][0] == [6, 7, 5, 6, 7, 5, 6, 7]
    # A continuation that ends before the context does is not extended.
    seq = torch.tensor([[3, 4, 5, 6, 9, 9, 9, 9, 9, 9, 9, 3, 4]])
    assert rec.drafter._candidates(rec.drafter.start(seq, 64))[0][0] == [5, 6, 9, 9, 9, 9, 9, 9]


class RandomPlans:
    """Replaces the policy's decision by forced ones, cycling through every kind (tree only, one
    chain, two chains; one node or a larger tree) with random sizes, keeping the rest of the
    machinery (statistics, observation, stats) as is."""

    KINDS = [(1, 0), (1, 1), (1, 2), (8, 0), (8, 1), (8, 2), (40, 2), (2, 1), (0, 0), (0, 1)]  # (tree nodes, chains)

    def __init__(self, policy, seed):
        self.policy, self.rng, self.decide_rows = policy, random.Random(seed), policy.decide_rows
        self.kinds, self.step = set(), 0

    def __call__(self, rows, cost=None):
        return [self.forced(candidates, plan) for (candidates, _), plan in zip(rows, self.decide_rows(rows, cost))]

    def forced(self, candidates, plan):  # plan: a real decision (it refreshes the tree order)
        nodes, want = self.KINDS[self.step % len(self.KINDS)]
        self.step += 1
        chains = [t[: self.rng.randint(1, len(t))] if i < want else [] for i, (t, *_) in enumerate(candidates[:2])]
        self.kinds.add((nodes > 1, sum(1 for c in chains if c)))
        return Plan(nodes, chains, plan.candidates, plan.buckets, plan.match, plan.expected, plan.seconds)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_every_decision_path_is_lossless(arch):
    model = tiny_model(arch)
    rec = TokenRecycler(model)  # the defaults: tree="auto", n-gram candidates
    rec.drafter.policy.cost.set_curve(CostModel([1, 128], [1.0, 2.0], context=10**6))  # skip measuring (speed)
    plans = RandomPlans(rec.drafter.policy, seed=1)
    rec.drafter.policy.decide_rows = plans
    prompts = [[50, 51, 52, 50, 51], [7, 8, 9, 7, 8, 10, 7, 8, 9, 7, 8], list(range(20, 40)) * 2]
    for ids in prompts:
        ids = torch.tensor([ids])
        want = model.generate(ids, max_new_tokens=48, do_sample=False)
        assert torch.equal(rec.generate(ids, max_new_tokens=48), want)
    assert {(False, 0), (True, 0), (False, 1), (True, 1)} <= plans.kinds  # tree-only, chain-only, both
    assert any(k[1] == 2 for k in plans.kinds)  # two chains grafted


def test_policy_decisions_are_lossless_with_a_trusting_and_a_distrusting_policy():
    model = tiny_model("llama")
    ids = torch.tensor([[7, 8, 9, 7, 8, 10, 7, 8, 9, 7, 8]])
    want = model.generate(ids, max_new_tokens=40, do_sample=False)
    for prior, cost in ((0.95, [1.0, 1.01]), (0.01, [1.0, 64.0])):
        rec = TokenRecycler(model)
        rec.drafter.policy.chain.prior[:] = prior
        rec.drafter.policy.cost.set_curve(CostModel([1, 128], cost, context=10**6))
        assert torch.equal(rec.generate(ids, max_new_tokens=40), want)
        if prior > 0.5:
            assert sum(rec.stats.chain_tokens) > 0


def test_a_steep_cost_curve_drafts_nothing():
    """Where every extra token costs about a whole forward (a compute-bound CPU), drafting cannot
    pay: the policy forwards the root alone (0 matrix nodes, no chain); with a flat curve it drafts."""
    from token_recycling.policy import Policy
    policy = Policy(topk=8, max_chain=10, max_ngram=4)
    candidates = [([5, 6, 7, 8], 2)]
    policy.cost.set_curve(CostModel([1, 2, 128], [1.0, 2.0, 128.0], context=10**6))
    plan = policy.decide(candidates, run=0)
    assert plan.tree_nodes == 0 and plan.chain_tokens == 0 and plan.expected == 1.0
    policy.cost.set_curve(CostModel([1, 128], [1.0, 1.01], context=10**6))
    plan = policy.decide(candidates, run=0)
    assert plan.tree_nodes > 0 and plan.chain_tokens > 0


def test_the_curve_ignores_slow_outliers(monkeypatch):
    """Interleaved rounds, the fastest time per size, and monotone from above: a burst of load that
    slows one round (or one size's first forwards) leaves the curve where the quiet forwards put it."""
    from token_recycling import auto_tree
    true = lambda n: 0.1 * (1 + n / 8)  # noqa: E731
    slow = {(1, 0): 3.0, (1, 1): 2.0, (2, 0): 2.5, (8, 3): 1.7}  # (size, its k-th forward) -> factor
    seen: dict = {}
    clock = FakeClock(lambda n: true(n) * slow.get((n, seen.get(n, 0)), 1.0))

    def forward(n):
        clock.forward(n)
        seen[n] = seen.get(n, 0) + 1

    monkeypatch.setattr(auto_tree.time, "perf_counter", clock.perf_counter)
    curve = auto_tree.measure_cost(forward, sizes=(1, 2, 4, 8, 16, 32))
    assert curve.seconds == pytest.approx([true(n) for n in (1, 2, 4, 8, 16, 32)])
    # Monotone from above: a size measured slower than a larger one takes the larger one's time.
    clock = FakeClock(lambda n: 0.5 if n == 2 else true(n))
    monkeypatch.setattr(auto_tree.time, "perf_counter", clock.perf_counter)
    curve = auto_tree.measure_cost(clock.forward, sizes=(1, 2, 4), small_repeats=2)
    assert curve.seconds == pytest.approx([true(1), true(4), true(4)])


def test_the_curve_stops_past_two_sizes_that_cost_four_root_steps(monkeypatch):
    from token_recycling import auto_tree
    steep = FakeClock(lambda n: 0.01 * (1 + n / 8))  # size 1: 0.01125; 4x is reached from 32 on
    monkeypatch.setattr(auto_tree.time, "perf_counter", steep.perf_counter)
    curve = auto_tree.measure_cost(steep.forward)
    assert curve.sizes == [1, 2, 4, 8, 16, 24, 32, 48] and max(steep.calls) == 48
    one_slow = FakeClock(lambda n: 0.01 * (5.0 if n == 24 else 1 + n / 64))  # one slow size does not stop it
    monkeypatch.setattr(auto_tree.time, "perf_counter", one_slow.perf_counter)
    assert auto_tree.measure_cost(one_slow.forward).sizes == list(auto_tree.COST_SIZES)


def brute_force_chain_choice(policy: Policy, candidates, run: int, budget: int, price: float):
    """Every (candidate, c, m) scored from the statistics directly: ChainStats position rates and the
    AutoTree rate of each top-1 node."""
    rates = policy.auto.rates()[1:]
    node = {tuple(p): i for i, p in enumerate(policy.auto.paths)}
    g = [0.0]
    for d in range(1, budget + 1):
        g.append(g[-1] + rates[node[(0,) * d]])
    options = [(g[m] - price * m, 0, m) for m in range(budget + 1)]
    for rank, (tokens, n) in enumerate(candidates):
        e = policy.chain.expected(policy.chain.bucket(rank, n, run))
        for c in range(1, min(len(tokens), budget) + 1):
            for m in range(budget - c + 1):
                options.append((e[c] + (e[c] - e[c - 1]) * g[m] - price * (c + m), c, m))
    return max(options, key=lambda o: o[0])


def test_decide_chain_takes_the_best_chain_for_its_price():
    rng = np.random.default_rng(3)
    for trial in range(30):
        policy = Policy(topk=8, max_chain=10, max_ngram=4)
        policy.chain.num[:] = rng.integers(0, 20, policy.chain.num.shape)
        policy.chain.den[:] = policy.chain.num + rng.integers(0, 20, policy.chain.num.shape)
        policy.auto.den[:] = rng.integers(0, 50, policy.auto.den.shape)
        policy.auto.num[:] = np.minimum(policy.auto.den, rng.integers(0, 50, policy.auto.den.shape))
        candidates = [(rng.integers(0, 9, int(rng.integers(1, 11))).tolist(), int(rng.integers(1, 5)))
                      for _ in range(int(rng.integers(0, 3)))]
        run, budget = int(rng.integers(0, 6)), int(rng.integers(0, 8))
        price = float(rng.choice([0.0, 0.01, 0.1, 0.3, 1.0]))
        plan = policy.decide_chain(candidates, run, budget, price)
        c = sum(len(x) for x in plan.chains)
        best, _, _ = brute_force_chain_choice(policy, candidates, run, budget, price)
        assert plan.expected - 1 - price * (c + plan.tree_nodes) == pytest.approx(best)
        assert c + plan.tree_nodes <= budget
        if plan.chains:
            assert any(plan.chains[0] == t[:c] for t, _ in candidates)
    policy = Policy(topk=8, max_chain=10, max_ngram=4)
    assert policy.decide_chain([], 0, 6, 0.0).tree_nodes == 6  # free tokens: the whole budget
    plan = policy.decide_chain([([1, 2, 3], 4)], 0, 6, 1e3)
    assert plan.tree_nodes == 0 and plan.chains == []  # nothing pays at that price


def _plan_size(plan):
    return 1 + plan.tree_nodes + plan.chain_tokens


def test_a_batch_chooses_one_size_and_roots_alone_where_drafting_does_not_pay():
    from token_recycling.auto_tree import CostModel
    from token_recycling.policy import Policy, StepCost
    policy = Policy(8, max_chain=10, max_ngram=4)
    trusted = [(list(range(20, 30)), 4)]
    rows = [(trusted, 4)] + [([], 0)] * 7  # one row with a long match, seven without

    flat = StepCost()
    flat.set_curve(CostModel([1, 128], [1.0, 1.05]))  # more nodes cost next to nothing: draft
    plans = policy.decide_rows(rows, flat)
    sizes = [_plan_size(p) for p in plans]
    assert max(sizes) > 1 and plans[0].chain_tokens > 0
    assert all(s <= max(sizes) for s in sizes)

    steep = StepCost()
    steep.set_curve(CostModel([1, 2, 128], [1.0, 1.9, 120.0]))  # each node nearly doubles the forward
    plans = policy.decide_rows(rows, steep)
    assert [_plan_size(p) for p in plans] == [1] * len(rows)  # the batch runs as batched greedy does
    assert plans[0].candidates == [trusted[0][0]]  # its candidate is still scored after the step

    # One row alone with the same curve may still draft its trusted chain: the batch's choice is the batch's.
    alone = policy.decide_rows(rows[:1], steep)[0]
    assert alone.expected / steep(_plan_size(alone)) >= 1.0 / steep(1)
    assert policy.decide(*rows[0], cost=steep).chains == alone.chains  # decide is decide_rows of one row


def test_expected_gains_follow_what_drafted_steps_produced():
    policy = Policy(8, max_chain=10, max_ngram=4)
    trusted = [(list(range(20, 30)), 4)]
    before = policy.decide(trusted, run=4)
    assert policy.calibration["chains"] == 1.0 and before.expected > 1.0 and before.chains
    chain = [Plan(0, [[5, 6, 7]], chain_gain=2.0)]  # two extra tokens expected of a chain ...
    for _ in range(31):
        policy.record_outcome(chain[0], [5, 9])  # ... one produced (then the bonus)
    assert policy.calibration["chains"] == 1.0  # not before 32 drafted plans
    policy.record_outcome(Plan(0, [], expected=1.0), [4])  # the root alone teaches nothing
    assert len(policy.outcomes["chains"]) == 31
    policy.record_outcome(chain[0], [5, 9])
    assert policy.calibration["chains"] == pytest.approx(0.5)
    assert policy.calibration["tree"] == policy.calibration["lone tree"] == 1.0  # the tree was not drafted
    after = policy.decide(trusted, run=4)
    assert after.expected - 1.0 == pytest.approx(0.5 * (before.expected - 1.0), rel=1e-6) or \
        after.expected < before.expected  # the same plan's gain halves, or a smaller plan is chosen
    for _ in range(300):  # the raw gain (before calibration) is what is compared
        policy.record_outcome(Plan(0, [[5, 6, 7]], chain_gain=2.0), [5, 6, 9])
    assert policy.calibration["chains"] == pytest.approx(1.0)


def test_calibration_kept_as_outcomes_come_equals_one_summed_afresh():
    policy = Policy(8, max_chain=10, max_ngram=4)
    rng = random.Random(3)
    for i in range(700):  # the kept outcomes wrap around more than twice
        gain, produced = rng.uniform(0.1, 3.0), rng.randrange(0, 4)
        policy.record_outcome(Plan(0, [[1] * 5], chain_gain=gain), [1] * produced + [9])
        kept = policy.outcomes["chains"]
        expected = sum(e for e, _ in kept)
        fresh = np.clip(sum(a for _, a in kept) / expected, 0.25, 1.5) if len(kept) >= 32 else 1.0
        assert policy.calibration["chains"] == pytest.approx(fresh, rel=1e-12), i


def test_step_cost_median_is_numpys():
    rng = random.Random(5)
    for n in range(1, 40):
        values = [rng.uniform(0.5, 2.0) for _ in range(n)]
        assert policy_median(values) == float(np.median(values))


def test_calibration_is_kept_in_the_state():
    policy = Policy(8, max_chain=10, max_ngram=4)
    for _ in range(40):
        policy.record_outcome(Plan(4, [], tree_gain=1.0), [3])  # the lone tree: 0 of 1.0
        policy.record_outcome(Plan(0, [[1, 2]], chain_gain=1.0), [1, 2, 9])  # the chain: 2 of 1.0
    state = json.loads(json.dumps(policy.state()))  # as save() writes it
    back = Policy(8, max_chain=10, max_ngram=4)
    back.load_state(state)
    assert back.calibration == pytest.approx({"chains": 1.5, "tree": 1.0, "lone tree": 0.25})
    assert [list(o) for o in back.outcomes.values()] == [list(o) for o in policy.outcomes.values()]
    older = {k: v for k, v in state.items() if k != "outcomes"}  # a state saved before outcomes were kept
    fresh = Policy(8, max_chain=10, max_ngram=4)
    fresh.load_state(older)
    assert fresh.calibration == {"chains": 1.0, "tree": 1.0, "lone tree": 1.0}
    with pytest.raises(ValueError, match="outcomes"):
        fresh.load_state({**state, "outcomes": {"chains": [[1.0]], "tree": [], "lone tree": []}})


def test_each_source_is_calibrated_apart():
    """A matrix tree drafted alone that produces half its estimate is trusted half as much; beside
    a chain, the tree's and the chain's own records decide theirs."""
    policy = Policy(8, max_chain=10, max_ngram=4)
    for _ in range(40):
        policy.record_outcome(Plan(4, [], tree_gain=1.0), [3, 4])  # the tree alone: 1 extra token of 1.0
        policy.record_outcome(Plan(4, [], tree_gain=1.0), [3])     # then 0 of 1.0
        # beside a chain: the chain's two tokens right (2 of 2.0), and the tree gave one more (1 of 0.5)
        policy.record_outcome(Plan(4, [[1, 2]], chain_gain=2.0, tree_gain=0.5), [1, 2, 8, 9])
    assert policy.calibration["lone tree"] == pytest.approx(0.5)
    assert policy.calibration["chains"] == pytest.approx(1.0)
    assert policy.calibration["tree"] == pytest.approx(1.5)  # 1 of 0.5 each time: clipped
    # The lone tree's calibration scales only grid cells without a chain.
    policy.refresh()
    g = policy._grid([(list(range(20, 30)), 4)], run=4)
    raw = g["chains"] + g["tree"]
    lone = policy.calibration["lone tree"] * g["tree"][:, 0, 0]
    assert np.allclose(g["expected"][:, 0, 0], 1.0 + lone)
    assert np.allclose(g["expected"][:, 1:, :], 1.0 + g["chains"][:, 1:, :] + 1.5 * g["tree"][:, 1:, :])
    assert raw.shape == g["expected"].shape
