#!/usr/bin/env bash
# Builds arctic-inference 0.3.0 (SuffixDecoding) from source into the venv of the python given, unless
# `import arctic_inference.suffix_decoding` already works there. Used by suffix_check.sh and
# vllm_check.sh. It has no wheel for CPU machines; its build requirements are installed as its
# pyproject pins them, keeping the venv's protobuf where it has one (vLLM pins its own, and pip then
# picks a grpcio-tools that fits it); CMake must find the venv's Python, hence CMAKE_ARGS (without it
# CMake may find another Python and fail with "No module named nanobind").
# Usage: install_arctic.sh PYTHON LOG. Output goes to LOG; on failure the step that failed is printed
# on stdout and the exit status is 1. About 30 s on 2 cores.
set -uo pipefail
PY=$1
log=$2
"$PY" -c "import arctic_inference.suffix_decoding" >/dev/null 2>&1 && exit 0
pip_q() { "$PY" -m pip install -q --disable-pip-version-check "$@" >> "$log" 2>&1; }
protobuf=$("$PY" -c "import google.protobuf as p; print(p.__version__)" 2>/dev/null)
if ! pip_q nanobind==2.9.2 grpcio-tools "protobuf==${protobuf:-5.29.6}" setuptools wheel ninja cmake; then
  echo "cannot install arctic-inference's build requirements"
  exit 1
fi
if ! CMAKE_ARGS="-DPython_EXECUTABLE=$PY" pip_q --no-build-isolation --no-deps arctic-inference==0.3.0; then
  echo "pip install arctic-inference==0.3.0 failed"
  exit 1
fi
if ! "$PY" -c "import arctic_inference.suffix_decoding" >> "$log" 2>&1; then
  echo "arctic-inference installed but 'import arctic_inference.suffix_decoding' fails"
  exit 1
fi
