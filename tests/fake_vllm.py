"""A stand-in for the parts of vLLM a custom proposer touches, to test the proposer without vLLM.

It mimics vLLM 0.32's V1 runner as seen from ``propose(sampled_token_ids, num_tokens_no_spec,
token_ids_cpu)``: a persistent batch of rows whose order changes (requests finish, arrive, move,
are preempted and resumed), chunked prefills (a partial chunk samples nothing), one logits row
per verified position computed through ``model.compute_logits`` in batch order, greedy
verification of each request's drafts, stale tokens left in ``token_ids_cpu`` past a row's
length, and a scheduler that may cut drafts. The model is a fixed random table: the logits after
a context depend on its last two tokens, so greedy text repeats and drafts get accepted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch


def fake_config(k: int = 4, max_model_len: int = 512, vocab: int = 40, rank: int = 0):
    return SimpleNamespace(
        speculative_config=SimpleNamespace(num_speculative_tokens=k),
        model_config=SimpleNamespace(max_model_len=max_model_len, get_vocab_size=lambda: vocab),
        parallel_config=SimpleNamespace(rank=rank))


class BigramModel:
    """logits(context) = table[context[-2], context[-1]]; ``compute_logits`` is what vLLM calls."""

    def __init__(self, vocab: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.vocab = vocab
        self.table = torch.randn(vocab, vocab, vocab, generator=g)

    def logits(self, context: list[int]) -> torch.Tensor:
        a = context[-2] if len(context) >= 2 else 0
        return self.table[a, context[-1]]

    def greedy(self, prompt: list[int], new_tokens: int) -> list[int]:
        seq = list(prompt)
        for _ in range(new_tokens):
            seq.append(int(self.logits(seq).argmax()))
        return seq[len(prompt):]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden  # the engine below passes logits as "hidden states"


@dataclass
class Request:
    rid: int
    prompt: list[int]
    max_new: int
    output: list[int] = field(default_factory=list)
    computed: int = 0                 # context tokens whose KV exists (prefill progress)
    drafts: list[int] = field(default_factory=list)

    @property
    def context(self) -> list[int]:
        return self.prompt + self.output

    @property
    def done(self) -> bool:
        return len(self.output) >= self.max_new


class FakeEngine:
    """Runs requests through ``proposer.propose`` the way vLLM's runner does (see module doc).

    ``log`` records, per step, every logits row as (fed token or None, top-k ids), so a test can
    rebuild the matrix the paper's update should give; ``accepted_log`` each row's sampled tokens
    with the token before them.
    """

    def __init__(self, proposer, model: BigramModel, max_reqs: int = 8, max_len: int = 512,
                 chunk: int | None = None, seed: int = 0):
        self.proposer, self.model = proposer, model
        self.max_reqs, self.max_len, self.chunk = max_reqs, max_len, chunk
        self.rng = np.random.default_rng(seed)
        self.token_ids = self.rng.integers(0, model.vocab, (max_reqs, max_len)).astype(np.int32)  # stale junk
        self.num_tokens = np.zeros(max_reqs, dtype=np.int32)
        self.running: list[Request] = []
        self.paused: list[Request] = []
        self.log: list[list[tuple[int | None, list[int]]]] = []
        self.accepted_log: list[list[tuple[int, list[int]]]] = []  # per step: (token before, sampled)
        self.draft_tokens = 0     # draft tokens verified (what vLLM counts as num_draft_tokens)
        self.accepted_tokens = 0  # ... of which accepted and returned (num_accepted_tokens)

    def add(self, req: Request) -> None:
        self.running.append(req)

    def preempt(self, req: Request) -> None:
        """vLLM frees the KV cache and drops the drafts; the request is recomputed on resume."""
        self.running.remove(req)
        req.computed, req.drafts = 0, []
        self.paused.append(req)

    def resume(self, req: Request) -> None:
        self.paused.remove(req)
        self.running.append(req)

    def step(self, shuffle: bool = False, cut_drafts: float = 0.0, skip_propose: bool = False) -> None:
        """One engine step. skip_propose: vLLM skips the proposer for a step when a request is
        within K tokens of max_model_len (``_input_fits_in_drafter``); the next step has no drafts."""
        batch = [r for r in self.running if not r.done]
        if shuffle:
            batch = [batch[i] for i in self.rng.permutation(len(batch))]
        assert len(batch) <= self.max_reqs
        rows, sampled, topk_log, accepted_log = [], [], [], []
        for b, req in enumerate(batch):
            ctx = req.context
            if req.computed < len(ctx) - 1:  # (chunked) prefill: one logits row, at the chunk's end
                end = len(ctx) if self.chunk is None else min(len(ctx), req.computed + self.chunk)
                req.computed = end
                row = self.model.logits(ctx[:end])
                rows.append(row)
                if end < len(ctx):  # partial chunk: its sample is discarded
                    sampled.append([])
                    topk_log.append((None, row))
                    continue
                topk_log.append((ctx[-1], row))
                tokens = [int(row.argmax())]
            else:
                drafts = req.drafts
                if cut_drafts and self.rng.random() < cut_drafts:
                    drafts = drafts[: int(self.rng.integers(0, len(drafts) + 1))]
                fed = [ctx[-1]] + drafts
                tokens = []
                for j, t in enumerate(fed):
                    row = self.model.logits(ctx + drafts[:j])
                    rows.append(row)
                    topk_log.append((t, row))
                for j in range(len(fed)):
                    best = int(rows[len(rows) - len(fed) + j].argmax())
                    tokens.append(best)
                    if j >= len(drafts) or drafts[j] != best:
                        break
                if drafts:
                    self.draft_tokens += len(drafts)
                    self.accepted_tokens += min(len(tokens), req.max_new - len(req.output)) - 1
            tokens = tokens[: req.max_new - len(req.output)]
            accepted_log.append((ctx[-1], list(tokens)))
            req.output.extend(tokens)
            req.computed = len(req.context) - 1  # the last sampled token is fed next step
            sampled.append(tokens)
        # vLLM computes all logits rows with one compute_logits call, then samples.
        if rows:
            self.model.compute_logits(torch.stack(rows))  # the proposer's hook (load_model) sees it
        k = self.proposer.options.topk
        self.log.append([(t, row.topk(k).indices.tolist()) for t, row in topk_log])
        self.accepted_log.append(accepted_log)
        for b, req in enumerate(batch):  # the persistent batch: row b holds req's tokens
            ctx = req.context
            self.token_ids[b, : len(ctx)] = ctx
            self.num_tokens[b] = len(ctx)
        if skip_propose:
            for req in batch:
                req.drafts = []
            self.running = [r for r in self.running if not r.done]
            return
        drafts = self.proposer.propose(sampled, self.num_tokens[: len(batch)].copy(), self.token_ids)
        assert len(drafts) == len(batch)
        for req, d, s in zip(batch, drafts, sampled):
            assert all(isinstance(t, int) and 0 <= t < self.model.vocab for t in d)
            assert len(d) <= self.proposer.num_speculative_tokens
            req.drafts = list(d) if s else []
        self.running = [r for r in self.running if not r.done]


def run_engine(engine: FakeEngine, max_steps: int = 500, **step_kwargs) -> None:
    steps = 0
    while engine.running and steps < max_steps:
        engine.step(**step_kwargs)
        steps += 1
    assert not engine.running, "requests did not finish"
