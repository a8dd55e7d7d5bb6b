"""Drafting: what the model verifies at each step, and what drafting learns from each step.

The draft is the matrix tree (``build_draft_tree`` over the adjacency matrix) with candidate
continuations grafted under the root (``graft_chain``, once per candidate): the context's n-gram
continuations, and the suffix memory's (memory.SuffixMemory: earlier requests' prompts and
outputs). With a fixed tree it is that tree and the context's first candidate (else the memory's)
cut to ``ngram_tokens``; with tree="auto" a :class:`Policy` chooses, per step, the tree size and
each candidate's length (policy.py). A :class:`Drafter` owns what is shared by every request: the
adjacency matrix (recycled after every verification), the suffix memory, the tree choice and its
statistics. Drafting is host work: the matrix, the trees and the n-gram index
live on the CPU, and a draft is built there and sent to the model's device without waiting for it
(its host copy stays with it, ``Draft.host``), so a step reads nothing back for drafting
(step_sync.py). What belongs to one sequence (its n-gram index, how its last
continuation fared) lives in a :class:`DraftState`, one per request.

The same Drafter serves engines that verify one chain per request per step (the vLLM proposer):
``draft_chains`` / ``observe_chain`` / ``recycle`` beside ``draft`` / ``observe`` / ``recycle``, with
the same matrix, policy and statistics, and DraftStates found again by their tokens (``state_key``).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch

from . import distributed, ops
from .adjacency import AdjacencyMatrix
from .auto_tree import COST_SIZES, REMEASURE_SIZES, measure_cost, remeasure_cost
from .memory import MAX_MATCH, SuffixMemory, most_frequent
from .ngram import NgramIndex
from .policy import CANDIDATES, DEFAULT_CHAIN_PRICE, Plan, Policy, StepCost
from .tree import DraftTree, TreeSpec, make_tree


MAX_FORWARD_TOKENS = 512  # a batch's cost curve is timed up to this many tokens per forward (rows x nodes)
DEFAULT_MEMORY_TOKENS = 262144  # the suffix memory's default capacity (ngram_history): about 4 MB


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
    plan: Plan | None = None  # tree="auto": the step's choice and what it rested on
    host: "Draft | None" = None  # the same draft on the CPU, when this one lives on a device
    chain_sources: tuple = ()  # per grafted chain: (nodes after its graft, it came from the suffix memory)

    @property
    def on_host(self) -> "Draft":
        """This draft's tensors on the CPU (itself when it is there)."""
        return self.host if self.host is not None else self

    @property
    def size(self) -> int:
        return self.tokens.shape[1]

    @property
    def tree_nodes(self) -> int:
        """Nodes of the matrix tree in this draft, root included (the rest came from the n-gram chain)."""
        return min(self.tree.num_nodes, self.size)

    @property
    def chain_tokens(self) -> int:
        """N-gram tokens forwarded as new nodes (not merged into the matrix tree)."""
        return self.size - self.tree_nodes

    def from_memory(self, node: int) -> bool:
        """Whether chain node ``node`` (>= tree_nodes) was added by a suffix-memory chain (a chain
        token merged into an earlier node counts as that node's)."""
        for end, memory in self.chain_sources:
            if node < end:
                return memory
        return False

    def truncate(self, n: int) -> "Draft":
        """The first n nodes (breadth-first order within the tree and chain, so still a tree)."""
        return replace(self, tokens=self.tokens[:, :n], parents=self.parents[:n], depths=self.depths[:n],
                       mask=self.mask[:n, :n], host=self.host.truncate(n) if self.host is not None else None)

    def to(self, device: torch.device) -> "Draft":
        """This host draft on ``device``: pinned copies, sent without waiting for the device."""
        if device.type == "cpu":
            return self
        send = lambda t: t.contiguous().pin_memory().to(device, non_blocking=True)  # noqa: E731
        return replace(self, tokens=send(self.tokens), parents=send(self.parents), depths=send(self.depths),
                       mask=send(self.mask), host=self)


