"""The ``suffix`` baselines of ``token-recycling bench``: SuffixDecoding's drafts (Oliaro et al.,
arXiv 2411.04975, in the implementation vLLM calls: ``arctic_inference.suffix_decoding``) verified
by this project's decode step, so that the drafters differ and nothing else does (the same tree
forward, greedy or sampling verification, cache compaction, kernels and ``skinny_linear`` routing).

:class:`SuffixDrafter` is a :class:`~token_recycling.draft.Drafter` that a ``TokenRecycler`` takes
as ``drafter=``. Per request it starts a SuffixDecodingCache request with the prompt, adds every
accepted token to the request's response (which joins the cache's global tree of earlier
responses, kept across requests) and, each step, drafts ``speculate(context's last tokens)``: a
chain (as vLLM's ``method="suffix"`` drafts it) or, with ``tree=True``, SuffixDecoding's draft tree,
which this project's tree verification can verify and vLLM's chain verification cannot. It never
reads or writes the adjacency matrix.

Defaults are vLLM's ``SpeculativeConfig`` defaults for ``method="suffix"``: trees of depth 24, up to
24 draft tokens (``num_speculative_tokens`` defaults to the tree depth), ``max_spec_factor`` 1.0,
``min_token_prob`` 0.1, the 10000 latest responses kept.

arctic-inference is an optional dependency of the benchmark only (docs/benchmarking.md has the
install command); :func:`unavailable_reason` says why it cannot be used where it cannot.
"""

from __future__ import annotations

import collections
import importlib

import numpy as np
import torch

from ..draft import Draft, Drafter

MAX_TREE_DEPTH = 24          # suffix_decoding_max_tree_depth
MAX_SPEC_TOKENS = 24         # num_speculative_tokens (vLLM: the tree depth when not given)
MAX_SPEC_FACTOR = 1.0        # suffix_decoding_max_spec_factor
MIN_TOKEN_PROB = 0.1         # suffix_decoding_min_token_prob
MAX_CACHED_REQUESTS = 10000  # suffix_decoding_max_cached_requests
INSTALL = ("pip install nanobind==2.9.2 grpcio-tools protobuf==5.29.6 setuptools wheel ninja cmake && "
           "CMAKE_ARGS=-DPython_EXECUTABLE=$(which python) "
           "pip install --no-build-isolation --no-deps arctic-inference==0.3.0")
METHODS = {"suffix": False, "suffix-tree": True}  # bench method -> tree speculation


def unavailable_reason() -> str | None:
    """None where ``arctic_inference.suffix_decoding`` imports, else one line saying why not and how to
    install it."""
    try:
        importlib.import_module("arctic_inference.suffix_decoding")
    except Exception as exc:  # noqa: BLE001 - any failure to load means the baseline cannot run
        return f"arctic_inference.suffix_decoding cannot be imported ({type(exc).__name__}: {exc}); install: {INSTALL}"
    return None


class SuffixState:
    """One request's drafting state: its id in the cache, the tokens so far (a growing int32 buffer)
    and how many of them are the prompt."""

    def __init__(self, req_id: int, seq: torch.Tensor, capacity: int):
        tokens = seq.view(-1).cpu().numpy().astype(np.int32)
        self.req_id = req_id
        self.buffer = np.zeros(max(capacity, tokens.size) + 1, dtype=np.int32)
        self.buffer[: tokens.size] = tokens
        self.length = tokens.size
        self.prompt_len = tokens.size - 1  # start() is given the prompt and the prefill's token
        self.added = 0  # tokens of the buffer already given to the cache

    def response(self) -> np.ndarray:
        return self.buffer[self.prompt_len: self.length]

    def accept(self, seq: torch.Tensor, emitted: int, host_tokens: torch.Tensor | None = None) -> None:
        """The sequence grew by its last ``emitted`` tokens (DraftState.accept's contract); the drafter
        gives them to the cache before its next draft."""
        if emitted == 0:
            return
        new = (host_tokens[:emitted] if host_tokens is not None else seq[0, seq.shape[1] - emitted:]).cpu()
        self._append(new.numpy().astype(np.int32))

    def _append(self, tokens: np.ndarray) -> None:
        if self.length + tokens.size > self.buffer.size:
            grown = np.zeros(2 * (self.length + tokens.size), dtype=np.int32)
            grown[: self.length] = self.buffer[: self.length]
            self.buffer = grown
        self.buffer[self.length: self.length + tokens.size] = tokens
        self.length += tokens.size


