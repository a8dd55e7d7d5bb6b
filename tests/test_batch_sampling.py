"""Lossless sampling with a batch: two left-padded prompts of different lengths sampled together by
seeded ``rec.generate(do_sample=True, generator=...)`` runs with a hot matrix; each row's first three
tokens are distributed as HF's batched ``do_sample=True`` output for the same padded batch (the
two-sample chi-square test of test_sampling.py, calibrated by the same test of HF against HF), and
drafts were accepted in those runs (tokens per step per row > 1).

Sized for one core: RUNS batched generations (two rows each) against two HF sample sets of HF_RUNS
copies of the batch.
"""

import copy
from collections import Counter

import pytest
import torch
from models import tiny_model
from test_sampling import NEW, _check, _cut

from token_recycling import TokenRecycler

PROMPTS = [[5, 9, 17, 5, 9], [11, 4, 23, 8, 11, 4, 23, 8]]  # lengths 5 and 8: row 0 has 3 pads in front
RUNS = 200
HF_RUNS = 2000


def _batch():
    width = max(len(p) for p in PROMPTS)
    ids = torch.zeros(len(PROMPTS), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(PROMPTS):
        ids[b, width - len(p):] = torch.tensor(p)
        mask[b, width - len(p):] = 1
    return ids, mask


@pytest.fixture(scope="module")
def model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    m = copy.deepcopy(tiny_model("llama"))  # sharper, as in test_sampling.py: drafts get accepted at temperature 1
    with torch.no_grad():
        m.get_output_embeddings().weight.mul_(2.0)
    yield m
    torch.set_num_threads(threads)


def _hf_rows(model, ids, mask, seed: int) -> list[Counter]:
    """Per row, the first NEW tokens of HF_RUNS batched do_sample=True copies of the batch."""
    torch.manual_seed(seed)
    out = model.generate(ids.repeat(HF_RUNS, 1), attention_mask=mask.repeat(HF_RUNS, 1), do_sample=True,
                         temperature=1.0, max_new_tokens=NEW, pad_token_id=model.generation_config.eos_token_id)
    new = out[:, ids.shape[1]:].view(HF_RUNS, len(PROMPTS), -1)
    return [Counter(_cut(new[r, b].tolist()) for r in range(HF_RUNS)) for b in range(len(PROMPTS))]


def test_batched_sampling_rows_follow_hf(model):
    ids, mask = _batch()
    rec = TokenRecycler(model, tree="paper-16")
    rec.generate(ids, attention_mask=mask, max_new_tokens=60, eos_token_id=-1)  # a hot matrix for these texts
    ours = [Counter() for _ in PROMPTS]
    emitted = steps = 0
    for seed in range(RUNS):
        out = rec.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=True, temperature=1.0,
                           generator=torch.Generator().manual_seed(seed))
        assert torch.equal(out[:, : ids.shape[1]], ids)  # the padded prompts come back as given
        for b in range(len(PROMPTS)):
            ours[b][_cut(out[b, ids.shape[1]:].tolist())] += 1
        emitted += sum(sum(r.accept_lengths) for r in rec.stats.rows)
        steps += sum(r.steps for r in rec.stats.rows)
    hf, hf2 = _hf_rows(model, ids, mask, 1), _hf_rows(model, ids, mask, 2)
    for b in range(len(PROMPTS)):
        _check(f"row {b} (length {len(PROMPTS[b])})", ours[b], hf[b], hf2[b])
    print(f"{emitted / steps:.2f} tokens per step per row")
    assert emitted / steps > 1.0, "no draft was ever accepted: the batched walk was not exercised"
