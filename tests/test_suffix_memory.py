"""The suffix memory (memory.SuffixMemory): lookups equal a brute-force search over the remembered
sequences, the memory stays under its cap over a long run with LRU eviction, and it is saved and
loaded with the matrix (older files without it still load)."""

import random
from collections import Counter

import numpy as np
import pytest
import torch
from models import tiny_model

from token_recycling import TokenRecycler
from token_recycling.adjacency import AdjacencyMatrix, CorruptMatrixFile
from token_recycling.memory import MAX_MATCH, SuffixMemory


def reference_lookup(seqs: list[list[int]], context: list[int], max_tokens: int):
    """Brute force: every position after the context's last bigram, its backward match length (up
    to MAX_MATCH), the longest ones, then token by token the continuation most of them share
    (ties: the latest sequence/position)."""
    occ = []  # (sequence, position) in store order
    for s, seq in enumerate(seqs):
        for p in range(2, len(seq)):
            if seq[p - 2: p] == context[-2:]:
                k = 0
                while k < min(MAX_MATCH, len(context), p) and seq[p - 1 - k] == context[-1 - k]:
                    k += 1
                occ.append((s, p, k))
    if not occ:
        return None
    best = max(k for _, _, k in occ)
    rows = [seqs[s][p: p + max_tokens] for s, p, k in occ if k == best]
    active = list(range(len(rows)))
    chain, support = [], 0
    for j in range(max_tokens):
        col = [(i, rows[i][j]) for i in active if j < len(rows[i])]
        if not col:
            break
        counts = Counter(t for _, t in col)
        top = max(counts.values())
        tok = [t for i, t in reversed(col) if counts[t] == top][0]  # the latest row among the most frequent
        if j == 0:
            support = counts[tok]
        chain.append(tok)
        active = [i for i, t in col if t == tok]
    return chain, best, support, len(rows)


def test_lookup_equals_a_brute_force_search():
    rng = random.Random(3)
    for trial in range(40):
        vocab = rng.choice([4, 6, 12])  # small vocabularies: many repeats, long and tied matches
        seqs = [[rng.randrange(vocab) for _ in range(rng.randint(1, 40))] for _ in range(rng.randint(1, 12))]
        mem = SuffixMemory(10_000)
        for seq in seqs:
            mem.add(torch.tensor(seq))
        for _ in range(10):
            context = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
            max_tokens = rng.randint(1, 12)
            got = mem.lookup(np.array(context), max_tokens, touch=False)
            want = reference_lookup(seqs, context, max_tokens)
            if want is not None and sum(1 for seq in seqs for p in range(2, len(seq))
                                        if seq[p - 2: p] == context[-2:]) > 64:
                continue  # past MAX_OCCURRENCES the memory compares the latest 64 only
            assert (None if got is None else (got.tokens, got.match, got.support, got.occurrences)) == want, \
                (trial, seqs, context, max_tokens)


def test_longest_match_and_frequency():
    mem = SuffixMemory(1000)
    mem.add([1, 2, 3, 4, 5, 6])
    mem.add([9, 2, 3, 4, 7, 8])
    mem.add([8, 2, 3, 4, 7, 9])
    found = mem.lookup(np.array([0, 2, 3]), 5)
    assert found.tokens == [4, 7, 9] and found.match == 2 and found.support == 3 and found.occurrences == 3
    found = mem.lookup(np.array([1, 2, 3]), 5)  # the longer match wins over the more frequent path
    assert found.tokens == [4, 5, 6] and found.match == 3 and found.support == 1
    assert mem.lookup(np.array([5]), 5) is None and mem.lookup(np.array([6, 1]), 5) is None
    assert len(mem) == 18 and mem.nbytes > 0 and mem.bytes_per_token == mem.nbytes / 18


