"""The decode step, for one row or many: prefill, then per step

    draft (every row) -> one forward (every row's tree, padded to one size) -> verify (every row)
        -> one host sync -> recycle (one matrix update) -> compact (one compact_kv call) -> emit

B = 1 is the smallest batch, not a path of its own. What differs with B lives in the cache layout
(cache.py): row b holds its ``P_b`` cached tokens at slots ``[0, P_b)``; a step writes every row's
tree at the common slots ``[L, L + N)`` with ``L = max_b P_b``, so with one row the tree sits right
after its prefix. Left-padded prompts are shifted into that layout once, after the prefill.

The drafter decides per row, against the forward-cost curve of the step's batch size (``costs``:
one :class:`policy.StepCost` per B, passed to the drafter as an argument), and also whether the
batch drafts at all (``Drafter.draft_rows``): where a forward of B rows of n nodes costs more than
it returns, every row forwards its root alone and the step runs as batched greedy does.

The step reads back from the device once (step_sync.py): every row's accept length, accepted
nodes, emitted tokens and every forwarded node's top-k come back in one copy.
"""

from __future__ import annotations

import copy
import dataclasses
import time

import torch

from . import cache as kv
from . import calibration, distributed, hf_model, lean_forward, skinny, window
from .auto_tree import CostModel, sync
from .draft import Draft
from .emit import Emitter
from .policy import StepCost
from .stats import GenerationStats
from .step_sync import ForwardTimer, StepSync


class Row:
    """One prompt being decoded: its sequence as returned (left padding kept), how many tokens it holds
    in the cache, its next root (a host tensor [1]), its drafting state, verifier, emitter and stats."""

    def __init__(self, seq: torch.Tensor, pad: int, verifier, emitter: Emitter):
        self.seq, self.pad, self.verifier, self.emitter = seq, pad, verifier, emitter
        self.cached = seq.shape[1] - pad
        self.root: torch.Tensor | None = None
        self.state = None
        self.done = False
        self.stats = GenerationStats(decoding=verifier.description)


