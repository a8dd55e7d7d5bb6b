"""Typed wrappers of ``torch.ops.token_recycling.*``, the public ops contract.

Other frameworks may call ``torch.ops.token_recycling.<name>`` directly; these wrappers only add
types and docs. Each op also has a fake (meta) implementation so it works under ``torch.compile``
and ``FakeTensorMode``. Trees are given as ``parents`` (``parents[0] == -1``, ``0 <= parents[i] < i``)
and ``ranks`` (the matrix column each node takes from its parent's row).
"""

from __future__ import annotations

import contextlib

import torch

from . import _extension  # noqa: F401  (loads the native library)

_ops = torch.ops.token_recycling


def build_draft_tree(matrix: torch.Tensor, roots: torch.Tensor, parents: torch.Tensor,
                     ranks: torch.Tensor) -> torch.Tensor:
    """Fill a draft tree from the adjacency matrix.

    matrix ``[V, k]`` int32/int64, roots ``[B]`` int64, parents/ranks ``[N]`` int32.
    Returns tokens ``[B, N]`` int64 with ``tokens[:, 0] = roots`` and
    ``tokens[b, i] = matrix[tokens[b, parents[i]], ranks[i]]``.
    """
    return _ops.build_draft_tree(matrix, roots, parents, ranks)


def update_adjacency(matrix: torch.Tensor, tokens: torch.Tensor, candidates: torch.Tensor) -> None:
    """Recycle: row ``tokens[b, n]`` of ``matrix`` := ``candidates[b, n]`` (in place).

    tokens ``[B, N]`` int64, candidates ``[B, N, k]`` int32/int64 (top-k next tokens, best first).
    When a token occurs more than once, its last occurrence in row-major ``(b, n)`` order wins.
    """
    _ops.update_adjacency(matrix, tokens, candidates)


def verify_greedy(tokens: torch.Tensor, predictions: torch.Tensor,
                  parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Find the longest draft path equal to the model's greedy choices.

    tokens, predictions ``[B, N]`` int64 (predictions = argmax of the logits at each node);
    parents ``[N]`` (or ``[B, N]``, one tree per row) int32. Returns ``(accept_len [B],
    accepted_nodes [B, max_depth + 1] padded with -1, bonus [B])``; ``accept_len`` counts the root.
    """
    return _ops.verify_greedy(tokens, predictions, parents)


def verify_sample(tokens: torch.Tensor, parents: torch.Tensor, probs: torch.Tensor,
                  uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Walk the draft tree with the model's own samples (lossless speculative sampling).

    At a node of depth d, draw a token from ``probs[b, node]`` by inverse CDF with ``uniforms[b, d]``; if a
    child of the node holds it (the smallest index when several do), move there and draw again; else
    stop: the drawn token is the bonus. tokens ``[B, N]`` int64, parents ``[N]`` (or ``[B, N]``) int32,
    probs ``[B, N, V]`` float32 non-negative finite weights (need not sum to 1; V <= 2^20; only
    visited rows are read), uniforms ``[B, N]`` float64 in ``[0, 1)`` (a row's walk uses its first
    ``accept_len`` uniforms, whatever the tree: see :mod:`token_recycling.sample`). The draw is exact integer
    arithmetic (see ``kernels/verify_sample.h``), so every backend and ``reference.verify_sample`` pick
    the same token. Returns ``(accept_len [B], accepted_nodes [B, max_depth + 1] padded with -1,
    bonus [B])`` as :func:`verify_greedy` does.
    """
    return _ops.verify_sample(tokens, parents, probs, uniforms)


def compact_kv(caches: list[torch.Tensor], prefix_len: torch.Tensor, accepted_nodes: torch.Tensor,
               accept_len: torch.Tensor) -> None:
    """Move the accepted path's cache entries into place, for all layers in one call.

    caches: key and value tensors ``[B, H, S, D]``; tree node ``i`` of row ``b`` sits at
    ``prefix_len[b] + i``. Position ``prefix_len[b] + j`` receives the entry at
    ``prefix_len[b] + accepted_nodes[b, j]`` for ``j < accept_len[b]``; all reads precede writes.
    """
    _ops.compact_kv(caches, prefix_len, accepted_nodes, accept_len)


def tree_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: torch.Tensor,
                   tree_mask: torch.Tensor, scale: float, tree_start: int = -1) -> torch.Tensor:
    """Attention of tree nodes over the prefix and their visible tree nodes.

    q ``[B, Hq, N, D]``; k, v ``[B, Hkv, S, D]`` with the prefix at ``[0, prefix_len[b])`` and node
    ``i`` at ``prefix_len[b] + i``; tree_mask ``[N, N]`` bool (node i may see node j), or ``[B, N, N]``
    (one tree per row). ``tree_start >= 0``: node ``i`` of every row sits at ``tree_start + i`` instead,
    and row b sees the prefix ``[0, prefix_len[b])`` (``prefix_len[b] <= tree_start``; the keys in
    between are never attended): a batch of rows of different lengths whose trees were appended at
    one cache length. GQA when ``Hq % Hkv == 0``. fp32/fp16/bf16 with fp32 accumulation. Returns
    ``[B, Hq, N, D]``.
    On CUDA: N <= 256, head_dim 64, 80, 96, 128 or 256; prefix_len may stay on the CPU, which spares
    the device sync that checking it on the GPU costs.
    """
    return _ops.tree_attention(q, k, v, prefix_len, tree_mask, scale, tree_start)


