"""Lossless: TokenRecycler output == model.generate(do_sample=False) token for token in fp32."""

import pytest
import torch
from models import ARCHS, private_copy, tiny_model

from token_recycling import TokenRecycler, verify


def _prompts(vocab, g, n=4):
    lens = [1, 5, 12, 30][:n]
    return [torch.randint(3, vocab, (1, L), generator=g) for L in lens]


@pytest.mark.parametrize("arch", ARCHS)
def test_lossless_every_architecture(arch):
    model, reference = tiny_model(arch), private_copy(arch)[1]  # the reference: never given to a recycler
    g = torch.Generator().manual_seed(1)
    rec = TokenRecycler(model, tree="paper")
    accepted = []
    for ids in _prompts(model.config.vocab_size, g):  # repeated calls: the matrix stays hot
        want = reference.generate(ids, max_new_tokens=40, do_sample=False)
        got = rec.generate(ids, max_new_tokens=40)
        assert torch.equal(got, want), arch
        accepted.append(rec.stats.mean_accepted)
        via_hook = model.generate(ids, max_new_tokens=40, do_sample=False, custom_generate=rec)
        assert torch.equal(via_hook, want), arch
    assert max(accepted) > 1.0, "drafts were never accepted: the test would not exercise compaction"


@pytest.mark.parametrize("tree", ["paper", "paper-16", "chain-4", [[0], [1], [0, 0], [0, 0, 0]]])
def test_lossless_for_any_tree(tree):
    model = tiny_model("llama")
    rec = TokenRecycler(model, tree=tree)
    ids = torch.tensor([[5, 9, 17, 5, 9]])
    assert torch.equal(rec.generate(ids, max_new_tokens=50), model.generate(ids, max_new_tokens=50, do_sample=False))


def test_eos_inside_an_accepted_path_stops_exactly_there():
    model = tiny_model("qwen2")
    ids = torch.tensor([[7, 8, 9]])
    plain = model.generate(ids, max_new_tokens=60, do_sample=False, eos_token_id=None)[0, 3:].tolist()
    rec = TokenRecycler(model, tree="paper")
    rec.generate(ids, max_new_tokens=60, eos_token_id=-1)  # warm the matrix on this text (no EOS hit)
    assert rec.stats.mean_accepted > 1.5
    # Pick as EOS a token that the hot recycler emits in the middle of a multi-token step.
    rec.generate(ids, max_new_tokens=60, eos_token_id=-1)
    lens, pos, eos_at = rec.stats.accept_lengths, 0, None
    for n in lens:
        if n >= 3:
            eos_at = pos + 1  # second token of a multi-token step
            break
        pos += n
    assert eos_at is not None
    eos = plain[eos_at]
    first = plain.index(eos)
    want = model.generate(ids, max_new_tokens=60, do_sample=False, eos_token_id=eos)
    got = rec.generate(ids, max_new_tokens=60, eos_token_id=eos)
    assert torch.equal(got, want) and got.shape[1] == 3 + first + 1


@pytest.mark.parametrize("max_new", [1, 2, 7, 33])
def test_max_new_tokens_cuts_inside_an_accepted_path(max_new):
    model = tiny_model("llama")
    rec = TokenRecycler(model, tree="paper")
    ids = torch.tensor([[3, 4, 5, 6]])
    rec.generate(ids, max_new_tokens=64)  # hot matrix: later steps accept several tokens
    want = model.generate(ids, max_new_tokens=max_new, do_sample=False)
    got = rec.generate(ids, max_new_tokens=max_new)
    assert torch.equal(got, want) and got.shape[1] == 4 + max_new


def test_one_token_prompt():
    model = tiny_model("gemma")
    ids = torch.tensor([[11]])
    rec = TokenRecycler(model)
    assert torch.equal(rec.generate(ids, max_new_tokens=30), model.generate(ids, max_new_tokens=30, do_sample=False))


def test_streamer_receives_exactly_the_returned_tokens():
    class Collect:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.view(-1).tolist())

        def end(self):
            self.ended = True

    model = tiny_model("llama")
    ids = torch.tensor([[21, 22, 23]])
    rec = TokenRecycler(model)
    rec.generate(ids, max_new_tokens=40)
    s = Collect()
    out = rec.generate(ids, max_new_tokens=40, streamer=s)
    assert s.ended and s.chunks[0] == [21, 22, 23]
    assert sum(s.chunks[1:], []) == out[0, 3:].tolist()
    assert any(len(c) > 1 for c in s.chunks[1:]), "a hot matrix should stream multi-token steps"


def test_save_load_round_trip(tmp_path):
    model = tiny_model("qwen3")
    ids = torch.tensor([[4, 5, 6, 7]])
    rec = TokenRecycler(model, tree="paper-16")
    rec.generate(ids, max_new_tokens=40)
    path = tmp_path / "matrix.safetensors"
    rec.save(path)
    back = TokenRecycler.load(model, path)
    assert torch.equal(back.matrix.table, rec.matrix.table)
    assert back.tree.paths == rec.tree.paths
    assert torch.equal(back.generate(ids, max_new_tokens=40), model.generate(ids, max_new_tokens=40, do_sample=False))
    rec.reset()
    assert int(rec.matrix.table.abs().sum()) == 0


def test_hot_start_accepts_more_than_cold():
    model = tiny_model("mistral")
    ids = torch.tensor([[40, 41, 42, 43, 44]])
    rec = TokenRecycler(model)
    rec.generate(ids, max_new_tokens=48)
    cold = rec.stats.mean_accepted
    rec.generate(ids, max_new_tokens=48)
    assert rec.stats.mean_accepted > cold


