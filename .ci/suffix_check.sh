#!/usr/bin/env bash
# CI check of the bench's SuffixDecoding baselines (token_recycling/tools/suffix.py), in the project's venv:
#   1. arctic-inference 0.3.0 built from source into the venv (.ci/install_arctic.sh),
#   2. tests/test_suffix.py with TOKEN_RECYCLING_REQUIRE_SUFFIX=1 (a missing arctic-inference fails,
#      never skips): fp32 greedy with SuffixDecoding's drafts equals model.generate, chain and tree,
#      batch and sampling; the cross-request data sets build,
#   3. a small bench run on the default model with both suffix baselines: every method's tokens must
#      equal greedy's (fp32) and the report must have the suffix columns.
# Every failure exits non-zero. Only TOKEN_RECYCLING_SKIP_SUFFIX=1 (a machine where arctic-inference
# cannot build: no network, no compiler) turns a failed install into SKIP with exit status 0, and says so.
# SUFFIX_PYTHON: the venv's python (default: `python` on PATH, the venv .ci/run activated).
# About 4 minutes on 2 cores the first time (the build ~30 s, tests ~30 s, bench ~3 min); a rerun skips the build.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${SUFFIX_PYTHON:-python}
log=build/suffix_check.log
mkdir -p build
: > "$log"
start=$SECONDS
skip() {
  if [ "${TOKEN_RECYCLING_SKIP_SUFFIX:-0}" = 1 ]; then
    echo "suffix_check: SKIP ($1; TOKEN_RECYCLING_SKIP_SUFFIX=1); last lines of $log:"
    tail -n 15 "$log"
    exit 0
  fi
  echo "suffix_check: FAIL ($1); last lines of $log:"
  tail -n 15 "$log"
  echo "suffix_check: set TOKEN_RECYCLING_SKIP_SUFFIX=1 only where arctic-inference cannot be built (docs/benchmarking.md)"
  exit 1
}
lap() { echo "suffix_check: $1 after $((SECONDS - start)) s"; }

"$PY" -c "import torch" >> "$log" 2>&1 || skip "cannot run $PY with torch"
PY=$("$PY" -c "import sys; print(sys.executable)")
versions() { "$PY" -c "import torch, transformers; print(torch.__version__, transformers.__version__)"; }
before=$(versions)
why=$(bash .ci/install_arctic.sh "$PY" "$log") || skip "${why:-arctic-inference did not build}"
lap "arctic-inference ready"

# A failure from here on is ours: the installs must not have moved torch or transformers, and the
# tests and the bench must pass.
set -e
after=$(versions)
if [ "$before" != "$after" ]; then
  echo "suffix_check: FAIL (installing arctic-inference changed torch/transformers: $before -> $after)"
  exit 1
fi
(cd tests && HF_HUB_OFFLINE=1 TOKEN_RECYCLING_REQUIRE_SUFFIX=1 "$PY" -m pytest -q -p no:cacheprovider test_suffix.py)
lap "tests passed"

out=build/suffix-bench
rm -rf "$out"
HF_HUB_OFFLINE=1 "$PY" -m token_recycling bench --dataset humaneval-family --limit 1 --max-new-tokens 48 \
  --dtype float32 --baselines greedy,suffix,suffix-tree --out "$out" --no-progress >> "$log" 2>&1 \
  || { tail -n 30 "$log"; echo "suffix_check: FAIL (bench run)"; exit 1; }
"$PY" - "$out" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
results = json.loads((out / "results.json").read_text())
assert results["config"]["methods"] == ["greedy", "suffix", "suffix-tree", "ours"], results["config"]["methods"]
differ = [(s["id"], m, at) for s in results["samples"] for m, at in s["mismatch"].items() if at is not None]
assert not differ, f"outputs differ from greedy in float32 (id, method, first token): {differ}"
report = (out / "report.md").read_text()
assert "MAT suffix" in report and "speedup ours/suffix-tree" in report and "not run" not in report
steps = {m: sum(s["methods"][m]["steps"] for s in results["samples"]) for m in ("suffix", "suffix-tree")}
tokens = {m: sum(s["methods"][m]["new_tokens"] for s in results["samples"]) for m in steps}
print("suffix_check: bench ok, tokens per step " + ", ".join(f"{m} {tokens[m] / steps[m]:.2f}" for m in steps))
EOF
lap "bench passed (report: $out/report.md)"
