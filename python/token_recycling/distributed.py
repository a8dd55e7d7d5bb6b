"""Multi-process runs (tensor parallel under torchrun): every drafting decision must be the same on
every rank, or the ranks forward drafts of different sizes into the same collectives and hang.

Decisions are made from data that is already identical everywhere (accepted tokens, the matrix)
and from timings; timings differ per rank, so every timing that feeds a decision goes through
:func:`agree`, which hands every rank rank 0's values.

:func:`check_draft` is the safety net: before each verification forward the ranks compare a
fingerprint of their drafts (one small all-gather), so a desynchronisation is a RuntimeError naming
the ranks, not a collective that waits on tensors of another shape.
"""

from __future__ import annotations

import os

import torch

CHECK_ENV = "TOKEN_RECYCLING_CHECK_RANKS"  # "0": never; "N": every N steps (default 1: every step)


def active() -> bool:
    """True inside an initialized torch.distributed group of more than one process."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _device(near: torch.device | None = None) -> torch.device:
    """Where collectives take their tensors: the CPU for gloo, this rank's GPU for NCCL."""
    if torch.distributed.get_backend() != "nccl":
        return torch.device("cpu")
    if near is not None and near.type == "cuda":
        return near
    return torch.device("cuda", torch.cuda.current_device())


def agree(values: list[float]) -> list[float]:
    """``values`` as rank 0 measured them, on every rank (unchanged in a single process)."""
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    torch.distributed.broadcast(t, src=0)
    return t.cpu().tolist()


def check_every() -> int:
    """How often :func:`check_draft` compares ranks, from $TOKEN_RECYCLING_CHECK_RANKS (0: never)."""
    text = os.environ.get(CHECK_ENV, "1").strip() or "1"
    try:
        every = int(text)
    except ValueError:
        raise ValueError(f"${CHECK_ENV} must be a non-negative integer (0: no check), got {text!r}") from None
    if every < 0:
        raise ValueError(f"${CHECK_ENV} must be a non-negative integer (0: no check), got {text!r}")
    return every


# Odd 31-bit multipliers, one per draft position (fixed, so every rank computes the same hash).
_WEIGHTS = torch.randint(1, 2**31 - 1, (4096,), generator=torch.Generator().manual_seed(17)) | 1
_weights_on: dict[torch.device, torch.Tensor] = {}


def fingerprint(tokens: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
    """[size, hash(tokens), hash(parents)] as int64 on the tokens' device (int64 sums wrap: still a hash)."""
    t, p = tokens.reshape(-1).long(), parents.reshape(-1).long()
    n = t.numel()
    if t.device not in _weights_on:
        _weights_on[t.device] = _WEIGHTS.to(t.device)
    w = _weights_on[t.device][torch.arange(n, device=t.device) % _WEIGHTS.numel()]
    size = torch.tensor([n], dtype=torch.int64, device=t.device)
    return torch.cat([size, (t * w).sum().view(1), ((p + 2) * w.flip(0)).sum().view(1)])


def check_same(what: str, local: torch.Tensor) -> None:
    """Raise RuntimeError unless every rank holds the same small int64 tensor ``local``."""
    if not active():
        return
    dist = torch.distributed
    local = local.to(_device(local.device), torch.int64)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    values = [g.cpu().tolist() for g in gathered]
    differ = [r for r, v in enumerate(values) if v != values[0]]
    if differ:
        raise RuntimeError(
            f"tensor-parallel ranks disagree on {what}: rank(s) {differ} differ from rank 0 "
            f"(fingerprints {dict(enumerate(values))}). Every rank must draft the same tree from the same "
            f"data; a decision taken from per-rank data (timing, randomness) has desynchronized them.")


def check_draft(draft, step: int) -> None:
    """Every ``check_every()`` steps: the ranks' drafts (tokens, parents) must be identical."""
    if not active():
        return
    every = check_every()
    if every and step % every == 0:
        check_same(f"the draft of step {step} ({draft.size} nodes on rank {rank()})",
                   fingerprint(draft.tokens, draft.parents))


def check_prompt(input_ids: torch.Tensor) -> None:
    """Before the prefill: every rank must generate from the same prompt (unless checks are off)."""
    if active() and check_every():
        check_same("the prompt", fingerprint(input_ids, torch.zeros_like(input_ids)))
