"""tree="auto": what to draft, decided per step from what that step knows.

Each step the drafter knows (1) the candidate continuations: from the context's n-gram index the
continuations of the longest earlier match of the context's suffix, and of older or shorter matches
that continue differently (``ops.ngram_candidates``), with the matched suffix length n of each; from
the suffix memory of earlier requests (memory.SuffixMemory) the most frequent continuation after the
longest match there, with its match length and support (how many earlier occurrences went on that
way); the best ``CANDIDATES`` of them by expected accepted tokens enter the choice below, and every
one is scored afterwards; (2) how the continuation fared
on the last step (how many of its tokens the model then produced: a copy run keeps going); (3) the
matrix tree's per-node acceptance rates (:class:`auto_tree.AutoTree`); (4) the forward cost curve
t(m) at the current context (:class:`StepCost`). It chooses the matrix tree size N (0: none), the first
candidate's chain length C1 and the second's C2 maximising

    expected tokens / seconds = (1 + E1(C1) + E2(C2) + (1 - p1 - p2) * tree(N)) / (t(1 + N + C1 + C2) + overhead)

where E_i(C) is the expected accepted prefix of candidate i cut to C tokens and p_i the chance that
candidate i's first token is accepted (0 when C_i = 0): the candidates differ, so they are right on
different steps, and the matrix tree pays on the steps where neither is.

Chain statistics (:class:`ChainStats`). Like SuffixDecoding, which grows its speculation length
with the match length and with how often a continuation was seen, the trust in a candidate depends
on a *bucket*: its source and rank (this request's context: first or second candidate; the suffix
memory), its matched suffix length n (the memory's in ranges: 2-3, 4-7, 8-15, 16+ tokens), its
agreement (a context candidate's: the matched suffix occurred once before; 2+ times, every time
followed by the candidate's first token; at least half the times; fewer: :func:`agreement`), for the
memory its support (1, 2-3, 4+ earlier occurrences agreed on its first token), and the last step's
run (0, 1-3 or 4+ of the last candidate's tokens were what the model produced). Agreement tells
short matches apart: on MT-Bench and HumanEval prompts, a one-token match whose candidate token
followed at most half of its earlier occurrences was right about a quarter of the time, one
followed by it every time about 60%. For every
bucket and chain position j we count how often position j was correct given 1..j-1 were. Every
candidate is scored against the accepted tokens whether or not it was drafted, and as far as the
accepted tokens (bonus included) reach, so no exploration is needed: a chain not drafted is still
measured at position 1. A bucket's rates shrink towards its source and rank's pooled rates, which
shrink towards a prior, so a rare bucket borrows strength and a common one speaks for itself.
Statistics saved by earlier versions load: the layouts without agreement give each agreement class
of a context bucket that bucket's counts (and the oldest layout, a context part and an
earlier-outputs part of the same shape, only its context part).

Cost (:class:`StepCost`). t(m) is measured once (``measure_cost``) at the first context, and then
followed: every step's forward time is divided by the curve's prediction, and the median of the
last 32 such ratios scales the curve (it follows the context length and the machine's load, and
one noisy step cannot move it). ``overhead`` is the median time of a step outside the forward (the
drafting, the decision, verification, cache compaction). When a prompt's context is twice the one
measured (and 256 tokens longer), the curve is carried there: sizes 1, 16 and 64 are timed again and
rescale it (auto_tree.remeasure_cost): measuring the whole curve again costs seconds on a long
document on a small CPU, more than the decision it informs is worth.

One chain per step (:meth:`Policy.decide_chain`). An engine that verifies one chain per request
(vLLM) gets the same statistics through a chain-shaped choice: an n-gram candidate's prefix, then
the matrix's top-1 path, lengths chosen for expected accepted tokens minus a price per drafted
token. That engine reports no forward times, so the price comes from :class:`BatchStepCost`, fitted
from the time between its steps against the tokens each forwarded for the whole batch.
"""

from __future__ import annotations

import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from .auto_tree import BUDGETS, AutoTree, CostModel

