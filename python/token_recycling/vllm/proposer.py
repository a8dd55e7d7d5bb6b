"""TokenRecyclingProposer: Token Recycling drafts for vLLM's speculative decoding.

The proposer is the chain-only configuration of the library's :class:`~token_recycling.draft.Drafter`
(the same class the HF loop drafts with): vLLM verifies one chain per request per step, so each step
it asks ``Drafter.draft_chains`` for every request's chain: an n-gram candidate of the request's
context continued by the matrix's top-1 path (cut where it reaches a row nothing was recycled into),
its lengths chosen per request and per step by the drafter's :class:`~token_recycling.policy.Policy`
from the same chain statistics (by match length, run and source) and matrix statistics the HF loop
keeps. Next step it scores what each draft got right into those statistics (``observe_chain``) and
recycles the verified positions' top-k into the matrix (``Drafter.recycle``; recycle.py says where
the logits come from). A matrix saved by either engine, with its policy statistics, warms the other.

Cost. vLLM gives a proposer no forward times, so the price of a drafted token comes from the wall
time between propose() calls against the tokens each step forwarded (policy.BatchStepCost: fitted
from steps that forwarded decode rows only; before that, a documented flat default).

One matrix serves every request of the engine (hot across requests and users). Per-request state
(a content-found ``DraftState``) is bounded and rebuilt from the tokens whenever it is missing, so
preemption, resumption and row moves are safe. Statistics: a ``GenerationStats`` (counters only).
"""

from __future__ import annotations

import atexit
import copy
import os
import tempfile
import time
import weakref
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from ..adjacency import AdjacencyMatrix
from ..draft import DraftState, Drafter, state_key
from ..policy import BatchStepCost
from ..stats import GenerationStats
from .options import ProposerOptions
from .recycle import TopkCapture

NGRAM_TOKENS = 10  # the HF loop's default chain length: its saved chain statistics then fit ours


@dataclass
class _Row:
    """One batch row in one step."""
    state: DraftState | None
    tokens: np.ndarray | None      # the row of token_ids_cpu
    length: int = 0                # tokens after this step's sampled ones
    before: int = 0                # tokens before them
    fed: list[int] | None = None   # the tokens whose logits rows this step computed (None: unknown)
    logit_rows: int | None = 1     # how many logits rows this row has (None: unknown)
    decoded: bool = False          # a request we drafted for last step, found again: its forward is known


