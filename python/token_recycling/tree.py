"""Draft-tree templates: a tree is a list of rank paths under the root.

``[2, 0]`` is "the best candidate after the third-best candidate after the root". A template is
turned into the arrays the ops and the model forward need: ``parents`` and ``ranks`` (node 0 is the
root), ``depths``, the ``[N, N]`` ancestor mask and position offsets (= depth).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence, Union

import torch

RankPath = tuple[int, ...]


def _paper_paths() -> list[list[int]]:
    """The Token Recycling paper's static tree: 80 nodes, depths 1..6 with 8/21/25/15/8/3 nodes."""
    d1 = [[i] for i in range(8)]
    d2 = [[0, i] for i in range(8)] + [[1, i] for i in range(4)] + [[2, i] for i in range(3)]
    d2 += [[3, 0], [3, 1], [4, 0], [5, 0], [6, 0], [7, 0]]
    d3 = [[0, 0, i] for i in range(8)] + [[0, 1, 0], [0, 1, 1], [0, 1, 2], [0, 2, 0], [0, 2, 1]]
    d3 += [[0, i, 0] for i in range(3, 8)] + [[1, 0, 0], [1, 0, 1], [1, 1, 0]]
    d3 += [[i, 0, 0] for i in range(2, 6)]
    d4 = [[0, 0, 0, i] for i in range(5)] + [[0, 0, 1, 0], [0, 0, 1, 1], [0, 0, 2, 0], [0, 0, 3, 0]]
    d4 += [[0, 0, 4, 0], [0, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [2, 0, 0, 0], [3, 0, 0, 0]]
    d5 = [[0, 0, 0, 0, 0], [0, 0, 0, 0, 1], [0, 0, 0, 0, 2], [0, 0, 0, 1, 0], [0, 0, 0, 2, 0]]
    d5 += [[0, 0, 1, 0, 0], [0, 1, 0, 0, 0], [1, 0, 0, 0, 0]]
    d6 = [[0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1], [0, 0, 0, 1, 0, 0]]
    return d1 + d2 + d3 + d4 + d5 + d6


# Prior probability that a candidate of each rank is the model's next token; used to cut the
# paper tree down to small presets before any statistics exist (tree="auto" then measures).
RANK_PRIOR = (0.45, 0.15, 0.07, 0.045, 0.03, 0.02, 0.015, 0.01)


def prior_score(path: Sequence[int]) -> float:
    score = 1.0
    for r in path:
        score *= RANK_PRIOR[r] if r < len(RANK_PRIOR) else RANK_PRIOR[-1]
    return score


def best_subtree(paths: Sequence[Sequence[int]], scores: Sequence[float], budget: int,
                 in_pick_order: bool = False) -> list[list[int]]:
    """The ``budget`` highest-scoring paths that still form a tree (every ancestor kept); in
    breadth-first order, or in the order they were picked (every prefix of it is a best tree too).

    With greedy verification the expected accepted length of a tree is 1 + the sum of its nodes'
    path-match probabilities, so taking nodes by score, ancestors first, maximises it for a budget
    when scores never grow along a path (a child can only match when its parent did).
    """
    score_of = {tuple(p): s for p, s in zip(paths, scores)}
    chosen: list[tuple[int, ...]] = []
    chosen_set: set[tuple[int, ...]] = set()
    # Candidates whose parent is already chosen (the frontier), best first.
    while len(chosen) < budget:
        best, best_score = None, -1.0
        for p, s in score_of.items():
            if p in chosen_set or (len(p) > 1 and p[:-1] not in chosen_set):
                continue
            if s > best_score or (s == best_score and best is not None and (len(p), p) < (len(best), best)):
                best, best_score = p, s
        if best is None:
            break
        chosen.append(best)
        chosen_set.add(best)
    if in_pick_order:
        return [list(p) for p in chosen]
    return [list(p) for p in sorted(chosen, key=lambda p: (len(p), p))]


def _preset(name: str) -> list[list[int]]:
    paper = _paper_paths()
    if name == "paper":
        return paper
    if name.startswith("chain-"):
        n = int(name.split("-", 1)[1])
        return [[0] * d for d in range(1, n + 1)]
    if name.startswith("paper-"):
        n = int(name.split("-", 1)[1])
        return best_subtree(paper, [prior_score(p) for p in paper], n)
    raise ValueError(f"unknown tree preset {name!r}; known: {', '.join(PRESETS)} or a list of rank paths")


PRESETS = ("paper", "paper-8", "paper-16", "paper-32", "paper-48", "chain-4", "chain-8")


@dataclass(frozen=True)
class DraftTree:
    """A validated draft tree; node 0 is the root, nodes are in breadth-first (depth) order."""

    paths: tuple[RankPath, ...]  # rank path of every node but the root
    topk: int
    parents: torch.Tensor = field(repr=False)  # [N] int32, parents[0] == -1
    ranks: torch.Tensor = field(repr=False)  # [N] int32, ranks[0] == 0 (unused)
    depths: torch.Tensor = field(repr=False)  # [N] int64
    mask: torch.Tensor = field(repr=False)  # [N, N] bool: node i may attend to node j (ancestors and itself)

    @property
    def num_nodes(self) -> int:
        """Nodes forwarded per step, root included."""
        return len(self.paths) + 1

    @property
    def max_depth(self) -> int:
        return max((len(p) for p in self.paths), default=0)

    def to(self, device: torch.device | str) -> "DraftTree":
        return DraftTree(self.paths, self.topk, self.parents.to(device), self.ranks.to(device),
                         self.depths.to(device), self.mask.to(device))

    @staticmethod
    def from_paths(paths: Iterable[Sequence[int]], topk: int = 8) -> "DraftTree":
        """Validate rank paths and build the arrays. Raises ValueError for anything not a tree."""
        norm: list[RankPath] = []
        for p in paths:
            if isinstance(p, (str, bytes)) or not isinstance(p, Sequence):
                raise ValueError(f"tree path {p!r} is not a list of ranks")
            if len(p) == 0:
                raise ValueError("tree paths must be non-empty (the root is implicit)")
            for r in p:
                if isinstance(r, bool) or not isinstance(r, int):
                    raise ValueError(f"tree path {list(p)} has a non-integer rank {r!r}")
                if not 0 <= r < topk:
                    raise ValueError(f"tree path {list(p)} has rank {r} outside [0, topk={topk})")
            norm.append(tuple(p))
        if len(set(norm)) != len(norm):
            dup = next(p for p in norm if norm.count(p) > 1)
            raise ValueError(f"tree path {list(dup)} appears more than once")
        present = set(norm)
        for p in norm:
            if len(p) > 1 and p[:-1] not in present:
                raise ValueError(f"tree path {list(p)} has no parent {list(p[:-1])}: not a tree")
        # Breadth-first order (stable within a depth) puts every parent before its children.
        ordered = sorted(norm, key=len)
        index = {p: i + 1 for i, p in enumerate(ordered)}
        n = len(ordered) + 1
        parents = [-1] + [index[p[:-1]] if len(p) > 1 else 0 for p in ordered]
        ranks = [0] + [p[-1] for p in ordered]
        depths = [0] + [len(p) for p in ordered]
        mask = torch.zeros(n, n, dtype=torch.bool)
        for i in range(n):
            j = i
            while j != -1:
                mask[i, j] = True
                j = parents[j]
        return DraftTree(tuple(ordered), topk, torch.tensor(parents, dtype=torch.int32),
                         torch.tensor(ranks, dtype=torch.int32), torch.tensor(depths, dtype=torch.long), mask)


TreeSpec = Union[str, Sequence[Sequence[int]], DraftTree]


def make_tree(spec: TreeSpec, topk: int = 8) -> DraftTree:
    """A DraftTree from a preset name, a list of rank paths, or a DraftTree (checked against topk)."""
    if isinstance(spec, DraftTree):
        if spec.topk > topk:
            raise ValueError(f"tree was built for topk={spec.topk} but the matrix has k={topk}")
        return spec
    if isinstance(spec, str):
        return DraftTree.from_paths(_preset(spec), topk)
    return DraftTree.from_paths(spec, topk)