RUNS = (0, 1, 4)  # last step's run buckets: 0, 1-3, 4+ tokens of the continuation were right
CANDIDATES = 2  # candidates drafted per step (and context n-gram candidates looked up)
MEMORY_MATCH = (2, 4, 8, 16)  # suffix-memory match length buckets: 2-3, 4-7, 8-15, 16+
MEMORY_SUPPORT = (1, 2, 4)  # suffix-memory support buckets: 1, 2-3, 4+ occurrences
AGREEMENT = ("single", "unanimous", "majority", "minority")  # context candidates' agreement classes
# What a plan's expected gain is made of, each calibrated apart: the chains, the matrix tree beside a
# chain, the matrix tree alone (drafted where no candidate is: it was right less often there).
SOURCES = ("chains", "tree", "lone tree")
OUTCOMES_KEPT = 256  # per source, the last drafted plans its calibration is measured over


def median(values) -> float:
    """np.median of a short sequence of floats, without numpy's per-call cost (called every step)."""
    ordered = sorted(values)
    half = len(ordered) // 2
    return float(ordered[half]) if len(ordered) % 2 else (ordered[half - 1] + ordered[half]) / 2.0


def right_prefix(draft: list[int], actual: list[int]) -> int:
    """How many leading tokens of ``draft`` equal the tokens the model produced (``actual``)."""
    right, n = 0, min(len(draft), len(actual))
    while right < n and draft[right] == actual[right]:
        right += 1
    return right


def agreement(support: int, occurrences: int) -> int:
    """A context candidate's agreement class (an index into AGREEMENT): its matched suffix occurred
    ``occurrences`` times before, ``support`` of them followed by the candidate's first token.
    0: once (or never counted); 1: 2+ times, always followed by it; 2: at least half the times; 3: fewer."""
    if occurrences <= 1:
        return 0
    if support >= occurrences:
        return 1
    return 2 if 2 * support >= occurrences else 3


def run_bucket(run: int) -> int:
    return sum(run >= r for r in RUNS) - 1


@dataclass
class Plan:
    """One step's choice and what it rested on (kept for the step's observation and the stats)."""

    tree_nodes: int  # matrix tree nodes under the root
    chains: list[list[int]]  # the candidates' tokens to graft (each cut to its chosen length)
    candidates: list[list[int]] = field(default_factory=list)  # full candidates (for observation)
    buckets: list[int] = field(default_factory=list)  # each candidate's ChainStats bucket
    match: int = 0  # matched suffix length of the first candidate (0: no match)
    expected: float = 1.0  # expected tokens this step
    seconds: float = 0.0  # predicted step time
    decision_seconds: float = 0.0  # time to make the choice (measured)
    recent: bool = False  # the first candidate came from the suffix memory (earlier requests)
    memory: list[bool] = field(default_factory=list)  # per chain: it came from the suffix memory
    chain_gain: float = 0.0  # of the expected extra tokens: the chains' share, before calibration
    tree_gain: float = 0.0  # ... and the matrix tree's (tree(N) on the steps where no chain is right)

    @property
    def chain_tokens(self) -> int:
        return sum(len(c) for c in self.chains)


