"""The matrix tree's statistics for tree="auto" (policy.py makes the per-step choice), and the cost curve.

Acceptance. For every node of a large candidate tree we estimate the probability that its whole
rank path matches the model's greedy tokens. After each step the accepted tokens t_1..t_L (bonus
included) are known, and so are the matrix rows the draft was built from; a candidate node at depth
d <= L matches iff its parent matched and rank r_d of row(t_{d-1}) holds t_d. So every step
measures *every* candidate node down to the accepted depth, whether or not it was in the tree that
was forwarded. Each node keeps counts (parent matched and observable -> den, node matched -> num);
its rate is rate(parent) * (num + a * prior) / (den + a). With greedy verification the expected
tokens per step of a tree closed under ancestors is 1 + the sum of its nodes' rates, so the best
tree for a budget is the top-rated nodes, ancestors first (tree.best_subtree).

Cost. t(n): the fastest of several timed verification forwards of n tree tokens at a given context
(:func:`measure_cost`; carried to a longer context by :func:`remeasure_cost`); policy.StepCost
follows it from step to step.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .tree import RANK_PRIOR, DraftTree

BUDGETS = (1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128)
COST_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)


def candidate_paths(max_nodes: int = 192, topk: int = 8, max_depth: int = 12) -> list[list[int]]:
    """The top-1 chain down to max_depth (often the most accepted path of all), then the rank paths
    with the best prior score, best-first, up to max_nodes (a tree, ancestors first)."""
    prior = [RANK_PRIOR[r] if r < len(RANK_PRIOR) else RANK_PRIOR[-1] for r in range(topk)]
    out: list[tuple[int, ...]] = [(0,) * d for d in range(1, min(max_depth, max_nodes) + 1)]
    chain = set(out)
    heap = [(-prior[r], (r,)) for r in range(topk)]
    heapq.heapify(heap)
    while heap and len(out) < max_nodes:
        neg, path = heapq.heappop(heap)
        if path not in chain:
            out.append(path)
        if len(path) < max_depth:
            for r in range(topk):
                heapq.heappush(heap, (neg * prior[r], path + (r,)))
    return [list(p) for p in sorted(out, key=lambda p: (len(p), p))]


@dataclass
class CostModel:
    """Seconds per verification forward of n tokens (linear interpolation between measured sizes)."""

    sizes: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    context: int = 0

    def __call__(self, n):
        """Seconds for n tokens (a number or an array); past the measured range the last slope goes on."""
        n = np.asarray(n, dtype=np.float64)
        inside = np.interp(n, self.sizes, self.seconds)
        if len(self.sizes) >= 2:
            slope = (self.seconds[-1] - self.seconds[-2]) / (self.sizes[-1] - self.sizes[-2])
            inside = np.where(n > self.sizes[-1], self.seconds[-1] + slope * (n - self.sizes[-1]), inside)
        return float(inside) if np.ndim(inside) == 0 else inside

    @property
    def measured(self) -> bool:
        return bool(self.sizes)


class AutoTree:
    """Keeps acceptance statistics over a candidate tree and picks the tree to draft with."""

    def __init__(self, topk: int, candidates: list[list[int]] | None = None, pseudo_count: float = 2.0):
        self.topk = topk
        self.paths = candidates or candidate_paths(topk=topk)
        self._tree = DraftTree.from_paths(self.paths, topk)  # for its parents/ranks/depths arrays
        self.parents = self._tree.parents.numpy().astype(np.int64)
        self.ranks = self._tree.ranks.numpy().astype(np.int64)
        depths = self._tree.depths.numpy()
        self.levels = [np.nonzero(depths == d)[0] for d in range(1, int(depths.max()) + 1)]
        self.prior = np.array([RANK_PRIOR[min(r, len(RANK_PRIOR) - 1)] for r in self.ranks], dtype=np.float64)
        n = len(self.parents)
        self.num = np.zeros(n, dtype=np.float64)
        self.den = np.zeros(n, dtype=np.float64)
        self.a = pseudo_count

    # ------------------------------------------------------------------ statistics
    def rates(self) -> np.ndarray:
        cond = (self.num + self.a * self.prior) / (self.den + self.a)
        rate = np.ones_like(cond)
        for idx in self.levels:
            rate[idx] = rate[self.parents[idx]] * cond[idx]
        rate[0] = 1.0
        return rate

    def score_nodes(self, rows: np.ndarray, targets: np.ndarray) -> None:
        """rows [L, k]: draft-time matrix rows of the accepted path's tokens t_0..t_{L-1};
        targets [L]: t_1..t_L (the accepted tokens after the root, then the bonus)."""
        hits = rows == targets[:, None]  # [L, k]
        matched = np.zeros(len(self.parents), dtype=bool)
        matched[0] = True
        for d, idx in enumerate(self.levels[: len(targets)]):
            pm = matched[self.parents[idx]]
            hit = pm & hits[d, self.ranks[idx]]
            self.den[idx] += pm
            self.num[idx] += hit
            matched[idx] = hit
            if not hit.any():
                break

    # ------------------------------------------------------------------ choice
    def best_order(self) -> tuple[list[list[int]], np.ndarray]:
        """(candidate nodes best first, ancestors first: every prefix is the best tree of its size;
        gains[n - 1] = expected accepted tokens of the first n, the root's bonus not counted)."""
        # A node's rate never exceeds its parent's, so best-first by rate (ties: shallower first) is
        # ancestors-first: tree.best_subtree's order, in O(n log n).
        rate = self.rates()[1:]
        idx = sorted(range(len(self.paths)), key=lambda i: (-rate[i], len(self.paths[i]), self.paths[i]))
        return [self.paths[i] for i in idx], np.cumsum(rate[idx])

    def choose(self, budget: int) -> list[list[int]]:
        """The best tree of ``budget`` nodes under the root for the current statistics."""
        return self.best_order()[0][:budget]

    # ------------------------------------------------------------------ persistence
    def state(self) -> dict:
        return {"paths": self.paths, "num": self.num.tolist(), "den": self.den.tolist()}

    def load_state(self, state: dict) -> None:
        if [list(p) for p in state.get("paths", [])] != self.paths:
            return  # statistics for another candidate tree: start fresh
        self.num = np.array(state["num"], dtype=np.float64)
        self.den = np.array(state["den"], dtype=np.float64)


SMALL_SIZES = 16  # sizes a CPU step forwards (the policy's choices there): timed more often


STOP_RATIO = 4.0  # larger sizes are not timed once two in a row cost this many one-token forwards


def measure_cost(forward_n, sizes=COST_SIZES, repeats: int = 2, context: int = 0, small_repeats: int = 5,
                 stop_ratio: float = STOP_RATIO) -> CostModel:
    """Time forward_n(n) (one verification forward of n tokens, cache restored afterwards).

    Sizes up to SMALL_SIZES (cheap, and what the policy picks on a CPU) in ``small_repeats``
    interleaved rounds (each round times every size once, so a burst of load from elsewhere hits
    them alike rather than one size's repeats); then the larger sizes in ascending order,
    ``repeats`` times each, until two in a row cost at least ``stop_ratio`` times size 1: past
    them the curve's last slope goes on (CostModel), which is what a step bound by arithmetic costs,
    and a step that costs four root-only steps is rarely worth its tokens. On a 2-core CPU that
    skips the forwards of 96 and 128 tokens (or of 128 alone), most of the measurement's time in a
    user's first request; a GPU, whose curve stays nearly flat, times every size. A size keeps its fastest
    time: load and interrupts only ever add. The curve is then made monotone from above (t(n) =
    the least time of any size >= n), so a slow outlier at a small size is lowered to its
    neighbours' level instead of lifting every larger size to it: lifting made t(1..8) look flat
    once (a 7-node tree on every step of a 40-prompt run where 4 paid best)."""
    sizes = sorted(sizes)
    forward_n(min(sizes[-1], SMALL_SIZES))  # warm-up: allocator, kernels
    best = {n: float("inf") for n in sizes}

    def time_one(n: int) -> None:
        t = time.perf_counter()
        forward_n(n)
        best[n] = min(best[n], time.perf_counter() - t)

    small = [n for n in sizes if n <= SMALL_SIZES]
    for _ in range(small_repeats):
        for n in small:
            time_one(n)
    measured, above = list(small), 0
    for n in sizes[len(small):]:
        for _ in range(repeats):
            time_one(n)
        measured.append(n)
        above = above + 1 if best[n] >= stop_ratio * best[sizes[0]] else 0
        if above == 2:
            break
    secs = np.minimum.accumulate(np.array([best[n] for n in measured])[::-1])[::-1].tolist()
    return CostModel(measured, secs, context)


REMEASURE_SIZES = (1, 16, 64)


def remeasure_cost(forward_n, old: CostModel, sizes=REMEASURE_SIZES, repeats: int = 2, context: int = 0) -> CostModel:
    """``old`` carried to a longer context cheaply: time a few sizes (the best of ``repeats`` each; no
    warm-up, the cache is warm) and scale the old curve by the measured ratios new / old, linear in n
    between those sizes and constant past them. A few forwards instead of :func:`measure_cost`'s
    dozens of forwards of up to 128 tokens, which at a long context cost seconds on a CPU."""
    sizes = [n for n in sizes if n <= max(old.sizes)] or [min(old.sizes)]
    ratios = []
    for n in sizes:
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            forward_n(n)
            best = min(best, time.perf_counter() - t)
        ratios.append(best / max(old(n), 1e-9))
    secs = [old(n) * float(np.interp(n, sizes, ratios)) for n in old.sizes]
    secs = np.maximum.accumulate(np.array(secs)).tolist()
    return CostModel(list(old.sizes), secs, context)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