class Decoder:
    """Runs generations for a TokenRecycler: its model, drafter and settings, and the forward-cost
    curve of every batch size it has decoded (one row's is the drafter's own, saved with the matrix)."""

    def __init__(self, rec):
        self.rec = rec
        self.costs: dict[int, StepCost] = {}
        self.fixed: CostModel | None = None  # a curve given instead of measured (TokenRecycler.use_cost_curve)
        # This call's verification forwards go through lean_forward (decode): its lean_forward.Parts, or False.
        self.lean: lean_forward.Parts | bool = False

    def cost(self, batch: int) -> StepCost | None:
        policy = self.rec.drafter.policy
        if policy is None:
            return None
        if batch == 1:
            return policy.cost
        if batch not in self.costs:
            self.costs[batch] = StepCost()
            if self.fixed is not None:
                self.costs[batch].set_curve(self.fixed)
        return self.costs[batch]

    # ------------------------------------------------------------------ one generation
    def decode(self, input_ids: torch.Tensor, pads: torch.Tensor, cache, stopping, verifier, streamer,
               capacity: int, pad_token_id: int) -> torch.Tensor:
        """input_ids [B, S] (left-padded by ``pads`` [B]); returns [B, S + new] as generate() does."""
        rec = self.rec
        start = time.perf_counter()
        # Verification forwards without transformers' per-module Python where that gives the same
        # logits (lean_forward.py); decided per call: hooks or a mode may have changed since the last.
        self.lean = hf_model.lean_usable(rec.model, rec.tree_attention, rec._cache_kwarg)
        if self.lean:  # the model's parts, looked up once for this call's forwards
            self.lean = lean_forward.Parts(rec.model)
        rows = self._prefill(input_ids, pads, cache, verifier, stopping, streamer, capacity)
        steps = self._loop(rows, cache)
        if rec.graph is not None:
            rec.graph.release()
        for row in rows:  # later requests draft from these (the suffix memory)
            row.emitter.end()
            rec.drafter.finish(row.seq[0, input_ids.shape[1]:], prompt=row.seq[0, row.pad: input_ids.shape[1]])
        rec.stats = self._stats(rows, steps, time.perf_counter() - start, input_ids.shape[1], verifier.description)
        return padded_output(rows, pad_token_id)

    def _prefill(self, input_ids, pads, cache, verifier, stopping, streamer, capacity: int) -> list[Row]:
        rec = self.rec
        keep_all = rec.seed_from_prompt
        padded = bool(pads.any())
        extra = {}
        if padded:
            mask = (torch.arange(input_ids.shape[1]).view(1, -1) >= pads.view(-1, 1)).to(input_ids.device)
            positions = (mask.long().cumsum(-1) - 1).masked_fill(~mask, 0)  # as generate() computes them
            extra = {"attention_mask": mask.long(), "position_ids": positions}
        out = rec.model(input_ids=input_ids, use_cache=True, logits_to_keep=0 if keep_all else 1,
                        **{rec._cache_kwarg: cache}, **extra)
        if padded:
            kv.left_align(cache, pads.to(input_ids.device))
            kv.crop(cache, int((input_ids.shape[1] - pads).max()), input_ids.shape[1])
        rows = []
        for b in range(input_ids.shape[0]):
            row_verifier = verifier if input_ids.shape[0] == 1 else copy.copy(verifier)
            row = Row(input_ids[b: b + 1], int(pads[b]), row_verifier, Emitter(stopping, streamer))
            if keep_all:
                rec.drafter.recycle(row.seq[:, row.pad:], out.logits[b: b + 1, row.pad:].topk(rec.topk, dim=-1).indices)
            root = row.verifier.first(row.seq, out.logits[b: b + 1, -1, :])
            row.seq, row.done, _ = row.emitter.emit(row.seq, root)
            row.root = root.cpu()  # drafting is host work (draft.py)
            row.state = rec.drafter.start(row.seq[:, row.pad:], capacity)  # the n-gram index skips padding
            rows.append(row)
        return rows

    def _loop(self, rows: list[Row], cache) -> int:
        rec, drafter = self.rec, self.rec.drafter
        length = max(r.cached for r in rows)  # the cache's length (slots), kept on the host
        active, length = self._drop_finished(rows, cache, length)  # rows whose first token ended them
        cost, cost_rows = self.cost(len(active)), len(active)  # the curve, and the batch size it is of
        if active:
            self._tune(active, cache, length, cost)
        steps = 0
        # The prefix length on the device, for the kernels that read it there (graph steps, one row).
        prefix_len = torch.tensor([r.cached for r in active], dtype=torch.long, device=rec.device)
        timer = ForwardTimer(rec.device)
        with StepSync(rec.device) as step_sync:  # the step's one host sync (step_sync.py)
            while active:
                t_step = time.perf_counter()
                batch = len(active)
                drafts = drafter.draft_rows([r.state for r in active], [r.root for r in active], cost)
                drafts, forwarded = self._fit(cache, length, drafts)
                for draft in drafts:  # tensor parallel: a desync is an error, not a hang
                    distributed.check_draft(draft, steps)
                kv.check_cache(cache, forwarded)
                timer.start()
                logits = self._forward(active, drafts, cache, length, forwarded, prefix_len)
                timer.stop()
                pendings, candidates = [], []
                for b, (row, draft) in enumerate(zip(active, drafts)):
                    pending, cands = row.verifier.verify(row.seq, draft, logits[b: b + 1, : draft.size])
                    pendings.append(pending)
                    candidates.append(cands)
                parts = [p for pending in pendings for p in pending.device_parts()]
                host = step_sync.fetch(*parts, *candidates)
                verdicts = [pending.resolve(*host[3 * b: 3 * b + 3]) for b, pending in enumerate(pendings)]
                host_candidates = host[3 * batch:]
                for row, draft, verdict in zip(active, drafts, verdicts):
                    drafter.observe(row.state, draft, verdict.path, verdict.new_host)
                drafter.recycle(torch.cat([d.on_host.tokens for d in drafts], dim=1),
                                torch.cat(host_candidates).view(1, sum(d.size for d in drafts), -1))
                length = self._compact(cache, active, drafts, verdicts, length, forwarded, prefix_len)
                for row, draft, verdict in zip(active, drafts, verdicts):
                    row.cached += verdict.accepted
                    row.seq, row.done, emitted = row.emitter.emit(row.seq, verdict.new_tokens,
                                                                  verdict.new_host.tolist())
                    if not row.done:
                        row.state.accept(row.seq[:, row.pad:], emitted, verdict.new_host)
                    row.stats.record_step(verdict.path.tolist(), draft)
                    row.root = verdict.new_host[-1:]
                if batch == 1:
                    prefix_len = prefix_len + verdicts[0].accept_len[:1]  # on the device: no sync
                steps += 1
                if batch == cost_rows:  # a narrower batch's times would bend the wider batch's curve
                    drafter.step_done(time.perf_counter() - t_step, timer.seconds(), forwarded, cost)
                if any(r.done for r in active):
                    active, length = self._drop_finished(active, cache, length)
                    if active:
                        prefix_len = torch.tensor([r.cached for r in active], dtype=torch.long, device=rec.device)
                        # A curve already measured for the smaller batch, else the wider batch's (nodes
                        # cost no less with fewer rows): measuring inside a call would cost more than it saves.
                        narrower = self.cost(len(active))
                        if narrower is not None and narrower.measured:
                            cost, cost_rows = narrower, len(active)
            step_sync.finish()
        return steps

    # ------------------------------------------------------------------ the cost curve
    def _tune(self, rows: list[Row], cache, length: int, cost: StepCost | None) -> None:
        """The forward-cost curve of ``len(rows)`` rows: from the calibration cache where this machine
        measured one for this model and setting, else measured now (Drafter.tune) and kept there."""
        rec = self.rec
        entry = self._cost_entry(len(rows)) if cost is not None and not cost.measured else None
        if entry is not None:
            stored = calibration.load(entry)
            if stored is not None and stored.get("sizes"):
                cost.load_state(stored)
        fresh = cost is not None and not cost.measured
        rec.drafter.tune(lambda n: self._timed_dummy_forward(rows, cache, length, n), length,
                         kv.static_capacity(cache), cost, rows=len(rows))
        if entry is not None and fresh and cost.measured:
            calibration.store(entry, cost.state())

    def _cost_entry(self, batch: int) -> str | None:
        """The calibration cache's entry of a curve for ``batch`` rows in this recycler's setting (None:
        not cached, as under torch.distributed, where every rank must measure together)."""
        rec = self.rec
        if self.fixed is not None or distributed.active() or calibration.mode() == "off":
            return None
        table = rec._routing_table()
        routing = ",".join(f"{k}:{v}" for k, v in sorted(table.items())) if table else str(rec.skinny_linear)
        routing += "; packed" if rec.skinny_linear and skinny.packs(rec.model) else ""
        setting = (f"cost curve; rows={batch}; attention={rec.attention}; skinny_linear={routing}; "
                   f"graphs={rec.graph is not None}")
        return calibration.key(rec.model, rec.device, setting)

    # ------------------------------------------------------------------ the step's parts
    def _fit(self, cache, length: int, drafts: list[Draft]) -> tuple[list[Draft], int]:
        """(the drafts that fit the cache, how many slots the forward writes). A static cache forwards
        only the first nodes that fit; graph steps (one row) pad to a bucket size."""
        if self.rec.graph is not None:
            draft, size = self.rec.graph.fit(cache, length, drafts[0])
            return [draft], size or draft.size
        drafts = [kv.fit(cache, length, d) for d in drafts]  # every row's tree starts at the same slot
        return drafts, max(d.size for d in drafts)

    def _forward(self, rows: list[Row], drafts: list[Draft], cache, length: int, forwarded: int,
                 prefix_len: torch.Tensor, graphs: bool = True) -> torch.Tensor:
        """Logits [B, N, V] of every row's draft (graph steps: one row, padded to a bucket)."""
        rec = self.rec
        if rec.graph is not None and graphs:
            return rec.graph.forward(drafts[0], prefix_len, cache, forwarded)
        tokens, depths, tree = pad_drafts(drafts)
        if len(rows) == 1:
            prefix, start = length, None  # the tree right after the prefix (window layers need this)
        else:
            prefix, start = torch.tensor([r.cached for r in rows], dtype=torch.long), length
        return hf_model.forward_tree(rec.model, tokens, depths, tree, prefix, cache, rec.tree_attention,
                                     rec._cache_kwarg, start=start, lean=self.lean)

    def _compact(self, cache, rows: list[Row], drafts: list[Draft], verdicts, length: int, forwarded: int,
                 prefix_len: torch.Tensor) -> int:
        """Every row's accepted nodes move to right after its prefix (one compact_kv call for all rows
        and layers), the rest of the forwarded trees is dropped; returns the new cache length."""
        new_length = max(r.cached + v.accepted for r, v in zip(rows, verdicts))
        if len(rows) == 1:  # the verify op's own device tensors: nothing to build on the host
            v = verdicts[0]
            kv.compact(cache, prefix_len, v.accepted_nodes, v.accept_len, moved=v.accepted > 1,
                       length=length + forwarded, keep=new_length)
            return new_length
        width = max(v.accepted for v in verdicts)
        nodes = torch.full((len(rows), width), -1, dtype=torch.long)
        for b, (row, v) in enumerate(zip(rows, verdicts)):
            nodes[b, : v.accepted] = v.path + (length - row.cached)  # compact_kv reads at prefix + node
        lengths = torch.tensor([v.accepted for v in verdicts], dtype=torch.long)
        cached = torch.tensor([r.cached for r in rows], dtype=torch.long)
        kv.compact(cache, cached, nodes, lengths, moved=width > 1 or length > min(r.cached for r in rows),
                   length=length + forwarded, keep=new_length)
        return new_length

    def _drop_finished(self, active: list[Row], cache, length: int) -> tuple[list[Row], int]:
        """The rows still going; the finished ones leave the cache, which is cropped to the longest left."""
        keep = [b for b, r in enumerate(active) if not r.done]
        if len(keep) == len(active) or not keep:
            return [active[b] for b in keep], length
        kv.keep_rows(cache, keep)
        new_length = max(active[b].cached for b in keep)
        kv.crop(cache, new_length, length)
        return [active[b] for b in keep], new_length

    def _timed_dummy_forward(self, rows: list[Row], cache, length: int, n: int) -> None:
        """A verification-shaped forward: every row forwards a chain of n nodes; the cache restored."""
        device = self.rec.device
        drafts = [chain_draft(r.root, n, device) for r in rows]
        self._forward(rows, drafts, cache, length, n, None, graphs=False)  # never captured: n is any size
        sync(device)
        kv.trim(cache, n)

    def _stats(self, rows: list[Row], steps: int, seconds: float, prompt_len: int, decoding: str) -> GenerationStats:
        rec = self.rec
        if len(rows) == 1:  # the row's own figures, and the row itself in ``rows`` as for any B
            row = rows[0].stats
            row.new_tokens, row.seconds = rows[0].seq.shape[1] - prompt_len, seconds
            stats = dataclasses.replace(row, rows=[row])
        else:
            stats = summed_stats(rows, steps, seconds, prompt_len, decoding)
        stats.tree, stats.tree_size = rec.describe(), rec.tree.num_nodes - 1
        stats.predicted_speedup = rec.drafter.predicted_speedup()
        base = rec.drafter.single_step_seconds()
        if len(rows) == 1 and base is not None and stats.steps:
            stats.measured_speedup = stats.mean_accepted * base / (stats.seconds / stats.steps)
        return stats


