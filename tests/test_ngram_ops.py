"""ngram_index_append / ngram_lookup against the brute-force reference, plus NgramIndex, opcheck,
bad inputs and corrupted tables (which must raise, never read out of bounds)."""

import random

import pytest
import torch

from token_recycling import ops
from token_recycling.testing import reference
from token_recycling.ngram import NgramIndex, new_ngram_table

LONG = torch.long


def _check_lookups(rng, table, history, lengths, max_ngram):
    for _ in range(3):
        n = rng.randint(1, max_ngram)
        c = rng.randint(1, 9)
        got = ops.ngram_lookup(table, history, lengths, n, c)
        want = reference.ngram_lookup_reference(history, lengths, n, c)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (lengths.tolist(), n, c)


@pytest.mark.parametrize("seed", range(40))
def test_incremental_lookup_matches_reference(seed):
    rng = random.Random(seed)
    batch, max_ngram = rng.randint(1, 3), rng.randint(1, 5)
    capacity, vocab = rng.randint(1, 90), rng.choice([1, 2, 3, 5, 40])
    # Tokens past each row's length are already there: the ops must never read them as context.
    history = torch.randint(0, vocab, (batch, capacity), generator=torch.Generator().manual_seed(seed))
    table = new_ngram_table(batch, capacity, max_ngram)
    lengths = torch.zeros(batch, dtype=LONG)
    _check_lookups(rng, table, history, lengths, max_ngram)
    while int(lengths.min()) < capacity:
        new = torch.tensor([min(capacity, int(n) + rng.choice([0, 1, 1, 2, 3, 8])) for n in lengths])
        ops.ngram_index_append(table, history, lengths, new)
        lengths = new
        _check_lookups(rng, table, history, lengths, max_ngram)


@pytest.mark.parametrize("seed", range(6))
def test_repetitive_context_gives_long_continuations(seed):
    # A repeated phrase with a few mutations: long matches, continuations cut at max_tokens and at len.
    rng = random.Random(100 + seed)
    phrase = [rng.randint(0, 50) for _ in range(rng.randint(3, 12))]
    text = []
    while len(text) < 300:
        text += [t if rng.random() > 0.05 else rng.randint(0, 50) for t in phrase]
    index = NgramIndex(1, len(text), max_ngram=4)
    at = 0
    while at < len(text):
        step = rng.randint(1, 6)
        index.extend(torch.tensor([text[at : at + step]]))
        at += step
        for c in (1, 4, 16):
            got = index.lookup(c)
            want = reference.ngram_lookup_reference(index.history, index.lengths, 4, c)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_index_class_ragged_rows_and_reset():
    rng = random.Random(7)
    index = NgramIndex(3, 200, max_ngram=3)
    for _ in range(40):
        tokens = torch.randint(0, 4, (3, 5))
        counts = torch.tensor([rng.randint(0, 5) for _ in range(3)])
        index.extend(tokens, counts)
        got = index.lookup(6)
        want = reference.ngram_lookup_reference(index.history, index.lengths, 3, 6)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    index.reset()
    assert index.lookup(6)[1].tolist() == [0, 0, 0]
    index.extend(torch.tensor([[9, 8, 9], [1, 1, 1], [2, 3, 4]]))
    got = index.lookup(6)
    want = reference.ngram_lookup_reference(index.history, index.lengths, 3, 6)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(ValueError, match="overflows"):
        index.extend(torch.zeros(3, 198, dtype=LONG))


def _filled(batch=2, capacity=40, max_ngram=3, vocab=3, length=30, seed=0):
    history = torch.randint(0, vocab, (batch, capacity), generator=torch.Generator().manual_seed(seed))
    table = new_ngram_table(batch, capacity, max_ngram)
    lengths = torch.full((batch,), length, dtype=LONG)
    ops.ngram_index_append(table, history, torch.zeros_like(lengths), lengths)
    return table, history, lengths


def test_opcheck():
    table, history, lengths = _filled()
    new = lengths + torch.tensor([3, 7])
    torch.library.opcheck(torch.ops.token_recycling.ngram_index_append.default, (table, history, lengths, new))
    torch.library.opcheck(torch.ops.token_recycling.ngram_lookup.default, (table, history, lengths, 3, 5))