class SuffixDrafter(Drafter):
    """SuffixDecoding's drafts through the Drafter interface the decode step calls (start, draft_rows,
    recycle, finish). ``tree``: SuffixDecoding's draft tree instead of vLLM's chain. The other
    arguments are the SuffixDecodingCache's and ``speculate``'s (module doc: vLLM's defaults)."""

    def __init__(self, vocab_size: int, device: torch.device, *, tree: bool = False,
                 max_tree_depth: int = MAX_TREE_DEPTH, max_spec_tokens: int = MAX_SPEC_TOKENS,
                 max_spec_factor: float = MAX_SPEC_FACTOR, min_token_prob: float = MIN_TOKEN_PROB,
                 max_cached_requests: int = MAX_CACHED_REQUESTS, topk: int = 8):
        reason = unavailable_reason()
        if reason is not None:
            raise ImportError(reason)
        if max_tree_depth < 1 or max_spec_tokens < 1:
            raise ValueError(f"max_tree_depth and max_spec_tokens must be >= 1, got {max_tree_depth}, "
                             f"{max_spec_tokens}")
        if max_spec_factor < 0 or not 0 <= min_token_prob <= 1:
            raise ValueError(f"max_spec_factor must be >= 0 and min_token_prob in [0, 1], got {max_spec_factor}, "
                             f"{min_token_prob}")
        super().__init__(vocab_size, device, tree=[], topk=topk, ngram=False, ngram_history=0)
        self.tree_spec = "suffix-tree" if tree else "suffix"
        self.use_tree = tree
        self.max_tree_depth, self.max_spec_tokens = max_tree_depth, max_spec_tokens
        self.max_spec_factor, self.min_token_prob = max_spec_factor, min_token_prob
        self.max_cached_requests = max_cached_requests
        self._new_cache()

    def _new_cache(self) -> None:
        from arctic_inference.suffix_decoding import SuffixDecodingCache
        self.cache = SuffixDecodingCache(max_tree_depth=self.max_tree_depth,
                                         max_cached_requests=self.max_cached_requests)
        self._active: collections.OrderedDict[int, SuffixState] = collections.OrderedDict()
        self._next_id = 0

    # ------------------------------------------------------------------ per request
    def start(self, seq: torch.Tensor, capacity: int) -> SuffixState:
        """``seq`` [1, S]: the prompt and the token the prefill produced (step.py starts drafting after it)."""
        state = SuffixState(self._next_id, seq, capacity)
        self._next_id += 1
        self.cache.start_request(state.req_id, state.buffer[: state.prompt_len].copy())
        state.added = state.prompt_len
        self._add(state)
        self._active[state.req_id] = state
        return state

    def finish(self, generated: torch.Tensor, prompt: torch.Tensor | None = None) -> None:
        """A request ended with ``generated`` (its new tokens): the tokens of its last step join its
        response, and the request stops (its response stays in the global tree). Rows finish in the
        order they started; a request left by a call that raised is stopped here too. ``prompt`` is
        not needed: the cache was given it when the request started."""
        tokens = generated.view(-1).cpu().numpy().astype(np.int32)
        while self._active:
            req_id, state = self._active.popitem(last=False)
            response = state.response()
            done = response.size <= tokens.size and np.array_equal(tokens[: response.size], response)
            if done and tokens.size > response.size:
                state._append(tokens[response.size:])
            if done:
                self._add(state)
            self.cache.stop_request(req_id)
            if done:
                return

    def _add(self, state: SuffixState) -> None:
        """The tokens accepted since the last call join the request's response in the cache."""
        if state.length > state.added:
            self.cache.add_active_response(state.req_id, state.buffer[state.added: state.length].copy())
            state.added = state.length

    # ------------------------------------------------------------------ drafting
    def draft_rows(self, states: list[SuffixState], roots: list[torch.Tensor], cost=None) -> list[Draft]:
        """One draft per row: the root, then ``speculate``'s tokens (chain, or tree) after it."""
        drafts = []
        for state, root in zip(states, roots):
            self._add(state)
            context = np.ascontiguousarray(state.buffer[max(0, state.length - self.max_tree_depth): state.length])
            spec = self.cache.speculate(state.req_id, context, max_spec_tokens=self.max_spec_tokens,
                                        max_spec_factor=self.max_spec_factor, min_token_prob=self.min_token_prob,
                                        use_tree_spec=self.use_tree)
            drafts.append(tree_draft(int(root.view(-1)[0]), spec.token_ids, spec.parents, self.tree).to(self.device))
        return drafts

    def recycle(self, tokens: torch.Tensor, candidates: torch.Tensor) -> None:
        """SuffixDecoding keeps no adjacency matrix: nothing to recycle."""

    # ------------------------------------------------------------------ state
    def describe(self) -> str:
        shape = "tree" if self.use_tree else "chain"
        return (f"SuffixDecoding (arctic-inference) {shape}: depth {self.max_tree_depth}, up to "
                f"{self.max_spec_tokens} tokens, spec factor {self.max_spec_factor}, min prob {self.min_token_prob}")

    def reset(self) -> None:
        """Cold start: a new, empty cache (no earlier responses)."""
        self._new_cache()

    def extra_state(self) -> dict:
        raise NotImplementedError("the suffix baseline keeps its cache in memory only; it cannot be saved")


def tree_draft(root: int, token_ids: list[int], parents: list[int], tree) -> Draft:
    """The Draft of the root and a SuffixDecoding draft (``parents[i]``: the index of token i's parent
    among ``token_ids``, -1 for the root): node 0 the root, node i + 1 token i. SuffixDecoding emits a
    parent before its children, so the nodes are in topological order as verification needs."""
    n = len(token_ids) + 1
    parent = np.full(n, -1, dtype=np.int32)
    depth = np.zeros(n, dtype=np.int64)
    mask = np.zeros((n, n), dtype=bool)
    mask[0, 0] = True
    for i, p in enumerate(parents, start=1):
        p = int(p) + 1
        if not 0 <= p < i:
            raise ValueError(f"SuffixDecoding draft out of topological order: token {i - 1} has parent {p - 1}")
        parent[i], depth[i] = p, depth[p] + 1
        mask[i] = mask[p]
        mask[i, i] = True
    tokens = torch.tensor([[root, *token_ids]], dtype=torch.long)
    return Draft(tokens, torch.from_numpy(parent), torch.from_numpy(depth), torch.from_numpy(mask), tree)


def make(method: str, vocab_size: int, device: torch.device, topk: int = 8) -> SuffixDrafter:
    """The drafter of a bench method ("suffix": vLLM's chain; "suffix-tree": SuffixDecoding's tree)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    return SuffixDrafter(vocab_size, device, tree=METHODS[method], topk=topk)


__all__ = ["SuffixDrafter", "SuffixState", "tree_draft", "make", "unavailable_reason", "METHODS", "INSTALL"]