class ChainStats:
    """Per-position acceptance of n-gram candidates, by bucket (see the module docstring)."""

    def __init__(self, max_ngram: int, length: int, pseudo_count: float = 4.0):
        self.max_ngram, self.length, self.a = max_ngram, length, pseudo_count
        self.per_rank = max_ngram * len(AGREEMENT) * len(RUNS)  # a context rank's: length x agreement x run
        self.memory_start = CANDIDATES * self.per_rank  # then the memory's: match x support x run
        buckets = self.memory_start + len(MEMORY_MATCH) * len(MEMORY_SUPPORT) * len(RUNS)
        self.num = np.zeros((buckets, length + 1))  # [b, j]: position j right (given 1..j-1 were)
        self.den = np.zeros((buckets, length + 1))  # [b, j]: position j observed with 1..j-1 right
        # Before any data: the first position is right a third of the time, later ones more often
        # (a continuation that started right tends to go on).
        self.prior = np.array([0.0, 0.35] + [0.7] * (length - 1))
        self._memo: dict[int, np.ndarray] | None = None  # expected() by bucket, inside memoized() only

    @contextmanager
    def memoized(self):
        """Within the block, ``expected`` computes each bucket once (read-only arrays): for a batch's
        decisions, between which nothing is scored. Scoring inside the block is an error."""
        self._memo = {}
        try:
            yield self
        finally:
            self._memo = None

    def bucket(self, rank: int, ngram: int, run: int, memory: bool = False, support: int = 1,
               occurrences: int | None = None) -> int:
        """``memory``: the candidate came from the suffix memory (earlier requests), with ``support``
        earlier occurrences agreeing on its first token; else it is the context's candidate ``rank``,
        its matched suffix seen ``occurrences`` times before (default: ``support``), ``support`` of
        them followed by its first token (:func:`agreement`)."""
        if memory:
            match = max(sum(ngram >= m for m in MEMORY_MATCH) - 1, 0)
            sup = max(sum(support >= m for m in MEMORY_SUPPORT) - 1, 0)
            return self.memory_start + (match * len(MEMORY_SUPPORT) + sup) * len(RUNS) + run_bucket(run)
        agree = agreement(support, support if occurrences is None else occurrences)
        return (rank * self.per_rank + ((min(ngram, self.max_ngram) - 1) * len(AGREEMENT) + agree) * len(RUNS)
                + run_bucket(run))

    def group(self, bucket: int) -> tuple[int, int]:
        """The buckets [lo, hi) pooled with ``bucket``: its context rank's, or the memory's."""
        if bucket >= self.memory_start:
            return self.memory_start, self.num.shape[0]
        rank = bucket // self.per_rank
        return rank * self.per_rank, (rank + 1) * self.per_rank

    def score(self, bucket: int, candidate: list[int], actual: list[int]) -> int:
        """Scores a candidate against the tokens the model produced; returns its correct prefix length
        (up to ``length``). Every position up to the first wrong one was tried; those before it were right."""
        if self._memo is not None:
            raise RuntimeError("ChainStats.score inside memoized(): the memoized curves would be stale")
        n = min(len(candidate), len(actual), self.length)
        right = right_prefix(candidate[:n], actual)
        self.den[bucket, 1:min(right + 1, n) + 1] += 1
        self.num[bucket, 1:right + 1] += 1
        return right

    def expected(self, bucket: int) -> np.ndarray:
        """[length + 1]: expected correct tokens of the candidate cut to 0..length tokens."""
        if self._memo is not None:
            curve = self._memo.get(bucket)
            if curve is None:
                curve = self._memo[bucket] = self._expected(bucket)
                curve.flags.writeable = False
            return curve
        return self._expected(bucket)

    def _expected(self, bucket: int) -> np.ndarray:
        lo, hi = self.group(bucket)
        pooled = (self.num[lo:hi].sum(0) + self.a * self.prior) / (self.den[lo:hi].sum(0) + self.a)
        q = (self.num[bucket] + self.a * pooled) / (self.den[bucket] + self.a)
        q[0] = 1.0
        survive = np.cumprod(q)
        survive[0] = 0.0
        return np.cumsum(survive)

    def state(self) -> dict:
        return {"num": self.num.tolist(), "den": self.den.tolist()}

    def load_state(self, state: dict) -> None:
        num, den = np.array(state.get("num", [])), np.array(state.get("den", []))
        if num.shape == self.num.shape and den.shape == self.den.shape:
            self.num, self.den = num, den
            return
        if num.shape != den.shape or num.ndim != 2 or num.shape[1] != self.length + 1:
            return
        # Earlier layouts had no agreement: a context rank's buckets were (length, run).
        old_context = CANDIDATES * self.max_ngram * len(RUNS)
        memory_rows = self.num.shape[0] - self.memory_start
        if num.shape[0] == old_context + memory_rows:  # context, then the suffix memory's buckets
            self.num[self.memory_start:], self.den[self.memory_start:] = num[old_context:], den[old_context:]
        elif num.shape[0] != 2 * old_context:  # the oldest: a context part, an earlier-outputs part
            return
        shape = (CANDIDATES, self.max_ngram, 1, len(RUNS), self.length + 1)
        spread = (CANDIDATES, self.max_ngram, len(AGREEMENT), len(RUNS), self.length + 1)
        for mine, old in ((self.num, num), (self.den, den)):
            mine[: self.memory_start] = np.broadcast_to(old[:old_context].reshape(shape), spread).reshape(
                self.memory_start, self.length + 1)