def tree_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: torch.Tensor,
                       tree_mask: torch.Tensor, scale: float, tree_start: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`tree_attention` that also returns each row's log-sum-exp: ``(out [B, Hq, N, D],
    lse [B, Hq, N] float32)``, lse = natural log of the softmax denominator of the scaled scores
    (``-inf`` for a row that sees no key). With ``prefix_len = 0`` and k, v the tree nodes' keys, it
    is the tree-block half of two-part tree attention (see :func:`merge_attention_states`). CPU and
    CUDA (the same limits as :func:`tree_attention`).
    """
    return _ops.tree_attention_lse(q, k, v, prefix_len, tree_mask, scale, tree_start)


def merge_attention_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                           lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two attentions of the same queries over disjoint key sets by their log-sum-exps.

    out_a, out_b ``[B, H, N, D]`` (one dtype: fp32/fp16/bf16, any strides); lse_a, lse_b ``[B, H, N]``
    float32 (natural log; ``-inf`` = saw no key). Returns ``(out [B, H, N, D] in out_a's dtype,
    lse [B, H, N] float32)``: ``out = (w_a out_a + w_b out_b) / (w_a + w_b)`` with ``w_x = exp(lse_x
    - m)``, ``m = max(lse_a, lse_b)``; rows where both are ``-inf`` get zeros and ``-inf``. CPU and CUDA
    (no device sync: nothing is checked on the device).
    """
    return _ops.merge_attention_states(out_a, lse_a, out_b, lse_b)


def ngram_index_append(table: torch.Tensor, history: torch.Tensor, old_len: torch.Tensor,
                       new_len: torch.Tensor) -> None:
    """Index the n-grams ending at positions ``old_len[b] + 1 .. new_len[b]`` of each row (in place).

    The caller owns the state: history ``[B, L]`` int64 (tokens, L = capacity; append only) and
    table ``[B, max_ngram, S, 3]`` int64, zeros when empty, ``S`` a power of two ``> L`` (see
    :func:`token_recycling.ngram.new_ngram_table` and ``kernels/ngram_index.h`` for the layout).
    old_len, new_len ``[B]`` int64: ``old_len`` must be the length the table already indexes
    (checked); ``new_len > L`` is an error. CPU only. Amortised O(max_ngram) per new token.
    """
    _ops.ngram_index_append(table, history, old_len, new_len)


