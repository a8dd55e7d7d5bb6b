"""Batched decoding: B left-padded prompts at once, each row with its own draft, acceptance and stop.

The step is the batch-1 loop's (recycler.py), once per row where it is per request, once per batch
where it is one model call:

    per row   draft (its own n-gram index, one shared matrix)
    batch     pad the drafts to one size N -> one forward over every row's tree (batch_cache.py)
    per row   verify (greedy or sampling walk, with the row's own context)
    batch     recycle (one matrix update) -> compact every row's accepted path (one compact_kv call)
    per row   emit (stopping criteria per row); finished rows leave the batch

The output is what transformers' batched ``generate()`` returns: the rows as given (left padding
kept), then each row's new tokens, ``pad_token_id`` after a row's EOS, all rows the length of the
longest. With tree="auto" every row's plan is chosen by the policy from its own candidates, against
a forward-cost curve measured with batch-shaped forwards (each of B rows forwarding n nodes), kept
per batch size: a wider batch makes nodes dearer, so trees shrink with it.
"""

from __future__ import annotations

import copy
import time
from types import SimpleNamespace

import torch

from . import batch_cache as bc
from . import cache as kv
from .auto_tree import sync
from .draft import Draft
from .emit import Emitter
from .policy import StepCost
from .stats import GenerationStats


