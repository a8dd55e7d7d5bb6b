"""TokenRecyclingProposer: Token Recycling drafts for vLLM's speculative decoding.

vLLM verifies one chain of drafts per request per step, so each step the proposer drafts, for every
request in the batch, the better of two chains (the policy, chosen per request and per step):

1. **n-gram chain** when the context's end occurred before and that earlier occurrence matches at
   least ``min_match`` tokens (a long, trusted match: code, quotes, lists, repeated names): the
   tokens that followed it, up to K;
2. **matrix chain** otherwise: the top-1 path through the adjacency matrix from the last token
   (``ops.build_draft_tree`` with a chain tree), cut where it reaches a row nothing was recycled
   into yet.

An n-gram chain shorter than K is continued by the matrix chain from its last token. One matrix
serves every request of the engine (hot across requests and users); it is recycled every step
(see recycle.py). Per-request state (request_state.py) is bounded and rebuilt from the tokens
whenever it is missing, so preemption, resumption and row moves are safe.
"""

from __future__ import annotations

import atexit
import copy
import os
import tempfile
import time
import weakref
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .. import ops
from ..adjacency import AdjacencyMatrix
from .options import ProposerOptions
from .recycle import TopkCapture, learn_accepted, recycle_topk
from .request_state import RequestState, state_key


@dataclass
class ProposerStats:
    steps: int = 0                 # propose() calls
    drafts: int = 0                # requests drafted for (summed over steps)
    ngram_drafts: int = 0          # ... of which led by the n-gram chain
    drafted_ngram: int = 0         # draft tokens proposed from the n-gram chain
    drafted_matrix: int = 0        # ... from the adjacency matrix
    verified: int = 0              # drafts whose outcome was seen (the request's next step)
    accepted_ngram: int = 0        # accepted draft tokens that came from the n-gram chain
    accepted_matrix: int = 0       # ... from the matrix
    proposed_verified: int = 0     # draft tokens of those verified drafts
    recycled_topk: int = 0         # matrix rows set from the model's top-k (the paper's update)
    recycled_accepted: int = 0     # matrix rows updated from accepted tokens
    unmapped_steps: int = 0        # topk mode: steps whose logits rows could not be matched to tokens
    states_rebuilt: int = 0        # request states built from scratch (new, moved-and-lost, resumed)

    @property
    def acceptance(self) -> float:
        """Accepted / proposed draft tokens over the drafts whose outcome was seen."""
        return (self.accepted_ngram + self.accepted_matrix) / self.proposed_verified if self.proposed_verified else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["acceptance"] = self.acceptance
        return d