class StepCost:
    """Seconds of a step that forwards m tokens at the current context (see the module docstring)."""

    def __init__(self, window: int = 32):
        self.curve = CostModel()
        self.ratios: deque[float] = deque(maxlen=window)
        self.overheads: deque[float] = deque(maxlen=window)
        self.scale, self.overhead = 1.0, 0.0

    @property
    def measured(self) -> bool:
        return self.curve.measured

    def needs_measuring(self, context: int) -> bool:
        return not self.curve.measured or context >= 2 * self.curve.context + 256

    def set_curve(self, curve: CostModel) -> None:
        self.curve = curve
        self.ratios.clear()
        self.scale = 1.0

    def record_step(self, forwarded: int, forward_seconds: float, step_seconds: float) -> None:
        """One step's forward time (``forwarded`` nodes per row) and its whole time."""
        if not self.curve.measured:
            return
        self.ratios.append(forward_seconds / max(self.curve(forwarded), 1e-9))
        self.overheads.append(max(step_seconds - forward_seconds, 0.0))
        self.scale = median(self.ratios)
        self.overhead = median(self.overheads)

    def forward(self, m) -> np.ndarray:
        return self.scale * np.asarray(self.curve(m)) if self.curve.measured else 1.0 + 0.01 * np.asarray(m)

    def __call__(self, m) -> np.ndarray:
        """Seconds of a whole step (forward + overhead) for m forwarded tokens (array or scalar)."""
        return self.forward(m) + (self.overhead if self.curve.measured else 0.0)

    def state(self) -> dict:
        c = self.curve
        return {"sizes": c.sizes, "seconds": c.seconds, "context": c.context, "overhead": self.overhead}

    def load_state(self, state: dict) -> None:
        if state.get("sizes"):
            self.set_curve(CostModel(list(state["sizes"]), list(state["seconds"]), int(state.get("context", 0))))
            self.overhead = float(state.get("overhead", 0.0))


