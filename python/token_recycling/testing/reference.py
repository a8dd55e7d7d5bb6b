"""The test oracle: plain PyTorch versions of every op, slow and obvious, that the native kernels are
tested against. They take the same arguments as :mod:`token_recycling.ops` and never share code with
it; the library never imports this module (the decode path runs :mod:`token_recycling.ops`)."""

from __future__ import annotations

import math

import torch


def _depths(parents: torch.Tensor) -> list[int]:
    par = parents.tolist()
    depth = [0] * len(par)
    for i in range(1, len(par)):
        depth[i] = depth[par[i]] + 1
    return depth


def build_draft_tree(matrix, roots, parents, ranks):
    n = parents.shape[0]
    tokens = torch.empty(roots.shape[0], n, dtype=torch.long, device=roots.device)
    tokens[:, 0] = roots
    for i in range(1, n):
        tokens[:, i] = matrix[tokens[:, int(parents[i])], int(ranks[i])].long()
    return tokens


def update_adjacency(matrix, tokens, candidates):
    flat_tokens = tokens.reshape(-1).tolist()
    flat_cand = candidates.reshape(len(flat_tokens), candidates.shape[-1])  # (-1 is ambiguous when empty)
    for i, t in enumerate(flat_tokens):  # in order: the last occurrence wins
        matrix[t] = flat_cand[i].to(matrix.dtype)


def verify_greedy(tokens, predictions, parents):
    batch, n = tokens.shape
    per_row = parents.dim() == 2
    lens, paths, bonus = [], [], []
    width = 1 if per_row else max(_depths(parents)) + 1  # a shared tree sets the width even with no rows
    for b in range(batch):
        par = parents[b] if per_row else parents
        depth = _depths(par)
        width = max(width, max(depth) + 1)
        best, matched = 0, [True] + [False] * (n - 1)
        for i in range(1, n):
            p = int(par[i])
            matched[i] = matched[p] and int(tokens[b, i]) == int(predictions[b, p])
            if matched[i] and depth[i] > depth[best]:
                best = i
        path = [best]
        while path[-1] != 0:
            path.append(int(par[path[-1]]))
        paths.append(path[::-1])
        lens.append(len(path))
        bonus.append(int(predictions[b, best]))
    accepted = torch.full((batch, width), -1, dtype=torch.long, device=tokens.device)
    for b, path in enumerate(paths):
        accepted[b, : len(path)] = torch.tensor(path)
    as_t = lambda xs: torch.tensor(xs, dtype=torch.long, device=tokens.device)  # noqa: E731
    return as_t(lens), accepted, as_t(bonus)


def _inverse_cdf(p, u):
    """Exact integer inverse-CDF draw: weights ceil(p / max * 2^32) (0 stays 0), smallest v whose
    running sum exceeds floor(u * total)."""
    p = p.double()
    q = torch.where(p > 0, torch.ceil(p / p.max() * 2.0 ** 32), torch.zeros_like(p)).long()
    total = int(q.sum())
    target = min(math.floor(u * float(total)), total - 1)
    return int(torch.searchsorted(q.cumsum(0), torch.tensor(target), right=True))


def verify_sample(tokens, parents, probs, uniforms):
    batch, n = tokens.shape
    per_row = parents.dim() == 2
    lens, paths, bonus = [], [], []
    width = 1 if per_row else max(_depths(parents)) + 1  # a shared tree sets the width even with no rows
    for b in range(batch):
        par = (parents[b] if per_row else parents).tolist()
        width = max(width, max(_depths(parents[b] if per_row else parents)) + 1)
        children = {}
        for i in range(1, n):
            children.setdefault((par[i], int(tokens[b, i])), i)  # first child (index order) wins
        node, path = 0, []
        while True:
            path.append(node)
            drawn = _inverse_cdf(probs[b, node], float(uniforms[b, len(path) - 1]))  # the walk's d-th draw
            if (node, drawn) not in children:
                break
            node = children[(node, drawn)]
        paths.append(path)
        lens.append(len(path))
        bonus.append(drawn)
    accepted = torch.full((batch, width), -1, dtype=torch.long, device=tokens.device)
    for b, path in enumerate(paths):
        accepted[b, : len(path)] = torch.tensor(path)
    as_t = lambda xs: torch.tensor(xs, dtype=torch.long, device=tokens.device)  # noqa: E731
    return as_t(lens), accepted, as_t(bonus)


