"""What drafting achieved: for the last generate() call (per step), or for a serving engine's proposer
so far (counters); steps, tokens, acceptance, and where accepted tokens came from: the adjacency
matrix (``from_matrix``), the context's n-gram chains (``from_ngram``) or the suffix memory of
earlier requests (``from_memory``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class GenerationStats:
    decoding: str = "greedy"           # "greedy" or "sample(...)" with the processors applied
    steps: int = 0                     # verification forwards (the prefill is not a step)
    new_tokens: int = 0                # tokens returned beyond the prompt
    accept_lengths: list[int] = field(default_factory=list)  # tokens emitted per step (accepted + bonus)
    node_matches: dict[str, int] = field(default_factory=dict)  # rank path "0,1" -> steps whose accepted path used it
    tree_nodes: list[int] = field(default_factory=list)      # nodes forwarded per step (root included)
    matrix_nodes: list[int] = field(default_factory=list)    # per step: of those, matrix-tree nodes (root included)
    chain_tokens: list[int] = field(default_factory=list)    # per step: of those, new n-gram chain nodes
    ngram_accepted: list[int] = field(default_factory=list)  # per step: accepted tokens from the context n-gram chains
    memory_accepted: list[int] = field(default_factory=list)  # per step: accepted tokens from suffix-memory chains
    match: list[int] = field(default_factory=list)           # per step (auto): matched suffix length, 0 = no match
    recent: list[int] = field(default_factory=list)          # per step (auto): 1 = that match was in the suffix memory
    expected: list[float] = field(default_factory=list)      # per step (auto): tokens the policy expected
    decision_seconds: float = 0.0      # auto: time spent choosing the drafts (all steps)
    from_matrix: int = 0               # accepted draft tokens that came from the adjacency matrix
    from_ngram: int = 0                # accepted draft tokens that came from the context n-gram chain
    from_memory: int = 0               # accepted draft tokens that came from the suffix memory (earlier requests)
    seconds: float = 0.0
    tree: str = ""                     # the tree in use at the end of the call
    tree_size: int = 0                 # its nodes under the root
    predicted_speedup: float | None = None  # auto: the last step's expected tokens/s vs one token/step
    measured_speedup: float | None = None   # auto: tokens/s vs the cost model's single-token step
    rows: list = field(default_factory=list)  # batch > 1: each row's own GenerationStats (this one sums them)
    # An engine that verifies one chain per request per step (the vLLM proposer, which runs for as long
    # as the server does) keeps only counters: the per-step lists above stay empty, ``steps`` counts
    # its drafting calls (one per engine step) and from_matrix / from_ngram / from_memory its accepted
    # draft tokens.
    drafts: int = 0                    # chains proposed (requests drafted for, summed over steps)
    ngram_drafts: int = 0              # ... of which led by a candidate (context n-gram or suffix memory)
    drafted_ngram: int = 0             # draft tokens proposed from context n-gram candidates
    drafted_memory: int = 0            # ... from suffix-memory candidates
    drafted_matrix: int = 0            # ... from the adjacency matrix
    verified: int = 0                  # chains whose outcome was seen (the request's next step)
    proposed_verified: int = 0         # draft tokens of those chains
    recycled_topk: int = 0             # matrix rows set from the model's top-k (the paper's update)
    recycled_accepted: int = 0         # matrix rows updated from produced tokens (no logits, or rows unmapped)
    unmapped_steps: int = 0            # steps whose logits rows could not be matched to the tokens fed
    states_rebuilt: int = 0            # request states built from their tokens (new, lost after a move, resumed)

    def record_step(self, path: list[int], draft) -> None:
        """One verification step: the accepted node indices (root first) and the Draft forwarded."""
        tree_nodes, tree_paths = draft.tree_nodes, draft.tree.paths
        chain_nodes = [node for node in path if node >= tree_nodes]
        from_memory = sum(1 for node in chain_nodes if draft.from_memory(node))
        from_ngram = len(chain_nodes) - from_memory
        self.steps += 1
        self.accept_lengths.append(len(path))
        self.tree_nodes.append(draft.size)
        self.matrix_nodes.append(tree_nodes)
        self.chain_tokens.append(draft.chain_tokens)
        self.ngram_accepted.append(from_ngram)
        self.memory_accepted.append(from_memory)
        self.from_matrix += len(path) - 1 - len(chain_nodes)
        self.from_ngram += from_ngram
        self.from_memory += from_memory
        plan = draft.plan
        if plan is not None:
            self.match.append(plan.match)
            self.recent.append(int(plan.recent))
            self.expected.append(round(plan.expected, 3))
            self.decision_seconds += plan.decision_seconds
        for node in path[1:]:
            if node < tree_nodes:
                key = ",".join(map(str, tree_paths[node - 1]))
                self.node_matches[key] = self.node_matches.get(key, 0) + 1

    def record_chain(self, proposed: int, accepted: int, from_ngram: int, memory: bool = False) -> None:
        """One verified chain: ``proposed`` draft tokens, the first ``accepted`` of them accepted, the
        first ``from_ngram`` of the chain from a candidate (``memory``: the suffix memory's, else a
        context n-gram's; the rest from the matrix)."""
        self.verified += 1
        self.proposed_verified += proposed
        ngram = min(accepted, from_ngram)
        if memory:
            self.from_memory += ngram
        else:
            self.from_ngram += ngram
        self.from_matrix += accepted - ngram

    @property
    def acceptance(self) -> float:
        """Accepted / proposed draft tokens (chains: over the verified ones; trees: every forwarded node
        but the roots)."""
        proposed = self.proposed_verified or sum(self.tree_nodes) - len(self.tree_nodes)
        return self.accepted_drafts / proposed if proposed else 0.0

    @property
    def accepted_drafts(self) -> int:
        """Accepted draft tokens from every source (bonus tokens not counted)."""
        return self.from_matrix + self.from_ngram + self.from_memory

    @property
    def mean_accepted(self) -> float:
        """Mean tokens emitted per step (the paper's MAT, bonus token included)."""
        return sum(self.accept_lengths) / len(self.accept_lengths) if self.accept_lengths else 0.0

    @property
    def accept_histogram(self) -> list[int]:
        hist = [0] * (max(self.accept_lengths, default=0) + 1)
        for n in self.accept_lengths:
            hist[n] += 1
        return hist

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(mean_accepted=self.mean_accepted, accept_histogram=self.accept_histogram,
                 tokens_per_second=self.tokens_per_second, acceptance=self.acceptance)
        return d

    def summary(self) -> str:
        return (f"{self.new_tokens} new tokens in {self.steps} steps, {self.mean_accepted:.2f} tokens/step, "
                f"{self.tokens_per_second:.1f} tokens/s, tree {self.tree}")
