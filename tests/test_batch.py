"""Batch > 1 (left padding): every row == HF batched greedy generate() and == the row run alone (fp32)."""


import pytest
import torch
from models import private_copy, tiny_model

from token_recycling import TokenRecycler, hf_attention

PAD = 0


def _batch(prompts):
    """Left-padded [B, S] ids (padding PAD) and the attention mask."""
    width = max(p.numel() for p in prompts)
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - p.numel():] = p
        mask[b, width - p.numel():] = 1
    return ids, mask


def _prompts(vocab, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:  # a repeated piece in each prompt gives the n-gram drafts something to find
        piece = torch.randint(3, vocab, (max(n // 3, 1),), generator=g)
        out.append(torch.cat([piece, torch.randint(3, vocab, (n,), generator=g), piece])[:n])
    return out


def _pad_id(model):
    pad = model.generation_config.pad_token_id
    return pad if pad is not None else model.generation_config.eos_token_id


def _check_rows_alone(model, prompts, got, max_new, **kw):
    """Row b of `got` is its padding, then what the prompt gives alone, then the pad id."""
    width = got.shape[1]
    start = max(p.numel() for p in prompts)
    for b, p in enumerate(prompts):
        alone = model.generate(p.view(1, -1), max_new_tokens=max_new, do_sample=False, **kw)[0]
        pad = start - p.numel()
        assert torch.equal(got[b, pad: pad + alone.numel()], alone), b
        assert bool((got[b, pad + alone.numel(): width] == _pad_id(model)).all()), b


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
def test_rows_equal_hf_batched_and_alone(arch):
    model = tiny_model(arch)
    prompts = _prompts(model.config.vocab_size, [3, 17, 1, 40])  # very different lengths
    ids, mask = _batch(prompts)
    rec = TokenRecycler(model, tree="paper")
    want = model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False)
    got = rec.generate(ids, attention_mask=mask, max_new_tokens=40)
    assert torch.equal(got, want)
    assert len(rec.stats.rows) == 4 and rec.stats.new_tokens == sum(s.new_tokens for s in rec.stats.rows)
    assert max(s.mean_accepted for s in rec.stats.rows) > 1.0, "no draft accepted: compaction not exercised"
    via_hook = model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, custom_generate=rec)
    assert torch.equal(via_hook, want)
    _check_rows_alone(model, prompts, got, 40)


@pytest.mark.parametrize("batch", [1, 2, 3, 8])
def test_batch_sizes_with_the_default_auto_tree(batch):
    model = tiny_model("llama")
    prompts = _prompts(model.config.vocab_size, [5 + 7 * b % 23 for b in range(batch)], seed=batch)
    ids, mask = _batch(prompts)
    if batch == 1:  # one row with padding in front goes through the batched loop too
        ids, mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1), torch.cat([torch.zeros(1, 3).long(), mask], 1)
    rec = TokenRecycler(model)
    rec.generate(ids, attention_mask=mask, max_new_tokens=24)  # warm: later calls accept more
    want = model.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False)
    assert torch.equal(rec.generate(ids, attention_mask=mask, max_new_tokens=32), want)
    assert len(rec.stats.rows) == batch
    assert rec.stats.accept_lengths == [sum(r.accept_lengths[t] for r in rec.stats.rows if t < r.steps)
                                        for t in range(rec.stats.steps)]  # per forward, the rows' tokens summed
    assert rec.stats.new_tokens == sum(r.new_tokens for r in rec.stats.rows)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=32, custom_generate=rec), want)


def test_eos_inside_an_accepted_path_in_one_row_only():
    model = tiny_model("qwen2")
    prompts = _prompts(model.config.vocab_size, [4, 9, 2], seed=5)
    ids, mask = _batch(prompts)
    rec = TokenRecycler(model, tree="paper")
    for _ in range(2):  # warm the matrix on these texts (no EOS hit)
        rec.generate(ids, attention_mask=mask, max_new_tokens=60, eos_token_id=-1)
    texts = rec.generate(ids, attention_mask=mask, max_new_tokens=60, eos_token_id=-1)[:, ids.shape[1]:].tolist()
    chosen = None
    for b, stats in enumerate(rec.stats.rows):  # a token emitted inside a multi-token step of row b only
        pos = 1  # the first token comes from the prefill
        for n in stats.accept_lengths:
            if n >= 3:
                eos = texts[b][pos + 1]
                if texts[b].index(eos) == pos + 1 and all(eos not in t for c, t in enumerate(texts) if c != b):
                    chosen = (b, eos, pos + 1)
                    break
            pos += n
        if chosen:
            break
    assert chosen is not None, "no token to force as EOS: the test would not exercise a cut inside a path"
    b, eos, at = chosen
    want = model.generate(ids, attention_mask=mask, max_new_tokens=60, do_sample=False, eos_token_id=eos)
    got = rec.generate(ids, attention_mask=mask, max_new_tokens=60, eos_token_id=eos)
    assert torch.equal(got, want)
    assert got[b, ids.shape[1] + at] == eos and bool((got[b, ids.shape[1] + at + 1:] == eos).all())
    assert got.shape[1] == ids.shape[1] + 60  # the other rows went on to the limit


