"""tree="auto": a draft tree shaped by measured acceptance and measured cost.

Acceptance. For every node of a large candidate tree we estimate the probability that its whole
rank path matches the model's greedy tokens. After each step the accepted tokens t_1..t_L (bonus
included) are known, and so are the matrix rows the draft was built from; a candidate node at depth
d <= L matches iff its parent matched and rank r_d of row(t_{d-1}) holds t_d. So every step
measures *every* candidate node down to the accepted depth, whether or not it was in the tree that
was forwarded. Each node keeps counts (parent matched and observable -> den, node matched -> num);
its rate is rate(parent) * (num + a * prior) / (den + a). With greedy verification the expected
tokens per step of a tree closed under ancestors is 1 + the sum of its nodes' rates, so the best
tree for a budget is the top-rated nodes, ancestors first (tree.best_subtree).

Cost. t(n): the median time of one verification forward of n tree tokens at the current context,
measured once per model/device/dtype, plus the loop's own overhead per step, measured while
generating.

Hybrid drafts. The n-gram chain is grafted under the root; its nodes that are new (not merged into
tree nodes) cost forward time like any node. For chain position j we count the steps whose chain
had at least j new nodes (den) and those where at least j of them were accepted (num), so a chain
cut to c nodes is expected to add sum_{j<=c} present * num_j / den_j tokens for about present * c
nodes, where present is the share of steps that found a match.

The choice: the tree size n and chain length c maximising
expected_tokens(n, c) / (t(1 + n + present * c) + overhead).
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .tree import RANK_PRIOR, DraftTree, best_subtree

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

    def __call__(self, n: float) -> float:
        if len(self.sizes) >= 2 and n > self.sizes[-1]:  # past the measured range: extend the last slope
            slope = (self.seconds[-1] - self.seconds[-2]) / (self.sizes[-1] - self.sizes[-2])
            return self.seconds[-1] + slope * (n - self.sizes[-1])
        return float(np.interp(n, self.sizes, self.seconds))

    @property
    def measured(self) -> bool:
        return bool(self.sizes)


class AutoTree:
    """Keeps acceptance statistics over a candidate tree and picks the tree to draft with."""

    def __init__(self, topk: int, candidates: list[list[int]] | None = None, pseudo_count: float = 2.0,
                 retune_every: int = 16, max_chain: int = 0):
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
        self.cost = CostModel()
        self.overhead = 0.0  # seconds per step outside the forward (EMA)
        self.max_chain = max_chain  # the longest n-gram chain the loop may graft (0: no n-gram drafts)
        self.chain_num = np.zeros(max_chain + 1, dtype=np.float64)  # [j]: steps with >= j chain tokens accepted
        self.chain_den = np.zeros(max_chain + 1, dtype=np.float64)  # [j]: steps with >= j new chain nodes
        self.chain_steps = 0.0  # steps observed for the chain
        self.chain = max_chain  # chosen chain length
        self.retune_every = retune_every
        self.steps_since_tune = 0
        self.tuned_steps = 0
        self.budget = 0
        self.expected_tokens = 1.0
        self.predicted_speedup: float | None = None

    # ------------------------------------------------------------------ statistics
    def rates(self) -> np.ndarray:
        cond = (self.num + self.a * self.prior) / (self.den + self.a)
        rate = np.ones_like(cond)
        for idx in self.levels:
            rate[idx] = rate[self.parents[idx]] * cond[idx]
        rate[0] = 1.0
        return rate

    def observe(self, rows: np.ndarray, targets: np.ndarray) -> None:
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

    def observe_step(self, seconds_total: float, forwarded: int, chain_nodes: int, chain_accepted: int) -> None:
        """One step: its wall time, nodes forwarded, new n-gram chain nodes and how many were accepted."""
        if self.cost.measured:
            over = max(seconds_total - self.cost(forwarded), 0.0)
            self.overhead = over if self.tuned_steps == 0 else 0.9 * self.overhead + 0.1 * over
        if self.max_chain:
            self.chain_steps += 1
            self.chain_den[1: min(chain_nodes, self.max_chain) + 1] += 1
            self.chain_num[1: min(chain_accepted, self.max_chain) + 1] += 1
        self.tuned_steps += 1
        self.steps_since_tune += 1

    # ------------------------------------------------------------------ choice
    def due(self) -> bool:
        every = self.retune_every if self.tuned_steps < 256 else 4 * self.retune_every
        return self.budget == 0 or self.steps_since_tune >= every

    def choose(self, max_nodes: int | None = None) -> list[list[int]]:
        """The best tree for the current statistics and cost model."""
        self.steps_since_tune = 0
        rate = self.rates()
        order = best_subtree(self.paths, rate[1:].tolist(), len(self.paths), in_pick_order=True)
        index = {tuple(p): i + 1 for i, p in enumerate(self.paths)}
        gains = np.cumsum([rate[index[tuple(p)]] for p in order])
        limit = min(len(order), max_nodes or len(order))
        chain_gain, present = self.chain_gains()
        best_n, best_c, best_value = 1, 0, -1.0
        base = self.cost(1) + self.overhead if self.cost.measured else 1.0
        for n in BUDGETS:
            if n > limit:
                break
            for c in range(self.max_chain + 1):
                expected = 1.0 + gains[n - 1] + chain_gain[c]
                nodes = 1 + n + present * c
                seconds = self.cost(nodes) + self.overhead if self.cost.measured else 1.0 + 0.01 * nodes
                value = expected / seconds
                if value > best_value:
                    best_n, best_c, best_value, self.expected_tokens = n, c, value, expected
        self.budget, self.chain = best_n, best_c
        self.predicted_speedup = best_value * base
        return order[:best_n]

    def chain_gains(self) -> tuple[np.ndarray, float]:
        """(expected accepted chain tokens for each chain length 0..max_chain, share of steps with a
        match). Before any observation the chain is assumed to pay for itself about as well as a
        second-rank tree node, so it is tried and then measured."""
        if not self.max_chain:
            return np.zeros(1), 0.0
        present = self.chain_den[1] / self.chain_steps if self.chain_steps else 0.8
        prior = np.array([0.0] + [0.3 * 0.7 ** j for j in range(self.max_chain)])
        rate = (self.chain_num + self.a * prior) / (self.chain_den + self.a)
        rate[0] = 0.0
        return present * np.cumsum(rate), present

    # ------------------------------------------------------------------ persistence
    def state(self) -> dict:
        return {"paths": self.paths, "num": self.num.tolist(), "den": self.den.tolist(),
                "cost": {"sizes": self.cost.sizes, "seconds": self.cost.seconds, "context": self.cost.context},
                "overhead": self.overhead, "chain_num": self.chain_num.tolist(),
                "chain_den": self.chain_den.tolist(), "chain_steps": self.chain_steps}

    def load_state(self, state: dict) -> None:
        if [list(p) for p in state.get("paths", [])] != self.paths:
            return  # statistics for another candidate tree: start fresh
        self.num = np.array(state["num"], dtype=np.float64)
        self.den = np.array(state["den"], dtype=np.float64)
        c = state.get("cost") or {}
        if c.get("sizes"):
            self.cost = CostModel(list(c["sizes"]), list(c["seconds"]), int(c.get("context", 0)))
        self.overhead = float(state.get("overhead", 0.0))
        if len(state.get("chain_num", [])) == self.max_chain + 1:
            self.chain_num = np.array(state["chain_num"], dtype=np.float64)
            self.chain_den = np.array(state["chain_den"], dtype=np.float64)
            self.chain_steps = float(state.get("chain_steps", 0.0))


def measure_cost(forward_n, sizes=COST_SIZES, repeats: int = 3, context: int = 0) -> CostModel:
    """Time forward_n(n) (one verification forward of n tokens, cache restored afterwards)."""
    forward_n(max(sizes))  # warm-up: allocator, kernels
    secs = []
    for n in sizes:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            forward_n(n)
            times.append(time.perf_counter() - t)
        secs.append(float(np.median(times)))
    # A forward of more tokens never costs less: keep the curve monotone against timing noise.
    secs = np.maximum.accumulate(np.array(secs)).tolist()
    return CostModel(list(sizes), secs, context)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
