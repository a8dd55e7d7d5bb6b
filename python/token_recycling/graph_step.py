"""The graph-ready verification forward (``TokenRecycler(..., cuda_graphs=True)``), captured as CUDA
graphs on CUDA.

What CUDA-graph capture needs from a step, and how this module provides it:
  - fixed shapes: the draft is padded to a bucket size (``BUCKETS``); padding nodes see only
    themselves, no real node sees them, and their logits are dropped, so they change nothing;
  - fixed addresses: a static cache (transformers' StaticCache writes at its device-side
    ``cumulative_length``), and per bucket static input buffers (tokens, depths, the padded tree
    mask, the device-side prefix length) that each step copies its draft into; positions are
    computed on the device from them, and tree attention reads the prefix length from the device
    (``tree_prefix_len``);
  - no host syncs inside the forward: the CUDA ops defer their checks inside the decode loop
    (step_sync.py), so nothing in the forward waits for the GPU.
Each bucket is a :class:`Bucket`: its buffers and one function that runs the model on them. On
CUDA, when the step is capturable (:func:`capture_blocker`), the first step that uses a bucket
warms that function up on a side stream and captures it into a ``torch.cuda.CUDAGraph``; later
steps copy their inputs into the buffers and replay it. Captures belong to one cache (a
``generate()`` call makes a new one): a new cache drops them, so each call captures every bucket it
uses once (a capture waits for the device: it is not a one-sync step). On the CPU, or where capture
is not possible, the same function runs uncaptured on the same buffers (``captured`` stays False,
``uncaptured_reason`` says why).

Checked: the uncaptured path on the CPU (tests/test_graph_step.py, fp32 == greedy); capture and
replay on a GPU by bench/gpu_decode.py's lossless part (fp32 == greedy on tiny Llama / Qwen2 /
Gemma, graphs captured and replayed). tests/test_graph_step.py also holds a GPU test (captured ==
uncaptured == greedy), skipped without one.
"""

from __future__ import annotations

import torch

from . import cache as kv

BUCKETS = (8, 16, 32, 64, 128)


def bucket_for(n: int, room: int | None = None) -> int | None:
    """The smallest bucket holding n nodes (and at most ``room``), else the largest that fits room;
    None when no bucket fits."""
    fitting = [b for b in BUCKETS if room is None or b <= room]
    if not fitting:
        return None
    return next((b for b in fitting if b >= n), fitting[-1])


def padded_mask(mask: torch.Tensor, size: int) -> torch.Tensor:
    """The [size, size] mask: the draft's block, padding nodes seeing only themselves."""
    n = mask.shape[0]
    out = torch.eye(size, dtype=torch.bool, device=mask.device)
    out[:n, :n] = mask
    return out


def capture_blocker(model, cache) -> str | None:
    """Why a step of ``model`` over ``cache`` cannot be captured as a CUDA graph (None: it can)."""
    from . import window
    from ._extension import WITH_CUDA
    from .hf_model import attn_implementation, model_device
    if model_device(model).type != "cuda":
        return "not on a CUDA device"
    if not WITH_CUDA:
        return "token-recycling was built without CUDA kernels"
    if attn_implementation(model) != "token_recycling":
        return "the model does not use the tree-attention backend (its prefix length would come from the host)"
    if any(window.is_window(layer) for layer in kv.cache_layers(cache)):
        return "sliding-window layers grow by concatenation (their buffers move)"
    if kv.static_capacity(cache) is None:
        return "the cache is not static"
    return None