def test_lru_eviction_keeps_the_sequences_used_last():
    mem = SuffixMemory(40)
    for i in range(4):
        mem.add([100 + i, 1, 2, 3 + i] + [50 + i] * 6)  # 10 tokens each: full
    assert len(mem) == 40
    mem.lookup(np.array([100, 1, 2]), 4)  # sequence 0 is used: the most recent now
    mem.add(list(range(200, 210)))  # over the cap: drops the least recently used down to 3/4 of it
    held = mem.state_tensors()["memory_tokens"].tolist()
    assert len(mem) <= 40 and 100 in held and 200 in held and 101 not in held
    assert mem.lookup(np.array([100, 1, 2]), 2).tokens == [3, 50]
    mem.add(list(range(1000, 1100)))  # longer than the cap: its last 40 tokens
    assert len(mem) == 40 and mem.state_tensors()["memory_tokens"].tolist() == list(range(1060, 1100))
    off = SuffixMemory(0)
    off.add([1, 2, 3])
    assert len(off) == 0 and off.lookup(np.array([1, 2]), 3) is None
    for bad in (-1, 2.5, "8", True):
        with pytest.raises(ValueError, match="ngram_history"):
            SuffixMemory(bad)
    with pytest.raises(ValueError, match="token ids"):
        mem.add([-5, 1])


def test_ten_thousand_requests_stay_under_the_cap():
    cap = 50_000
    mem = SuffixMemory(cap)
    rng = np.random.default_rng(0)
    phrases = rng.integers(0, 30_000, size=(200, 24))  # requests repeat phrases, as answers do
    bound = 0
    for i in range(10_000):
        parts = [phrases[j] for j in rng.integers(0, 200, size=rng.integers(1, 6))]
        parts.append(rng.integers(0, 30_000, size=int(rng.integers(1, 300))))
        mem.add(np.concatenate(parts))
        assert len(mem) <= cap
        if i % 50 == 0:
            mem.lookup(parts[0][:8], 10)
            bound = max(bound, mem.nbytes)
    assert bound <= 24 * cap, bound  # about 16 bytes per token (the store, the keys, the positions)
    assert mem.bytes_per_token < 24


def test_saved_with_the_matrix_and_old_files_still_load(tmp_path):
    model = tiny_model("llama")
    rec = TokenRecycler(model, ngram_history=500)
    rec.drafter.finish(torch.tensor([7, 8, 9, 10, 11]), prompt=torch.tensor([3, 4, 5, 6]))
    rec.drafter.finish(torch.tensor([21, 22, 23, 24]))
    path = tmp_path / "m.safetensors"
    rec.save(path)
    back = TokenRecycler.load(model, path)
    assert back.drafter.memory.state_tensors()["memory_tokens"].tolist() == [3, 4, 5, 6, 7, 8, 9, 10, 11, 21, 22, 23, 24]
    assert back.drafter.memory.lookup(np.array([5, 6]), 3).tokens == [7, 8, 9]
    small = TokenRecycler.load(model, path, ngram_history=6)  # a smaller memory keeps the latest that fit
    assert small.drafter.memory.state_tensors()["memory_tokens"].tolist() == [21, 22, 23, 24]
    # A file written without tensors (the matrix alone, as older versions save) loads with an empty memory.
    AdjacencyMatrix.write(tmp_path / "old.safetensors", rec.matrix.table.clone(), "{}")
    assert len(TokenRecycler.load(model, tmp_path / "old.safetensors").drafter.memory) == 0
    assert AdjacencyMatrix.read_tensors(tmp_path / "old.safetensors") == {}
    # Changed memory bytes are refused, by their own checksum.
    data = bytearray(path.read_bytes())
    at = data.rfind(np.array([21, 22, 23, 24], dtype=np.int32).tobytes())
    data[at] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptMatrixFile, match="tensors beside the matrix"):
        TokenRecycler.load(model, path)


def test_chain_statistics_of_the_older_layout_load_their_context_part():
    from token_recycling.policy import ChainStats
    stats = ChainStats(max_ngram=4, length=10)
    old_context = 2 * 4 * 3  # rank x matched length x run (no agreement classes yet)
    old_rows = 2 * old_context  # a context part and an earlier-outputs part of the same shape
    num = np.arange(old_rows * 11, dtype=float).reshape(old_rows, 11)
    stats.load_state({"num": num.tolist(), "den": (num + 1).tolist()})
    assert np.array_equal(stats.num[stats.bucket(0, 2, 1)], num[1 * 3 + 1])  # rank 0, n = 2, run 1-3
    assert np.array_equal(stats.num[stats.bucket(1, 4, 5, support=1, occurrences=5)], num[12 + 3 * 3 + 2])
    assert not stats.num[stats.memory_start:].any() and not stats.den[stats.memory_start:].any()