def check_left_padded(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The pad count of every row [B] (CPU); refuses right padding, empty rows and a bad mask."""
    batch, seq = input_ids.shape
    if attention_mask is None:
        return torch.zeros(batch, dtype=torch.long)
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 1:
        attention_mask = attention_mask.unsqueeze(0)
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (batch, seq):
        raise ValueError(f"attention_mask must be a tensor of the shape of input_ids {(batch, seq)}, got "
                         f"{getattr(attention_mask, 'shape', type(attention_mask).__name__)}")
    mask = attention_mask.detach().cpu()
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (tokens)")
    mask = mask.long()
    pads = seq - mask.sum(1)
    if bool((pads == seq).any()):
        raise ValueError("attention_mask has a row with no token (all zeros)")
    want = torch.arange(seq).view(1, -1) >= pads.view(-1, 1)
    if not torch.equal(mask.bool(), want):
        raise ValueError("attention_mask is not left-padded: TokenRecycler needs the padding of every row before "
                         "its tokens (tokenizer.padding_side = 'left', as transformers' generate() expects "
                         "for decoder-only models); right padding is not supported")
    return pads


class Row:
    """One prompt of the batch: its sequence as returned (left padding kept), what it holds in the
    cache, its next root, drafting state, verifier, emitter and statistics."""

    def __init__(self, index: int, seq: torch.Tensor, pad: int, verifier, emitter: Emitter, decoding: str):
        self.index, self.seq, self.pad, self.verifier, self.emitter = index, seq, pad, verifier, emitter
        self.cached = seq.shape[1] - pad
        self.root: torch.Tensor | None = None
        self.state = None
        self.done = False
        self.stats = GenerationStats(decoding=decoding)


def pad_drafts(drafts: list[Draft]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokens, depths [B, N] and tree masks [B, N, N] of every row's draft padded to the largest N.
    A padding node sees only itself and no real node sees it; its logits are never read."""
    n = max(d.size for d in drafts)
    device = drafts[0].tokens.device
    tokens = torch.zeros(len(drafts), n, dtype=torch.long, device=device)
    depths = torch.zeros(len(drafts), n, dtype=torch.long, device=device)
    tree = torch.eye(n, dtype=torch.bool, device=device).repeat(len(drafts), 1, 1)
    for b, d in enumerate(drafts):
        tokens[b, : d.size] = d.tokens[0]
        depths[b, : d.size] = d.depths
        tree[b, : d.size, : d.size] = d.mask
    return tokens, depths, tree


class BatchDecoder:
    """Runs one batched generation for a TokenRecycler (its drafter, model and settings)."""

    def __init__(self, rec):
        self.rec = rec
        self.costs: dict[int, StepCost] = {}  # auto: the cost curve of each batch size

    def decode(self, input_ids, pads, cache, stopping, verifier, pad_token_id: int, capacity: int) -> torch.Tensor:
        rec = self.rec
        start = time.perf_counter()
        policy = rec.drafter.policy
        saved_cost = policy.cost if policy is not None else None
        if policy is not None:
            policy.cost = self.costs.setdefault(input_ids.shape[0], StepCost())
        try:
            rows = self._prefill(input_ids, pads, cache, verifier, stopping, capacity)
            steps = self._loop(rows, cache, capacity)
        finally:
            if policy is not None:
                policy.cost = saved_cost
        for row in rows:  # later requests' n-grams search these outputs, as after a one-row generate
            rec.drafter.finish(row.seq[0, input_ids.shape[1]:])
        rec.stats = summed_stats(rows, steps, time.perf_counter() - start, input_ids.shape[1], verifier.description)
        rec.stats.tree, rec.stats.tree_size = rec.describe(), rec.tree.num_nodes - 1
        return padded_output(rows, pad_token_id)

    def _prefill(self, input_ids, pads, cache, verifier, stopping, capacity: int) -> list[Row]:
        rec = self.rec
        mask = (torch.arange(input_ids.shape[1]).view(1, -1) >= pads.view(-1, 1)).to(input_ids.device)
        positions = (mask.long().cumsum(-1) - 1).masked_fill(~mask, 0)  # as generate() computes them
        keep_all = rec.seed_from_prompt
        out = rec.model(input_ids=input_ids, attention_mask=mask.long(), position_ids=positions, use_cache=True,
                        logits_to_keep=0 if keep_all else 1, **{rec._cache_kwarg: cache})
        bc.left_align(cache, pads.to(input_ids.device))
        rows = []
        for b in range(input_ids.shape[0]):
            row = Row(b, input_ids[b: b + 1], int(pads[b]), copy.copy(verifier), Emitter(stopping),
                      verifier.description)
            if keep_all:
                valid = input_ids[b: b + 1, row.pad:]
                rec.drafter.recycle(valid, out.logits[b: b + 1, row.pad:].topk(rec.topk, dim=-1).indices)
            row.root = row.verifier.first(row.seq, out.logits[b: b + 1, -1, :])
            row.seq, row.done, _ = row.emitter.emit(row.seq, row.root)
            row.state = rec.drafter.start(row.seq[:, row.pad:], capacity)  # the n-gram index skips padding
            rows.append(row)
        return rows

    def _loop(self, rows: list[Row], cache, capacity: int) -> int:
        rec, drafter = self.rec, self.rec.drafter
        active = self._drop_finished(rows, rows, cache)
        if active:
            drafter.tune(lambda n: self._timed_dummy_forward(active, cache, n), min(r.cached for r in active),
                         None)
        steps = 0
        while active:
            t_step = time.perf_counter()
            drafts = [drafter.draft(r.state, r.root) for r in active]
            tokens, depths, tree = pad_drafts(drafts)
            cached = torch.tensor([r.cached for r in active], dtype=torch.long, device=rec.device)
            start = cache.get_seq_length()
            t_forward = time.perf_counter()
            logits = bc.forward_rows(rec.model, tokens, depths, tree, cached, cache, rec.tree_attention,
                                     rec._cache_kwarg)
            sync(rec.device)
            t_forward = time.perf_counter() - t_forward
            verdicts = []
            for b, (row, draft) in enumerate(zip(active, drafts)):
                pending, candidates = row.verifier.verify(row.seq, draft, logits[b: b + 1, : draft.size])
                verdict = pending.resolve_here()  # (this loop reads back per row, not once per step)
                drafter.observe(row.state, draft, verdict.path, verdict.new_tokens)
                drafter.recycle(draft.tokens, candidates)
                verdicts.append(verdict)
            new_cached = bc.compact_rows(cache, cached, start, [v.path for v in verdicts])
            for b, (row, draft, verdict) in enumerate(zip(active, drafts, verdicts)):
                row.cached = int(new_cached[b])
                row.seq, row.done, emitted = row.emitter.emit(row.seq, verdict.new_tokens)
                if not row.done:
                    row.state.accept(row.seq[:, row.pad:], emitted)
                row.stats.record_step(verdict.path.tolist(), draft)
                row.root = verdict.new_tokens[-1:]
            steps += 1
            drafter.step_done(time.perf_counter() - t_step, t_forward, SimpleNamespace(size=tokens.shape[1]))
            active = self._drop_finished(rows, active, cache)
        return steps

    def _drop_finished(self, rows: list[Row], active: list[Row], cache) -> list[Row]:
        """The rows still going; the finished ones leave the cache (which is cropped to the longest left)."""
        keep = [b for b, r in enumerate(active) if not r.done]
        if len(keep) < len(active):
            if keep:
                bc.keep_rows(cache, keep)
                bc.crop(cache, max(active[b].cached for b in keep))
            for r in active:
                if r.done:
                    r.emitter.end()
        return [active[b] for b in keep]

    def _timed_dummy_forward(self, active: list[Row], cache, n: int) -> None:
        """A batch-shaped verification forward: every row forwards a chain of n nodes; cache restored."""
        device = self.rec.device
        tokens = torch.cat([r.root.view(1, 1).expand(1, n) for r in active])
        depths = torch.arange(n, device=device).expand(len(active), n)
        tree = torch.ones(n, n, dtype=torch.bool, device=device).tril().expand(len(active), n, n).contiguous()
        cached = torch.tensor([r.cached for r in active], dtype=torch.long, device=device)
        bc.forward_rows(self.rec.model, tokens, depths, tree, cached, cache, self.rec.tree_attention,
                        self.rec._cache_kwarg)
        sync(device)
        kv.trim(cache, n)


def padded_output(rows: list[Row], pad_token_id: int) -> torch.Tensor:
    """Every row's sequence, right-filled with pad_token_id to the longest (as generate() pads)."""
    width = max(r.seq.shape[1] for r in rows)
    out = torch.full((len(rows), width), pad_token_id, dtype=torch.long, device=rows[0].seq.device)
    for b, r in enumerate(rows):
        out[b, : r.seq.shape[1]] = r.seq[0]
    return out


def summed_stats(rows: list[Row], steps: int, seconds: float, prompt_len: int, decoding: str) -> GenerationStats:
    """The batch's statistics: per step (one forward) the tokens every active row emitted together
    (``accept_lengths``) and the nodes forwarded (``tree_nodes``, padding included is not counted:
    the rows' own draft sizes summed); totals summed over rows; ``rows`` holds each row's own."""
    total = GenerationStats(decoding=decoding, steps=steps, seconds=seconds)
    for r in rows:
        s = r.stats
        s.new_tokens = r.seq.shape[1] - prompt_len
        s.seconds = seconds
        total.new_tokens += s.new_tokens
        total.from_matrix += s.from_matrix
        total.from_ngram += s.from_ngram
        total.decision_seconds += s.decision_seconds
        for key, count in s.node_matches.items():
            total.node_matches[key] = total.node_matches.get(key, 0) + count
    for t in range(steps):
        going = [r.stats for r in rows if t < r.stats.steps]  # a row's steps are the batch's first ones
        total.accept_lengths.append(sum(s.accept_lengths[t] for s in going))
        total.tree_nodes.append(sum(s.tree_nodes[t] for s in going))
        total.matrix_nodes.append(sum(s.matrix_nodes[t] for s in going))
        total.chain_tokens.append(sum(s.chain_tokens[t] for s in going))
        total.ngram_accepted.append(sum(s.ngram_accepted[t] for s in going))
    total.rows = [r.stats for r in rows]
    return total
