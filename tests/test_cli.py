"""The command line: error paths (exit code 2, one message, no traceback), prompt input, generate."""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cli_fixtures
from token_recycling.tools import cli, usage


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return cli_fixtures.llama_folder(tmp_path_factory.mktemp("tiny") / "llama")


def run_main(argv, capsys):
    rc = cli.main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# ---------------------------------------------------------------------------------- error paths

@pytest.mark.parametrize("command", ["generate", "bench"])
def test_unknown_tree(command, capsys, tiny_folder):
    rc, out, err = run_main([command, "--model", str(tiny_folder), "--tree", "no-such-tree"], capsys)
    assert rc == 2 and out == ""
    assert err.startswith("token-recycling: error: --tree 'no-such-tree': unknown tree preset")
    assert "Traceback" not in err


def test_tree_given_as_json_is_validated(capsys, tmp_path):
    assert cli.parse_tree("[[0], [1], [0, 0]]", 8) == [[0], [1], [0, 0]]
    path = tmp_path / "tree.json"
    path.write_text("[[0], [0, 3]]")
    assert cli.parse_tree(str(path), 8) == [[0], [0, 3]]
    with pytest.raises(cli.UsageError, match="no parent"):
        cli.parse_tree("[[0], [1, 1]]", 8)
    with pytest.raises(cli.UsageError, match="outside"):
        cli.parse_tree("[[9]]", 8)
    with pytest.raises(cli.UsageError, match="not valid JSON"):
        cli.parse_tree("[[0], [1", 8)
    with pytest.raises(cli.UsageError, match="cannot be read"):
        cli.parse_tree(str(tmp_path / "missing.json"), 8)


@pytest.mark.parametrize("command", ["generate", "bench"])
def test_missing_model_path(command, capsys, tmp_path):
    argv = [command, "--model", str(tmp_path / "nowhere")] + (["hello"] if command == "generate" else [])
    rc, out, err = run_main(argv, capsys)
    assert rc == 2 and "does not exist" in err and str(tmp_path / "nowhere") in err and "Traceback" not in err