def test_seed_from_prompt_fills_prompt_rows():
    model = tiny_model("llama")
    ids = torch.tensor([[30, 31, 32]])
    rec = TokenRecycler(model, seed_from_prompt=True)
    out = rec.generate(ids, max_new_tokens=10)
    assert torch.equal(out, model.generate(ids, max_new_tokens=10, do_sample=False))
    logits = model(ids).logits[0]
    for i, t in enumerate(ids[0].tolist()):
        if t not in out[0, 3:].tolist():  # rows of generated tokens are overwritten later
            assert torch.equal(rec.matrix.table[t].long(), logits[i].topk(8).indices)


def test_logits_processor_through_generate_stays_exact():
    model = tiny_model("llama")
    ids = torch.tensor([[9, 10, 11, 9, 10]])
    rec = TokenRecycler(model)
    kw = dict(max_new_tokens=30, do_sample=False, repetition_penalty=1.3, min_new_tokens=5)
    assert torch.equal(model.generate(ids, custom_generate=rec, **kw), model.generate(ids, **kw))


# ------------------------------------------------------------------------------------ bad input
def test_bad_input():
    model = tiny_model("llama")
    rec = TokenRecycler(model)
    with pytest.raises(ValueError, match="max_new_tokens"):
        rec.generate(torch.tensor([[1, 2]]), max_new_tokens=0)
    with pytest.raises(ValueError, match="seq >= 1"):
        rec.generate(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="outside"):
        rec.generate(torch.tensor([[1, 320]]))
    with pytest.raises(TypeError):
        rec.generate(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="attention_mask.*left-padded"):  # batches: test_batch.py
        rec.generate(torch.tensor([[1, 2], [3, 4]]), attention_mask=torch.tensor([[1, 1], [1, 0]]))


def test_matrix_file_for_another_model_is_refused(tmp_path):
    small = TokenRecycler(tiny_model("llama"))
    path = tmp_path / "m.safetensors"
    small.save(path)
    other = tiny_model("llama").__class__._from_config(
        type(tiny_model("llama").config)(vocab_size=500, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1, intermediate_size=64), attn_implementation="sdpa")
    with pytest.raises(ValueError, match="vocab_size=320"):
        TokenRecycler.load(other, path)
    with pytest.raises(ValueError, match="k=4"):
        TokenRecycler.load(tiny_model("llama"), path, topk=4)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="not a token-recycling matrix"):
        TokenRecycler.load(tiny_model("llama"), tmp_path / "junk.safetensors")


def test_model_without_4d_mask_support_is_refused():
    model = tiny_model("qwen2", attn="eager", seed=3)
    model.config._attn_implementation_internal = "flash_attention_2"
    try:
        with pytest.raises(ValueError, match="Qwen2ForCausalLM.*flash_attention_2"):
            TokenRecycler(model)
    finally:
        model.config._attn_implementation_internal = "eager"


def test_greedy_choice_follows_argmax_on_ties():
    logits = torch.randn(1, 6, 320).to(torch.bfloat16)
    logits[0, 1, 7] = logits[0, 1, 200] = 50.0  # exact tie: the first index must win, as in argmax
    logits[0, 4, 319] = logits[0, 4, 3] = 60.0
    greedy, cand = verify.greedy_and_candidates(logits, 8)
    assert torch.equal(greedy, logits.argmax(-1))
    assert torch.equal(logits.gather(-1, cand), logits.topk(8, dim=-1).values)  # the top-k, ties in id order


@pytest.mark.parametrize("prompt_len", [1, 6])
def test_static_cache_through_generate(prompt_len):
    """generate(cache_implementation="static"): a fixed-size cache, so near its end the tree is cut to fit."""
    model = tiny_model("llama")
    rec = TokenRecycler(model)
    ids = torch.arange(10, 10 + prompt_len).view(1, -1)
    for _ in range(2):
        want = model.generate(ids, max_new_tokens=50, do_sample=False)
        got = model.generate(ids, max_new_tokens=50, do_sample=False, custom_generate=rec, cache_implementation="static")
        assert torch.equal(got, want)


def test_generate_leaves_the_model_as_it_was():
    """The attention backend and the skinny_linear routing are entered for the length of a call and
    restored on return, also when the call fails; the model then computes what an untouched copy does."""
    _, model = private_copy("llama")
    reference = private_copy("llama")[1]

    def state(m):
        return m.config._attn_implementation, sorted(n for n, mod in m.named_modules() if "forward" in mod.__dict__)

    before = state(model)
    rec = TokenRecycler(model)  # the CPU defaults: our attention backend, skinny_linear where it applies
    assert state(model) == before
    ids = torch.tensor([[5, 6, 7, 5, 6, 7, 5]])
    rec.generate(ids, max_new_tokens=12)
    model.generate(ids, max_new_tokens=12, do_sample=False, custom_generate=rec)
    rec.generate(torch.tensor([[0, 5, 6], [7, 8, 9]]), attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]),
                 max_new_tokens=6)

    class Failing:
        def put(self, value):
            if value.numel() and value.view(-1)[0] >= 0 and getattr(self, "seen", False):
                raise RuntimeError("streamer failed")
            self.seen = True

        def end(self):
            pass

    with pytest.raises(RuntimeError, match="streamer failed"):
        rec.generate(ids, max_new_tokens=12, streamer=Failing())
    assert state(model) == before
    assert torch.equal(model(ids).logits, reference(ids).logits)
    assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False),
                       reference.generate(ids, max_new_tokens=12, do_sample=False))