def chain_draft(root: torch.Tensor, n: int, device: torch.device) -> Draft:
    """A chain of n copies of ``root`` (the cost curve's dummy forward)."""
    from .tree import make_tree
    tokens = root.view(1, 1).expand(1, n).contiguous().to(device)
    mask = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    parents = torch.arange(-1, n - 1, dtype=torch.int32, device=device)
    return Draft(tokens, parents, torch.arange(n, device=device), mask, make_tree([], 1))


def pad_drafts(drafts: list[Draft]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokens, depths [B, N] and tree masks [B, N, N] of every row's draft padded to the largest N.
    A padding node sees only itself and no real node sees it; its logits are never read. One row's
    draft is returned as it is."""
    if len(drafts) == 1:
        d = drafts[0]
        return d.tokens, d.depths.view(1, -1), d.mask.view(1, d.size, d.size)
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


def padded_output(rows: list[Row], pad_token_id: int) -> torch.Tensor:
    """Every row's sequence, right-filled with pad_token_id to the longest (as generate() pads)."""
    if len(rows) == 1:
        return rows[0].seq
    width = max(r.seq.shape[1] for r in rows)
    out = torch.full((len(rows), width), pad_token_id, dtype=torch.long, device=rows[0].seq.device)
    for b, r in enumerate(rows):
        out[b, : r.seq.shape[1]] = r.seq[0]
    return out


def summed_stats(rows: list[Row], steps: int, seconds: float, prompt_len: int, decoding: str) -> GenerationStats:
    """The batch's statistics: per step (one forward) the tokens every active row emitted together
    (``accept_lengths``) and the nodes forwarded (``tree_nodes``: the rows' own draft sizes summed,
    padding not counted); totals summed over rows; ``rows`` holds each row's own."""
    total = GenerationStats(decoding=decoding, steps=steps, seconds=seconds)
    for r in rows:
        s = r.stats
        s.new_tokens = r.seq.shape[1] - prompt_len
        s.seconds = seconds
        total.new_tokens += s.new_tokens
        total.from_matrix += s.from_matrix
        total.from_ngram += s.from_ngram
        total.from_memory += s.from_memory
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
        total.memory_accepted.append(sum(s.memory_accepted[t] for s in going))
    total.rows = [r.stats for r in rows]
    return total