def test_bad_dtypes_and_shapes():
    table, history, lengths = _filled()
    append, lookup = ops.ngram_index_append, ops.ngram_lookup
    with pytest.raises(TypeError, match="history"):
        lookup(table, history.int(), lengths, 3, 4)
    with pytest.raises(TypeError, match="table"):
        append(table.int(), history, lengths, lengths)
    with pytest.raises(TypeError, match="new_len"):
        append(table, history, lengths, lengths.int())
    with pytest.raises(ValueError, match="batch"):
        lookup(table[:1], history, lengths, 3, 4)
    with pytest.raises(ValueError, match="one length per row"):
        lookup(table, history, lengths[:1], 3, 4)
    with pytest.raises(ValueError, match="4-D"):
        lookup(table[:, 0], history, lengths, 1, 4)
    with pytest.raises(ValueError, match="slot"):
        lookup(table[..., :2], history, lengths, 3, 4)
    with pytest.raises(ValueError, match="power of two"):
        lookup(table[:, :, :48].contiguous(), history, lengths, 3, 4)
    with pytest.raises(ValueError, match="greater than the capacity"):
        small = torch.zeros(2, 3, 32, 3, dtype=LONG)
        lookup(small, history, lengths, 3, 4)
    with pytest.raises(ValueError, match="contiguous"):
        append(table.transpose(1, 2).contiguous().transpose(1, 2), history, lengths, lengths)


def test_bad_lengths_and_tokens():
    table, history, lengths = _filled()
    append, lookup = ops.ngram_index_append, ops.ngram_lookup
    with pytest.raises(ValueError, match="capacity"):
        append(table, history, lengths, torch.tensor([30, 41]))
    with pytest.raises(ValueError, match="less than"):
        append(table, history, lengths, torch.tensor([30, 29]))
    with pytest.raises(ValueError, match="old_len"):
        append(table, history, torch.tensor([30, -1]), torch.tensor([30, 31]))
    bad = history.clone()
    bad[1, 32] = -5
    with pytest.raises(ValueError, match="negative"):
        append(table, bad, lengths, torch.tensor([31, 33]))
    with pytest.raises(ValueError, match="length"):
        lookup(table, history, torch.tensor([30, 41]), 3, 4)
    with pytest.raises(ValueError, match="max_ngram"):
        lookup(table, history, lengths, 4, 4)
    with pytest.raises(ValueError, match="max_ngram"):
        lookup(table, history, lengths, 0, 4)
    with pytest.raises(ValueError, match="max_tokens"):
        lookup(table, history, lengths, 3, 0)


def test_table_out_of_step_with_lengths():
    table, history, lengths = _filled()
    before = table.clone()
    with pytest.raises(ValueError, match="does not index row 1"):  # tokens 30..31 skipped
        ops.ngram_index_append(table, history, torch.tensor([30, 32]), torch.tensor([31, 34]))
    with pytest.raises(ValueError, match="already indexes row 0"):  # appended twice
        ops.ngram_index_append(table, history, torch.tensor([28, 30]), torch.tensor([31, 30]))
    assert torch.equal(table, before), "a rejected append must not modify the table"
    with pytest.raises(ValueError, match="ngram_index_append"):  # lookup before indexing new tokens
        ops.ngram_lookup(table, history, lengths + 1, 3, 4)


def _suffix_slot(table, b, n, length):
    """The slot of row b's n-gram plane that holds the suffix ending at `length`."""
    slots = (table[b, n - 1, :, 1] == length).nonzero().flatten()
    assert slots.numel() == 1
    return int(slots[0])


def test_hash_collisions_are_resolved_by_tokens():
    # Plane n holds the suffix's slot behind three decoys with the suffix's very key but other
    # tokens, on the suffix's own probe path (linear from key & (S - 1), as the header documents).
    # A lookup that trusted the key would take a decoy.
    torch.manual_seed(3)
    n, capacity = 3, 64
    text = torch.randint(0, 10_000, (1, capacity))
    text[0, 57:60] = text[0, 20:23]  # the suffix (len 60) occurred before, ending at 23
    table = new_ngram_table(1, capacity, n)
    length = torch.tensor([60])
    ops.ngram_index_append(table, text, torch.tensor([0]), length)
    plane = table[0, n - 1]
    mine = _suffix_slot(table, 0, n, 60)
    key = int(plane[mine, 0])
    others = [i for i in (plane[:, 1] != 0).nonzero().flatten().tolist() if i != mine][:3]
    home, size = key & (plane.shape[0] - 1), plane.shape[0]
    rebuilt = torch.zeros_like(plane)
    for j, i in enumerate(others):
        rebuilt[(home + j) % size] = torch.tensor([key, int(plane[i, 1]), int(plane[i, 2])])
    rebuilt[(home + len(others)) % size] = plane[mine]
    table[0, n - 1] = rebuilt
    got = ops.ngram_lookup(table, text, length, n, 5)
    want = reference.ngram_lookup_reference(text, length, n, 5)
    assert int(want[1][0]) == 5
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("field,value", [(1, 41), (1, 2), (1, -7), (2, 30), (2, 1), (2, -3), (2, 5)])
def test_corrupted_slots_raise(field, value):
    # Positions read from the table are checked before history is read at them.
    history = torch.tensor([[1, 2, 3, 1, 2, 3] * 5 + [0] * 10])
    table = new_ngram_table(1, 40, 3)
    ops.ngram_index_append(table, history, torch.tensor([0]), torch.tensor([30]))
    slot = _suffix_slot(table, 0, 3, 30)
    table[0, 2, slot, field] = value
    with pytest.raises(ValueError, match="corrupted|does not index"):
        ops.ngram_lookup(table, history, torch.tensor([30]), 3, 4)