class DraftState:
    """Per-request drafting state: the n-gram index over this sequence's tokens (None without
    n-grams), and how many tokens of the last step's first candidate the model produced (``run``).
    Earlier requests are the Drafter's suffix memory, shared, not part of this state."""

    def __init__(self, seq: torch.Tensor, capacity: int, max_ngram: int | None):
        self.max_ngram = max_ngram
        self.index = self._new_index(seq, capacity) if max_ngram else None
        self.run = 0

    def _new_index(self, seq, capacity: int) -> NgramIndex:
        index = NgramIndex(1, max(capacity, seq.shape[1] + 1), self.max_ngram)
        index.extend(seq)
        return index

    def tail(self, n: int) -> np.ndarray:
        """The last ``n`` tokens of the indexed sequence (fewer when it is shorter), int64."""
        length = int(self.index.lengths[0])
        return self.index.history[0, max(0, length - n): length].numpy()

    def accept(self, seq: torch.Tensor, emitted: int, host_tokens: torch.Tensor | None = None) -> None:
        """The sequence grew by its last ``emitted`` tokens (``host_tokens``: those tokens on the host)."""
        if self.index is None or emitted == 0:
            return
        if self.index.lengths[0] + emitted > self.index.capacity:  # ran past the planned length
            self.index = self._new_index(seq, 2 * self.index.capacity)
        else:
            new = host_tokens[:emitted].view(1, -1) if host_tokens is not None else seq[:, seq.shape[1] - emitted:]
            self.index.extend(new)

    # ------------------------------------------------------------------ a request known by its tokens
    # An engine that hands the drafter token rows and no request ids (vLLM) keeps its states here too:
    # built from the tokens (from_tokens), found again by content (state_key, matches), moved on by
    # the tokens accepted since (advance), its index bounded to a window. The chain-only drafting
    # (Drafter.draft_chains) records what it proposed in ``drafts``, ``from_ngram``, ``root`` and
    # ``plan``, which the next step's Drafter.observe_chain scores.
    offset = 0                    # tokens of the sequence before the index (the window's start)
    window: int | None = None     # from_tokens: the index covers at most this many tokens
    root = -1                     # the sequence's last token when the chain was drafted
    from_ngram = 0                # how many of ``drafts`` (a prefix) came from a candidate
    from_memory = False           # ... and that candidate came from the suffix memory
    plan: Plan | None = None      # the policy's choice behind ``drafts`` (None: no policy or no budget)

    @classmethod
    def from_tokens(cls, tokens: np.ndarray, length: int, max_ngram: int, window: int) -> "DraftState":
        """The state of a sequence ``tokens[:length]`` (a host array); its n-gram index covers the last
        ``window`` tokens at most (then restarts from the last ``window // 2``), so its memory is
        bounded: about ``max_ngram * 2 * window * 24`` bytes (0.8 MB for 4 and 4096)."""
        if window < 64:
            raise ValueError(f"window must be >= 64, got {window}")
        state = cls(torch.zeros(1, 0, dtype=torch.long), 1, None)
        state.max_ngram, state.window = max_ngram, window
        state.drafts = []  # proposed at the last step, after ``length`` tokens
        state._index_tail(tokens, length)
        return state

    @property
    def length(self) -> int:
        """Tokens of the sequence indexed so far (absolute: the window's start included)."""
        return self.offset + int(self.index.lengths[0])

    def matches(self, tokens: np.ndarray, length: int) -> bool:
        """Whether this state indexes exactly ``tokens[:length]`` (its window of it)."""
        if self.index is None or length != self.length:
            return False
        held = self.index.history[0, : length - self.offset].numpy()
        return bool(np.array_equal(held, tokens[self.offset:length]))

    def advance(self, tokens: np.ndarray, length: int) -> None:
        """Index ``tokens[self.length:length]``, the tokens accepted since the last step (from_tokens states)."""
        old = self.length
        if length < old:
            raise ValueError(f"a sequence cannot shrink: {old} -> {length} tokens")
        if length == old:
            return
        if length - self.offset > self.index.capacity:
            self._index_tail(tokens, length)
            return
        new = torch.from_numpy(np.ascontiguousarray(tokens[old:length], dtype=np.int64)).view(1, -1)
        self.index.extend(new)

    @property
    def nbytes(self) -> int:
        """Memory of the n-gram index."""
        return (self.index.table.numel() + self.index.history.numel()) * 8 if self.index is not None else 0

    def _index_tail(self, tokens: np.ndarray, length: int) -> None:
        keep = length if length <= self.window else self.window // 2
        self.offset = length - keep
        cap = 64
        while cap < 2 * keep:
            cap *= 2
        self.index = NgramIndex(1, max(keep, min(cap, self.window)), self.max_ngram)
        if keep:
            tail = np.ascontiguousarray(tokens[self.offset:length], dtype=np.int64)
            self.index.extend(torch.from_numpy(tail).view(1, -1))


