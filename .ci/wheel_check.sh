#!/usr/bin/env bash
# CI check that the wheel is complete, tested as a wheel:
#   1. `pip wheel --no-build-isolation --no-deps` builds it against the torch of $PYTHON (the
#      CMake build folder, build/<wheel tag>, is the one `pip install .` used, so after .ci/run's
#      install this only relinks; from scratch it compiles the extension, about 2.5 min on 2 cores);
#   2. every file of python/token_recycling/ must be in it, and the extension (_C*.so);
#   3. it is installed into a fresh venv, which then sees $PYTHON's packages (torch, transformers,
#      pytest, ...) through a .pth file written after the install, so the wheel's token_recycling
#      is the one imported (checked);
#   4. a quick subset of the tests runs from a copy outside the source tree: the ops, their fuzzing,
#      one lossless generation, and the command line.
# A module, the extension or an entry point missing from the wheel fails here, not in a user's install.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
out=${OUT_DIR:-build/ci-wheel}
unset PYTHONPATH  # only the wheel may provide token_recycling
rm -rf "$out"
mkdir -p "$out/dist"
out=$(cd "$out" && pwd)

start=$SECONDS
"$PYTHON" -m pip wheel -q --disable-pip-version-check --no-build-isolation --no-deps -w "$out/dist" .
wheel=$(ls "$out"/dist/token_recycling-*.whl)
echo "wheel_check: built $(basename "$wheel") in $((SECONDS - start)) s"

# Every source file of the package (and the compiled extension) is in the wheel.
"$PYTHON" - "$wheel" <<'EOF'
import pathlib, sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
src = pathlib.Path("python/token_recycling")
want = {f"token_recycling/{p.relative_to(src)}" for p in src.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and not p.name.startswith("_C.")}
missing = sorted(want - names)
if missing:
    sys.exit(f"wheel_check: missing from the wheel: {missing}")
if not any(n.startswith("token_recycling/_C.") and n.endswith((".so", ".pyd")) for n in names):
    sys.exit("wheel_check: the compiled extension token_recycling/_C*.so is not in the wheel")
if not any(n.endswith(".dist-info/entry_points.txt") for n in names):
    sys.exit("wheel_check: the wheel declares no entry points (the token-recycling command)")
print(f"wheel_check: {len(want)} package files and the extension are in the wheel")
EOF

# A fresh venv with the wheel; the outer environment's packages come after it on sys.path.
"$PYTHON" -m venv --without-pip "$out/venv"
"$PYTHON" -m pip --python "$out/venv/bin/python" install -q --disable-pip-version-check --no-deps --no-index "$wheel"
outer=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
inner=$("$out/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "import site; site.addsitedir('$outer')" > "$inner/zz_outer_environment.pth"
where=$(cd /tmp && "$out/venv/bin/python" -c 'import token_recycling; print(token_recycling.__file__)')
case "$where" in
  "$inner"/*) echo "wheel_check: token_recycling imported from the wheel ($where)" ;;
  *) echo "wheel_check: token_recycling came from $where, not from the wheel in $inner" >&2; exit 1 ;;
esac
"$out/venv/bin/token-recycling" --help > /dev/null

# The tests, copied outside the source tree.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp -r tests "$tmp/tests"
printf '[pytest]\nmarkers =\n    cuda: needs a GPU\n    slow: loads the real model\n' > "$tmp/tests/pytest.ini"
cd "$tmp/tests"
"$out/venv/bin/python" -m pytest -q -p no:cacheprovider test_ops.py test_ngram_ops.py test_graft_chain.py \
  test_fuzz_ops.py "test_generation.py::test_lossless_for_any_tree" \
  "test_cli.py::test_generate_streams_the_greedy_text"
echo "wheel_check: ok in $((SECONDS - start)) s"
