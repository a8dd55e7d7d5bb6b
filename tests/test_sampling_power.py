"""Batched sampling against HF's sampling, with enough runs to see a bias of total variation 0.05.

Each setting draws RUNS rows of the same prompt in one batched call (rows are sampled independently:
each has its own walk and its own uniforms) through the batch path, either ``rec.generate(ids [B, S])``
or ``model.generate(custom_generate=rec, num_return_sequences=RUNS)``, with a hot matrix so drafts
are accepted. Their first NEW tokens are compared with HF_RUNS rows of HF's ``do_sample=True`` by the
two-sample chi-square tests of homogeneity.py, on the whole outcomes and on the token at each
position (``_statistic``); outcomes are pooled until the smaller sample expects POOL of each, and each
threshold is the chi-square quantile for its bins' degrees of freedom (ALPHA split over the four).
The test is calibrated (a second HF sample of RUNS rows passes it) and shown to have power: a sampler
whose output is off by a total variation of exactly 0.05 (computed, not estimated) fails it.
"""

from collections import Counter

import pytest
import torch
from homogeneity import tv, worst_test
from test_sampling import EOS, NEW, PROMPT, _cut
from test_sampling import model  # noqa: F401  (the sharper tiny model, a module-scoped fixture)

from token_recycling import TokenRecycler, sample
from token_recycling.sample import sampling_processors

RUNS = 2000      # our rows per setting (one batched call)
HF_RUNS = 20000  # HF's rows per setting (HF's batched sampling is cheap)
ALPHA = 4e-4  # in all: 1e-4 for each of the four tests
POOL = 5
BIAS_TV = 0.05

# (generate() options, route): repetition_penalty and min_p act on each tree node's own context and
# distribution; top-k, top-p and a temperature together.
SETTINGS = {
    "repetition_penalty 1.5, temperature 0.6": (dict(temperature=0.6, repetition_penalty=1.5), "custom_generate"),
    "min_p 0.1": (dict(temperature=1.0, min_p=0.1), "batch"),
    "top-k 8, top-p 0.9, temperature 0.8": (dict(temperature=0.8, top_k=8, top_p=0.9), "batch"),
}
BIASED = "top-k 8, top-p 0.9, temperature 0.8"


@pytest.fixture(scope="module")
def rec(model):
    rec = TokenRecycler(model, tree="paper-16")
    rec.generate(PROMPT, max_new_tokens=60, eos_token_id=-1)  # a hot matrix for this text
    return rec


def _hf(model, kwargs, rows: int, seed: int) -> Counter:
    torch.manual_seed(seed)
    ids = PROMPT.expand(rows, -1)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=NEW,
                         pad_token_id=EOS, **kwargs)
    return Counter(_cut(row) for row in out[:, PROMPT.shape[1]:].tolist())


def _ours(model, rec, kwargs, route: str, seed: int) -> tuple[Counter, float]:
    """RUNS rows in one batched call; (their outcomes, tokens per step per row)."""
    if route == "batch":
        out = rec.generate(PROMPT.expand(RUNS, -1), max_new_tokens=NEW, do_sample=True,
                           generator=torch.Generator().manual_seed(seed), **kwargs)
    else:  # HF repeats the prompt RUNS times and hands the batch to the recycler; torch's default generator
        torch.manual_seed(seed)
        out = model.generate(PROMPT, do_sample=True, max_new_tokens=NEW, num_return_sequences=RUNS,
                             custom_generate=rec, **kwargs)
    assert out.shape[0] == RUNS and len(rec.stats.rows) == RUNS
    emitted = sum(sum(r.accept_lengths) for r in rec.stats.rows)
    return Counter(_cut(row) for row in out[:, PROMPT.shape[1]:].tolist()), emitted / sum(r.steps for r in rec.stats.rows)


