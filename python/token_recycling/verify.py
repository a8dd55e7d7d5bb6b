"""Verification: which drafted nodes the model itself would have produced.

Greedy: the deepest node whose whole path equals the model's argmax at every ancestor is accepted,
plus one bonus token (the model's choice after it). The same top-k pass that gives the argmax gives
the candidates that recycling writes into the matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import ops


@dataclass
class Verdict:
    """accept_len [1] and accepted_nodes [1, D+1] as verify_greedy returns them (device tensors);
    ``path``: the accepted node indices (root first) and ``new_tokens``: the tokens they emit
    (the accepted drafts after the root, then the bonus)."""

    accept_len: torch.Tensor
    accepted_nodes: torch.Tensor
    path: torch.Tensor
    new_tokens: torch.Tensor

    @property
    def accepted(self) -> int:
        """Nodes kept in the cache (root included)."""
        return self.path.shape[0]


def greedy_and_candidates(logits: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmax [1, N], top-k ids [1, N, k]) from one top-k pass. The top-1 id is the argmax unless
    the two best logits tie (not rare in bf16); only then is argmax's first-index rule, which greedy
    generate() uses, looked up."""
    values, candidates = logits.topk(topk, dim=-1)
    greedy = candidates[..., 0]
    if topk == 1:
        return logits.argmax(-1), candidates
    tie = values[..., 0] == values[..., 1]
    if logits.device.type != "cpu" or bool(tie.any()):  # on a GPU, no sync just to look
        greedy = torch.where(tie, logits.argmax(-1), greedy)
    return greedy, candidates


def process_tree_logits(processors, seq: torch.Tensor, tokens: torch.Tensor, parents: torch.Tensor,
                        logits: torch.Tensor) -> torch.Tensor:
    """Apply HF logits processors node by node, each with its own context (prefix + its path), so
    processors that look at the history (repetition penalty, no-repeat n-grams) stay exact."""
    rows = []
    parents = parents.tolist()
    tok = tokens[0].tolist()
    for i in range(tokens.shape[1]):
        path, j = [], i
        while j > 0:
            path.append(tok[j])
            j = parents[j]
        ids = torch.cat([seq[0], torch.tensor(path[::-1], dtype=seq.dtype, device=seq.device)])
        rows.append(processors(ids.view(1, -1), logits[:, i].float()))
    return torch.stack(rows, dim=1)


def verify_greedy(tokens: torch.Tensor, greedy: torch.Tensor, parents: torch.Tensor) -> Verdict:
    """The longest drafted path the model agrees with, and its bonus token. One device-to-host
    sync (the accepted length)."""
    accept_len, nodes, bonus = ops.verify_greedy(tokens, greedy, parents)
    n_acc = int(accept_len[0])
    path = nodes[0, :n_acc]
    return Verdict(accept_len, nodes, path, torch.cat([tokens[0, path[1:]], bonus]))