def test_unreadable_model_files(capsys, tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    (tmp_path / "broken.gguf").write_bytes(b"\0" * 16)
    rc, _, err = run_main(["generate", "hi", "--model", str(tmp_path / "weights.bin")], capsys)
    assert rc == 2 and "not a .gguf" in err
    rc, _, err = run_main(["generate", "hi", "--model", str(tmp_path / "broken.gguf")], capsys)
    assert rc == 2 and "not a GGUF file" in err


def test_folder_with_broken_config_is_a_clear_error(capsys, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    rc, _, err = run_main(["generate", "hi", "--model", str(tmp_path), "--dtype", "float32"], capsys)
    assert rc == 2 and "cannot load the model" in err and "Traceback" not in err


def test_unknown_dtype_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate", "hi", "--dtype", "fp8"])
    assert exc.value.code == 2
    assert "invalid choice: 'fp8'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_gpu(capsys, tiny_folder):
    rc, _, err = run_main(["generate", "hi", "--model", str(tiny_folder), "--device", "cuda"], capsys)
    assert rc == 2 and "no CUDA GPU" in err


def test_bench_option_errors(capsys, tmp_path, tiny_folder):
    rc, _, err = run_main(["bench", "--model", str(tiny_folder), "--baselines", "greedy,beam"], capsys)
    assert rc == 2 and "--baselines: unknown beam" in err
    rc, _, err = run_main(["bench", "--model", str(tiny_folder), "--dataset", str(tmp_path / "q.jsonl")], capsys)
    assert rc == 2 and "neither mt-bench nor humaneval" in err
    with pytest.raises(SystemExit):
        cli.main(["bench", "--limit", "0"])
    assert "must be at least 1" in capsys.readouterr().err
    assert cli.parse_baselines("") == () and cli.parse_baselines("pld, greedy,pld") == ("pld", "greedy")


def test_module_entry_point_reports_errors_without_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(cli.__file__).parents[2]),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "token_recycling", "generate", "hi", "--model",
                           str(tmp_path / "nowhere")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "token-recycling: error: model path" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "token_recycling", "--help"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0 and "generate" in proc.stdout and "bench" in proc.stdout


# ------------------------------------------------------------------------------------- prompts

def _args(prompt=None):
    return argparse.Namespace(prompt=prompt)


class _Stdin(io.StringIO):
    def __init__(self, text, tty):
        super().__init__(text)
        self._tty = tty

    def isatty(self):
        return self._tty


def test_prompt_comes_from_argument_then_stdin_then_default(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", _Stdin("from stdin\n", tty=False))
    assert usage.read_prompt(_args("from argv")) == "from argv"
    assert usage.read_prompt(_args()) == "from stdin\n"
    monkeypatch.setattr(sys, "stdin", _Stdin("", tty=True))
    assert usage.read_prompt(_args()) == usage.DEFAULT_PROMPT
    assert capsys.readouterr().err == ""  # a terminal: the example, silently
    monkeypatch.setattr(sys, "stdin", None)  # no stdin at all (a closed descriptor, pythonw)
    assert usage.read_prompt(_args()) == usage.DEFAULT_PROMPT


@pytest.mark.parametrize("text", ["", "  \n\t\n"])
def test_empty_stdin_falls_back_to_the_example_with_a_note(monkeypatch, capsys, text):
    monkeypatch.setattr(sys, "stdin", _Stdin(text, tty=False))
    assert usage.read_prompt(_args()) == usage.DEFAULT_PROMPT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "standard input is empty" in err and usage.DEFAULT_PROMPT in err


@pytest.mark.parametrize("prompt", ["", "   "])
def test_an_explicit_empty_prompt_is_an_error(monkeypatch, capsys, tiny_folder, prompt):
    monkeypatch.setattr(sys, "stdin", _Stdin("not read", tty=False))
    with pytest.raises(usage.UsageError, match="the prompt is empty"):
        usage.read_prompt(_args(prompt))
    rc, out, err = run_main(["generate", prompt, "--model", str(tiny_folder)], capsys)
    assert rc == 2 and out == "" and err == "token-recycling: error: the prompt is empty\n"


def test_generate_with_empty_stdin_answers_the_example(capsys, monkeypatch, tiny_folder):
    monkeypatch.setattr(sys, "stdin", _Stdin("", tty=False))
    rc, out, err = run_main(["generate", "--model", str(tiny_folder), "--max-new-tokens", "3", "--dtype", "float32",
                             "--tree", "chain-4"], capsys)
    assert rc == 0, err
    assert "standard input is empty: using the example prompt" in err and "3 new tokens" in err


# ------------------------------------------------------------------------------ reproducibility

@pytest.mark.parametrize("requested,fast_bf16,note", [
    ("float32", True, None), ("auto", False, None),
    ("bfloat16", False, "bfloat16"), ("float16", False, "float16"), ("auto", True, "bfloat16 auto")])
def test_half_precision_prints_one_reproducibility_line(monkeypatch, capsys, requested, fast_bf16, note):
    monkeypatch.setattr(cli.models, "cpu_has_fast_bf16", lambda flags: fast_bf16)
    dtype = cli._dtype(argparse.Namespace(dtype=requested, device="cpu"))
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith(f"[token-recycling] dtype {cli.models.dtype_name(dtype)}")
    if note is None:
        assert dtype == torch.float32 and len(lines) == 1
        return
    name = note.split()[0]
    assert dtype == cli.models.DTYPES[name] and len(lines) == 2
    assert f"in {name} the output can differ from plain greedy decoding, and from run to run" in lines[1]
    assert "--dtype float32 gives exact greedy" in lines[1]
    assert ("chosen automatically" in lines[1]) == note.endswith("auto")


def test_generate_in_bfloat16_says_so(capsys, tiny_folder):
    rc, _, err = run_main(["generate", "hi", "--model", str(tiny_folder), "--max-new-tokens", "2",
                           "--dtype", "bfloat16", "--tree", "chain-4"], capsys)
    assert rc == 0, err
    assert "note: in bfloat16 the output can differ" in err and "chosen automatically" not in err


# ------------------------------------------------------------------------------------ generate

STATS = re.compile(r"\[token-recycling\] (\d+) new tokens in (\d+) steps, ([\d.]+) tokens/step, "
                   r"[\d.]+ tokens/s \([\d.]+ s\); TokenRecycler\(tree='paper-16': 16 nodes, k=8[^)]*\)")


@pytest.mark.parametrize("chat", [True, False])
def test_generate_streams_the_greedy_text(capsys, tiny_folder, chat):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt = "Explain why the sky is blue."
    argv = ["generate", prompt, "--model", str(tiny_folder), "--max-new-tokens", "12", "--dtype", "float32",
            "--tree", "paper-16"] + ([] if chat else ["--no-chat-template"])
    rc, out, err = run_main(argv, capsys)
    assert rc == 0, err
    assert "[token-recycling] dtype float32" in err
    stats = STATS.search(err)
    assert stats, err
    new, steps = int(stats.group(1)), int(stats.group(2))
    assert 1 <= new <= 12 and steps <= new - 1  # the prefill emits one token, every step at least one

    tok = AutoTokenizer.from_pretrained(tiny_folder)
    model = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32)
    if chat:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
    greedy = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
    assert new == len(greedy)
    assert out == tok.decode(greedy, skip_special_tokens=True) + "\n"


def test_generate_reads_the_prompt_from_stdin(capsys, monkeypatch, tiny_folder):
    monkeypatch.setattr(sys, "stdin", _Stdin("Write a function that returns the sum of two numbers.", tty=False))
    rc, out, err = run_main(["generate", "--model", str(tiny_folder), "--max-new-tokens", "4", "--dtype", "float32",
                             "--tree", "[[0], [0, 0]]"], capsys)
    assert rc == 0, err
    assert "4 new tokens" in err and "2 nodes" in err and out.endswith("\n")


def test_bench_writes_json_that_the_report_reads(capsys, tmp_path, tiny_folder):
    data = tmp_path / "he.jsonl"
    data.write_text(json.dumps({"task_id": "HumanEval/0", "prompt": "def add(a, b):\n"}) + "\n")
    rc, out, err = run_main(["bench", "--model", str(tiny_folder), "--dataset", str(data), "--max-new-tokens", "6",
                             "--dtype", "float32", "--baselines", "pld", "--out", str(tmp_path / "o"),
                             "--no-progress", "--no-chat-template"], capsys)
    assert rc == 0, err
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["config"]["methods"] == ["pld", "ours"] and not results["config"]["chat_template"]
    assert results["samples"][0]["mismatch"] == {}  # nothing to compare with without greedy
    assert results["samples"][0]["category"] == "coding"
    assert "ours/pld" in out and f"results: {tmp_path / 'o' / 'results.json'}" in out
