"""Verification: which drafted nodes the model itself would have produced.

Greedy: the deepest node whose whole path equals the model's argmax at every ancestor is accepted,
plus one bonus token (the model's choice after it). The same top-k pass that gives the argmax gives
the candidates that recycling writes into the matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import ops


@dataclass
class Verdict:
    """A step's verdict after its host sync (step_sync.py). ``accept_len [1]`` and
    ``accepted_nodes [1, W]`` as the verify op returned them (device tensors, for compaction);
    ``path``: the accepted node indices, root first (host); ``new_tokens``: the tokens they emit
    (the accepted drafts after the root, then the bonus) on the device, and ``new_host`` the same
    on the host."""

    accept_len: torch.Tensor
    accepted_nodes: torch.Tensor
    path: torch.Tensor
    new_tokens: torch.Tensor
    new_host: torch.Tensor

    @property
    def accepted(self) -> int:
        """Nodes kept in the cache (root included)."""
        return self.path.shape[0]


@dataclass
class Pending:
    """A verification's device outputs before the step's sync: ``emitted [W]`` holds the emitted
    tokens in its first ``accept_len`` entries (built on the device, so no count is read back).
    ``settle(n)``: what the verifier does once the host knows n (sampling: consume n uniforms)."""

    accept_len: torch.Tensor
    accepted_nodes: torch.Tensor
    emitted: torch.Tensor
    settle: Callable[[int], None] | None = None

    def device_parts(self) -> tuple[torch.Tensor, ...]:
        """What the step's sync copies back for this verdict."""
        return self.accept_len[:1], self.accepted_nodes[0], self.emitted

    def resolve(self, accept_len: torch.Tensor, nodes: torch.Tensor, emitted: torch.Tensor) -> Verdict:
        """The verdict from the host copies of :meth:`device_parts`."""
        n = int(accept_len[0])  # a host tensor: no sync
        if self.settle is not None:
            self.settle(n)
        return Verdict(self.accept_len, self.accepted_nodes[:, :n], nodes[:n], self.emitted[:n], emitted[:n])


def pending(tokens: torch.Tensor, accept_len: torch.Tensor, nodes: torch.Tensor, bonus: torch.Tensor,
            settle: Callable[[int], None] | None = None) -> Pending:
    """Pending verdict of one row from a verify op's outputs, without a host sync: the path's
    tokens after the root, then the bonus at index accept_len - 1."""
    path_tokens = tokens[0, nodes[0].clamp(min=0)]
    emitted = torch.cat([path_tokens[1:], bonus.view(1)]).scatter(0, accept_len[:1] - 1, bonus.view(1))
    return Pending(accept_len, nodes, emitted, settle)


def greedy_and_candidates(logits: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmax [1, N], top-k ids [1, N, k]) from one top-k pass. On the CPU ops.greedy_topk ranks ties
    by the lower id, so its first id is the argmax. Elsewhere the top-1 id is the argmax unless the
    two best logits tie (not rare in bf16); only then is argmax's first-index rule, which greedy
    generate() uses, looked up."""
    if logits.device.type == "cpu" and 1 <= topk <= min(ops.GREEDY_TOPK_MAX_K, logits.shape[-1]) \
            and logits.dtype in (torch.float32, torch.bfloat16, torch.float16):
        ids = ops.greedy_topk(logits, topk)  # one pass, ranked with argmax's tie rule
        return ids[..., 0], ids
    values, candidates = logits.topk(topk, dim=-1)
    greedy = candidates[..., 0]
    if topk == 1:
        return logits.argmax(-1), candidates
    tie = values[..., 0] == values[..., 1]
    # No host read just to look (a sync on a GPU; the CPU takes the same path, step_sync.py).
    return torch.where(tie, logits.argmax(-1), greedy), candidates


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


def verify_greedy(tokens: torch.Tensor, greedy: torch.Tensor, parents: torch.Tensor) -> Pending:
    """The longest drafted path the model agrees with, and its bonus token (no host sync: the
    step's sync resolves it)."""
    accept_len, nodes, bonus = ops.verify_greedy(tokens, greedy, parents)
    return pending(tokens, accept_len, nodes, bonus)


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

    def verify(self, seq: torch.Tensor, draft, logits: torch.Tensor) -> tuple[Pending, torch.Tensor]:
        """The step's pending verdict and the top-k candidates of every node (for recycling)."""
        if self.processors is not None:
            host = draft.on_host
            logits = process_tree_logits(self.processors, seq, host.tokens, host.parents, logits)
        greedy, candidates = greedy_and_candidates(logits, self.topk)
        return verify_greedy(draft.tokens, greedy, draft.parents), candidates
