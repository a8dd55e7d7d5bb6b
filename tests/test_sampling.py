"""Lossless sampling: on a tiny model with a hot matrix, the joint distribution of the first three
sampled tokens (TokenRecycler, thousands of seeded runs) matches HF's own sampling, by a two-sample
chi-square test whose threshold is the chi-square quantile for the bins' degrees of freedom (the
same test passes HF against HF); and drafts were accepted during those runs."""

import math
from collections import Counter

import pytest
import torch
from models import tiny_model

from token_recycling import TokenRecycler

PROMPT = torch.tensor([[5, 9, 17, 5, 9]])
NEW = 3
EOS = 2
RUNS = 1200       # ours: one seeded generate() each
HF_RUNS = 4000    # HF: one batched generate() per sample set
ALPHA = 1e-3      # false-alarm rate of each test


def _chi2_quantile(df: int, alpha: float) -> float:
    """Upper alpha quantile of chi-square(df), Wilson-Hilferty (accurate to ~1% for df >= 3)."""
    z = {1e-3: 3.0902, 1e-4: 3.7190}[alpha]
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _homogeneity(a: Counter, b: Counter, min_count: int = 10) -> tuple[float, int]:
    """Two-sample chi-square statistic and degrees of freedom; outcomes seen fewer than min_count
    times in both samples together share one bin."""
    na, nb = sum(a.values()), sum(b.values())
    bins, rest = [], [0, 0]
    for key in set(a) | set(b):
        if a[key] + b[key] >= min_count:
            bins.append((a[key], b[key]))
        else:
            rest[0] += a[key]
            rest[1] += b[key]
    if sum(rest) > 0:
        bins.append(tuple(rest))
    ka, kb = math.sqrt(nb / na), math.sqrt(na / nb)
    stat = sum((x * ka - y * kb) ** 2 / (x + y) for x, y in bins)
    return stat, len(bins) - 1


def _tv(a: Counter, b: Counter) -> float:
    na, nb = sum(a.values()), sum(b.values())
    return 0.5 * sum(abs(a[k] / na - b[k] / nb) for k in set(a) | set(b))


def _first_tokens(row) -> tuple:
    """The first NEW new tokens, cut after an EOS (HF pads finished rows; we stop)."""
    out = []
    for t in row[:NEW]:
        out.append(int(t))
        if t == EOS:
            break
    return tuple(out)


def _hf_samples(model, kwargs, seed: int) -> Counter:
    torch.manual_seed(seed)
    ids = PROMPT.expand(HF_RUNS, -1)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=NEW,
                         pad_token_id=EOS, **kwargs)
    return Counter(_first_tokens(row) for row in out[:, PROMPT.shape[1]:].tolist())


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def rec(model):
    rec = TokenRecycler(model, tree="paper-16")
    rec.generate(PROMPT, max_new_tokens=60, eos_token_id=-1)  # a hot matrix for this text
    return rec


CASES = [("temperature 1.0", dict(temperature=1.0), "generator"),
         ("temperature 0.7", dict(temperature=0.7), "generator"),
         ("top-k 4", dict(temperature=1.0, top_k=4), "hook"),
         ("top-p 0.8", dict(temperature=0.7, top_p=0.8), "hook")]


@pytest.mark.parametrize("name,kwargs,how", CASES, ids=[c[0] for c in CASES])
def test_first_three_tokens_follow_hf_sampling(model, rec, name, kwargs, how):
    ours, emitted, steps = Counter(), 0, 0
    for seed in range(RUNS):
        if how == "generator":  # rec.generate with a seeded torch.Generator
            out = rec.generate(PROMPT, max_new_tokens=NEW, do_sample=True,
                               generator=torch.Generator().manual_seed(seed), **kwargs)
        else:  # model.generate(custom_generate=rec): HF's processors, torch's default generator
            torch.manual_seed(seed)
            out = model.generate(PROMPT, do_sample=True, max_new_tokens=NEW, custom_generate=rec, **kwargs)
        ours[_first_tokens(out[0, PROMPT.shape[1]:].tolist())] += 1
        emitted += sum(rec.stats.accept_lengths)
        steps += rec.stats.steps
    hf, hf2 = _hf_samples(model, kwargs, 1), _hf_samples(model, kwargs, 2)
    stat, df = _homogeneity(ours, hf)
    noise, df_hh = _homogeneity(hf2, hf)
    limit = _chi2_quantile(df, ALPHA)
    print(f"{name}: chi2 {stat:.1f} (df {df}, limit {limit:.1f}); HF vs HF {noise:.1f} (df {df_hh}); "
          f"TV ours-HF {_tv(ours, hf):.3f}, HF-HF {_tv(hf2, hf):.3f}; {emitted / steps:.2f} tokens/step")
    assert df >= 5, "too few distinct outcomes for the test to mean anything"
    assert noise < _chi2_quantile(df_hh, ALPHA), "HF against HF fails: the test is miscalibrated"
    assert stat < limit, f"{name}: our first three tokens are not distributed as HF's"
    assert emitted / steps > 1.0, "no draft was ever accepted: the test would not exercise the walk"


def test_seeded_sampling_is_reproducible(model, rec):
    a = rec.generate(PROMPT, max_new_tokens=20, do_sample=True, generator=torch.Generator().manual_seed(7))
    b = rec.generate(PROMPT, max_new_tokens=20, do_sample=True, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    torch.manual_seed(3)
    c = model.generate(PROMPT, do_sample=True, max_new_tokens=20, custom_generate=rec)
    torch.manual_seed(3)
    d = model.generate(PROMPT, do_sample=True, max_new_tokens=20, custom_generate=rec)
    assert torch.equal(c, d)
    assert rec.stats.decoding.startswith("sample(")


def test_sampling_rejects_bad_arguments(rec):
    with pytest.raises(ValueError, match="temperature"):
        rec.generate(PROMPT, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        rec.generate(PROMPT, do_sample=True, top_p=1.5)
    with pytest.raises(TypeError, match="generator"):
        rec.generate(PROMPT, do_sample=True, generator=7)
