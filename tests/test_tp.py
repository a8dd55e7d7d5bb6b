"""Tensor parallel on CPUs: 2 ranks under torchrun (gloo), models loaded with tp_plan="auto".

Every launch runs with a collective timeout ($TOKEN_RECYCLING_TP_TIMEOUT) and a subprocess timeout,
so a desynchronized run fails the test instead of hanging it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cli_fixtures
import token_recycling
from models import tiny_model

HERE = Path(__file__).resolve().parent
# The package the test process imported (the installed one in CI, python/ in a dev tree): the ranks
# must import the same one, never the source tree's python/ (it holds no built extension after a
# non-editable install).
PACKAGE = Path(token_recycling.__file__).resolve().parents[1]
# Against hangs only, never against slowness: a launch takes well under a minute, but on a loaded
# 2-core machine importing torch in two ranks can take minutes. A desync is found by the draft check,
# not by these timeouts.
LAUNCH_TIMEOUT_S = 600
COLLECTIVE_TIMEOUT_S = 300
MAX_NEW_TOKENS = 48  # as in tp_worker.py

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")


def torchrun(args: list[str], *, cwd: Path, env_extra: dict | None = None, stdin: str | None = None):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(PACKAGE), os.environ.get("PYTHONPATH", "")]),
               TOKEN_RECYCLING_TP_TIMEOUT=str(COLLECTIVE_TIMEOUT_S), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **(env_extra or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, input=stdin, capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT_S)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    out = {}
    for arch in ("llama", "qwen2"):
        tiny_model(arch).save_pretrained(root / arch)
        out[arch] = str(root / arch)
    return out


def prompts(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 320, (n,), generator=g).tolist() for n in (5, 12, 30)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, folders) -> list[dict]:
    """One launch of tp_worker.py: both models, then the forced desync; each rank's report."""
    out = tmp_path_factory.mktemp("tp-run")
    (out / "prompts.json").write_text(json.dumps(prompts()))
    proc = torchrun([str(HERE / "tp_worker.py"), str(out), *folders.values()], cwd=HERE)
    results = []
    for r in range(2):
        path = out / f"rank{r}.json"
        assert path.is_file(), f"rank {r} wrote nothing (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
        results.append(json.loads(path.read_text()))
    for r in results:
        assert "error" not in r, r.get("traceback")
    return results


def test_two_ranks_equal_single_process_greedy(ranks, folders):
    for arch, folder in folders.items():
        model = tiny_model(arch)
        for r in ranks:
            got = r["models"][folder]
            # really split: each rank holds half of the q projection's output rows
            assert got["q_proj_local"][0] * 2 == got["q_proj_global"][0], got
            assert "auto" in got["tree"]  # the default recycler
        for prompt, out0, out1 in zip(prompts(), ranks[0]["models"][folder]["outputs"],
                                      ranks[1]["models"][folder]["outputs"]):
            ref = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW_TOKENS, do_sample=False)[0].tolist()
            assert out0 == ref, (arch, prompt)
            assert out1 == ref, (arch, prompt)


def test_forced_desync_is_a_clear_error_not_a_hang(ranks):
    for r in ranks:
        error = r.get("desync_error")
        assert error, f"rank {r['rank']} did not notice that rank 1 drafts another tree"
        assert error.startswith("tensor-parallel ranks disagree on the draft of step 0"), error
        assert "rank(s) [1] differ from rank 0" in error, error


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    return cli_fixtures.llama_folder(tmp_path_factory.mktemp("tp-cli") / "llama")


def test_cli_generate_tp_prints_once_and_equals_single_process(tmp_path, chat_folder, capsys):
    from token_recycling.tools.cli import main

    args = ["generate", "--model", str(chat_folder), "--dtype", "float32", "--max-new-tokens", "24"]
    proc = torchrun(["-m", "token_recycling", *args, "--tp"], cwd=tmp_path, stdin="Explain why the sky is blue.")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main([*args, "Explain why the sky is blue."]) == 0
    single = capsys.readouterr().out
    assert single.strip(), "the single-process run printed nothing"
    assert proc.stdout == single  # rank 0's text only (read from stdin by rank 0), not one copy per rank
    assert proc.stderr.count("new tokens in") == 1, proc.stderr[-3000:]


