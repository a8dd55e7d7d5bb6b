"""`token-recycling generate|bench --do-sample --temperature T --top-p P` on a tiny model folder."""

import json

import pytest

import cli_fixtures
from token_recycling.tools import cli


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return cli_fixtures.llama_folder(tmp_path_factory.mktemp("tiny") / "llama")


def _run(argv, capsys):
    rc = cli.main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_generate_samples(capsys, tiny_folder):
    rc, out, err = _run(["generate", "Say something.", "--model", str(tiny_folder), "--max-new-tokens", "8",
                         "--dtype", "float32", "--tree", "paper-16", "--do-sample", "--temperature", "0.7",
                         "--top-p", "0.9"], capsys)
    assert rc == 0, err
    assert "new tokens in" in err and out.endswith("\n")


def test_sampling_options_need_do_sample(capsys, tiny_folder):
    rc, out, err = _run(["generate", "hi", "--model", str(tiny_folder), "--temperature", "0.7"], capsys)
    assert rc == 2 and "--do-sample" in err


def test_bench_samples_every_method(capsys, tmp_path, tiny_folder):
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"question_id": 1, "category": "c", "turns": ["Say 1."]}) + "\n")
    rc, out, err = _run(["bench", "--model", str(tiny_folder), "--dataset", str(data), "--max-new-tokens", "6",
                         "--dtype", "float32", "--tree", "paper-16", "--out", str(tmp_path / "o"), "--no-progress",
                         "--do-sample", "--temperature", "1.0"], capsys)
    assert rc == 0, err
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["config"]["sampling"] == {"do_sample": True, "temperature": 1.0, "top_p": None}
    sample = results["samples"][0]
    assert sample["mismatch"] == {}  # samples differ by design: no token-for-token check
    assert sample["methods"]["ours"]["stats"]["decoding"].startswith("sample(")
