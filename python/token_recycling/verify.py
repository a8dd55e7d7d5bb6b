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
    processors that look at the history (repetition penalty, no-repeat n-grams) stay exact. Nodes of
    one depth have contexts of one length and go through the processors as one batch (HF's
    processors treat batch rows independently): one call per tree level, not per node."""
    parents = parents.tolist()
    tok = tokens[0].tolist()
    paths: list[list[int]] = [[]]
    for i in range(1, tokens.shape[1]):
        paths.append(paths[parents[i]] + [tok[i]])
    levels: dict[int, list[int]] = {}
    for i, path in enumerate(paths):
        levels.setdefault(len(path), []).append(i)
    out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    for depth, nodes in levels.items():
        ids = torch.cat([seq[0].expand(len(nodes), -1),
                         torch.tensor([paths[i] for i in nodes], dtype=seq.dtype, device=seq.device).view(len(nodes), depth)],
                        dim=1)
        index = torch.tensor(nodes, device=logits.device)
        out[0, index] = processors(ids, logits[0, index].float())
    return out


def verify_greedy(tokens: torch.Tensor, greedy: torch.Tensor, parents: torch.Tensor) -> Verdict:
    """The longest drafted path the model agrees with, and its bonus token. One device-to-host
    sync (the accepted length)."""
    accept_len, nodes, bonus = ops.verify_greedy(tokens, greedy, parents)
    n_acc = int(accept_len[0])
    path = nodes[0, :n_acc]
    return Verdict(accept_len, nodes, path, torch.cat([tokens[0, path[1:]], bonus]))


class GreedyVerifier:
    """Greedy decoding: the first token is the argmax after the prefill, and a step accepts the
    longest drafted path equal to the argmax at every node (see verify_greedy)."""

    description = "greedy"

    def __init__(self, processors, topk: int):
        self.processors = processors
        self.topk = topk

    def first(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The token after the prompt from the prefill's last logits [1, V]: [1]."""
        if self.processors is not None:
            logits = self.processors(input_ids, logits.float())
        return logits.argmax(-1)

    def verify(self, seq: torch.Tensor, draft, logits: torch.Tensor) -> tuple[Verdict, torch.Tensor]:
        """The step's verdict and the top-k candidates of every node (for recycling)."""
        if self.processors is not None:
            logits = process_tree_logits(self.processors, seq, draft.tokens, draft.parents, logits)
        greedy, candidates = greedy_and_candidates(logits, self.topk)
        return verify_greedy(draft.tokens, greedy, draft.parents), candidates