def test_tp_needs_torchrun(capsys, chat_folder):
    from token_recycling.tools.cli import main

    env = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE") if k in os.environ}
    try:
        assert main(["generate", "--tp", "--model", str(chat_folder), "hi"]) == 2
    finally:
        os.environ.update(env)
    assert "--tp runs one process per rank under torchrun" in capsys.readouterr().err


def test_heads_that_do_not_divide_are_refused():
    from types import SimpleNamespace

    from token_recycling.tools import models, tp

    tp.check_divisible(SimpleNamespace(num_attention_heads=4, num_key_value_heads=2, intermediate_size=64), 2)
    smollm2 = SimpleNamespace(num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536)
    tp.check_divisible(smollm2, 3)
    with pytest.raises(models.ModelError, match=r"num_attention_heads=9, num_key_value_heads=3 are not divisible by 2"):
        tp.check_divisible(smollm2, 2)


def test_fingerprint_sees_every_token_parent_and_size():
    from token_recycling.distributed import fingerprint

    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 50000, (1, 40), generator=g)
    parents = torch.cat([torch.tensor([-1]), torch.randint(0, 39, (39,), generator=g)]).int()
    base = fingerprint(tokens, parents)
    assert torch.equal(base, fingerprint(tokens.clone(), parents.clone()))
    for i in range(40):
        t = tokens.clone()
        t[0, i] += 1
        assert not torch.equal(base, fingerprint(t, parents)), i
        if i:
            p = parents.clone()
            p[i] = (p[i] + 1) % i if i > 1 else -1
            assert not torch.equal(base, fingerprint(tokens, p)), i
    assert not torch.equal(base, fingerprint(tokens[:, :39], parents[:39]))
    swapped = tokens.clone()
    swapped[0, [3, 4]] = swapped[0, [4, 3]]
    assert tokens[0, 3] == tokens[0, 4] or not torch.equal(base, fingerprint(swapped, parents))


@pytest.mark.parametrize("value, every", [(None, 1), ("0", 0), ("4", 4), ("", 1)])
def test_check_every_reads_the_environment(monkeypatch, value, every):
    from token_recycling import distributed

    if value is None:
        monkeypatch.delenv(distributed.CHECK_ENV, raising=False)
    else:
        monkeypatch.setenv(distributed.CHECK_ENV, value)
    assert distributed.check_every() == every


@pytest.mark.parametrize("value", ["-1", "often"])
def test_check_every_rejects_bad_values(monkeypatch, value):
    from token_recycling import distributed

    monkeypatch.setenv(distributed.CHECK_ENV, value)
    with pytest.raises(ValueError, match=distributed.CHECK_ENV):
        distributed.check_every()


def test_cli_silences_other_ranks_and_sends_their_bench_files_elsewhere(monkeypatch, tmp_path):
    import atexit

    from token_recycling.tools import cli, tp

    calls = []
    monkeypatch.setattr(tp, "init", lambda device: calls.append(device))
    monkeypatch.setattr(atexit, "register", lambda *a: calls.append(a))
    monkeypatch.setattr(sys, "stdout", sys.stdout)
    monkeypatch.setattr(sys, "stderr", sys.stderr)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    args = cli.build_parser().parse_args(["bench", "--tp", "--out", str(tmp_path / "out")])
    monkeypatch.setattr(tp, "rank", lambda: 0)
    tp.setup_cli(args)
    assert args.out == str(tmp_path / "out") and args.progress
    monkeypatch.setattr(tp, "rank", lambda: 1)
    tp.setup_cli(args)
    assert calls[0] == "cpu"
    assert args.out != str(tmp_path / "out") and Path(args.out).is_dir() and not args.progress
    assert sys.stdout.name == os.devnull and sys.stderr.name == os.devnull
    Path(args.out).rmdir()
