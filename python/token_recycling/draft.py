"""Drafting: what the model verifies at each step, and what drafting learns from each step.

The draft is the matrix tree (``build_draft_tree`` over the adjacency matrix, shaped by a fixed
template or by the auto tree) with the context n-gram continuation grafted under the root
(``graft_chain``). A :class:`Drafter` owns what is shared by every request: the adjacency matrix
(recycled after every verification), the tree choice and its statistics. What belongs to one
sequence (its n-gram index) lives in a :class:`DraftState`, one per request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch

from . import distributed, ops
from .adjacency import AdjacencyMatrix
from .auto_tree import COST_SIZES, AutoTree, measure_cost
from .ngram import NgramIndex
from .tree import DraftTree, TreeSpec, make_tree


@dataclass(frozen=True)
class Draft:
    """One step's draft: ``tokens [1, M]`` with node 0 the root; ``parents [M]`` (int32),
    ``depths [M]``, ``mask [M, M]`` (node i sees node j). The first ``tree.num_nodes`` nodes are
    the matrix tree, the rest the grafted n-gram chain's new nodes."""

    tokens: torch.Tensor
    parents: torch.Tensor
    depths: torch.Tensor
    mask: torch.Tensor
    tree: DraftTree

    @property
    def size(self) -> int:
        return self.tokens.shape[1]

    @property
    def tree_nodes(self) -> int:
        """Nodes of the matrix tree in this draft, root included (the rest came from the n-gram chain)."""
        return min(self.tree.num_nodes, self.size)

    def truncate(self, n: int) -> "Draft":
        """The first n nodes (breadth-first order within the tree and chain, so still a tree)."""
        return replace(self, tokens=self.tokens[:, :n], parents=self.parents[:n], depths=self.depths[:n],
                       mask=self.mask[:n, :n])


class DraftState:
    """Per-request drafting state: the n-gram index over this sequence's tokens (None without n-grams)."""

    def __init__(self, seq: torch.Tensor, capacity: int, max_ngram: int | None):
        self.max_ngram = max_ngram
        self.index = self._new_index(seq, capacity) if max_ngram else None

    def _new_index(self, seq, capacity: int) -> NgramIndex:
        index = NgramIndex(1, max(capacity, seq.shape[1] + 1), self.max_ngram)
        index.extend(seq)
        return index

    def accept(self, seq: torch.Tensor, emitted: int) -> None:
        """The sequence grew by its last ``emitted`` tokens."""
        if self.index is None or emitted == 0:
            return
        if self.index.lengths[0] + emitted > self.index.capacity:  # ran past the planned length
            self.index = self._new_index(seq, 2 * self.index.capacity)
        else:
            self.index.extend(seq[:, seq.shape[1] - emitted:])


