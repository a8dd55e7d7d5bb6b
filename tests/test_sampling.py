"""Lossless sampling, tested against HF's own sampling by two-sample chi-square tests whose
thresholds are the chi-square quantiles for the bins' degrees of freedom (the same test passes HF
against HF, which shows it is calibrated).

1. The walk, thousands of times: on a hot draft tree (built from the model's own top tokens, with a
   duplicated child), the tokens one verification step emits (truncated at three) are distributed
   as HF's first three sampled tokens mapped through the same tree; for temperature 1.0 / 0.7,
   top-k and top-p.
2. End to end: the first three tokens of seeded ``rec.generate(do_sample=True, generator=...)`` and
   ``model.generate(do_sample=True, custom_generate=rec)`` runs with a hot matrix are distributed as
   HF's; drafts were accepted during those runs (tokens per step > 1).
"""

import copy
from collections import Counter

import pytest
import torch
from homogeneity import chi2_quantile, homogeneity, tv
from models import tiny_model

from token_recycling import TokenRecycler, ops
from token_recycling.testing import reference
from token_recycling.sample import SamplingVerifier, UniformStream, sampling_processors

PROMPT = torch.tensor([[5, 9, 17, 5, 9]])
NEW = 3
EOS = 2
WALKS = 4000      # test 1: walks per setting (one batched op call)
RUNS = 250        # test 2: seeded generate() calls per setting
HF_RUNS = 4000    # HF: one batched generate() per sample set
ALPHA = 1e-3      # false-alarm rate of each test

SETTINGS = {"temperature 1.0": dict(temperature=1.0), "temperature 0.7": dict(temperature=0.7),
            "top-k 4": dict(temperature=1.0, top_k=4), "top-p 0.8": dict(temperature=0.7, top_p=0.8)}


def _check(name: str, ours: Counter, hf: Counter, hf2: Counter) -> None:
    stat, df = homogeneity(ours, hf)
    noise, df_hh = homogeneity(hf2, hf)
    limit = chi2_quantile(max(df, 1), ALPHA)
    print(f"{name}: chi2 {stat:.1f} (df {df}, limit {limit:.1f}); HF vs HF {noise:.1f} (df {df_hh}); "
          f"TV ours-HF {tv(ours, hf):.3f}, HF-HF {tv(hf2, hf):.3f}")
    assert df >= 5, "too few distinct outcomes for the test to mean anything"
    assert noise < chi2_quantile(df_hh, ALPHA), "HF against HF fails: the test is miscalibrated"
    assert stat < limit, f"{name}: our tokens are not distributed as HF's"


def _cut(tokens) -> tuple:
    """The first NEW tokens, cut after an EOS (HF pads finished rows; we stop)."""
    out = []
    for t in list(tokens)[:NEW]:
        out.append(int(t))
        if t == EOS:
            break
    return tuple(out)


def _hf_first_tokens(model, kwargs, seed: int) -> list[list[int]]:
    torch.manual_seed(seed)
    ids = PROMPT.expand(HF_RUNS, -1)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=NEW,
                         pad_token_id=EOS, **kwargs)
    return out[:, PROMPT.shape[1]:].tolist()


@pytest.fixture(scope="module")
def model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead (and contention on a busy machine)
    # A copy, sharper than the shared tiny model: peaked distributions, as real text has, so that
    # drafts get accepted under sampling at temperature 1.
    m = copy.deepcopy(tiny_model("llama"))
    with torch.no_grad():
        m.get_output_embeddings().weight.mul_(2.0)
    yield m
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hf_samples(model):
    """Two independent HF sample sets per setting."""
    return {name: (_hf_first_tokens(model, kw, 1), _hf_first_tokens(model, kw, 2)) for name, kw in SETTINGS.items()}


# ------------------------------------------------------------------------------------ 1. the walk
def _hot_tree(model):
    """Root = the prompt's last token; under it the 3 likeliest tokens (and the likeliest once more,
    a duplicate that must never be taken), each with its 3 likeliest, the first of those with 2
    more. Returns tokens [1, N], parents [N], per-node logits [1, N, V] (each node's own context)."""
    tokens, parents, contexts = [int(PROMPT[0, -1])], [-1], [[]]

    def top(ctx, k):
        with torch.no_grad():
            logits = model(torch.tensor([PROMPT[0].tolist() + ctx])).logits[0, -1]
        return logits.topk(k).indices.tolist()

    def add(parent, token):
        tokens.append(token)
        parents.append(parent)
        contexts.append(contexts[parent] + [token])
        return len(tokens) - 1

    first = top([], 3)
    kids = [add(0, t) for t in first] + [add(0, first[0])]
    for kid in kids[:3]:
        grand = [add(kid, t) for t in top(contexts[kid], 3)]
        for t in top(contexts[grand[0]], 2):
            add(grand[0], t)
    with torch.no_grad():
        logits = torch.stack([model(torch.tensor([PROMPT[0].tolist() + c])).logits[0, -1] for c in contexts])
    return torch.tensor([tokens]), torch.tensor(parents, dtype=torch.int32), logits.unsqueeze(0)


