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
from token_recycling.testing.reference import ngram_lookup_reference
from token_recycling.draft import DraftState, Drafter, state_key
from token_recycling.policy import DEFAULT_CHAIN_PRICE, BatchStepCost
from token_recycling.vllm import ProposerOptions, TokenRecyclingProposer

VOCAB = 40


def make(k=4, recycle="topk", seed=0, max_len=512, fit_cost=False, **opts):
    proposer = TokenRecyclingProposer(fake_config(k, max_len, VOCAB), ProposerOptions(recycle=recycle, **opts))
    if not fit_cost:  # the fake engine's step times are noise: drafts must not depend on them
        proposer.cost = BatchStepCost(min_steps=1 << 30)
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

def serve(proposer, model, seed: int, requests: int, tokens: int):
    """``requests`` random prompts through the fake engine until every one has ``tokens`` new tokens."""
    engine = FakeEngine(proposer, model)
    reqs = [Request(i, p, tokens) for i, p in enumerate(prompts(np.random.default_rng(seed), requests))]
    for r in reqs:
        engine.add(r)
    run_engine(engine)
    return engine, reqs



# ---------------------------------------------------------------------------- the whole loop
def test_greedy_output_and_paper_recycling_with_a_steady_batch():
    proposer, model = make()
    engine, reqs = serve(proposer, model, seed=1, requests=3, tokens=40)
    for r in reqs:
        assert r.output == model.greedy(r.prompt, 40)
    assert torch.equal(proposer.matrix.table, oracle_matrix(engine.log, proposer.options.topk))
    s = proposer.stats
    assert s.unmapped_steps == 0 and s.recycled_topk > 0
    assert s.accepted_drafts > 0, s  # the bigram model repeats itself
    assert_counts_match_the_engine(proposer, engine)


def assert_counts_match_the_engine(proposer, engine):
    """The proposer's accounting against the engine's own count of what it verified and accepted."""
    s = proposer.stats
    assert s.proposed_verified == engine.draft_tokens, (s, engine.draft_tokens)
    assert s.from_matrix + s.from_ngram + s.from_memory == engine.accepted_tokens, (s, engine.accepted_tokens)
    assert s.drafted_ngram + s.drafted_memory + s.drafted_matrix >= s.proposed_verified
    assert 0 < s.acceptance == engine.accepted_tokens / engine.draft_tokens


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
    engine, reqs = serve(proposer, model, seed=7, requests=2, tokens=30)
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


def test_a_repeating_context_is_drafted_from_its_ngrams_and_accepted():
    # The bigram model's greedy text falls into a cycle: a prompt that holds the cycle is continued by
    # it, so the n-gram candidate is right and a sound proposer gets nearly every draft accepted.
    # (The engine's greedy verification keeps the output right whatever is drafted: this measures the drafts.)
    proposer, model = make(k=4)
    seed_prompt = prompts(np.random.default_rng(1), 1)[0]
    prompt = seed_prompt + model.greedy(seed_prompt, 80)
    engine = FakeEngine(proposer, model)
    r = Request(0, prompt, 60)
    engine.add(r)
    run_engine(engine)
    assert r.output == model.greedy(prompt, 60)
    s = proposer.stats
    assert s.acceptance > 0.9 and s.from_ngram > 0.9 * (s.from_ngram + s.from_matrix), s.as_dict()
    assert s.accepted_drafts / s.verified > 3.5  # K = 4: whole chains accepted
    assert_counts_match_the_engine(proposer, engine)


def test_a_prohibitive_price_drafts_nothing_and_stays_lossless():
    proposer, model = make()
    proposer.cost.price = lambda: 1e9  # a step so compute-bound that no draft token pays
    engine, reqs = serve(proposer, model, seed=14, requests=3, tokens=20)
    assert all(r.output == model.greedy(r.prompt, 20) for r in reqs)
    assert proposer.stats.drafts == 0 and engine.draft_tokens == 0


