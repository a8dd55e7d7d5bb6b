"""TokenRecyclingProposer without vLLM: its state, recycling, drafts and statistics against independent oracles.

tests/fake_vllm.py plays vLLM's runner (persistent batch, row moves, chunked prefill, preemption,
draft cuts); tests/test_vllm.py runs the real engine where vLLM is installed.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from fake_vllm import BigramModel, FakeEngine, Request, fake_config, run_engine
from token_recycling.adjacency import AdjacencyMatrix
from token_recycling.reference import ngram_lookup_reference
from token_recycling.draft import DraftState, Drafter, state_key
from token_recycling.vllm import ProposerOptions, TokenRecyclingProposer

VOCAB = 40


def make(k=4, recycle="topk", seed=0, max_len=512, **opts):
    proposer = TokenRecyclingProposer(fake_config(k, max_len, VOCAB), ProposerOptions(recycle=recycle, **opts))
    model = BigramModel(VOCAB, seed)
    proposer.load_model(model)
    return proposer, model


def oracle_matrix(log, topk: int) -> torch.Tensor:
    """The paper's update replayed from the engine's log: every fed token's row := its top-k,
    in batch order, skipping the first step (the proposer ignores warm-up captures)."""
    table = torch.zeros(VOCAB, topk, dtype=torch.int32)
    for step in log[1:]:
        for token, top in step:
            if token is not None:
                table[token] = torch.tensor(top, dtype=torch.int32)
    return table


def prompts(rng, n, length=12):
    return [rng.integers(0, VOCAB, length).tolist() for _ in range(n)]


# ---------------------------------------------------------------------------- the whole loop
def test_greedy_output_and_paper_recycling_with_a_steady_batch():
    proposer, model = make()
    rng = np.random.default_rng(1)
    engine = FakeEngine(proposer, model)
    reqs = [Request(i, p, 40) for i, p in enumerate(prompts(rng, 3))]
    for r in reqs:
        engine.add(r)
    run_engine(engine)
    for r in reqs:
        assert r.output == model.greedy(r.prompt, 40)
    assert torch.equal(proposer.matrix.table, oracle_matrix(engine.log, proposer.options.topk))
    s = proposer.stats
    assert s.unmapped_steps == 0 and s.recycled_topk > 0
    assert s.from_matrix + s.from_ngram > 0, s  # the bigram model repeats itself


def test_rows_move_requests_arrive_chunked_prefill_and_preemption():
    proposer, model = make(k=3)
    rng = np.random.default_rng(2)
    engine = FakeEngine(proposer, model, max_reqs=6, chunk=5, seed=3)
    reqs = [Request(i, p, int(rng.integers(5, 60))) for i, p in enumerate(prompts(rng, 8, 17))]
    pending = list(reqs)
    step = 0
    while engine.running or pending or engine.paused:
        while pending and len(engine.running) < 4:
            engine.add(pending.pop(0))
        if step % 7 == 3 and len(engine.running) > 1:
            engine.preempt(engine.running[0])
        elif engine.paused and step % 7 == 5:
            engine.resume(engine.paused[0])
        engine.step(shuffle=True)
        assert len(proposer._states) <= len(engine.running) + 1  # a just-finished request's state at most
        assert torch.equal(proposer.matrix.table, oracle_matrix(engine.log, proposer.options.topk)), step
        step += 1
        assert step < 1000
    for r in reqs:
        assert r.output == model.greedy(r.prompt, r.max_new)
    assert proposer.stats.unmapped_steps == 0
    assert proposer.stats.states_rebuilt >= len(reqs) + 1  # new requests and resumed ones


def test_identical_rows_share_nothing_wrong():
    proposer, model = make()
    rng = np.random.default_rng(4)
    engine = FakeEngine(proposer, model)
    p = prompts(rng, 1)[0]
    reqs = [Request(i, list(p), 30) for i in range(3)]
    for r in reqs:
        engine.add(r)
    run_engine(engine, shuffle=True)
    assert all(r.output == model.greedy(p, 30) for r in reqs)
    assert torch.equal(proposer.matrix.table, oracle_matrix(engine.log, proposer.options.topk))


def test_cut_drafts_are_detected_and_fall_back_to_accepted_tokens():
    proposer, model = make()
    rng = np.random.default_rng(5)
    engine = FakeEngine(proposer, model, seed=6)
    reqs = [Request(i, p, 50) for i, p in enumerate(prompts(rng, 3))]
    for r in reqs:
        engine.add(r)
    run_engine(engine, cut_drafts=0.5)
    assert all(r.output == model.greedy(r.prompt, 50) for r in reqs)
    assert proposer.stats.unmapped_steps > 0 and proposer.stats.recycled_accepted > 0


def test_a_step_without_propose_leaves_its_capture_behind_unused():
    proposer, model = make()
    rng = np.random.default_rng(13)
    engine = FakeEngine(proposer, model)
    reqs = [Request(i, p, 40) for i, p in enumerate(prompts(rng, 2))]
    for r in reqs:
        engine.add(r)
    skipped = {4, 9, 10}
    step = 0
    while engine.running:
        engine.step(skip_propose=step in skipped)
        step += 1
    assert all(r.output == model.greedy(r.prompt, 40) for r in reqs)
    assert proposer.stats.unmapped_steps == 0
    log = [entry if i not in skipped else [] for i, entry in enumerate(engine.log)]
    assert torch.equal(proposer.matrix.table, oracle_matrix(log, proposer.options.topk))


def test_accepted_mode_learns_every_transition():
    proposer, model = make(recycle="accepted")
    rng = np.random.default_rng(7)
    engine = FakeEngine(proposer, model)
    reqs = [Request(i, p, 30) for i, p in enumerate(prompts(rng, 2))]
    for r in reqs:
        engine.add(r)
    run_engine(engine)
    assert proposer.stats.recycled_topk == 0 and proposer.stats.unmapped_steps == 0
    # Replay: per step (the first is skipped), every pair (token, next) read from the table as it was
    # before the step and shifted in; when a token occurs twice in a step the last pair wins.
    expect = torch.zeros(VOCAB, proposer.options.topk, dtype=torch.int32)
    for step in engine.accepted_log[1:]:
        before = expect.clone()
        for prev, tokens in step:
            seq = [prev] + tokens
            for a, b in zip(seq[:-1], seq[1:]):
                old = before[a].tolist()
                expect[a] = torch.tensor(([b] + [t for t in old if t != b] + [b] * len(old))[: len(old)],
                                         dtype=torch.int32)
    assert torch.equal(proposer.matrix.table, expect)


def test_draft_budget_respects_max_model_len():
    proposer, model = make(k=4, max_len=30)
    rng = np.random.default_rng(8)
    engine = FakeEngine(proposer, model, max_len=30)
    r = Request(0, prompts(rng, 1, 10)[0], 19)
    engine.add(r)
    run_engine(engine)
    assert r.output == model.greedy(r.prompt, 19)
    assert len(r.prompt) + len(r.output) <= 29


# ---------------------------------------------------------------------------- the parts
def brute_force_match(h: list[int], max_ngram: int) -> tuple[list[int], int]:
    tokens, count = ngram_lookup_reference(torch.tensor([h]), torch.tensor([len(h)]), max_ngram, len(h))
    c = int(count[0])
    if c == 0:
        return [], 0
    end = len(h) - c
    m = 0
    while m < end and m < 64 and h[end - 1 - m] == h[len(h) - 1 - m]:
        m += 1
    return tokens[0, :c].tolist(), m


@pytest.mark.parametrize("window", [64, 4096])
def test_content_found_state_indexes_its_window_like_brute_force(window):
    rng = np.random.default_rng(9)
    drafter = Drafter(8, torch.device("cpu"), max_ngram=3, ngram_tokens=8)
    for trial in range(30):
        alphabet = int(rng.integers(2, 6))
        seq = rng.integers(0, alphabet, int(rng.integers(1, 300))).astype(np.int32)
        first = int(rng.integers(1, len(seq) + 1))
        state = drafter.start_from_tokens(seq, first, window)
        state.advance(seq, len(seq))
        assert state.matches(seq, len(seq)) and state.length == len(seq)
        held = seq[state.offset:].tolist()
        max_tokens = int(rng.integers(1, 8))
        chain, match = brute_force_match(held, 3)
        tokens, count = state.index.lookup(max_tokens)
        assert tokens[0, : int(count[0])].tolist() == chain[:max_tokens]
        cands = drafter._candidates(state)  # what the policy is offered: the same continuation first
        assert (cands[0][0][:max_tokens] if cands else []) == chain[:max_tokens]
        if cands:  # its matched length: at most max_ngram and the occurrence's whole match
            assert 1 <= cands[0][1] <= min(3, match)
        assert state.index.capacity <= max(window, len(held))
        if len(seq) > 1:
            other = seq.copy()
            other[state.offset] += 1
            assert not state.matches(other, len(seq))
            assert not state.matches(seq, len(seq) - 1)


def test_content_found_state_memory_is_bounded_by_the_window():
    seq = np.random.default_rng(10).integers(0, 50, 20000).astype(np.int32)
    state = DraftState.from_tokens(seq, 100, max_ngram=4, window=512)
    for n in range(100, 20000, 37):
        state.advance(seq, n)
    state.advance(seq, 20000)
    assert state.length == 20000 and state.offset >= 20000 - 512
    assert state.nbytes <= 4 * 1024 * 3 * 8 + 512 * 8
    chain, _ = brute_force_match(seq[state.offset:].tolist(), 4)
    tokens, count = state.index.lookup(6)
    assert tokens[0, : int(count[0])].tolist() == chain[:6]


def test_state_key_uses_length_and_tail():
    a = np.arange(20, dtype=np.int32)
    b = a.copy()
    b[0] = 99
    assert state_key(a, 10) == state_key(b, 10) != state_key(a, 11)  # the index check tells a from b
    assert state_key(a, 10) != state_key(a[::-1].copy(), 10)


def test_learn_accepted_matches_a_python_shift():
    g = torch.Generator().manual_seed(11)
    for _ in range(20):
        k = int(torch.randint(1, 6, (1,), generator=g))
        table = torch.randint(0, 12, (12, k), generator=g, dtype=torch.int32)
        prev = torch.randint(0, 12, (9,), generator=g)
        nxt = torch.randint(0, 12, (9,), generator=g)
        expect = table.clone()
        old = table.clone()
        for a, b in zip(prev.tolist(), nxt.tolist()):  # every pair reads the rows before the update
            row = [b] + [t for t in old[a].tolist() if t != b]
            row = (row + [t for t in old[a].tolist() if t == b][1:])[:k]
            expect[a] = torch.tensor(row, dtype=torch.int32)
        drafter = Drafter(12, torch.device("cpu"), topk=k)
        drafter.matrix.table = table
        drafter.learn_accepted(prev, nxt)
        assert torch.equal(drafter.matrix.table, expect)


def test_save_load_roundtrip_and_format(tmp_path, monkeypatch):
    proposer, model = make()
    rng = np.random.default_rng(12)
    engine = FakeEngine(proposer, model)
    engine.add(Request(0, prompts(rng, 1)[0], 30))
    run_engine(engine)
    path = tmp_path / "m.safetensors"
    proposer.save(path)
    table, extra = AdjacencyMatrix.read(path, VOCAB, proposer.options.topk)
    assert torch.equal(table, proposer.matrix.table) and extra["source"] == "vllm"
    monkeypatch.setenv("TOKEN_RECYCLING_MATRIX", str(path))
    warm = TokenRecyclingProposer(fake_config(4, 512, VOCAB))
    assert torch.equal(warm.matrix.table, proposer.matrix.table)
    with pytest.raises(ValueError, match="vocab_size"):
        TokenRecyclingProposer(fake_config(4, 512, VOCAB + 1))


def test_options_from_env_reject_bad_values(monkeypatch):
    monkeypatch.setenv("TOKEN_RECYCLING_RECYCLE", "both")
    with pytest.raises(ValueError, match="TOKEN_RECYCLING_RECYCLE"):
        ProposerOptions.from_env()
    monkeypatch.setenv("TOKEN_RECYCLING_RECYCLE", "accepted")
    monkeypatch.setenv("TOKEN_RECYCLING_MAX_NGRAM", "two")
    with pytest.raises(ValueError, match="TOKEN_RECYCLING_MAX_NGRAM"):
        ProposerOptions.from_env()
    monkeypatch.setenv("TOKEN_RECYCLING_MAX_NGRAM", "3")
    assert ProposerOptions.from_env() == ProposerOptions(recycle="accepted", max_ngram=3)
    monkeypatch.setenv("TOKEN_RECYCLING_MIN_MATCH", "2")  # the policy chooses now: said, not silently ignored
    with pytest.warns(UserWarning, match="TOKEN_RECYCLING_MIN_MATCH"):
        ProposerOptions.from_env()
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        TokenRecyclingProposer(fake_config(0))


def test_importing_the_package_does_not_import_vllm():
    code = ("import sys, token_recycling, token_recycling.vllm; "
            "assert 'vllm' not in sys.modules, sorted(m for m in sys.modules if m.startswith('vllm'))")
    subprocess.run([sys.executable, "-c", code], check=True)