KEY_TAIL = 8  # tokens of the end of the sequence in a state's key (matches() checks all of them anyway)


def state_key(tokens: np.ndarray, length: int) -> tuple:
    """The key a content-found state is stored under when its sequence is ``tokens[:length]``: an
    engine that does not say which request sits in which row stores each state under the length it
    was drafted at and finds it next step under ``length - len(sampled)``, then checks it (matches)."""
    return (length, tokens[max(0, length - KEY_TAIL):length].tobytes())


class Drafter:
    """The adjacency matrix, the suffix memory, the tree template (fixed or auto) and the n-gram settings.

    Args mirror :class:`TokenRecycler`'s: ``tree`` ("auto", a preset, rank paths or a DraftTree),
    ``topk``, ``ngram`` / ``max_ngram`` / ``ngram_tokens`` / ``ngram_history`` (the suffix memory's
    capacity in tokens; 0, or ``ngram=False``, keeps no memory).
    """

    def __init__(self, vocab_size: int, device: torch.device, tree: TreeSpec = "auto", topk: int = 8, *,
                 ngram: bool = True, max_ngram: int = 4, ngram_tokens: int = 10,
                 ngram_history: int = DEFAULT_MEMORY_TOKENS):
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        if ngram and (max_ngram < 1 or ngram_tokens < 1):
            raise ValueError(f"max_ngram and ngram_tokens must be >= 1, got {max_ngram}, {ngram_tokens}")
        self.device = device  # the model's: where drafts go
        self.host = torch.device("cpu")  # where drafting happens (module doc)
        self.topk = topk
        self.matrix = AdjacencyMatrix(vocab_size, topk, self.host)
        self.tree_spec = tree
        self.ngram, self.max_ngram, self.ngram_tokens = ngram, max_ngram, ngram_tokens
        if not isinstance(ngram_history, int) or isinstance(ngram_history, bool) or ngram_history < 0:
            raise ValueError(f"ngram_history (the suffix memory's capacity in tokens) must be an int >= 0, "
                             f"got {ngram_history!r}")
        self.memory = SuffixMemory(ngram_history if ngram else 0)  # earlier requests (memory.py)
        self.policy: Policy | None = None
        if isinstance(tree, str) and tree == "auto":
            self.policy = Policy(topk, max_chain=ngram_tokens if ngram else 0, max_ngram=max_ngram)
            self.tree = make_tree(self.policy.auto.choose(1), topk)
        else:
            self.tree = make_tree(tree, topk)
        self._trees: dict[tuple, DraftTree] = {}  # auto: trees by rank paths (a few sizes recur)

    auto = property(lambda self: self.policy.auto if self.policy else None, doc="the AutoTree statistics (auto)")

    # ------------------------------------------------------------------ per request
    def start(self, seq: torch.Tensor, capacity: int) -> DraftState:
        return DraftState(seq, capacity, self.max_ngram if self.ngram else None)

    def finish(self, generated: torch.Tensor, prompt: torch.Tensor | None = None) -> None:
        """A request ended: its prompt (when given) and generated tokens join the suffix memory,
        as one sequence, for later requests to draft from."""
        if prompt is not None:
            generated = torch.cat([prompt.detach().reshape(-1).cpu(), generated.detach().reshape(-1).cpu()])
        self.memory.add(generated)

    def draft(self, state: DraftState, root: torch.Tensor, cost: StepCost | None = None) -> Draft:
        """The matrix tree under ``root`` [1] (a host tensor), with n-gram continuations grafted under
        the root (merged with matching tree nodes): the fixed tree and one chain, or the policy's
        choice against ``cost`` (the step-cost curve of the batch size; default the policy's own).
        Built on the host, returned on the model's device (its host copy in ``.host``)."""
        return self.draft_rows([state], [root], cost)[0]

    def draft_rows(self, states: list[DraftState], roots: list[torch.Tensor],
                   cost: StepCost | None = None) -> list[Draft]:
        """One draft per row, forwarded together. With the policy the plans are chosen together
        (Policy.decide_rows) against ``cost``, the curve of a forward of ``len(states)`` rows: one
        size for the batch, roots alone where drafting does not pay (a wide batch on a compute-bound
        device then runs as batched greedy does)."""
        if self.policy is None:
            drafts = []
            for state, root in zip(states, roots):
                chains = self._fixed_chains(state)
                drafts.append(self._build(root, self.tree, [c for c, _ in chains], None,
                                          [m for _, m in chains]).to(self.device))
            return drafts
        plans = self.policy.decide_rows([(self._candidates(state), state.run) for state in states], cost)
        drafts = []
        for plan, root in zip(plans, roots):
            self.tree = self._tree_of(self.policy.tree_paths(plan.tree_nodes))
            drafts.append(self._build(root, self.tree, plan.chains, plan, plan.memory).to(self.device))
        return drafts

    def _build(self, root: torch.Tensor, tree: DraftTree, chains: list[list[int]], plan: Plan | None = None,
               memory: list[bool] | None = None) -> Draft:
        """``memory[i]``: chain i came from the suffix memory (the draft keeps which nodes did)."""
        tokens = ops.build_draft_tree(self.matrix.table, root.to(self.host), tree.parents, tree.ranks)
        memory = list(memory or []) + [False] * (len(chains) - len(memory or []))
        grafts = [(c, m) for c, m in zip(chains, memory) if c]
        if not grafts:
            return Draft(tokens, tree.parents, tree.depths, tree.mask, tree, plan)
        out, parents = tokens, tree.parents
        sources = []
        for chain, from_memory in grafts:  # each graft appends the chain's new nodes after the nodes so far
            c = torch.tensor([chain], dtype=torch.long)
            out, parents, depths, mask, num = ops.graft_chain(out, parents, c, torch.tensor([len(chain)]))
            m = int(num[0])
            out, parents, depths, mask = out[:, :m], parents[0, :m], depths[0, :m], mask[0, :m, :m]
            sources.append((m, from_memory))
        return Draft(out, parents, depths, mask, tree, plan, chain_sources=tuple(sources))

    def _fixed_chains(self, state: DraftState) -> list[tuple[list[int], bool]]:
        """A fixed tree's chain: the context's first candidate, else the suffix memory's, as
        [(tokens, from the memory)] (empty: neither matched)."""
        if state.index is None:
            return []
        chain, count = state.index.lookup(self.ngram_tokens)
        if int(count[0]):
            return [(chain[0, : int(count[0])].tolist(), False)]
        found = self._memory_candidate(state)
        return [(found[0], True)] if found else []

    def _memory_candidate(self, state: DraftState) -> tuple[list[int], int, bool, int] | None:
        """The suffix memory's continuation of the sequence: (tokens, match length, True, support)."""
        if state.index is None or not len(self.memory):
            return None
        found = self.memory.lookup(state.tail(MAX_MATCH), self.ngram_tokens)
        return (found.tokens, found.match, True, found.support) if found is not None else None

    def _candidates(self, state: DraftState) -> list[tuple]:
        """[(continuation, matched suffix length, from the suffix memory, support, occurrences)]: the
        context's n-gram candidates best first, each with how often its matched suffix occurred in
        the context and how often its first token followed (its agreement), then the suffix
        memory's (policy.Policy orders them). Where the most recent occurrence of the match went on
        as fewer than half of them did and another way was more frequent, the first candidate is
        instead the most recent occurrence of the most frequent way, and the most recent one comes
        second."""
        if state.index is None or not self.policy.max_chain:
            return []
        index = state.index
        tokens, count, ngram, start = ops.ngram_candidates(index.table, index.history, index.lengths,
                                                           index.max_ngram, self.ngram_tokens, CANDIDATES)
        counts, ngrams, starts = count[0].tolist(), ngram[0].tolist(), start[0].tolist()
        length = int(index.lengths[0])
        history = index.history[0].numpy()
        found = []
        for j in range(CANDIDATES):
            if not counts[j]:
                continue
            n = ngrams[j]
            occurrences = index.occurrences(n)
            after = history[occurrences + n]  # the token after each occurrence
            first = int(tokens[0, j, 0])
            support = int((after == first).sum())
            if j == 0 and 2 * support < after.size:
                majority = self._majority(history, occurrences, after, n, support, length)
                if majority is not None:  # it goes first, the most recent occurrence's way second
                    found += [majority, (self._continuation(history, starts[0], counts[0], length), n, False,
                                         support, int(after.size))]
                    break
            found.append((self._continuation(history, starts[j], counts[j], length), n, False, support,
                          int(after.size)))
        memory = self._memory_candidate(state)
        if memory is not None:
            found.append(memory)
        return found

    def _majority(self, history: np.ndarray, occurrences: np.ndarray, after: np.ndarray, n: int, support: int,
                  length: int) -> tuple | None:
        """The candidate of the way the most occurrences of the match went on, when more did than
        went on as the most recent one (``support``): from its most recent occurrence (among equally
        frequent ways, the one seen last). None: no way was more frequent."""
        token, count = most_frequent(after)
        if count <= support:
            return None
        begin = int(occurrences[after == token][-1]) + n
        cont = self._continuation(history, begin, min(self.ngram_tokens, length - begin), length)
        return cont, n, False, count, int(after.size)

    def _continuation(self, history: np.ndarray, begin: int, count: int, length: int) -> list[int]:
        """The ``count`` tokens of ``history`` from ``begin`` (an n-gram match's continuation)."""
        cont = history[begin: begin + count].tolist()
        if begin + count == length and count < self.ngram_tokens:
            # The match ends count tokens before the context does, so copying from it goes on into
            # the tokens it predicts: the continuation repeats with that period (a loop, a list, a
            # table). Cut at the context's end, it would draft less than a copy can give.
            cont = [cont[i % count] for i in range(self.ngram_tokens)]
        return cont

    def _tree_of(self, paths: list[list[int]]) -> DraftTree:
        key = tuple(map(tuple, paths))
        tree = self._trees.get(key)
        if tree is None:
            if len(self._trees) > 256:
                self._trees.clear()
            tree = self._trees[key] = make_tree(paths, self.topk)
        return tree

    # ------------------------------------------------------------------ learning from a step
    def observe(self, state: DraftState, draft: Draft, path: torch.Tensor, new_tokens: torch.Tensor) -> None:
        """Before recycling: the matrix statistics score every candidate node against the accepted
        tokens (using the draft-time matrix rows of the accepted path); the chain statistics score
        every n-gram candidate, drafted or not. ``path`` and ``new_tokens``: host tensors."""
        if self.policy is None:
            return
        actual = new_tokens.cpu()
        rows = self.matrix.table[draft.on_host.tokens[0, path.cpu()]]
        self.policy.auto.score_nodes(rows.numpy(), actual.numpy())
        if draft.plan is not None:
            state.run = self.policy.score_plan(draft.plan, actual.tolist())
            self.policy.record_outcome(draft.plan, actual.tolist())

    def recycle(self, tokens: torch.Tensor, candidates: torch.Tensor) -> None:
        """Every forwarded token's row := the model's top-k after it (host tensors; device ones are
        copied, which waits for the device: the decode loop passes its step sync's copies)."""
        ops.update_adjacency(self.matrix.table, tokens.to(self.host), candidates.to(self.host))

    def step_done(self, seconds: float, forward_seconds: float, forwarded: int, cost: StepCost | None = None) -> None:
        """After a step: its wall time and its forward's, which forwarded ``forwarded`` nodes per row
        (they feed ``cost``, the curve of the step's batch size; default the policy's own)."""
        if self.policy is None:
            return
        seconds, forward_seconds = distributed.agree([seconds, forward_seconds])  # the same on every rank
        (cost or self.policy.cost).record_step(forwarded, forward_seconds, seconds)

    # ------------------------------------------------------------------ the cost curve
    def tune(self, time_forward: Callable[[int], None], prefix: int, capacity: int | None,
             cost: StepCost | None = None, rows: int = 1) -> None:
        """Measure the forward cost curve ``cost`` (default the policy's own; ``time_forward(n)``: one
        verification-shaped forward of n tokens for each of ``rows`` rows, cache restored) when none is
        measured yet or the context outgrew it. Needs room for 3+ sizes in a static cache. A batch
        times sizes up to MAX_FORWARD_TOKENS tokens in all (past them the last slope goes on)."""
        if self.policy is None:
            return
        cost = cost or self.policy.cost
        if not cost.needs_measuring(prefix):
            return
        def fits(n: int) -> bool:
            return (capacity is None or prefix + n <= capacity) and (n * rows <= MAX_FORWARD_TOKENS or n <= 4)

        if cost.measured:  # the context outgrew the curve: a few sizes rescale it
            sizes = [n for n in REMEASURE_SIZES if fits(n)]
            if not sizes:  # the static cache is all but full
                return
            curve = remeasure_cost(time_forward, cost.curve, sizes=sizes, context=prefix)
        else:
            sizes = [n for n in COST_SIZES if fits(n)]
            if len(sizes) < 3:  # measured on a later call with more room
                return
            curve = measure_cost(time_forward, sizes=sizes, context=prefix)
        curve.seconds = distributed.agree(curve.seconds)  # decisions must match on every rank
        cost.set_curve(curve)

    # ------------------------------------------------------------------ state
    def describe(self) -> str:
        if self.policy is not None:
            return (f"tree='auto': per-step policy (last step: {self.tree.num_nodes - 1} tree nodes), k={self.topk}, "
                    + (f"ngram<={self.max_ngram}, up to {CANDIDATES}x{self.ngram_tokens} chain tokens"
                       if self.ngram else "no ngram"))
        ngram = f"ngram<={self.max_ngram}->{self.ngram_tokens}" if self.ngram else "no ngram"
        return f"tree={self.tree_spec!r}: {self.tree.num_nodes - 1} nodes, k={self.topk}, {ngram}"

    def reset(self) -> None:
        """Cold start: forget what the matrix (and the policy's statistics, the suffix memory) learned."""
        self.matrix.reset()
        self.memory.reset()
        if self.policy is not None:
            cost = self.policy.cost
            self.policy = Policy(self.topk, max_chain=self.policy.max_chain, max_ngram=self.max_ngram)
            self.policy.cost = cost  # the hardware did not change
            self.tree = make_tree(self.policy.auto.choose(1), self.topk)

    def extra_state(self) -> dict:
        """What save() stores beside the matrix: the tree (and the policy's statistics)."""
        extra = {"tree": [list(p) for p in self.tree.paths]}
        if self.policy is not None:
            extra["auto"] = self.policy.state()
        return extra

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        """What save() stores beside the matrix as tensors: the suffix memory (memory.SuffixMemory)."""
        return self.memory.state_tensors()

    def load_extra_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """The suffix memory saved by :meth:`extra_tensors` (a file without one leaves it as it is)."""
        if tensors:
            self.memory.load_state_tensors(tensors)

    def load_extra_state(self, extra: dict) -> None:
        if self.policy is not None and extra.get("auto"):
            self.policy.load_state(extra["auto"])
            saved = extra.get("tree")  # [] is a choice too: the last step drafted no matrix tree
            self.tree = make_tree([list(p) for p in saved] if saved is not None else self.policy.auto.choose(1),
                                  self.topk)

    def predicted_speedup(self) -> float | None:
        return self.policy.predicted_speedup() if self.policy is not None else None

    def single_step_seconds(self) -> float | None:
        """The cost model's time of a plain one-token step (auto, once measured)."""
        if self.policy is None or not self.policy.cost.measured:
            return None
        value = float(self.policy.cost(1))
        return value if math.isfinite(value) else None

    # ------------------------------------------------------------------ chain-only configuration
    # An engine that verifies one chain per request per step (vLLM's rejection sampler) drafts
    # through these, with the same matrix, the same Policy and its statistics as the tree drafting
    # above: start_from_tokens / draft_chains / observe_chain / recycle (or learn_accepted).

    def start_from_tokens(self, tokens, length: int, window: int) -> DraftState:
        """A request known only by its tokens ``tokens[:length]`` (a host array), its n-gram index
        bounded to ``window`` tokens (DraftState.from_tokens)."""
        return DraftState.from_tokens(tokens, length, self.max_ngram if self.ngram else 1, window)

    def draft_chain(self, state: DraftState, root: int, budget: int, price: float | None = None) -> list[int]:
        """One request's chain: :meth:`draft_chains` for one."""
        return self.draft_chains([state], [root], [budget], price)[0]

    def draft_chains(self, states: list[DraftState], roots: list[int], budgets: list[int],
                     price: float | None = None) -> list[list[int]]:
        """A chain of at most ``budgets[i]`` tokens after each sequence (``roots[i]``: its last token):
        an n-gram candidate's first tokens, continued by the matrix's top-1 path from its last token
        (from the root without one), cut where that path reaches a row nothing was recycled into.
        How many of each comes from the policy (Policy.decide_chain: its chain statistics by match
        length, run and source, the matrix chain's rates) and ``price``, what one more drafted token
        costs in expected tokens (policy.BatchStepCost.price; None: DEFAULT_CHAIN_PRICE). Without a
        policy (a fixed tree): the whole first candidate, then the matrix path. All paths come from
        one ``build_draft_tree`` call. Each state keeps its draft for :meth:`observe_chain`."""
        price = DEFAULT_CHAIN_PRICE if price is None else float(price)
        # The batch's decisions share the chain statistics' curves (nothing is scored between them).
        with self.policy.chain.memoized() if self.policy is not None else nullcontext():
            return self._draft_chains(states, roots, budgets, price)

    def _draft_chains(self, states: list[DraftState], roots: list[int], budgets: list[int],
                      price: float) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in states]
        pending: list[tuple[int, list[int], int, int]] = []  # (i, n-gram tokens, matrix tokens, path root)
        for i, (state, root, budget) in enumerate(zip(states, roots, budgets)):
            state.root, state.drafts, state.from_ngram, state.plan = int(root), [], 0, None
            state.from_memory = False
            if budget <= 0:
                continue
            if self.policy is None:
                fixed = self._fixed_chains(state) if self.ngram else []
                chain = fixed[0][0][:budget] if fixed else []
                state.from_memory = bool(fixed and fixed[0][1])
                tail = budget - len(chain)
            else:
                state.plan = self.policy.decide_chain(self._candidates(state) if self.ngram else [], state.run,
                                                      budget, price)
                chain = state.plan.chains[0] if state.plan.chains else []
                state.from_memory = bool(state.plan.chains and state.plan.memory and state.plan.memory[0])
                tail = state.plan.tree_nodes
            pending.append((i, chain, tail, chain[-1] if chain else int(root)))
        depth = max((tail for _, _, tail, _ in pending), default=0)
        tails: dict[int, list[int]] = {}
        walk = [(i, tail, at) for i, _, tail, at in pending if tail > 0]
        if walk:
            table = self.matrix.table
            parents = torch.arange(-1, depth, dtype=torch.int32)
            ranks = torch.zeros(depth + 1, dtype=torch.int32)
            roots_t = torch.tensor([at for _, _, at in walk], dtype=torch.long)
            paths = ops.build_draft_tree(table, roots_t, parents, ranks)  # [R, depth + 1]: the top-1 paths
            filled = (table[paths[:, :-1]] != 0).any(-1)  # the row each next token came from was recycled
            usable = filled.to(torch.int32).cumprod(dim=1).sum(dim=1).tolist()
            for (i, tail, _), path, ok in zip(walk, paths[:, 1:].tolist(), usable):
                tails[i] = path[: min(tail, ok)]
        for i, chain, _, _ in pending:
            draft = chain + tails.get(i, [])
            states[i].drafts, states[i].from_ngram = draft, len(chain)
            out[i] = draft
        return out

    def observe_chain(self, state: DraftState, produced: list[int]) -> None:
        """The chain twin of :meth:`observe`, before recycling: ``produced`` are the tokens the model
        gave after the state's last draft (its accepted prefix, then the bonus token). The matrix
        statistics score every candidate node from the draft's root (draft-time rows of the produced
        path), the chain statistics every n-gram candidate of the plan, drafted or not."""
        if self.policy is None or state.root < 0 or not produced:
            return
        path = [state.root] + [int(t) for t in produced[:-1]]
        rows = self.matrix.table[torch.tensor(path, dtype=torch.long)]
        self.policy.auto.score_nodes(rows.numpy(), np.asarray(produced, dtype=np.int64))
        if state.plan is not None:
            state.run = self.policy.score_plan(state.plan, [int(t) for t in produced])

    def learn_accepted(self, prev: torch.Tensor, nxt: torch.Tensor) -> None:
        """Recycling without logits: row ``prev[i]`` gets ``nxt[i]`` as rank 0, its other candidates
        shifted down (``nxt[i]`` removed from where it was). Pairs are (token, the token that followed
        it), both produced by the model; every pair reads the rows as they were before the update."""
        if prev.numel() == 0:
            return
        table = self.matrix.table
        prev = prev.to(torch.long).view(-1)
        old = table[prev].to(torch.long)                       # [T, k]
        nxt = nxt.to(torch.long).view(-1, 1)
        moved = (old == nxt).to(torch.int8)                    # the entry that becomes rank 0
        order = torch.argsort(moved, dim=1, stable=True)       # the others first, in their order
        rest = torch.gather(old, 1, order)[:, : table.shape[1] - 1]
        rows = torch.cat([nxt, rest], dim=1)
        ops.update_adjacency(table, prev.view(1, -1), rows.view(1, prev.numel(), -1).to(table.dtype))