def test_a_fitted_step_cost_keeps_the_loop_lossless_and_consistent():
    proposer, model = make(fit_cost=True)
    engine, reqs = serve(proposer, model, seed=15, requests=4, tokens=60)
    assert all(r.output == model.greedy(r.prompt, 60) for r in reqs)
    assert proposer.cost.samples  # decode-only steps were timed
    assert_counts_match_the_engine(proposer, engine)


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
        # (cut by the end of the context, a continuation goes on with its own period: draft.py) ...
        expected = [chain[i % len(chain)] for i in range(8)] if 0 < len(chain) < 8 else chain[:8]
        first = cands[0] if cands else ([], 0, False, 0, 0)
        if first[0][:max_tokens] != expected[:max_tokens]:
            # ... or second, after the continuation most occurrences agree on, where fewer than half
            # of the match's occurrences went on as the most recent one did
            assert cands[1][0][:max_tokens] == expected[:max_tokens]
            assert 2 * cands[1][3] < cands[1][4] and first[3] > cands[1][3] and first[0][0] != cands[1][0][0]
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


def reference_top1(table: torch.Tensor, root: int, budget: int) -> list[int]:
    """The matrix's top-1 path from root, stopping where a token's row was never recycled (all zero)."""
    out, at = [], root
    while len(out) < budget and bool(table[at].any()):
        at = int(table[at, 0])
        out.append(at)
    return out


