"""Plain PyTorch versions of every op: slow, obvious, and the oracle the native kernels are tested
against. They take the same arguments as :mod:`token_recycling.ops` and never share code with it."""

from __future__ import annotations

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
    flat_cand = candidates.reshape(len(flat_tokens), -1)
    for i, t in enumerate(flat_tokens):  # in order: the last occurrence wins
        matrix[t] = flat_cand[i].to(matrix.dtype)


def verify_greedy(tokens, predictions, parents):
    batch, n = tokens.shape
    per_row = parents.dim() == 2
    lens, paths, bonus = [], [], []
    width = 1
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


def compact_kv(caches, prefix_len, accepted_nodes, accept_len):
    for cache in caches:
        for b in range(cache.shape[0]):
            p, n = int(prefix_len[b]), int(accept_len[b])
            src = (p + accepted_nodes[b, :n]).tolist()
            cache[b, :, p : p + n] = cache[b, :, src].clone()


def tree_attention(q, k, v, prefix_len, tree_mask, scale):
    """Dense masked attention in q's dtype (or float64 if q is float64)."""
    batch, hq, n, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    k = k.repeat_interleave(hq // hkv, dim=1)
    v = v.repeat_interleave(hq // hkv, dim=1)
    out = torch.empty_like(q)
    for b in range(batch):
        p = int(prefix_len[b])
        visible = torch.zeros(n, s, dtype=torch.bool, device=q.device)
        visible[:, :p] = True
        visible[:, p : p + n] = tree_mask
        scores = (q[b] @ k[b].transpose(-1, -2)) * scale
        scores = scores.masked_fill(~visible, float("-inf"))
        weights = torch.softmax(scores.float() if q.dtype != torch.float64 else scores, dim=-1)
        weights = torch.nan_to_num(weights, nan=0.0).to(q.dtype)  # rows that see nothing -> 0
        out[b] = weights @ v[b]
    return out