def ngram_lookup(table: torch.Tensor, history: torch.Tensor, length: torch.Tensor, max_ngram: int,
                 max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The continuation of the longest context suffix that occurred before, most recent occurrence.

    For each row, with ``h = history[b, :length[b]]``: for ``n = max_ngram`` down to 1, the largest
    end ``e < len(h)`` with ``h[e-n:e] == h[-n:]``; the first ``n`` with one gives
    ``h[e : e + max_tokens]``. Returns ``(tokens [B, max_tokens] int64 padded with -1, count [B]
    int64)``, count 0 when nothing matched. ``max_ngram <= table.size(1)``; the table must index
    exactly ``history[b, :length[b]]`` (checked). CPU only.
    """
    return _ops.ngram_lookup(table, history, length, max_ngram, max_tokens)


def ngram_candidates(table: torch.Tensor, history: torch.Tensor, length: torch.Tensor, max_ngram: int,
                     max_tokens: int, max_candidates: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Up to ``max_candidates`` different continuations of the context's suffix, longest match first.

    For ``n = max_ngram`` down to 1, each earlier occurrence ``e`` of ``h[-n:]``, most recent first,
    gives ``h[e : e + max_tokens]``; it is kept unless it equals an earlier candidate over the
    shorter of the two. Returns ``(tokens [B, K, max_tokens] int64 padded with
    -1, count [B, K], ngram [B, K] (the matched suffix length n), start [B, K] (e))``, zeros for
    unused candidates. Candidate 0 is :func:`ngram_lookup`'s answer. CPU only.
    """
    return _ops.ngram_candidates(table, history, length, max_ngram, max_tokens, max_candidates)


def graft_chain(tree_tokens: torch.Tensor, parents: torch.Tensor, chain: torch.Tensor,
                chain_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                  torch.Tensor]:
    """Graft a token chain (e.g. an n-gram continuation) onto each row's draft tree.

    tree_tokens ``[B, N]`` int64 (node 0 = root), parents ``[N]`` int32, chain ``[B, C]`` int64,
    chain_len ``[B]`` int64 in ``[0, C]``. Walking from the root, each chain token moves to the
    current node's child with that token (the smallest index) if there is one; from the first token
    without one, the rest of the chain is appended as new nodes. Returns, with ``M = N + C``:
    ``(tokens [B, M] int64, parents [B, M] int32, depths [B, M] int64, tree_mask [B, M, M] bool,
    num_nodes [B] int64)``; row ``b`` is the tree unchanged, then the appended nodes, then padding
    (root token, parent 0, depth 1, mask = itself and the root: harmless if forwarded).
    ``tree_mask[b, i, j]`` is true iff ``j`` is ``i`` or an ancestor of ``i``. CPU only.
    """
    return _ops.graft_chain(tree_tokens, parents, chain, chain_len)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  vectorized: bool = True) -> torch.Tensor:
    """``x @ weight.T + bias`` for a few rows of x, streaming each weight row once (CPU, float32 or bf16).

    x ``[..., in]`` (rows may be strided), weight ``[out, in]``, bias ``[out]`` or None, all float32 or
    all bfloat16; returns ``[..., out]`` in that dtype, like ``torch.nn.functional.linear``. Meant for
    2..~12 rows (a verification forward's tokens), where BLAS's packed matrix product costs much more
    than one row's (``skinny.py`` routes a model's linears through it).
    Accumulates in float32 in its own order (within a few ulps of torch's); a bf16 result is rounded
    once from the float32 sum. Vectorized paths: AVX2/FMA (bf16 widened in registers) and, on CPUs
    with AVX512-BF16, AVX-512 (bf16 x bf16 by ``vdpbf16ps``, which reads bf16 denormals as zero).
    ``vectorized=False`` takes the portable C++ loop even where those exist (:func:`skinny_linear_vectorized`);
    the work is split over output features between torch's intra-op threads. CPU only.
    """
    return _ops.skinny_linear(x, weight, bias, vectorized)