def test_draft_chains_against_independent_references():
    g = torch.Generator().manual_seed(16)
    drafter = Drafter(VOCAB, torch.device("cpu"), topk=4, max_ngram=3)
    table = torch.randint(1, VOCAB, (VOCAB, 4), generator=g, dtype=torch.int32)
    table[VOCAB // 2:] = 0  # half the rows never recycled: paths stop there
    drafter.matrix.table.copy_(table)
    rng = np.random.default_rng(16)
    for _ in range(20):
        seq = rng.permutation(VOCAB)[:10].astype(np.int32)  # no repeats: no n-gram candidate
        state = drafter.start_from_tokens(seq, len(seq), 4096)
        budget = int(rng.integers(0, 7))
        root = int(seq[-1])
        assert drafter.draft_chain(state, root, budget, price=0.0) == reference_top1(table, root, budget)
        assert state.drafts == reference_top1(table, root, budget) and state.from_ngram == 0
        assert drafter.draft_chain(state, root, budget, price=10.0) == []  # nothing pays at that price
    # A repeated context: the (cold) policy drafts the n-gram continuation, then the matrix path from its end.
    seq = np.array([1, 2, 3, 4, 5, 1, 2, 3], dtype=np.int32)
    state = drafter.start_from_tokens(seq, len(seq), 4096)
    draft = drafter.draft_chain(state, 3, 6, price=DEFAULT_CHAIN_PRICE)
    # (the continuation 4 5 1 2 3 reaches the context's end and goes on with its period)
    assert draft[: state.from_ngram] == [4, 5, 1, 2, 3, 4, 5, 1][: state.from_ngram] and state.from_ngram >= 3
    assert draft[state.from_ngram:] == reference_top1(table, draft[state.from_ngram - 1], 6 - state.from_ngram)[
        : len(draft) - state.from_ngram]


def test_the_chain_policy_learns_from_what_was_produced():
    # Candidates that are always wrong lose their place to the matrix path, by the statistics alone.
    drafter = Drafter(VOCAB, torch.device("cpu"), topk=4, max_ngram=3)
    table = torch.zeros(VOCAB, 4, dtype=torch.int32)
    for t in range(VOCAB):
        table[t] = torch.tensor([(t + 7) % VOCAB, 1, 2, 3])
    drafter.matrix.table.copy_(table)
    seq = np.array([1, 2, 3, 9, 1, 2, 3], dtype=np.int32)  # candidate after "1 2 3": 9, 1, 2, 3
    first = None
    for step in range(40):
        state = drafter.start_from_tokens(seq, len(seq), 4096)
        draft = drafter.draft_chain(state, 3, 4)
        first = state.from_ngram if first is None else first
        produced = reference_top1(table, 3, 4) + [0]  # the model follows the matrix, never the n-gram
        drafter.observe_chain(state, produced)
    assert first > 0 and state.from_ngram == 0 and draft == reference_top1(table, 3, 4)
    policy = drafter.policy
    assert policy.chain.den.sum() >= 40 and policy.auto.num.sum() > 0


def test_batch_step_cost_fits_a_line_through_noise():
    cost = BatchStepCost()
    assert not cost.measured and cost.price() == pytest.approx(DEFAULT_CHAIN_PRICE / (1 + DEFAULT_CHAIN_PRICE))
    rng = np.random.default_rng(17)
    for i in range(64):
        forwarded = int(rng.integers(8, 40))
        seconds = 0.05 + 0.002 * forwarded + (0.5 if i % 16 == 5 else 0.0)  # a pause now and then
        cost.record_step(forwarded, 12, seconds)
    assert cost.measured
    assert cost.slope == pytest.approx(0.002, rel=1e-6) and cost.intercept == pytest.approx(0.05, rel=1e-6)
    t = np.array([s[0] for s in cost.samples], dtype=np.float64)
    assert cost.price() == pytest.approx(0.002 * 12 * len(t) / (0.05 * len(t) + 0.002 * t.sum()))
    flat = BatchStepCost()
    for _ in range(40):
        flat.record_step(8, 8, 0.01)  # no spread in tokens: no fit, the default stands
    assert not flat.measured and flat.price() == pytest.approx(DEFAULT_CHAIN_PRICE * 8 / (1 + 8 * DEFAULT_CHAIN_PRICE))


def test_policy_statistics_travel_between_the_hf_drafter_and_the_proposer(tmp_path, monkeypatch):
    hf = Drafter(VOCAB, torch.device("cpu"))  # the HF loop's defaults
    rng = np.random.default_rng(18)
    hf.policy.chain.num[:] = rng.integers(0, 5, hf.policy.chain.num.shape)
    hf.policy.chain.den[:] = hf.policy.chain.num + 3
    hf.policy.auto.den[:] = 7
    path = tmp_path / "hf.safetensors"
    hf.matrix.save(path, extra=hf.extra_state())  # what TokenRecycler.save writes
    monkeypatch.setenv("TOKEN_RECYCLING_MATRIX", str(path))
    proposer = TokenRecyclingProposer(fake_config(4, 512, VOCAB))
    assert np.array_equal(proposer.drafter.policy.chain.num, hf.policy.chain.num)
    assert np.array_equal(proposer.drafter.policy.auto.den, hf.policy.auto.den)
    proposer.drafter.policy.chain.den += 1  # the server learns; its save warms an HF drafter
    back = tmp_path / "vllm.safetensors"
    proposer.save(back)
    _, extra = AdjacencyMatrix.read(back, VOCAB, 8)
    warm = Drafter(VOCAB, torch.device("cpu"))
    warm.load_extra_state(extra)
    assert np.array_equal(warm.policy.chain.den, hf.policy.chain.den + 1)


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


def test_finished_requests_feed_the_suffix_memory(tmp_path):
    # A request the engine no longer schedules is remembered; the same prompt later drafts from it
    # (the matrix made cold, so the memory is what knows the answer), and a save carries the memory.
    proposer, model = make()
    prompt = prompts(np.random.default_rng(21), 1)[0]
    engine = FakeEngine(proposer, model)
    engine.add(Request(0, prompt, 40))
    run_engine(engine)
    proposer.matrix.reset()
    again = Request(1, prompt, 40)
    engine = FakeEngine(proposer, model)
    engine.add(again)
    run_engine(engine)
    assert again.output == model.greedy(prompt, 40)
    assert len(proposer.drafter.memory) >= len(prompt) + 40 and proposer.stats.from_memory > 0
    assert proposer.stats.drafted_memory >= proposer.stats.from_memory
    path = tmp_path / "m.safetensors"
    proposer.save(path)
    back, _ = make()
    back.load(path)
    held = back.drafter.memory.state_tensors()["memory_tokens"]
    assert torch.equal(held, proposer.drafter.memory.state_tensors()["memory_tokens"])
    off, _ = make(memory=0)
    assert off.drafter.memory.capacity == 0