def test_garbage_table_never_crashes():
    # Random slots (some with real keys) must give a ValueError or an in-bounds answer.
    history = torch.tensor([[1, 2, 3, 1, 2, 3] * 5 + [0] * 10])
    good = new_ngram_table(1, 40, 3)
    ops.ngram_index_append(good, history, torch.tensor([0]), torch.tensor([30]))
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        table = good.clone()
        pick = torch.rand(table.shape[:3], generator=gen) < 0.3
        noise = torch.randint(-3, 45, table.shape, generator=gen)
        noise[..., 0] = table[..., 0]  # keep real keys so probes hit and read positions
        table[pick] = noise[pick]
        try:
            tokens, count = ops.ngram_lookup(table, history, torch.tensor([30]), 3, 8)
            assert 0 <= int(count[0]) <= 8
        except ValueError:
            pass
        try:
            ops.ngram_index_append(table, history, torch.tensor([30]), torch.tensor([36]))
        except ValueError:
            pass


@pytest.mark.parametrize("seed", range(30))
def test_candidates_match_reference(seed):
    # Small vocabularies give many different continuations of short suffixes.
    rng = random.Random(500 + seed)
    batch, max_ngram = rng.randint(1, 3), rng.randint(1, 5)
    capacity, vocab = rng.randint(1, 80), rng.choice([2, 3, 5, 12])
    history = torch.randint(0, vocab, (batch, capacity), generator=torch.Generator().manual_seed(seed))
    table = new_ngram_table(batch, capacity, max_ngram)
    lengths = torch.zeros(batch, dtype=LONG)
    while True:
        n, c, k = rng.randint(1, max_ngram), rng.randint(1, 9), rng.randint(1, 4)
        got = ops.ngram_candidates(table, history, lengths, n, c, k)
        want = reference.ngram_candidates_reference(history, lengths, n, c, k)
        for g, w in zip(got, want):
            assert torch.equal(g, w), (lengths.tolist(), n, c, k)
        first = ops.ngram_lookup(table, history, lengths, n, c)  # candidate 0 is ngram_lookup's answer
        assert torch.equal(got[0][:, 0], first[0]) and torch.equal(got[1][:, 0], first[1])
        if int(lengths.min()) >= capacity:
            break
        new = torch.tensor([min(capacity, int(x) + rng.choice([1, 2, 5])) for x in lengths])
        ops.ngram_index_append(table, history, lengths, new)
        lengths = new


def test_candidates_opcheck_and_bad_input():
    history = torch.tensor([[1, 2, 3, 1, 2, 4, 1, 2]])
    table = new_ngram_table(1, 8, 3)
    ops.ngram_index_append(table, history, torch.tensor([0]), torch.tensor([8]))
    tokens, count, ngram, start = ops.ngram_candidates(table, history, torch.tensor([8]), 3, 4, 3)
    # "1 2" was last followed by 4 (start 5), before that by 3 (start 2): two different continuations.
    assert count.tolist() == [[3, 4, 0]] and ngram.tolist() == [[2, 2, 0]] and start.tolist() == [[5, 2, 0]]
    assert tokens[0, 0, :3].tolist() == [4, 1, 2] and tokens[0, 1, :4].tolist() == [3, 1, 2, 4]
    torch.library.opcheck(torch.ops.token_recycling.ngram_candidates, (table, history, torch.tensor([8]), 3, 4, 3))
    with pytest.raises(ValueError, match="max_candidates"):
        ops.ngram_candidates(table, history, torch.tensor([8]), 3, 4, 0)
    with pytest.raises(ValueError, match="max_ngram"):
        ops.ngram_candidates(table, history, torch.tensor([8]), 4, 4, 2)