class Bucket:
    """One bucket's static input buffers and the forward over them (captured or not)."""

    def __init__(self, model, cache_kwarg: str, cache, size: int, device: torch.device):
        self.model, self.cache_kwarg, self.cache, self.size = model, cache_kwarg, cache, size
        self.tokens = torch.zeros(1, size, dtype=torch.long, device=device)
        self.depths = torch.zeros(size, dtype=torch.long, device=device)
        self.mask = torch.eye(size, dtype=torch.bool, device=device).view(1, 1, size, size)
        self.prefix_len = torch.zeros(1, dtype=torch.long, device=device)
        self.graph = None  # torch.cuda.CUDAGraph once captured
        self.logits: torch.Tensor | None = None  # the captured forward's output buffer

    def load(self, draft, prefix_len: torch.Tensor) -> None:
        """Copy a step's inputs into the buffers (device to device: no wait)."""
        n = draft.size
        self.tokens.zero_()
        self.tokens[:, :n].copy_(draft.tokens)
        self.depths.zero_()
        self.depths[:n].copy_(draft.depths)
        self.mask.copy_(padded_mask(draft.mask, self.size).view(1, 1, self.size, self.size))
        self.prefix_len.copy_(prefix_len.reshape(1))

    def run(self) -> torch.Tensor:
        """The padded forward over the buffers: logits [1, size, V]; the cache gains ``size`` entries."""
        from .hf_model import forward_tree
        return forward_tree(self.model, self.tokens, self.depths.view(1, -1), self.mask.view(1, self.size, self.size),
                            self.prefix_len, self.cache, True, self.cache_kwarg)

    def capture(self, pool, warmup: int = 2) -> None:
        """Warm up on a side stream, then capture :meth:`run` (CUDA only). Each warm-up forward writes
        the bucket's ``size`` entries after the prefix (room the caller checked) and is cropped back;
        the captured forward is recorded, not run."""
        from . import ops
        with ops.deferred_device_errors(self.tokens.device):  # nothing in a captured forward may wait
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    self.run()
                    kv.trim(self.cache, self.size)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits = self.run()
        self.graph = graph

    def forward(self) -> torch.Tensor:
        if self.graph is None:
            return self.run()
        self.graph.replay()  # the recorded cumulative_length.add_ advances the cache as run() does
        return self.logits


class GraphStep:
    """Padded, device-prefix verification forwards for one model with a static cache."""

    def __init__(self, model, cache_kwarg: str, capture: bool = True):
        self.model, self.cache_kwarg = model, cache_kwarg
        self.capture = capture  # False: never capture (the uncaptured path, e.g. to compare)
        self.captured = False  # whether the last forward was a graph replay
        self.uncaptured_reason: str | None = None  # why the last forward was not captured
        self.buckets_used: set[int] = set()
        self.padded_forwards = 0  # forwards with padding nodes (bucket > draft)
        self.captures = 0  # graphs captured (all caches)
        self._buckets: dict[int, Bucket] = {}
        self._cache_id: int | None = None
        self._pool = None

    def fit(self, cache, prefix: int, draft):
        """(draft cut to what one bucket can hold in the cache's room, that bucket's size)."""
        capacity = kv.static_capacity(cache)
        if capacity is None:
            raise ValueError("cuda_graphs=True needs a static cache (generate(..., cache_implementation='static'))")
        size = bucket_for(draft.size, capacity - prefix)
        if size is None:  # less room than the smallest bucket: forward exactly what fits, unpadded
            return kv.fit(cache, prefix, draft), None
        return (draft.truncate(size) if draft.size > size else draft), size

    def forward(self, draft, prefix_len: torch.Tensor, cache, size: int | None) -> torch.Tensor:
        """Logits [1, N, V] of the draft's N nodes; the cache gains ``size`` (or N) entries.
        ``prefix_len``: LongTensor [1] on the device."""
        n = draft.size
        size = size or n
        self.buckets_used.add(size)
        self.padded_forwards += size > n
        bucket = self._bucket(cache, size, draft.tokens.device)
        bucket.load(draft, prefix_len)
        if bucket.graph is None and self.uncaptured_reason is None and size in BUCKETS:
            bucket.capture(self._pool)
            self.captures += 1
        self.captured = bucket.graph is not None
        return bucket.forward()[:, :n]

    def release(self) -> None:
        """Drop the buckets, their graphs and their hold on the cache (the decode loop calls it at the end)."""
        self._buckets.clear()
        self._cache_id = None

    def _bucket(self, cache, size: int, device: torch.device) -> Bucket:
        """The bucket's buffers over this cache (a new cache drops the old buckets and their graphs; the
        buckets hold the cache, so its id is not reused while they exist)."""
        if self._cache_id != id(cache):
            self._buckets.clear()
            self._cache_id = id(cache)
            self.uncaptured_reason = "capture off (cuda_graphs capture=False)" if not self.capture else \
                capture_blocker(self.model, cache)
            if self.uncaptured_reason is None and self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()  # one memory pool for every bucket's graph
        bucket = self._buckets.get(size)
        if bucket is None:
            bucket = self._buckets[size] = Bucket(self.model, self.cache_kwarg, cache, size, device)
        return bucket