class Drafter:
    """The adjacency matrix, the tree template (fixed or auto) and the n-gram settings.

    Args mirror :class:`TokenRecycler`'s: ``tree`` ("auto", a preset, rank paths or a DraftTree),
    ``topk``, ``ngram`` / ``max_ngram`` / ``ngram_tokens``.
    """

    def __init__(self, vocab_size: int, device: torch.device, tree: TreeSpec = "auto", topk: int = 8, *,
                 ngram: bool = True, max_ngram: int = 4, ngram_tokens: int = 10):
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        if ngram and (max_ngram < 1 or ngram_tokens < 1):
            raise ValueError(f"max_ngram and ngram_tokens must be >= 1, got {max_ngram}, {ngram_tokens}")
        self.device = device
        self.topk = topk
        self.matrix = AdjacencyMatrix(vocab_size, topk, device)
        self.tree_spec = tree
        self.ngram, self.max_ngram, self.ngram_tokens = ngram, max_ngram, ngram_tokens
        self.auto: AutoTree | None = None
        if isinstance(tree, str) and tree == "auto":
            self.auto = AutoTree(topk, max_chain=ngram_tokens if ngram else 0)
        self.tree: DraftTree = make_tree(self.auto.choose() if self.auto else tree, topk).to(device)

    # ------------------------------------------------------------------ per request
    def start(self, seq: torch.Tensor, capacity: int) -> DraftState:
        return DraftState(seq, capacity, self.max_ngram if self.ngram else None)

    @property
    def chain_length(self) -> int:
        """How many n-gram tokens to graft this step (0: none)."""
        if not self.ngram:
            return 0
        return self.auto.chain if self.auto is not None else self.ngram_tokens

    def draft(self, state: DraftState, root: torch.Tensor) -> Draft:
        """The matrix tree under ``root`` [1], with the n-gram continuation grafted under the root
        (merged with matching tree nodes)."""
        tree = self.tree
        tokens = ops.build_draft_tree(self.matrix.table, root, tree.parents, tree.ranks)
        plain = Draft(tokens, tree.parents, tree.depths, tree.mask, tree)
        length = self.chain_length
        if state.index is None or length == 0:
            return plain
        chain, count = state.index.lookup(length)
        if int(count[0]) == 0:
            return plain
        out, parents, depths, mask, num = ops.graft_chain(tokens.cpu(), tree.parents.cpu(), chain, count)
        m = int(num[0])
        to = lambda t: t.to(self.device, non_blocking=True)  # noqa: E731
        return Draft(to(out[:, :m]), to(parents[0, :m]), to(depths[0, :m]), to(mask[0, :m, :m]), tree)

    # ------------------------------------------------------------------ learning from a step
    def observe(self, draft: Draft, path: torch.Tensor, new_tokens: torch.Tensor) -> None:
        """Before recycling: the auto tree scores every candidate node against the accepted tokens,
        using the draft-time matrix rows of the accepted path."""
        if self.auto is not None:
            rows = self.matrix.table[draft.tokens[0, path]]
            self.auto.observe(rows.cpu().numpy(), new_tokens.cpu().numpy())

    def recycle(self, tokens: torch.Tensor, candidates: torch.Tensor) -> None:
        """Every forwarded token's row := the model's top-k after it."""
        ops.update_adjacency(self.matrix.table, tokens, candidates)

    def step_done(self, seconds: float, draft: Draft, path: list[int]) -> None:
        """After a step: its wall time and where its accepted tokens came from (auto tree)."""
        if self.auto is None:
            return
        from_chain = sum(1 for node in path if node >= draft.tree_nodes)
        seconds = distributed.agree([seconds])[0]  # decisions must match on every rank
        self.auto.observe_step(seconds, draft.size, draft.size - draft.tree_nodes, from_chain)
        if self.auto.due():
            self.retune()

    # ------------------------------------------------------------------ the auto tree
    def tune(self, time_forward: Callable[[int], None], prefix: int, capacity: int | None) -> None:
        """Measure the forward cost curve once (``time_forward(n)``: one verification-shaped forward of
        n tokens, cache restored), then choose the tree. Needs room for 3+ sizes in a static cache."""
        if self.auto is None:
            return
        sizes = [n for n in COST_SIZES if capacity is None or prefix + n <= capacity]
        if not self.auto.cost.measured and len(sizes) >= 3:  # else: measured on a later call with more room
            cost = measure_cost(time_forward, sizes=sizes, context=prefix)
            cost.seconds = distributed.agree(cost.seconds)  # decisions must match on every rank
            self.auto.cost = cost
        self.retune()

    def retune(self) -> None:
        paths = self.auto.choose()
        if [tuple(p) for p in paths] != list(self.tree.paths):
            self.tree = make_tree(paths, self.topk).to(self.device)

    # ------------------------------------------------------------------ state
    def describe(self) -> str:
        ngram = f"ngram<={self.max_ngram}->{self.chain_length}" if self.ngram else "no ngram"
        return (f"tree={self.tree_spec!r}: {self.tree.num_nodes - 1} nodes, k={self.topk}, {ngram}")

    def reset(self) -> None:
        """Cold start: forget what the matrix (and the auto tree's statistics) learned."""
        self.matrix.reset()
        if self.auto is not None:
            cost = self.auto.cost
            self.auto = AutoTree(self.topk, max_chain=self.auto.max_chain)
            self.auto.cost = cost  # the hardware did not change
            self.tree = make_tree(self.auto.choose(), self.topk).to(self.device)

    def extra_state(self) -> dict:
        """What save() stores beside the matrix: the tree (and the auto tree's statistics)."""
        extra = {"tree": [list(p) for p in self.tree.paths]}
        if self.auto is not None:
            extra["auto"] = self.auto.state()
        return extra

    def load_extra_state(self, extra: dict) -> None:
        if self.auto is not None and extra.get("auto"):
            self.auto.load_state(extra["auto"])
            saved = [list(p) for p in extra.get("tree", [])]
            self.tree = make_tree(saved or self.auto.choose(), self.topk).to(self.device)
            self.auto.budget = self.tree.num_nodes - 1

    def predicted_speedup(self) -> float | None:
        return self.auto.predicted_speedup if self.auto is not None else None

    def single_step_seconds(self) -> float | None:
        """The cost model's time of a plain one-token step (auto tree, once measured)."""
        if self.auto is None or not self.auto.cost.measured:
            return None
        value = self.auto.cost(1) + self.auto.overhead
        return value if math.isfinite(value) else None