def compact_kv(caches, prefix_len, accepted_nodes, accept_len):
    for cache in caches:
        for b in range(cache.shape[0]):
            p, n = int(prefix_len[b]), int(accept_len[b])
            src = (p + accepted_nodes[b, :n]).tolist()
            cache[b, :, p : p + n] = cache[b, :, src].clone()


def tree_visible(prefix_len, tree_mask, b: int, n: int, s: int, tree_start: int = -1, device=None):
    """[N, S] bool: what row b's nodes see: keys [0, prefix_len[b]) and the tree block (its own
    [N, N] mask, or tree_mask[b] when it is [B, N, N]) at tree_start, or right after the prefix."""
    p = int(prefix_len[b])
    at = p if tree_start < 0 else tree_start
    visible = torch.zeros(n, s, dtype=torch.bool, device=device)
    visible[:, :p] = True
    visible[:, at : at + n] = tree_mask[b] if tree_mask.dim() == 3 else tree_mask
    return visible


def tree_attention(q, k, v, prefix_len, tree_mask, scale, tree_start=-1):
    """Dense masked attention in q's dtype (or float64 if q is float64)."""
    batch, hq, n, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    k = k.repeat_interleave(hq // hkv, dim=1)
    v = v.repeat_interleave(hq // hkv, dim=1)
    out = torch.empty_like(q)
    for b in range(batch):
        visible = tree_visible(prefix_len, tree_mask, b, n, s, tree_start, q.device)
        scores = (q[b] @ k[b].transpose(-1, -2)) * scale
        scores = scores.masked_fill(~visible, float("-inf"))
        weights = torch.softmax(scores.float() if q.dtype != torch.float64 else scores, dim=-1)
        weights = torch.nan_to_num(weights, nan=0.0).to(q.dtype)  # rows that see nothing -> 0
        out[b] = weights @ v[b]
    return out


def attention_lse(q, k, v, visible, scale):
    """Masked attention and its log-sum-exp in q's dtype's float accumulation (float64 stays
    float64): q [B, H, N, D], k, v [B, H, S, D], visible [N, S] or [B, H, N, S] bool. Rows that see
    nothing: zero output, lse -inf."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.nan_to_num(torch.exp(scores - lse.unsqueeze(-1)), nan=0.0)
    return (weights @ v.to(acc)).to(q.dtype), lse.to(torch.float32 if acc == torch.float32 else acc)


def tree_attention_lse(q, k, v, prefix_len, tree_mask, scale, tree_start=-1):
    """tree_attention with the log-sum-exp of each row (see attention_lse)."""
    batch, hq, n, _ = q.shape
    hkv, s = k.shape[1], k.shape[2]
    k = k.repeat_interleave(hq // hkv, dim=1)
    v = v.repeat_interleave(hq // hkv, dim=1)
    outs, lses = [], []
    for b in range(batch):
        visible = tree_visible(prefix_len, tree_mask, b, n, s, tree_start, q.device)
        o, l = attention_lse(q[b : b + 1], k[b : b + 1], v[b : b + 1], visible, scale)
        outs.append(o)
        lses.append(l)
    if not outs:  # no rows
        return torch.empty_like(q), torch.empty(q.shape[:3], dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    return torch.cat(outs), torch.cat(lses)


def merge_attention_states(out_a, lse_a, out_b, lse_b):
    """The obvious merge: weights softmax([lse_a, lse_b]) per row (float64 in, float64 out)."""
    acc = torch.float64 if out_a.dtype == torch.float64 else torch.float32
    la, lb = lse_a.to(acc), lse_b.to(acc)
    m = torch.maximum(la, lb)
    dead = m == float("-inf")
    m = torch.where(dead, torch.zeros_like(m), m)
    wa, wb = torch.exp(la - m), torch.exp(lb - m)
    total = wa + wb
    out = (wa.unsqueeze(-1) * out_a.to(acc) + wb.unsqueeze(-1) * out_b.to(acc)) / total.clamp_min(1e-300).unsqueeze(-1)
    out = torch.where(dead.unsqueeze(-1), torch.zeros_like(out), out)
    lse = torch.where(dead, torch.full_like(m, float("-inf")), m + torch.log(total))
    return out.to(out_a.dtype), lse


def ngram_lookup_reference(history, length, max_ngram, max_tokens):
    """Brute force: scan every earlier end for the longest suffix first (no index)."""
    batch = history.shape[0]
    tokens = torch.full((batch, max_tokens), -1, dtype=torch.long, device=history.device)
    count = torch.zeros(batch, dtype=torch.long, device=history.device)
    for b in range(batch):
        h = history[b, : int(length[b])].tolist()
        found = None
        for n in range(max_ngram, 0, -1):
            suffix = h[len(h) - n :]
            for end in range(len(h) - 1, n - 1, -1):  # most recent first; end < len(h)
                if h[end - n : end] == suffix:
                    found = h[end : end + max_tokens]
                    break
            if found is not None:
                break
        if found:
            tokens[b, : len(found)] = torch.tensor(found)
            count[b] = len(found)
    return tokens, count


def graft_chain(tree_tokens, parents, chain, chain_len):
    batch, n = tree_tokens.shape
    m = n + chain.shape[1]
    root_depth = _depths(parents)
    out_tokens = torch.empty(batch, m, dtype=torch.long)
    out_parents = torch.empty(batch, m, dtype=torch.int32)
    out_depths = torch.empty(batch, m, dtype=torch.long)
    mask = torch.zeros(batch, m, m, dtype=torch.bool)
    num_nodes = torch.empty(batch, dtype=torch.long)
    for b in range(batch):
        tok = tree_tokens[b].tolist()
        par = parents.tolist()
        depth = list(root_depth)
        cur, appending = 0, False
        for j in range(int(chain_len[b])):
            c = int(chain[b, j])
            # The smallest-index child of cur with token c, among all nodes so far.
            child = next((i for i in range(len(tok)) if i > 0 and par[i] == cur and tok[i] == c), None)
            if child is not None and not appending:
                cur = child
                continue
            appending = True
            tok.append(c)
            par.append(cur)
            depth.append(depth[cur] + 1)
            cur = len(tok) - 1
        num_nodes[b] = len(tok)
        while len(tok) < m:  # padding: a root-token leaf below the root
            tok.append(tok[0])
            par.append(0)
            depth.append(1)
        out_tokens[b] = torch.tensor(tok)
        out_parents[b] = torch.tensor(par, dtype=torch.int32)
        out_depths[b] = torch.tensor(depth)
        for i in range(m):
            j = i
            while j != -1:
                mask[b, i, j] = True
                j = par[j]
    return out_tokens, out_parents, out_depths, mask, num_nodes



def ngram_candidates_reference(history, length, max_ngram, max_tokens, max_candidates):
    """Brute force: for each n, longest first, every earlier occurrence of the suffix, most recent
    first; its continuation unless it equals an earlier candidate over the shorter length."""
    batch = history.shape[0]
    tokens = torch.full((batch, max_candidates, max_tokens), -1, dtype=torch.long)
    count, ngram, start = (torch.zeros(batch, max_candidates, dtype=torch.long) for _ in range(3))
    for b in range(batch):
        h = history[b, : int(length[b])].tolist()
        taken: list[list[int]] = []
        for n in range(min(max_ngram, len(h) - 1), 0, -1):
            if len(taken) == max_candidates:
                break
            suffix = h[len(h) - n:]
            for end in range(len(h) - 1, n - 1, -1):  # every earlier occurrence, most recent first
                if len(taken) == max_candidates:
                    break
                if h[end - n: end] != suffix:
                    continue
                cont = h[end: end + max_tokens]
                if any(cont[: min(len(cont), len(o))] == o[: min(len(cont), len(o))] for o in taken):
                    continue
                j = len(taken)
                taken.append(cont)
                tokens[b, j, : len(cont)] = torch.tensor(cont)
                count[b, j], ngram[b, j], start[b, j] = len(cont), n, end
    return tokens, count, ngram, start


def skinny_linear(x, weight, bias=None):
    """``x @ weight.T + bias`` computed in float64, returned as float32."""
    y = x.double() @ weight.double().T
    if bias is not None:
        y = y + bias.double()
    return y.float()


def greedy_topk(logits, k):
    """The top-k ids ranked by (NaN first, larger logit, lower id), by two stable sorts over a copy
    in float64: the second sort (NaN first) keeps the first's order (value, then id) within each class."""
    v = logits.double()
    nan = v.isnan()
    by_value = torch.sort(v.masked_fill(nan, float("inf")), dim=-1, descending=True, stable=True).indices
    nan_sorted = torch.gather(nan, -1, by_value).to(torch.int8)
    order = torch.sort(nan_sorted, dim=-1, descending=True, stable=True).indices
    return torch.gather(by_value, -1, order)[..., :k].contiguous()


def rms_norm(x, weight, eps):
    """transformers' LlamaRMSNorm.forward, operation by operation."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotary_embedding(x, cos, sin):
    """apply_rotary_pos_emb for one tensor (cos, sin already [batch, 1, tokens, head_dim])."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos) + (rotated * sin)