class TokenRecyclingProposer:
    """vLLM custom proposer: ``speculative_config={"method": "custom_class", "model":
    "token_recycling.vllm.TokenRecyclingProposer", "num_speculative_tokens": K}``.

    Built by vLLM with its ``VllmConfig`` (only ``speculative_config.num_speculative_tokens``,
    ``model_config.max_model_len``, ``model_config.get_vocab_size()`` and ``parallel_config.rank``
    are read); settings of our own come from environment variables (see options.py).
    """

    def __init__(self, vllm_config, options: ProposerOptions | None = None):
        spec = getattr(vllm_config, "speculative_config", None)
        if spec is None or not getattr(spec, "num_speculative_tokens", None):
            raise ValueError("TokenRecyclingProposer needs speculative_config.num_speculative_tokens >= 1")
        self.num_speculative_tokens = int(spec.num_speculative_tokens)
        self.max_model_len = int(vllm_config.model_config.max_model_len)
        self.vocab_size = int(vllm_config.model_config.get_vocab_size())
        self.options = options if options is not None else ProposerOptions.from_env()
        opts = self.options
        self.drafter = Drafter(self.vocab_size, torch.device("cpu"), "auto", opts.topk, max_ngram=opts.max_ngram,
                               ngram_tokens=max(NGRAM_TOKENS, self.num_speculative_tokens), ngram_history=0)
        self.cost = BatchStepCost()
        self._states: dict[tuple, DraftState] = {}
        self._capture: TopkCapture | None = None
        self._warm = False  # captures before the first propose() are warm-up forwards
        self._last_call: float | None = None
        self.stats = GenerationStats(decoding="vllm", tree="chain")
        parallel = getattr(vllm_config, "parallel_config", None)
        self._saves = getattr(parallel, "rank", 0) == 0  # one writer under tensor/pipeline parallelism
        self._last_save = time.monotonic()
        path = opts.matrix_path
        if path and os.path.isfile(path):
            self.load(path)
        if path and self._saves:
            ref = weakref.ref(self)
            atexit.register(lambda: ref() is not None and ref().save(path))

    matrix = property(lambda self: self.drafter.matrix, doc="the AdjacencyMatrix (the drafter's)")

    # ----------------------------------------------------------------------- vLLM's interface
    def load_model(self, model=None, *args, **kwargs) -> None:
        """vLLM passes the target model: hook its logits for top-k recycling (recycle.py)."""
        if self.options.recycle == "topk":
            self._capture = TopkCapture.install(model, self.options.topk, self.vocab_size)

    def propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec: np.ndarray,
                token_ids_cpu: np.ndarray, slot_mappings=None) -> list[list[int]]:
        """Drafts for every request in the batch (``[]`` where none), after scoring and recycling what
        the last step verified. ``sampled_token_ids[i]``: the tokens row i produced this step (its
        accepted drafts and the bonus token; empty for a partial prefill);
        ``token_ids_cpu[i, :num_tokens_no_spec[i]]``: its whole context, those tokens included."""
        now = time.perf_counter()
        self.stats.steps += 1
        captured = self._capture.take() if self._capture is not None else []
        first, self._warm = not self._warm, True
        keys = [state_key(token_ids_cpu[i], int(num_tokens_no_spec[i]) - len(sampled)) if sampled else None
                for i, sampled in enumerate(sampled_token_ids)]
        twins = {key for key, n in Counter(keys).items() if key is not None and n > 1 and key in self._states}
        copies = {key: copy.deepcopy(self._states[key]) for key in twins}  # rows with identical tokens (n > 1)
        rows = [self._claim(i, sampled, num_tokens_no_spec, token_ids_cpu, key, copies)
                for i, (sampled, key) in enumerate(zip(sampled_token_ids, keys))]
        self._states = {}  # unclaimed states (finished, preempted, unscheduled requests) go here
        if rows and all(r.decoded for r in rows) and self._last_call is not None:  # the step forwarded decodes only
            self.cost.record_step(sum(r.logit_rows for r in rows), sum(map(len, sampled_token_ids)), now - self._last_call)
        self._last_call = now
        if not first:  # captures before the first call may come from vLLM's warm-up forwards
            self._recycle(rows, captured)
        drafts = self._draft(rows)
        self._maybe_save()
        return drafts

    # ----------------------------------------------------------------------- per step
    def _claim(self, i: int, sampled: list[int], num_tokens: np.ndarray, token_ids: np.ndarray, key,
               copies: dict) -> _Row:
        """Find row i's state from the last step (or build one), score its last draft, and note what
        this step fed for it."""
        if not sampled:  # a partial prefill: one logits row, discarded; nothing to draft yet
            return _Row(None, None)
        tokens = token_ids[i]
        length = int(num_tokens[i])
        before = length - len(sampled)
        row = _Row(None, tokens, length, before)
        state = self._states.pop(key, None)
        if state is None and key in copies:  # a second row with the same tokens: the same draft was fed
            state = copy.deepcopy(copies[key])
        produced = [int(t) for t in sampled]
        if state is not None and state.matches(tokens, before) and produced[:-1] == state.drafts[:len(produced) - 1]:
            row.fed = [int(tokens[before - 1])] + state.drafts
            row.logit_rows, row.decoded = len(row.fed), True
            if state.drafts:
                self.stats.record_chain(len(state.drafts), len(produced) - 1, state.from_ngram)
            self.drafter.observe_chain(state, produced)  # the matrix is still the one drafted from
            state.advance(tokens, length)
        else:
            # A request new to us: its prefill (one logits row, at the last prompt token), or one
            # whose state was lost (its drafts unknown: the step's rows cannot be mapped).
            if len(sampled) == 1 and before >= 1:
                row.fed = [int(tokens[before - 1])]
            else:
                row.fed, row.logit_rows = None, None
            state = self.drafter.start_from_tokens(tokens, length, self.options.ngram_window)
            self.stats.states_rebuilt += 1
        row.state = state
        return row

    def _recycle(self, rows: list[_Row], captured: list[torch.Tensor]) -> None:
        counts = [r.logit_rows for r in rows]
        total = None if None in counts else sum(counts)
        fits = [c for c in captured if c.shape[0] == total]
        if fits:
            fed, at, start = [], [], 0
            for r in rows:
                if r.fed is not None:
                    fed.extend(r.fed)
                    at.extend(range(start, start + len(r.fed)))
                start += r.logit_rows
            if fed:
                topk = fits[0][torch.tensor(at)]
                self.drafter.recycle(torch.tensor([fed], dtype=torch.long), topk.view(1, len(fed), -1))
                self.stats.recycled_topk += len(fed)
            return
        if self._capture is not None and rows:  # topk mode, but this step's rows cannot be mapped
            self.stats.unmapped_steps += 1
        prev, nxt = [], []
        for r in rows:
            if r.tokens is None or r.length < 2:
                continue
            lo = max(r.before - 1, 0)
            seq = r.tokens[lo:r.length]
            prev.extend(seq[:-1].tolist())
            nxt.extend(seq[1:].tolist())
        if prev:
            self.drafter.learn_accepted(torch.tensor(prev, dtype=torch.long), torch.tensor(nxt, dtype=torch.long))
            self.stats.recycled_accepted += len(prev)

    def _draft(self, rows: list[_Row]) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in rows]
        live = [(i, r) for i, r in enumerate(rows) if r.state is not None]
        if not live:
            return out
        for _, r in live:
            self._states[state_key(r.tokens, r.length)] = r.state
        k = self.num_speculative_tokens
        states = [r.state for _, r in live]
        drafts = self.drafter.draft_chains(states, [int(r.tokens[r.length - 1]) for _, r in live],
                                           [min(k, self.max_model_len - r.length - 1) for _, r in live],
                                           self.cost.price())
        s = self.stats
        for (i, _), state, draft in zip(live, states, drafts):
            out[i] = draft
            if state.plan is not None:
                s.decision_seconds += state.plan.decision_seconds
            if draft:
                s.drafts += 1
                s.ngram_drafts += bool(state.from_ngram)
                s.drafted_ngram += state.from_ngram
                s.drafted_matrix += len(draft) - state.from_ngram
        return out

    # ----------------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the matrix and the policy's statistics (safetensors, the format of ``TokenRecycler.save``)
        atomically."""
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tr-matrix-", suffix=".safetensors", dir=folder)
        os.close(fd)
        try:
            extra = dict(self.drafter.extra_state(), source="vllm", recycle=self.options.recycle)
            self.matrix.save(tmp, extra=extra)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self._last_save = time.monotonic()

    def load(self, path: str | os.PathLike) -> None:
        """Start from a saved matrix and policy statistics (from this proposer or ``TokenRecycler.save``;
        statistics of another shape, e.g. another max_ngram, are left out)."""
        table, extra = AdjacencyMatrix.read(path, self.vocab_size, self.options.topk)
        self.matrix.table.copy_(table)
        self.drafter.load_extra_state(extra)

    def _maybe_save(self) -> None:
        opts = self.options
        if (opts.matrix_path and self._saves and opts.save_every > 0
                and time.monotonic() - self._last_save >= opts.save_every):
            self.save(opts.matrix_path)

    def reset(self) -> None:
        """Forget the matrix, the policy's statistics and every request's state."""
        self.drafter.reset()
        self._states.clear()

    @property
    def state_bytes(self) -> int:
        """Memory held for requests (n-gram indexes), besides the matrix."""
        return sum(s.nbytes for s in self._states.values())