def _through_tree(sample: list[int], tokens: list[int], parents: list[int]) -> tuple:
    """What the walk emits when the model's draws are `sample`: tokens until one no child holds."""
    node, out = 0, []
    for t in sample:
        out.append(t)
        kids = [i for i in range(1, len(tokens)) if parents[i] == node and tokens[i] == t]
        if not kids:
            break
        node = kids[0]
    return _cut(out)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_walk_emits_hf_distribution(model, hf_samples, name):
    tokens, parents, logits = _hot_tree(model)
    processors = sampling_processors(model.generation_config, **SETTINGS[name])
    verifier = SamplingVerifier(processors, topk=8)
    probs = torch.softmax(verifier._process(PROMPT, tokens, parents, logits), dim=-1)
    g = torch.Generator().manual_seed(0)
    u = torch.rand(WALKS, tokens.shape[1], dtype=torch.float64, generator=g)
    n = tokens.shape[1]
    accept_len, nodes, bonus = ops.verify_sample(tokens.expand(WALKS, n).contiguous(), parents,
                                                 probs.expand(WALKS, n, -1).contiguous(), u)
    tok = tokens[0].tolist()
    ours = Counter()
    for length, path, b in zip(accept_len.tolist(), nodes.tolist(), bonus.tolist()):
        ours[_cut([tok[i] for i in path[1:length]] + [b])] += 1
    par = parents.tolist()
    hf, hf2 = ([_through_tree(s, tok, par) for s in samples] for samples in hf_samples[name])
    _check(name, ours, Counter(hf), Counter(hf2))
    assert accept_len.double().mean() > 1.3, "drafts were rarely accepted: the walk is barely exercised"
    assert not (nodes == 4).any(), "the duplicate child (node 4) was taken over the first one (node 1)"


# ------------------------------------------------------------------------------------ 2. end to end
@pytest.fixture(scope="module")
def rec(model):
    rec = TokenRecycler(model, tree="paper-16")
    rec.generate(PROMPT, max_new_tokens=60, eos_token_id=-1)  # a hot matrix for this text
    return rec


@pytest.mark.parametrize("name,how", [("temperature 1.0", "generator"), ("top-p 0.8", "hook")])
def test_generate_first_tokens_follow_hf(model, rec, hf_samples, name, how):
    ours, emitted, steps = Counter(), 0, 0
    for seed in range(RUNS):
        if how == "generator":  # rec.generate with a seeded torch.Generator
            out = rec.generate(PROMPT, max_new_tokens=NEW, do_sample=True,
                               generator=torch.Generator().manual_seed(seed), **SETTINGS[name])
        else:  # model.generate(custom_generate=rec): HF's processors, torch's default generator
            torch.manual_seed(seed)
            out = model.generate(PROMPT, do_sample=True, max_new_tokens=NEW, custom_generate=rec, **SETTINGS[name])
        ours[_cut(out[0, PROMPT.shape[1]:].tolist())] += 1
        emitted += sum(rec.stats.accept_lengths)
        steps += rec.stats.steps
    hf, hf2 = (Counter(_cut(s) for s in samples) for samples in hf_samples[name])
    _check(name, ours, hf, hf2)
    print(f"{name}: {emitted / steps:.2f} tokens/step")
    assert emitted / steps > 1.0, "no draft was ever accepted: the test would not exercise the walk"


@pytest.mark.parametrize("name", ["temperature 0.7", "top-p 0.8"])
def test_seeded_output_is_plain_sampling_with_the_same_draws(model, rec, name):
    """The k-th emitted token uses the k-th uniform of the stream, whatever the tree: the output
    equals one-token-at-a-time sampling (same processors, same inverse-CDF draw) with the same
    seed, for a hot and for a cold matrix."""
    kwargs = SETTINGS[name]
    processors = sampling_processors(model.generation_config, **kwargs)
    stream = UniformStream(torch.Generator().manual_seed(11), torch.device("cpu"))
    seq = PROMPT
    with torch.no_grad():
        for _ in range(30):
            scores = processors(seq, model(seq).logits[:, -1].float())
            token = reference.verify_sample(seq[:, -1:], torch.tensor([-1], dtype=torch.int32),
                                            torch.softmax(scores, -1).unsqueeze(1), stream.peek(1).view(1, 1))[2]
            stream.consume(1)
            seq = torch.cat([seq, token.view(1, 1)], dim=1)
    cold = TokenRecycler(model, tree="paper-16")
    for r in (rec, cold):
        out = r.generate(PROMPT, max_new_tokens=30, do_sample=True, eos_token_id=-1,
                         generator=torch.Generator().manual_seed(11), **kwargs)
        assert torch.equal(out, seq)
    assert rec.stats.mean_accepted > 1.0


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