def test_a_row_finishing_at_step_one():
    model = tiny_model("llama")
    prompts = _prompts(model.config.vocab_size, [6, 2, 11], seed=3)
    ids, mask = _batch(prompts)
    first = model.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False)[:, -1].tolist()
    rec = TokenRecycler(model)
    b = next(b for b in range(3) if first.count(first[b]) == 1)
    want = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, eos_token_id=first[b])
    got = rec.generate(ids, attention_mask=mask, max_new_tokens=30, eos_token_id=first[b])
    assert torch.equal(got, want) and rec.stats.rows[b].steps == 0
    assert torch.equal(rec.generate(ids, attention_mask=mask, max_new_tokens=1),
                       model.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False))


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_tree_attention_backend(arch, monkeypatch):
    """The kernel with one tree per row and the common tree slot (per-row prefixes), on the CPU."""
    reference, model = private_copy(arch)
    calls, real = [], hf_attention.ops.tree_attention

    def counting(q, k, v, prefix_len, tree_mask, scale, tree_start=-1):
        calls.append((tuple(tree_mask.shape), tree_start, prefix_len.tolist()))
        return real(q, k, v, prefix_len, tree_mask, scale, tree_start)

    monkeypatch.setattr(hf_attention.ops, "tree_attention", counting)
    prompts = _prompts(reference.config.vocab_size, [2, 19, 8], seed=11)
    ids, mask = _batch(prompts)
    rec = TokenRecycler(model, tree="paper-16", tree_attention=True)
    want = reference.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False)
    assert torch.equal(rec.generate(ids, attention_mask=mask, max_new_tokens=30), want)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=30, custom_generate=rec), want)
    batched = [c for c in calls if len(c[0]) == 3]
    assert batched and all(start >= max(p) for _, start, p in batched)
    assert any(len(set(p)) > 1 for _, _, p in batched), "rows of one length: per-row prefixes not exercised"


def test_sampling_with_top_k_1_is_greedy_per_row():
    model = tiny_model("qwen2")
    ids, mask = _batch(_prompts(model.config.vocab_size, [3, 12], seed=9))
    rec = TokenRecycler(model)
    want = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    got = rec.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=True, top_k=1,
                       generator=torch.Generator().manual_seed(0))
    assert torch.equal(got, want)


def test_bad_padding_is_refused():
    model = tiny_model("llama")
    rec = TokenRecycler(model)
    ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    with pytest.raises(ValueError, match="attention_mask.*left-padded"):
        rec.generate(ids, attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]))  # right padding
    with pytest.raises(ValueError, match="attention_mask.*no token"):
        rec.generate(ids, attention_mask=torch.tensor([[1, 1, 1], [0, 0, 0]]))
    with pytest.raises(ValueError, match="attention_mask"):
        rec.generate(ids, attention_mask=torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="streamer"):
        rec.generate(ids, streamer=object())


def test_a_batch_adds_every_row_to_the_suffix_memory():
    # As a one-row generate does: later requests draft from what the batch held and generated
    # (each row's own prompt and output, not the padding or another row's eos tail).
    model = tiny_model("llama")
    rec = TokenRecycler(model)
    prompts = _prompts(model.config.vocab_size, [5, 9])
    ids, mask = _batch(prompts)
    got = rec.generate(ids, attention_mask=mask, max_new_tokens=12)
    rows = [torch.cat([p.view(-1), got[b, ids.shape[1]:]]) for b, p in enumerate(prompts)]
    assert rec.drafter.memory.state_tensors()["memory_tokens"].tolist() == torch.cat(rows).tolist()


@pytest.mark.parametrize("tree_attention", [True, False])
def test_static_cache_with_a_batch(tree_attention):
    """cache_implementation="static" at B > 1 (HF batched greedy over its own static cache), through the
    tree kernel's per-row prefixes and through dense masks over the static buffer; a row finishing early
    leaves the static layers too."""
    reference, model = private_copy("llama")
    prompts = _prompts(model.config.vocab_size, [4, 19, 9])
    ids, mask = _batch(prompts)
    first = reference.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False)[:, -1]
    eos = int(first[1])  # row 1 stops at its first token: the batch shrinks at once
    want = reference.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False,
                              cache_implementation="static", eos_token_id=eos)
    rec = TokenRecycler(model, tree="paper-16", tree_attention=tree_attention)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, custom_generate=rec,
                         cache_implementation="static", eos_token_id=eos)
    assert torch.equal(got, want)
    assert max(s.mean_accepted for s in rec.stats.rows) > 1.0, "no draft accepted: compaction not exercised"


def test_one_row_only_options_are_refused_for_a_batch():
    model = tiny_model("llama")
    ids, mask = _batch(_prompts(model.config.vocab_size, [3, 5]))
    with pytest.raises(ValueError, match="streamer works with one unpadded sequence"):
        TokenRecycler(model).generate(ids, attention_mask=mask, streamer=object())
    with pytest.raises(NotImplementedError, match="cuda_graphs=True decodes one row at a time"):
        TokenRecycler(model, cuda_graphs=True).generate(ids, attention_mask=mask, max_new_tokens=4)
    window = tiny_model("mistral-window")
    with pytest.raises(NotImplementedError, match="sliding-window models are decoded one row at a time"):
        TokenRecycler(window).generate(ids, attention_mask=mask, max_new_tokens=4)