class Policy:
    """Per-step draft choice for tree="auto": the matrix statistics (AutoTree), the chain statistics,
    the cost, and the decision."""

    def __init__(self, topk: int, max_chain: int, max_ngram: int, retune_every: int = 16):
        self.auto = AutoTree(topk)
        self.max_chain = max_chain
        self.chain = ChainStats(max_ngram, max(max_chain, 1))
        self.cost = StepCost()
        self.retune_every = retune_every
        self.steps_since = retune_every  # refresh the tree gains on the first step
        self.order: list[list[int]] = []
        self.budgets = np.array([0])
        self.tree_gain = np.zeros(1)
        self.last_value = 1.0
        # Per source, (expected, produced) extra tokens of the last plans that drafted from it: how far
        # to trust each source's estimates (record_outcome).
        self.outcomes: dict[str, deque[tuple[float, int]]] = {s: deque(maxlen=OUTCOMES_KEPT) for s in SOURCES}
        # Per source, the kept outcomes' sums (expected, produced) and appends since they were last
        # summed afresh: kept as they change, summed again once per OUTCOMES_KEPT appends.
        self._sums: dict[str, list] = {s: [0.0, 0, 0] for s in SOURCES}
        self.calibration: dict[str, float] = {s: 1.0 for s in SOURCES}

    # ------------------------------------------------------------------ matrix tree gains
    def refresh(self) -> None:
        """Recompute the best tree of every budget from the node statistics (every few steps)."""
        self.order, gains = self.auto.best_order()
        # 0 nodes (nothing from the matrix) is a choice too: where every extra forwarded token costs
        # more than it is expected to bring (a compute-bound CPU), a step forwards the root alone,
        # or the root and a trusted chain, and decodes at plain greedy speed.
        budgets = [0] + [n for n in BUDGETS if n <= len(self.order)]
        self.budgets = np.array(budgets)
        self.tree_gain = np.array([gains[n - 1] if n else 0.0 for n in budgets])
        self.steps_since = 0

    def tree_paths(self, nodes: int) -> list[list[int]]:
        return self.order[:nodes]

    # ------------------------------------------------------------------ the decision
    def decide(self, candidates: list[tuple], run: int, cost: StepCost | None = None) -> Plan:
        """candidates: [(tokens, matched n)], [(tokens, matched n, from the suffix memory)],
        [(tokens, matched n, from the suffix memory, support)] or [(..., support, occurrences)] (a
        context candidate's agreement, ChainStats.bucket): the context's best first (at most
        CANDIDATES of them), the memory's anywhere; run: how many tokens of the last step's first candidate the
        model produced; cost: the step-cost curve to weigh against (default: this policy's own, one
        row's)."""
        return self.decide_rows([(candidates, run)], cost)[0]

    def decide_rows(self, rows: list[tuple[list[tuple], int]], cost: StepCost | None = None) -> list[Plan]:
        """One plan per row of a batch forwarded together: ``rows`` holds each row's (candidates, run)
        as :meth:`decide` takes them. The forward pads every row to the largest draft, so the batch
        chooses one size M (nodes per row, root included) maximising the tokens the rows expect, each
        from its best plan of at most M nodes, per second of a forward of M nodes per row; then every
        row takes that plan. M = 1 (roots alone) is a choice: a wide batch on a compute-bound device
        then runs as batched greedy does. With one row this is expected / seconds over its plans."""
        cost = cost or self.cost
        start = time.perf_counter()
        if self.steps_since >= self.retune_every:
            self.refresh()
        self.steps_since += 1
        grids = [self._grid(candidates, run) for candidates, run in rows]
        top = max(int(g["size"].max()) for g in grids)
        best = np.zeros((len(grids), top + 1))  # [row, M]: the row's best expected tokens with <= M nodes
        for b, g in enumerate(grids):
            np.maximum.at(best[b], g["size"].ravel(), g["expected"].ravel())
            best[b] = np.maximum.accumulate(best[b])
        sizes = np.arange(1, top + 1)
        seconds = np.asarray(cost(sizes), dtype=np.float64)
        value = best[:, 1:].sum(0) / seconds
        m = int(sizes[int(np.argmax(value))])
        self.last_value = float(value.max()) / len(grids)
        elapsed = (time.perf_counter() - start) / len(grids)
        plans = []
        for g in grids:
            # The row's most expected tokens within M nodes; among equals, the smallest draft.
            score = np.where(g["size"] <= m, g["expected"] - 1e-9 * g["size"], -np.inf)
            i, j, k = np.unravel_index(int(np.argmax(score)), score.shape)
            cands = g["cands"]
            chains = [t[:length] for (t, _, _, _), length in zip(cands, (j, k))]
            plan = Plan(int(self.budgets[i]), chains, [t for t, _, _, _ in cands], g["buckets"],
                        cands[0][1] if cands else 0, float(g["expected"][i, j, k]), float(seconds[m - 1]),
                        recent=bool(cands and cands[0][2]), memory=[c[2] for c in cands[: len(chains)]],
                        chain_gain=float(g["chains"][0, j, k]), tree_gain=float(g["tree"][i, j, k]))
            plan.decision_seconds = elapsed
            plans.append(plan)
        return plans

    def _grid(self, candidates: list[tuple], run: int) -> dict:
        """A row's choices: expected tokens and nodes forwarded (root included) over the grid of
        (matrix tree size, first chain length, second chain length)."""
        cands, buckets, curves = self._candidates(candidates, run)
        e = [curve[: min(len(t), self.max_chain) + 1] for curve, (t, _, _, _) in zip(curves, cands)]
        e1 = e[0] if e else np.zeros(1)
        e2 = e[1] if len(e) > 1 else np.zeros(1)
        # First-token chances (0 when not drafted): the candidates differ, so where their first
        # tokens differ they are right on disjoint steps, and the tree pays where neither is.
        p1 = np.where(np.arange(len(e1)) > 0, e1[min(1, len(e1) - 1)], 0.0)  # [c1]
        p2 = np.where(np.arange(len(e2)) > 0, e2[min(1, len(e2) - 1)], 0.0)  # [c2]
        n = self.budgets[:, None, None]
        c1 = np.arange(len(e1))[None, :, None]
        c2 = np.arange(len(e2))[None, None, :]
        neither = np.clip(1.0 - p1[None, :, None] - p2[None, None, :], 0.0, 1.0)
        chains = e1[None, :, None] + e2[None, None, :]  # [1, c1, c2]
        tree = neither * self.tree_gain[:, None, None]  # [n, c1, c2]
        lone = (c1 == 0) & (c2 == 0)  # [1, c1, c2]: no chain drafted
        trust = np.where(lone, self.calibration["lone tree"], self.calibration["tree"])
        expected = 1.0 + self.calibration["chains"] * chains + trust * tree
        size = np.broadcast_to(1 + n + c1 + c2, expected.shape)
        return {"expected": expected, "size": size, "cands": cands, "buckets": buckets, "chains": chains,
                "tree": tree}

    def _candidates(self, candidates: list[tuple], run: int) -> tuple[list[tuple], list[int], list[np.ndarray]]:
        """The candidates as (tokens, n, memory, support), their ChainStats buckets, and for the first
        CANDIDATES of them (the ones a plan may draft) their expected-tokens curves. Without a memory
        candidate: the context's first CANDIDATES in their order. With one: all of them ordered by
        expected accepted tokens when drafted whole (a memory candidate whose first token is that of
        a better context candidate, or the reverse, is not drafted: both would be right on the same
        steps), the rest after them (still scored)."""
        cands, buckets, context = [], [], 0
        for c in candidates:
            if not c[0] or not self.max_chain:
                continue
            memory = bool(c[2]) if len(c) > 2 else False
            if not memory:
                if context == CANDIDATES:
                    continue
                context += 1
            support = int(c[3]) if len(c) > 3 else 1
            occurrences = int(c[4]) if len(c) > 4 else support
            cands.append((c[0], c[1], memory, support))
            buckets.append(self.chain.bucket(context - 1, c[1], run, memory, support, occurrences))
        curves = [self.chain.expected(b) for b in buckets]
        if context == len(cands):
            return cands, buckets, curves
        value = [curve[min(len(t), self.max_chain)] for curve, (t, _, _, _) in zip(curves, cands)]
        chosen: list[int] = []
        for i in sorted(range(len(cands)), key=lambda i: -value[i]):
            clash = any(cands[j][0][0] == cands[i][0][0] and cands[j][2] != cands[i][2] for j in chosen)
            if len(chosen) < CANDIDATES and not clash:
                chosen.append(i)
        order = chosen + [i for i in range(len(cands)) if i not in chosen]
        return [cands[i] for i in order], [buckets[i] for i in order], [curves[i] for i in chosen]

    # ------------------------------------------------------------------ learning
    def record_outcome(self, plan: Plan, actual: list[int]) -> None:
        """A drafted plan's step produced the tokens ``actual`` (bonus included). The estimates behind
        the plans (shrunk statistics, priors, a cold matrix) can be optimistic or pessimistic, and not
        alike for every source: measured on MT-Bench and HumanEval, the matrix tree's gain was
        overestimated about twofold where it was drafted alone, rightly estimated beside a chain, and
        the chains' underestimated by about a tenth. So each source (SOURCES) has its own
        calibration: the ratio of the extra tokens it produced to those expected of it, over its last
        256 drafted plans (once 32 are in, clipped to [0.25, 1.5]), scales its gains. The chains'
        share of a step is the longest right prefix of a drafted chain; the tree's is the rest of the
        accepted tokens."""
        if plan.tree_nodes == 0 and not plan.chain_tokens:
            return  # the root alone: nothing to learn about the estimates
        from_chains = max((right_prefix(chain, actual) for chain in plan.chains), default=0)
        tree = "tree" if plan.chain_tokens else "lone tree"
        got = {"chains": from_chains, tree: max(len(actual) - 1 - from_chains, 0)}
        for source, gain, drafted in (("chains", plan.chain_gain, plan.chain_tokens > 0),
                                      (tree, plan.tree_gain, plan.tree_nodes > 0)):
            if not drafted:
                continue
            kept, sums = self.outcomes[source], self._sums[source]
            if len(kept) == kept.maxlen:
                sums[0] -= kept[0][0]
                sums[1] -= kept[0][1]
            kept.append((gain, got[source]))
            sums[0] += gain
            sums[1] += got[source]
            sums[2] += 1
            self._calibrate(source, recount=sums[2] >= OUTCOMES_KEPT)

    def _calibrate(self, source: str, recount: bool = True) -> None:
        """The source's calibration from its kept outcomes alone (1.0 until 32 are in); ``recount``:
        their sums afresh (else as record_outcome keeps them)."""
        outcomes, sums = self.outcomes[source], self._sums[source]
        if recount:
            sums[:] = [sum(e for e, _ in outcomes), sum(a for _, a in outcomes), 0]
        expected, produced = sums[0], sums[1]
        trusted = len(outcomes) >= 32 and expected > 0
        self.calibration[source] = float(np.clip(produced / expected, 0.25, 1.5)) if trusted else 1.0

    def score_plan(self, plan: Plan, actual: list[int]) -> int:
        """Scores the plan's candidates against the produced tokens; returns the first one's run."""
        runs = [self.chain.score(b, t, actual) for b, t in zip(plan.buckets, plan.candidates)]
        return runs[0] if runs else 0

    def predicted_speedup(self) -> float | None:
        if not self.cost.measured:
            return None
        return self.last_value * float(self.cost(1))

    def state(self) -> dict:
        return {"auto": self.auto.state(), "chain": self.chain.state(), "cost": self.cost.state(),
                "outcomes": {s: [[float(e), int(a)] for e, a in self.outcomes[s]] for s in SOURCES}}

    def load_state(self, state: dict) -> None:
        """What :meth:`state` gave (a saved recycler). The per-source outcomes, and so the
        calibration, come back too; a state saved before they were kept leaves them as they are."""
        self.auto.load_state(state.get("auto", {}))
        self.chain.load_state(state.get("chain", {}))
        self.cost.load_state(state.get("cost", {}))
        outcomes = state.get("outcomes")
        if isinstance(outcomes, dict):
            for source in SOURCES:  # all checked before any is taken
                pairs = outcomes.get(source)
                if not isinstance(pairs, list) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs):
                    raise ValueError(f"saved policy state: outcomes[{source!r}] must be a list of "
                                     f"[expected, produced] pairs")
            for source in SOURCES:
                self.outcomes[source] = deque(((float(e), int(a)) for e, a in outcomes[source]), maxlen=OUTCOMES_KEPT)
                self._calibrate(source)
        self.steps_since = self.retune_every

    # ------------------------------------------------------------------ one chain per step (vLLM)
    def decide_chain(self, candidates: list[tuple], run: int, budget: int, price: float) -> Plan:
        """For an engine that verifies one chain per request: the first c tokens of one n-gram
        candidate continued by m tokens of the matrix's top-1 path from its last token (c = 0: the
        top-1 path from the root), c + m <= budget, chosen to maximise

            expected accepted tokens - price * (c + m),   expected = E(c) + S(c) * g(m)

        E(c): the candidate's expected correct prefix cut to c (ChainStats, by the same buckets as
        decide()), S(c) the chance all c are right (1 for c = 0), g(m) the expected accepted tokens of
        the matrix's top-1 chain cut to m (AutoTree's rates of nodes [0], [0, 0], ..., taken to hold
        after a candidate's tokens too). ``price``: what one more drafted token costs, in tokens (a
        batch step's marginal cost times its tokens per second: BatchStepCost.price); at price 0
        every budget is filled, at a high price nothing is drafted. The plan's ``tree_nodes`` is m,
        its ``chains`` the chosen candidate's c tokens (empty for c = 0)."""
        start = time.perf_counter()
        budget = max(int(budget), 0)
        g = self.matrix_chain_gain(budget)  # [budget + 1]
        cands, buckets, _ = self._candidates(candidates, run)
        gain = g.tolist()
        # A few dozen (c, m) pairs: plain floats are quicker than numpy grids at this size. Ties go
        # to the first seen: the matrix path alone, then fewer candidate tokens, then fewer matrix ones.
        best = max(((gain[m] - price * m, -1, 0, m) for m in range(budget + 1)), key=lambda v: v[0])
        for r, ((tokens, _, _, _), b) in enumerate(zip(cands, buckets)):
            e = self.chain.expected(b)[: min(len(tokens), self.max_chain, budget) + 1].tolist()  # e[c]
            for c in range(1, len(e)):
                survive = e[c] - e[c - 1]  # the chance all c are right
                for m in range(budget - c + 1):
                    value = e[c] + survive * gain[m] - price * (c + m)
                    if value > best[0] + 1e-12:
                        best = (value, r, c, m)
        value, r, c, m = best
        chains = [cands[r][0][:c]] if c else []
        plan = Plan(m, chains, [t for t, _, _, _ in cands], buckets, cands[0][1] if cands else 0,
                    1.0 + value + price * (c + m), recent=bool(cands and cands[r if r >= 0 else 0][2]),
                    memory=[cands[r][2]] if c else [])
        plan.decision_seconds = time.perf_counter() - start
        return plan

    def matrix_chain_gain(self, depth: int) -> np.ndarray:
        """[depth + 1]: expected accepted tokens of the matrix's top-1 chain cut to 0..depth tokens
        (AutoTree's rates of [0], [0, 0], ...; past the deepest such node its last conditional rate
        goes on). Refreshed every ``retune_every`` calls, like the tree gains."""
        since = getattr(self, "_chain_since", self.retune_every)
        if since >= self.retune_every or getattr(self, "_chain_rates", None) is None:
            rates = self.auto.rates()[1:]
            node = {tuple(p): i for i, p in enumerate(self.auto.paths)}
            chain, d = [], 1
            while (0,) * d in node:
                chain.append(float(rates[node[(0,) * d]]))
                d += 1
            self._chain_rates, since = np.array(chain or [0.0]), 0
        self._chain_since = since + 1
        r = self._chain_rates
        if depth > len(r):
            q = r[-1] / r[-2] if len(r) >= 2 and r[-2] > 0 else r[-1]
            r = np.concatenate([r, r[-1] * q ** np.arange(1, depth - len(r) + 1)])
        return np.concatenate([[0.0], np.cumsum(r[:depth])])


