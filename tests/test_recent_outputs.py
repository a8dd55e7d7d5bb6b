"""Earlier requests in drafting (the Drafter's suffix memory, TokenRecycler(ngram_history=)): their
prompts and outputs are remembered, supply candidates of their own source to the policy, are shared
by every row, and the output stays the model's own (lossless) when they draft."""

import pytest
import torch
from models import private_copy, tiny_model

from token_recycling import TokenRecycler
from token_recycling.auto_tree import CostModel
from token_recycling.policy import ChainStats


def test_ngram_history_is_the_memory_capacity():
    assert TokenRecycler(tiny_model("llama"), ngram_history=1234).drafter.memory.capacity == 1234
    assert TokenRecycler(tiny_model("llama"), ngram=False).drafter.memory.capacity == 0
    for bad in (-3, 2.5, "8"):
        with pytest.raises(ValueError, match="ngram_history"):
            TokenRecycler(tiny_model("llama"), ngram_history=bad)


def test_memory_candidates_are_their_own_source():
    rec = TokenRecycler(tiny_model("llama"))
    drafter = rec.drafter
    drafter.finish(torch.tensor([60, 61, 62, 63]), prompt=torch.tensor([50, 51, 52]))  # an earlier request
    # The context holds "51 52" followed by 70 and ends with "51 52": its own match, then the memory's
    # (-> 60 61 ..., matched over 2 tokens, seen once).
    state = drafter.start(torch.tensor([[9, 51, 52, 70, 71, 8, 51, 52]]), 64)
    cands = drafter._candidates(state)
    assert cands[0][0][:2] == [70, 71] and cands[0][2] is False
    assert cands[-1] == ([60, 61, 62, 63], 2, True, 1)
    # Only the memory holds the suffix: it is the only candidate, with its match length.
    state = drafter.start(torch.tensor([[9, 8, 50, 51, 52]]), 64)
    assert drafter._candidates(state) == [([60, 61, 62, 63], 3, True, 1)]
    # The policy keeps its statistics apart: same match and run, other source -> other bucket; the
    # memory's buckets also differ by match length and support.
    stats = ChainStats(max_ngram=4, length=4)
    assert stats.bucket(0, 3, 0) != stats.bucket(0, 3, 0, memory=True)
    assert len({stats.bucket(0, n, 0, True, s) for n in (2, 5, 9, 20) for s in (1, 2, 5)}) == 12
    drafter.policy.cost.set_curve(CostModel([1, 128], [1.0, 1.01], context=10**6))
    draft = drafter.draft(state, torch.tensor([52]))
    assert draft.plan.recent and draft.plan.match == 3 and draft.plan.memory == [True]
    chain_nodes = range(draft.tree_nodes, draft.size)
    assert chain_nodes and all(draft.from_memory(n) for n in chain_nodes)
    # ngram_history=0: nothing is remembered.
    off = TokenRecycler(tiny_model("llama"), ngram_history=0).drafter
    off.finish(torch.tensor([50, 51, 52, 60]))
    assert len(off.memory) == 0 and off._candidates(off.start(torch.tensor([[50, 51, 52]]), 16)) == []


def test_a_fixed_tree_drafts_from_the_memory_when_the_context_has_no_match():
    drafter = TokenRecycler(tiny_model("llama"), tree="paper-16").drafter
    drafter.finish(torch.tensor([50, 51, 52, 60, 61, 62]))
    chains = drafter._fixed_chains(drafter.start(torch.tensor([[9, 51, 52]]), 16))
    assert chains == [([60, 61, 62], True)]
    chains = drafter._fixed_chains(drafter.start(torch.tensor([[51, 52, 7, 51, 52]]), 16))
    assert chains[0][1] is False and chains[0][0][0] == 7


def test_earlier_requests_draft_repeats_and_stay_lossless():
    reference, model = private_copy("llama")
    rec = TokenRecycler(model)
    g = torch.Generator().manual_seed(11)
    vocab = model.config.vocab_size
    prompts = [torch.randint(3, vocab, (1, n), generator=g) for n in (6, 9, 4)]
    first = [rec.generate(p, max_new_tokens=40) for p in prompts]
    for p, out in zip(prompts, first):
        assert torch.equal(out, reference.generate(p, max_new_tokens=40, do_sample=False))
    held = rec.drafter.memory.state_tensors()["memory_tokens"].tolist()
    assert held == torch.cat([out[0] for out in first]).tolist()  # each prompt and its output
    # The same requests again, each after a cold matrix: the memory alone knows their answers (a
    # continuation that the matrix tree also holds counts as the matrix's). Every output is still
    # greedy's, and the stats say where the accepted tokens came from.
    for p, out in zip(prompts, first):
        tokens, n, memory, support = rec.drafter._candidates(rec.drafter.start(p, 64))[-1]
        assert memory and n == p.shape[1] and tokens == out[0, p.shape[1]: p.shape[1] + 10].tolist()
        rec.matrix.reset()
        assert torch.equal(rec.generate(p, max_new_tokens=40), out)
        s = rec.stats
        assert s.from_matrix + s.from_ngram + s.from_memory == sum(n - 1 for n in s.accept_lengths)
        assert s.from_memory == sum(s.memory_accepted) and s.from_ngram == sum(s.ngram_accepted)
        assert s.from_memory >= 10 and any(s.recent)
    rec.reset()
    assert len(rec.drafter.memory) == 0


def test_a_batch_remembers_every_row_and_shares_the_memory():
    reference, model = private_copy("llama")
    rec = TokenRecycler(model)
    g = torch.Generator().manual_seed(5)
    vocab = model.config.vocab_size
    rows = [torch.randint(3, vocab, (n,), generator=g) for n in (7, 4)]
    width = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([torch.zeros(width - len(r), dtype=torch.long), r]) for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(width - len(r), dtype=torch.long), torch.ones(len(r), dtype=torch.long)])
                        for r in rows])
    want = reference.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    got = rec.generate(ids, attention_mask=mask, max_new_tokens=24)
    assert torch.equal(got, want)
    held = rec.drafter.memory.state_tensors()["memory_tokens"].tolist()
    expect = []  # every row's prompt (without padding) and its own output
    for b, r in enumerate(rows):
        new = got[b, width:].tolist()
        expect += r.tolist() + (new[: new.index(2) + 1] if 2 in new else new)  # up to its eos (id 2)
    assert held == expect
    # The batch again, from a cold matrix: both rows draft from the shared memory, losslessly.
    rec.matrix.reset()
    assert torch.equal(rec.generate(ids, attention_mask=mask, max_new_tokens=24), want)
    assert all(r.from_memory > 0 for r in rec.stats.rows)
    assert rec.stats.from_memory == sum(r.from_memory for r in rec.stats.rows)
