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

Suffix memory. The drafter's memory.SuffixMemory holds finished requests' tokens for every later
request to draft from (a candidate source of its own in the policy). vLLM does not tell a proposer
that a request finished: a request whose state goes unclaimed for a step (finished, preempted or not
scheduled) has the tokens its state holds (its n-gram window) remembered then. A preempted request
that comes back is remembered again when it ends, so a part of it can count twice in the support of
a continuation.

Cost. vLLM gives a proposer no forward times, so the price of a drafted token comes from the wall
time between propose() calls against the tokens each step forwarded (policy.BatchStepCost: fitted
from steps that forwarded decode rows only; before that, a documented flat default).

One matrix serves every request of the engine (hot across requests and users); with
``TOKEN_RECYCLING_MATRIX`` it is loaded at start and kept on disk however the server stops (keeper.py:
periodic saves from a thread, saves on SIGINT/SIGTERM and at exit, each atomic). Per-request state
(a content-found ``DraftState``) is bounded and rebuilt from the tokens whenever it is missing, so
preemption, resumption and row moves are safe. Statistics: a ``GenerationStats`` (counters only).
"""

from __future__ import annotations

import copy
import json
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from ..adjacency import AdjacencyMatrix, CorruptMatrixFile
from ..draft import DraftState, Drafter, state_key
from ..policy import BatchStepCost
from ..stats import GenerationStats
from .keeper import SIGNAL_SAVE_SECONDS, MatrixKeeper, logger, remove_stale_temp_files
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
                               ngram_tokens=max(NGRAM_TOKENS, self.num_speculative_tokens),
                               ngram_history=opts.memory)
        self.cost = BatchStepCost()
        self._states: dict[tuple, DraftState] = {}
        self._capture: TopkCapture | None = None
        self._warm = False  # captures before the first propose() are warm-up forwards
        self._last_call: float | None = None
        self.stats = GenerationStats(decoding="vllm", tree="chain")
        parallel = getattr(vllm_config, "parallel_config", None)
        self._saves = getattr(parallel, "rank", 0) == 0  # one writer under tensor/pipeline parallelism
        # The matrix and policy change only inside propose(), under this lock; a save copies them under
        # it. Re-entrant: a signal handler runs in the main thread, possibly in the middle of propose().
        self._lock = threading.RLock()
        self._version = 0        # bumped by every propose() that learned something
        self._saved_version = 0  # the version the file on disk holds (a fresh or loaded matrix: 0)
        self._steps_before = 0   # engine steps the loaded matrix had seen
        self.loaded: dict | None = None  # what was loaded at start (path, filled_rows, saved_at, steps)
        self.keeper: MatrixKeeper | None = None
        path = opts.matrix_path
        if path:
            self._load_at_start(path)
            if self._saves:
                self.keeper = MatrixKeeper(self, TokenRecyclingProposer._changed_copy,
                                           TokenRecyclingProposer._write_copy, opts.save_every)

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
        with self._lock:
            return self._propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu)

    def _propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu) -> list[list[int]]:
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
        for state in self._states.values():  # unclaimed (finished, preempted, unscheduled): remembered
            self._remember(state)
        self._states = {}
        if rows and all(r.decoded for r in rows) and self._last_call is not None:  # the step forwarded decodes only
            self.cost.record_step(sum(r.logit_rows for r in rows), sum(map(len, sampled_token_ids)), now - self._last_call)
        self._last_call = now
        if not first:  # captures before the first call may come from vLLM's warm-up forwards
            self._recycle(rows, captured)
        if any(r.state is not None for r in rows):
            self._version += 1  # the matrix or the policy's statistics learned: the next save writes
        return self._draft(rows)

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
                self.stats.record_chain(len(state.drafts), len(produced) - 1, state.from_ngram, state.from_memory)
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

    def _remember(self, state: DraftState) -> None:
        """A request's tokens (its state's n-gram window) join the suffix memory."""
        if state.index is not None and self.drafter.memory.capacity:
            self.drafter.memory.add(state.index.history[0, : int(state.index.lengths[0])])

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
                if state.from_memory:
                    s.drafted_memory += state.from_ngram
                else:
                    s.drafted_ngram += state.from_ngram
                s.drafted_matrix += len(draft) - state.from_ngram
        return out

    # ----------------------------------------------------------------------- persistence
    def _copy(self, reason: str) -> tuple:
        """What a save writes, copied under the lock: (table, extra as JSON, version, filled rows, the
        suffix memory's tensors)."""
        with self._lock:
            table = self.matrix.table.detach().to("cpu", copy=True)
            filled = int((table != 0).any(-1).sum())
            extra = dict(self.drafter.extra_state(), source="vllm", recycle=self.options.recycle,
                         saved_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), saved_unix=time.time(),
                         steps=self._steps_before + self.stats.steps, filled_rows=filled, reason=reason,
                         pid=os.getpid())
            return table, json.dumps(extra), self._version, filled, self.drafter.extra_tensors()

    def _changed_copy(self, reason: str = "periodic"):
        """The keeper's snapshot: a copy, or None when the file already holds this version."""
        with self._lock:
            return None if self._version == self._saved_version else self._copy(reason)

    def _write_copy(self, copied: tuple, reason: str) -> str:
        table, extra_json, version, filled, tensors = copied
        path = self.options.matrix_path
        AdjacencyMatrix.write(path, table, extra_json, tensors)
        with self._lock:
            self._saved_version = max(self._saved_version, version)
        return f"{path} ({filled} of {table.shape[0]} rows filled, version {version})"

    def save(self, path: str | os.PathLike) -> None:
        """Write the matrix and the policy's statistics (safetensors, the format of ``TokenRecycler.save``,
        with when it was saved and after how many engine steps) atomically."""
        table, extra_json, version, _, tensors = self._copy("save")
        AdjacencyMatrix.write(path, table, extra_json, tensors)
        if self.options.matrix_path and os.path.abspath(path) == os.path.abspath(self.options.matrix_path):
            with self._lock:
                self._saved_version = max(self._saved_version, version)

    def load(self, path: str | os.PathLike) -> dict:
        """Start from a saved matrix and policy statistics (from this proposer or ``TokenRecycler.save``;
        statistics of another shape, e.g. another max_ngram, are left out). Returns the file's extra
        metadata. A damaged file raises CorruptMatrixFile; one for another vocabulary or k, ValueError."""
        table, extra = AdjacencyMatrix.read(path, self.vocab_size, self.options.topk)
        tensors = AdjacencyMatrix.read_tensors(path)
        with self._lock:
            self.matrix.table.copy_(table)
            self.drafter.load_extra_state(extra)
            self.drafter.load_extra_tensors(tensors)
            self._steps_before = int(extra.get("steps", 0) or 0)
        return extra

    def _load_at_start(self, path: str) -> None:
        """Load ``path`` when it exists and say so in the log (filled rows, when saved, after how many
        steps). A damaged file is set aside as ``<path>.corrupt`` (kept for a look, never loaded) and
        the server starts cold; a whole file made for another model (vocabulary, k) raises ValueError,
        untouched: that is a wrong setting, not a crash to recover from."""
        left = remove_stale_temp_files(path)
        if left:
            logger.warning("token-recycling: removed %d temporary file(s) of a save that was interrupted "
                           "(%s); they were never the matrix file", len(left), ", ".join(left))
        if not os.path.exists(path):
            logger.info("token-recycling: no matrix at %s yet; starting cold, it will be saved there", path)
            return
        try:
            extra = self.load(path)
        except CorruptMatrixFile as exc:
            aside = f"{path}.corrupt"
            try:
                os.replace(path, aside)
            except OSError:
                aside = "(could not be moved)"
            logger.error("token-recycling: refusing the matrix file %s: %s. Starting cold; the file was "
                         "moved to %s", path, exc, aside)
            return
        filled = int((self.matrix.table != 0).any(-1).sum())
        self.loaded = {"path": os.fspath(path), "filled_rows": filled, "saved_at": extra.get("saved_at"),
                       "steps": self._steps_before, "reason": extra.get("reason")}
        logger.info("token-recycling: loaded the matrix from %s: %d of %d rows filled, saved at %s (%s) after %d "
                    "engine steps", path, filled, self.vocab_size, extra.get("saved_at", "an unknown time"),
                    extra.get("reason", "unknown"), self._steps_before)

    def close(self) -> None:
        """No more saves by this proposer: its periodic thread ends, signals and exit no longer save it."""
        if self.keeper is not None:
            self.keeper.stop()

    def __del__(self) -> None:
        # vLLM's worker process drops its model runner, and this proposer with it, when it ends in
        # order (how it ends after a SIGTERM to the API server alone), then leaves with os._exit: no
        # atexit. What changed since the last save is saved here (bounded, as on a signal).
        keeper = getattr(self, "keeper", None)
        if keeper is None:
            return
        try:
            keeper.save("exit", timeout=SIGNAL_SAVE_SECONDS, owner=self)
            keeper.stop()
        except Exception:  # interpreter teardown: nothing left to save with
            pass

    def reset(self) -> None:
        """Forget the matrix, the policy's statistics and every request's state."""
        with self._lock:
            self.drafter.reset()
            self._states.clear()
            self._version += 1

    @property
    def state_bytes(self) -> int:
        """Memory held for requests (n-gram indexes), besides the matrix."""
        return sum(s.nbytes for s in self._states.values())
