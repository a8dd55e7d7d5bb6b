"""The GPU benchmark scripts' smoke modes run on the CPU, so a lent GPU's few minutes are not spent on
an argument error: gpu_decode.py (forward and overhead rows) feeding project_speedup.py, attention_vs_sdpa.py
and step_breakdown.py, each with --device cpu --quick."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
pytestmark = pytest.mark.skipif(not BENCH.is_dir(), reason="needs the source tree's bench/")


def run(*args: str, cwd: Path) -> str:
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=cwd,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out.stdout


def test_gpu_decode_rows_feed_the_projection(tmp_path):
    timing = tmp_path / "timing.json"
    printed = run(str(BENCH / "gpu_decode.py"), "--device", "cpu", "--quick", "--shapes", "llama-1b",
                  "--reps", "2", "--steps", "4", "--json", str(timing), cwd=tmp_path)
    assert "# lossless failures: 0" in printed
    rows = json.loads(timing.read_text())["rows"]
    parts = {r["part"] for r in rows}
    assert {"lossless", "forward", "overhead"} <= parts
    assert all(r["equal"] for r in rows if r["part"] == "lossless")
    paths = {r["path"] for r in rows if r["part"] == "forward"}
    assert {"greedy", "hf_generate", "tree", "dense"} <= paths
    table = run(str(BENCH / "project_speedup.py"), "--timing", str(timing), "--acceptance",
                str(BENCH / "summary" / "acceptance_by_tree.json"), cwd=tmp_path)
    lines = [line for line in table.splitlines() if line.startswith("| llama-1b")]
    assert len(lines) >= 10 and all(float(line.split("|")[8]) > 0 for line in lines)


def test_attention_and_step_breakdown_smoke(tmp_path):
    out = run(str(BENCH / "attention_vs_sdpa.py"), "--device", "cpu", "--quick", cwd=tmp_path)
    assert "ours ms" in out
    out = run(str(BENCH / "step_breakdown.py"), "--device", "cpu", "--quick", "--steps", "4", cwd=tmp_path)
    assert "tree+uncapt" in out and "dense" in out


def test_linear_bandwidth_quick(tmp_path):
    printed = run(str(BENCH / "linear_bandwidth.py"), "--quick", "--rows", "1,3", "--threads", "1", cwd=tmp_path)
    assert "a plain sum reads" in printed
    assert printed.count("skinny_linear") == 4  # two shapes, two row counts