DEFAULT_CHAIN_PRICE = 0.01  # decide_chain's price before anything is measured: a drafted token costs 1% of a step


class BatchStepCost:
    """The price of a drafted token for an engine that verifies a batch each step and tells the
    drafter nothing of its forward (vLLM hands a proposer tokens only).

    What is measured: the wall time between two consecutive calls of the drafter (one engine step:
    scheduling, the batch's forward, sampling, the drafting itself) against the tokens that step
    forwarded for the whole batch (each request's root and drafts) and the tokens it produced. Only
    steps that forwarded decode rows alone are used (a prefill's token count is unknown). The fit is
    ``t(T) = a + b * T`` over the last ``window`` such steps, by Theil-Sen (the median of the slopes
    between every two steps, then the median intercept), so a pause or an odd step does not move it.

    The price: one more drafted token makes the step b seconds longer for every request in it, and a
    step yields E / t(T) tokens per second, so the token must be expected to bring ``b * E / t(T)``
    tokens to pay for itself (Policy.decide_chain). Until ``min_steps`` steps with differing T are
    seen, or when the steps stop differing, ``b / a`` is taken as ``default_slope`` (1%: one extra
    token of a small batch costs little next to a step's fixed work, so an unmeasured policy drafts
    what its statistics expect to be accepted, as before the fit)."""

    def __init__(self, window: int = 64, min_steps: int = 16, default_slope: float = 0.01):
        self.samples: deque[tuple[int, int, float]] = deque(maxlen=window)  # (forwarded, produced, seconds)
        self.min_steps, self.default_slope = min_steps, default_slope
        self.intercept: float | None = None  # seconds; None: not fitted
        self.slope: float | None = None      # seconds per forwarded token

    @property
    def measured(self) -> bool:
        return self.slope is not None

    def record_step(self, forwarded: int, produced: int, seconds: float) -> None:
        """One step that forwarded decode rows only: tokens forwarded (batch), produced, wall seconds."""
        if forwarded > 0 and seconds > 0:
            self.samples.append((int(forwarded), int(produced), float(seconds)))
            self._fit()

    def _fit(self) -> None:
        t = np.array([s[0] for s in self.samples], dtype=np.float64)
        secs = np.array([s[2] for s in self.samples])
        dt = t[:, None] - t[None, :]
        pairs = dt > 0
        if len(self.samples) < self.min_steps or pairs.sum() < self.min_steps:
            self.intercept = self.slope = None
            return
        slope = max(float(np.median((secs[:, None] - secs[None, :])[pairs] / dt[pairs])), 0.0)
        self.slope = slope
        self.intercept = max(float(np.median(secs - slope * t)), 1e-9)

    def seconds(self, forwarded) -> np.ndarray:
        """A step's seconds for T forwarded tokens (unfitted: in units of the fixed part, a = 1)."""
        if self.measured:
            return self.intercept + self.slope * np.asarray(forwarded, dtype=np.float64)
        return 1.0 + self.default_slope * np.asarray(forwarded, dtype=np.float64)

    def price(self) -> float:
        """Expected tokens one more drafted token must bring (see the class docstring)."""
        slope = self.slope if self.measured else self.default_slope
        if not self.samples:
            return slope / float(self.seconds(1))  # one request producing one token a step
        t = np.array([s[0] for s in self.samples], dtype=np.float64)
        produced = sum(s[1] for s in self.samples)
        return float(slope * produced / self.seconds(t).sum())

    def state(self) -> dict:
        return {"intercept": self.intercept, "slope": self.slope, "steps": len(self.samples)}