def _statistic(a: Counter, b: Counter) -> tuple[float, int, float]:
    """The largest of four two-sample chi-square tests, each against its threshold at ALPHA / 4: the
    whole 3-token outcomes, and the token at each position (None after an EOS)
    (``homogeneity.worst_test``). Returns (statistic, degrees of freedom, threshold) of the test
    nearest to rejecting."""
    return worst_test(a, b, NEW, ALPHA, POOL)


@pytest.fixture(scope="module")
def hf_samples(model):
    """Per setting: HF_RUNS rows to test against, and RUNS more rows to calibrate the test with."""
    return {name: (_hf(model, kw, HF_RUNS, 1), _hf(model, kw, RUNS, 2)) for name, (kw, _) in SETTINGS.items()}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_batched_sampling_follows_hf(model, rec, hf_samples, name):
    kwargs, route = SETTINGS[name]
    hf, hf_small = hf_samples[name]
    ours, per_step = _ours(model, rec, kwargs, route, seed=3)
    stat, df, limit = _statistic(ours, hf)
    noise, df_hh, limit_hh = _statistic(hf_small, hf)
    print(f"{name} ({route}): chi2 {stat:.1f} (df {df}, limit {limit:.1f}); HF vs HF {noise:.1f} (df {df_hh}); "
          f"TV ours-HF {tv(ours, hf):.3f}, HF-HF {tv(hf_small, hf):.3f}; {per_step:.2f} tokens/step")
    assert len(ours) >= 10, "too few distinct outcomes for the test to mean anything"
    assert noise < limit_hh, "HF against HF fails: the test is miscalibrated"
    assert stat < limit, f"{name}: our tokens are not distributed as HF's"
    assert per_step > 1.0, "no draft was ever accepted: the walk was not exercised"


# ------------------------------------------------------------------------------------ power
def test_a_sampler_off_by_tv_005_fails(model, rec, hf_samples, monkeypatch):
    """The same statistic, numbers of runs and setting as above, on a recycler whose first draw mixes
    a little mass onto the uniform distribution over the vocabulary (as a sampler that skips the
    warpers now and then would). Only the first draw is biased and every later draw is HF's given
    the tokens before it, so the total variation between its output and HF's is that of the first
    token: ``mix * TV(p, uniform)``, made exactly BIAS_TV by the choice of mix. The test must reject it.

    What it sees less well at these numbers: a bias of the same size that only moves mass between
    outcomes HF itself produces (a sampler that flattens the tokens the warpers kept: by the whole-outcome
    test's noncentrality, about 50% power at 2,000 runs and 90% at 4,000)."""
    kwargs, route = SETTINGS[BIASED]
    processors = sampling_processors(model.generation_config, **kwargs)
    with torch.no_grad():
        p = torch.softmax(processors(PROMPT, model(PROMPT).logits[:, -1].float()), dim=-1).double()[0]
    uniform = torch.full_like(p, 1 / p.numel())
    mix = BIAS_TV / (0.5 * float((p - uniform).abs().sum()))
    assert 0 < mix < 0.1

    real = sample.SamplingVerifier._process

    def biased(self, seq, tokens, parents, logits):
        scores = real(self, seq, tokens, parents, logits)
        if parents is not sample._ROOT_ONLY:  # a tree step: HF's distribution
            return scores
        q = (1 - mix) * torch.softmax(scores.double(), dim=-1) + mix / scores.shape[-1]  # the first draw
        return torch.log(q).float()

    monkeypatch.setattr(sample.SamplingVerifier, "_process", biased)
    ours, _ = _ours(model, rec, kwargs, route, seed=3)
    hf = hf_samples[BIASED][0]
    stat, df, limit = _statistic(ours, hf)
    print(f"mix {mix:.4f} (exact TV {BIAS_TV}): chi2 {stat:.1f} (df {df}, limit {limit:.1f}); "
          f"TV biased-HF {tv(ours, hf):.3f}")
    assert stat > limit, "a sampler off by a total variation of 0.05 passes the test: it has too little power"