def skinny_linear_cat(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor] | None = None,
                      vectorized: bool = True) -> torch.Tensor:
    """:func:`skinny_linear` of one x by several weights in one call, their outputs side by side:
    ``torch.cat([skinny_linear(x, w, b, vectorized) for w, b in zip(weights, biases)], -1)``, equal bit
    for bit, as one op with one split of the work between threads (a layer's q, k and v projections,
    or its gate and up projections: ``skinny.joint``).

    weights ``[out_i, in]``, all float32 or all bfloat16 (x's dtype); biases None/empty or one
    ``[out_i]`` per weight; returns ``[..., sum out_i]``. CPU only.
    """
    return _ops.skinny_linear_cat(x, list(weights), list(biases or []), vectorized)


def skinny_linear_vectorized() -> bool:
    """True when :func:`skinny_linear` has a vectorized path (AVX2/FMA or AVX-512) on this CPU (else the portable loop)."""
    return _ops.skinny_linear_vectorized()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama/Qwen2 RMS norm, ``weight * (h * rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)``
    with ``h = x.to(float32)``, equal to it bit for bit, in four operations instead of eight (the variance by
    ATen's own ``pow`` and ``mean``, the rest in one pass). x ``[..., dim]`` and weight ``[dim]``, both
    float32 or both bfloat16; returns a contiguous tensor of x's shape and dtype. CPU only."""
    return _ops.rms_norm(x, weight, eps)


def rotary_embedding(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` as transformers' Llama/Qwen2 ``apply_rotary_pos_emb`` computes it
    for q or k, equal to it bit for bit, in one pass. x ``[batch, heads, tokens, head_dim]`` (any strides
    with contiguous last dimension, e.g. ``view(...).transpose(1, 2)``), cos and sin ``[batch, 1, tokens,
    head_dim]``, all float32 or all bfloat16, head_dim even; returns a contiguous tensor of x's shape. CPU only."""
    return _ops.rotary_embedding(x, cos, sin)


GREEDY_TOPK_MAX_K = 64


def greedy_topk(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The top-k token ids of every position: logits ``[..., vocab]`` (float32, bf16 or fp16) ->
    int64 ``[..., k]``, ranked by logit, ties by the lower id, NaN above every number.

    ``ids[..., 0]`` is therefore exactly ``logits.argmax(-1)`` (the first index of the maximum, the
    token greedy decoding picks), and ``ids`` are the candidates recycling stores: one pass over the
    logits where torch needs ``topk`` and ``argmax`` (whose tie rule ``topk`` does not promise).
    ``1 <= k <= min(vocab, 64)``. CPU only.
    """
    return _ops.greedy_topk(logits, k)


# ----------------------------------------------------------------------------- fake implementations
@torch.library.register_fake("token_recycling::build_draft_tree")
def _(matrix, roots, parents, ranks):
    return roots.new_empty((roots.shape[0], parents.shape[0]))


# ----------------------------------------------------------------------------------- deferred device checks
def set_deferred_device_errors(device: torch.device | str, enable: bool) -> bool:
    """Defer the device-side input checks of the CUDA ops on ``device`` (see :func:`deferred_device_errors`);
    returns whether they were deferred before. A no-op (False) for the CPU, whose ops check at once."""
    return _ops.set_deferred_device_errors(torch.device(device), bool(enable))


def take_device_errors(device: torch.device | str) -> torch.Tensor:
    """The device's accumulated error record, int64 ``[6]`` on that device, and the record cleared.
    Waits for nothing: copy it to the host with the step's other results and pass the copy to
    :func:`raise_device_errors`. Always zeros on the CPU."""
    return _ops.take_device_errors(torch.device(device))


def raise_device_errors(record: torch.Tensor) -> None:
    """Raise the reporting op's ValueError (its own message, as an immediate check would give) when the
    host copy of a record from :func:`take_device_errors` holds an error."""
    _ops.raise_device_errors(record)


@contextlib.contextmanager
def deferred_device_errors(device: torch.device | str):
    """Within the block, the CUDA ops on ``device`` do not wait for the GPU to check the values only
    it holds (token ids, tree order, device-side prefix lengths): each ORs its kernels' error report
    into the device's accumulated record, and the caller reads it once (:func:`take_device_errors` in
    its one copy to the host, then :func:`raise_device_errors`). Outside such a block every op checks
    and raises at once. Under deferral ``verify_greedy``/``verify_sample`` return ``accepted_nodes``
    ``[B, N]`` (all N columns, -1 past each path), since the tree depth is not read back. On exit
    the previous setting is restored; errors still accumulated are left for the next take."""
    device = torch.device(device)
    previous = set_deferred_device_errors(device, True)
    try:
        yield
    finally:
        set_deferred_device_errors(device, previous)


@torch.library.register_fake("token_recycling::update_adjacency")
def _(matrix, tokens, candidates):
    return None


@torch.library.register_fake("token_recycling::verify_greedy")
def _(tokens, predictions, parents):
    width = torch.library.get_ctx().new_dynamic_size(min=1)  # tree depth + 1: data-dependent
    batch = tokens.shape[0]
    return tokens.new_empty((batch,)), tokens.new_empty((batch, width)), tokens.new_empty((batch,))


@torch.library.register_fake("token_recycling::verify_sample")
def _(tokens, parents, probs, uniforms):
    width = torch.library.get_ctx().new_dynamic_size(min=1)  # tree depth + 1: data-dependent
    batch = tokens.shape[0]
    return tokens.new_empty((batch,)), tokens.new_empty((batch, width)), tokens.new_empty((batch,))


@torch.library.register_fake("token_recycling::compact_kv")
def _(caches, prefix_len, accepted_nodes, accept_len):
    return None


@torch.library.register_fake("token_recycling::tree_attention")
def _(q, k, v, prefix_len, tree_mask, scale, tree_start=-1):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.register_fake("token_recycling::tree_attention_lse")
def _(q, k, v, prefix_len, tree_mask, scale, tree_start=-1):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty(q.shape[:3], dtype=torch.float32))


@torch.library.register_fake("token_recycling::merge_attention_states")
def _(out_a, lse_a, out_b, lse_b):
    return torch.empty_like(out_a, memory_format=torch.contiguous_format), torch.empty_like(lse_a)


@torch.library.register_fake("token_recycling::ngram_index_append")
def _(table, history, old_len, new_len):
    return None


@torch.library.register_fake("token_recycling::ngram_lookup")
def _(table, history, length, max_ngram, max_tokens):
    batch = history.shape[0]
    return history.new_empty((batch, max_tokens)), history.new_empty((batch,))


@torch.library.register_fake("token_recycling::ngram_candidates")
def _(table, history, length, max_ngram, max_tokens, max_candidates):
    batch = history.shape[0]
    return (history.new_empty((batch, max_candidates, max_tokens)), history.new_empty((batch, max_candidates)),
            history.new_empty((batch, max_candidates)), history.new_empty((batch, max_candidates)))


@torch.library.register_fake("token_recycling::graft_chain")
def _(tree_tokens, parents, chain, chain_len):
    batch, m = tree_tokens.shape[0], tree_tokens.shape[1] + chain.shape[1]
    return (tree_tokens.new_empty((batch, m)), parents.new_empty((batch, m)), tree_tokens.new_empty((batch, m)),
            tree_tokens.new_empty((batch, m, m), dtype=torch.bool), tree_tokens.new_empty((batch,)))


@torch.library.register_fake("token_recycling::skinny_linear")
def _(x, weight, bias=None, vectorized=True):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("token_recycling::skinny_linear_cat")
def _(x, weights, biases, vectorized=True):
    return x.new_empty((*x.shape[:-1], sum(w.shape[0] for w in weights)))


@torch.library.register_fake("token_recycling::greedy_topk")
def _(logits, k):
    return logits.new_empty((*logits.shape[:-1], k), dtype=torch.long)


@torch.library.register_fake("token_recycling::rms_norm")
def _(x, weight, eps):
    return x.new_empty(x.shape)


@torch.library.register_fake("token_recycling::rotary_embedding")
def _(x, cos, sin):
    return x.new_empty(x.shape)
