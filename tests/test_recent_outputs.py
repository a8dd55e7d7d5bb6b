"""Earlier requests' outputs in the n-gram lookup (ngram.RecentOutputs, TokenRecycler(ngram_history=)):
bounded, flagged as their own source in the policy's statistics, preferred after the context's own
matches, and lossless."""

import pytest
import torch
from models import tiny_model

from token_recycling import TokenRecycler
from token_recycling.auto_tree import CostModel
from token_recycling.ngram import RecentOutputs
from token_recycling.policy import ChainStats


def test_recent_outputs_keep_the_last_capacity_tokens():
    r = RecentOutputs(5)
    r.add(torch.tensor([1, 2, 3]))
    r.add(torch.tensor([[4, 5, 6, 7]]))
    assert r.tokens.tolist() == [3, 4, 5, 6, 7]
    r.reset()
    assert len(r) == 0
    off = RecentOutputs(0)
    off.add(torch.tensor([1, 2]))
    assert len(off) == 0
    for bad in (-1, 2.5, "8"):
        with pytest.raises(ValueError, match="ngram_history"):
            RecentOutputs(bad)
    with pytest.raises(ValueError, match="ngram_history"):
        TokenRecycler(tiny_model("llama"), ngram_history=-3)


def test_recent_candidates_are_flagged_and_come_after_the_context():
    rec = TokenRecycler(tiny_model("llama"))
    drafter = rec.drafter
    drafter.finish(torch.tensor([50, 51, 52, 60, 61, 62, 63]))  # an earlier answer
    # The context holds "51 52" followed by 70 and ends with "51 52": its own match comes first, the
    # earlier output's (-> 60 61 ...) second.
    state = drafter.start(torch.tensor([[9, 51, 52, 70, 71, 8, 51, 52]]), 64)
    assert state.seed_len == 7
    cands = drafter._candidates(state)
    assert cands[0][0][:2] == [70, 71] and cands[0][2] is False
    assert cands[1][0][:2] == [60, 61] and cands[1][2] is True
    # Only the earlier output holds the suffix: its continuation is the first candidate, flagged.
    state = drafter.start(torch.tensor([[9, 8, 50, 51, 52]]), 64)
    cands = drafter._candidates(state)
    assert cands[0][0][:3] == [60, 61, 62] and cands[0][1] == 3 and cands[0][2] is True
    # The policy keeps its statistics apart: same rank, length and run, other source -> other bucket.
    stats = ChainStats(max_ngram=4, length=4)
    assert stats.bucket(0, 3, 0) != stats.bucket(0, 3, 0, recent=True)
    drafter.policy.cost.set_curve(CostModel([1, 128], [1.0, 1.01], context=10**6))
    plan = drafter.draft(state, torch.tensor([52])).plan
    assert plan.recent and plan.match == 3
    # ngram_history=0: nothing is remembered.
    off = TokenRecycler(tiny_model("llama"), ngram_history=0).drafter
    off.finish(torch.tensor([50, 51, 52, 60]))
    assert off.start(torch.tensor([[50, 51, 52]]), 16).seed_len == 0


def test_an_earlier_output_drafts_a_repeat_and_stays_lossless():
    model = tiny_model("llama")
    rec = TokenRecycler(model)
    g = torch.Generator().manual_seed(11)
    first = torch.randint(3, model.config.vocab_size, (1, 6), generator=g)
    out = rec.generate(first, max_new_tokens=40)
    assert torch.equal(out, model.generate(first, max_new_tokens=40, do_sample=False))
    assert rec.drafter.recent.tokens.tolist() == out[0, 6:].tolist()
    # A new prompt ending with a stretch of that output: its first draft continues it as the earlier
    # output did (the new context never held that continuation), and the output is still greedy's.
    second = torch.cat([torch.randint(3, model.config.vocab_size, (1, 3), generator=g), out[:, 6:16]], dim=1)
    tokens, n, recent = rec.drafter._candidates(rec.drafter.start(second, 64))[0]
    assert recent and n == 4 and tokens[:4] == out[0, 16:20].tolist()
    want = model.generate(second, max_new_tokens=20, do_sample=False)
    assert torch.equal(rec.generate(second, max_new_tokens=20), want)
    rec.reset()
    assert len(rec.drafter.recent) == 0
