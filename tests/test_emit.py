"""emit.py: the default stopping criteria (max length, EOS) are evaluated once per step over the
accepted tokens with one device->host copy, and stop exactly where token-by-token evaluation does."""

import pytest
import torch
from transformers.generation.stopping_criteria import (EosTokenCriteria, MaxLengthCriteria, StoppingCriteria,
                                                       StoppingCriteriaList)

from token_recycling import _testing, emit


class StopAfter(StoppingCriteria):
    """A user criterion (not vectorizable): done once the sequence holds `token`."""

    def __init__(self, token):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return (input_ids == self.token).any(-1)


def criteria(max_length, eos):
    c = StoppingCriteriaList([MaxLengthCriteria(max_length=max_length)])
    if eos is not None:
        c.append(EosTokenCriteria(eos_token_id=eos))
    return c


@pytest.mark.parametrize("trial", range(40))
def test_once_per_step_equals_token_by_token(trial):
    g = torch.Generator().manual_seed(trial)
    seq = torch.randint(0, 12, (1, int(torch.randint(1, 6, (1,), generator=g))), generator=g)
    new = torch.randint(0, 12, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g)
    eos = [None, 3, [3, 7]][trial % 3]
    stopping = criteria(seq.shape[1] + int(torch.randint(1, 10, (1,), generator=g)), eos)
    fast = emit.Emitter(stopping)
    assert fast.vectorized
    slow = emit.Emitter(stopping)
    slow.vectorized = False  # the token-by-token path: what generate() does
    with _testing.counting() as counts:
        got = fast.emit(seq, new)
    assert counts.host_copies == 1
    want = slow.emit(seq, new)
    assert torch.equal(got[0], want[0]) and got[1:] == want[1:]


def test_user_criteria_go_token_by_token():
    stopping = criteria(100, None)
    stopping.append(StopAfter(5))
    e = emit.Emitter(stopping)
    assert not e.vectorized
    seq, done, count = e.emit(torch.tensor([[1, 2]]), torch.tensor([4, 5, 6]))
    assert done and count == 2 and seq.tolist() == [[1, 2, 4, 5]]


def test_streamer_gets_the_emitted_tokens():
    class Streamer:
        def __init__(self):
            self.chunks = []

        def put(self, t):
            self.chunks.append(t.tolist())

    s = Streamer()
    e = emit.Emitter(criteria(100, 9), s)
    e.emit(torch.tensor([[1]]), torch.tensor([4, 9, 6]))
    assert s.chunks == [[4, 9]]


@pytest.mark.parametrize("trial", range(40))
def test_host_tokens_cut_where_the_device_copy_does(trial):
    """The decode loop passes the tokens its step sync copied (step_sync.py): no copy of the
    emitter's own, and the same cut as the one-copy path."""
    g = torch.Generator().manual_seed(100 + trial)
    seq = torch.randint(0, 12, (1, int(torch.randint(1, 6, (1,), generator=g))), generator=g)
    new = torch.randint(0, 12, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g)
    eos = [None, 3, [3, 7]][trial % 3]
    stopping = criteria(seq.shape[1] + int(torch.randint(1, 10, (1,), generator=g)), eos)
    with _testing.counting() as counts:
        got = emit.Emitter(stopping).emit(seq, new, new.tolist())
    assert counts.host_copies == 0
    want = emit.Emitter(stopping).emit(seq, new)
    assert torch.equal(got[0], want[0]) and got[1:] == want[1:]