@dataclass
class _Row:
    """One batch row in one step."""
    state: RequestState | None
    tokens: np.ndarray | None      # the row of token_ids_cpu
    length: int = 0                # tokens after this step's sampled ones
    before: int = 0                # tokens before them
    fed: list[int] | None = None   # the tokens whose logits rows this step computed (None: unknown)
    logit_rows: int | None = 1     # how many logits rows this row has (None: unknown)


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
        self.matrix = AdjacencyMatrix(self.vocab_size, self.options.topk)
        k = self.num_speculative_tokens
        self._chain_parents = torch.arange(-1, k, dtype=torch.int32)
        self._chain_ranks = torch.zeros(k + 1, dtype=torch.int32)
        self._states: dict[tuple, RequestState] = {}
        self._capture: TopkCapture | None = None
        self._warm = False  # captures before the first propose() are warm-up forwards
        self.stats = ProposerStats()
        parallel = getattr(vllm_config, "parallel_config", None)
        self._saves = getattr(parallel, "rank", 0) == 0  # one writer under tensor/pipeline parallelism
        self._last_save = time.monotonic()
        path = self.options.matrix_path
        if path and os.path.isfile(path):
            self.load(path)
        if path and self._saves:
            ref = weakref.ref(self)
            atexit.register(lambda: ref() is not None and ref().save(path))

    # ----------------------------------------------------------------------- vLLM's interface
    def load_model(self, model=None, *args, **kwargs) -> None:
        """vLLM passes the target model: hook its logits for top-k recycling (recycle.py)."""
        if self.options.recycle == "topk":
            self._capture = TopkCapture.install(model, self.options.topk, self.vocab_size)

    def propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec: np.ndarray,
                token_ids_cpu: np.ndarray, slot_mappings=None) -> list[list[int]]:
        """Drafts for every request in the batch (``[]`` where none), after recycling what the
        last step verified. ``sampled_token_ids[i]``: the tokens row i accepted this step (its
        accepted drafts and the bonus token; empty for a partial prefill);
        ``token_ids_cpu[i, :num_tokens_no_spec[i]]``: its whole context, those tokens included."""
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
        if not first:  # captures before the first call may come from vLLM's warm-up forwards
            self._recycle(rows, captured)
        drafts = self._draft(rows)
        self._maybe_save()
        return drafts

    # ----------------------------------------------------------------------- per step
    def _claim(self, i: int, sampled: list[int], num_tokens: np.ndarray, token_ids: np.ndarray, key,
               copies: dict) -> _Row:
        """Find row i's state from the last step (or build one) and what this step fed for it."""
        if not sampled:  # a partial prefill: one logits row, discarded; nothing to draft yet
            return _Row(None, None)
        tokens = token_ids[i]
        length = int(num_tokens[i])
        before = length - len(sampled)
        row = _Row(None, tokens, length, before)
        state = self._states.pop(key, None)
        if state is None and key in copies:  # a second row with the same tokens: the same draft was fed
            state = copy.deepcopy(copies[key])
        if state is not None and state.matches(tokens, before) and sampled[:-1] == state.drafts[:len(sampled) - 1]:
            row.fed = [int(tokens[before - 1])] + state.drafts
            row.logit_rows = len(row.fed)
            self._count_outcome(state, len(sampled) - 1)
            state.advance(tokens, length)
        else:
            # A request new to us: its prefill (one logits row, at the last prompt token), or one
            # whose state was lost (its drafts unknown: the step's rows cannot be mapped).
            if len(sampled) == 1 and before >= 1:
                row.fed = [int(tokens[before - 1])]
            else:
                row.fed, row.logit_rows = None, None
            state = RequestState(tokens, length, self.options.max_ngram, self.options.ngram_window)
            self.stats.states_rebuilt += 1
        row.state = state
        return row

    def _count_outcome(self, state: RequestState, accepted: int) -> None:
        if not state.drafts:
            return
        s = self.stats
        s.verified += 1
        s.proposed_verified += len(state.drafts)
        from_ngram = min(accepted, state.from_ngram)
        s.accepted_ngram += from_ngram
        s.accepted_matrix += accepted - from_ngram

    def _recycle(self, rows: list[_Row], captured: list[torch.Tensor]) -> None:
        table = self.matrix.table
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
                recycle_topk(table, torch.tensor(fed, dtype=torch.long), fits[0][torch.tensor(at)])
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
            learn_accepted(table, torch.tensor(prev, dtype=torch.long), torch.tensor(nxt, dtype=torch.long))
            self.stats.recycled_accepted += len(prev)

    def _draft(self, rows: list[_Row]) -> list[list[int]]:
        k, opts = self.num_speculative_tokens, self.options
        out: list[list[int]] = [[] for _ in rows]
        pending: list[tuple[int, list[int], int]] = []  # (row, n-gram chain, budget)
        for i, r in enumerate(rows):
            if r.state is None:
                continue
            self._states[state_key(r.tokens, r.length)] = r.state
            r.state.drafts, r.state.from_ngram = [], 0
            budget = min(k, self.max_model_len - r.length - 1)
            if budget <= 0:
                continue
            chain, match = r.state.continuation(budget)
            chain = chain[:budget] if match >= opts.min_match else []
            pending.append((i, chain, budget))
        if not pending:
            return out
        roots = torch.tensor([chain[-1] if chain else int(rows[i].tokens[rows[i].length - 1])
                              for i, chain, _ in pending], dtype=torch.long)
        table = self.matrix.table
        paths = ops.build_draft_tree(table, roots, self._chain_parents, self._chain_ranks)  # [R, k + 1]
        filled = (table[paths[:, :-1]] != 0).any(-1)             # the row each next token came from
        usable = filled.to(torch.int32).cumprod(dim=1).sum(dim=1).tolist()
        paths = paths[:, 1:].tolist()
        s = self.stats
        for (i, chain, budget), path, n_ok in zip(pending, paths, usable):
            tail = path[: min(n_ok, budget - len(chain))]
            draft = chain + tail
            state = rows[i].state
            state.drafts, state.from_ngram = draft, len(chain)
            out[i] = draft
            if draft:
                s.drafts += 1
                s.ngram_drafts += bool(chain)
                s.drafted_ngram += len(chain)
                s.drafted_matrix += len(tail)
        return out

    # ----------------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the matrix (safetensors, the same format as ``TokenRecycler.save``) atomically."""
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tr-matrix-", suffix=".safetensors", dir=folder)
        os.close(fd)
        try:
            self.matrix.save(tmp, extra={"source": "vllm", "recycle": self.options.recycle})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self._last_save = time.monotonic()

    def load(self, path: str | os.PathLike) -> None:
        """Start from a saved matrix (from this proposer or from ``TokenRecycler.save``)."""
        table, _ = AdjacencyMatrix.read(path, self.vocab_size, self.options.topk)
        self.matrix.table.copy_(table)

    def _maybe_save(self) -> None:
        opts = self.options
        if (opts.matrix_path and self._saves and opts.save_every > 0
                and time.monotonic() - self._last_save >= opts.save_every):
            self.save(opts.matrix_path)

    def reset(self) -> None:
        """Forget the matrix and every request's state."""
        self.matrix.reset()
        self._states.clear()

    @property
    def state_bytes(self) -> int:
        """Memory held for requests (n-gram indexes), besides the matrix."""
        return sum(s.nbytes for s in self._states.values())
