#!/usr/bin/env bash
# The repository a clone downloads: fails on
#   - a tracked file over 200 KB (raw benchmark output belongs in the ignored bench/out/, a summary
#     of a few KB in bench/summary/);
#   - an absolute path of the machine that wrote a file (/work/..., /home/..., /root/..., /tmp/...)
#     in a tracked text file; paths that are the same on every machine (/usr/local/..., /opt/...,
#     /proc/..., /dev/null) are fine, and so is a path built at run time (tempfile);
#   - a reference to a numbered work period or issue ("session 7", "issue 10", "issue-10") in the
#     library, the kernels, the README or docs/: comments say what the code does and why.
# Run from anywhere; CI runs it first (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  echo "check_repo: SKIP (not a git checkout)"
  exit 0
fi
limit_kb=200
fail=0

# Files allowed to hold a machine path on purpose, as git pathspecs (this script names the patterns).
allow_paths=(':!.ci/check_repo.sh')

while IFS= read -r -d '' f; do
  [ -f "$f" ] || continue
  size=$(wc -c < "$f")
  if [ "$size" -gt $((limit_kb * 1024)) ]; then
    echo "check_repo: $f is $((size / 1024)) KB (limit ${limit_kb} KB): keep raw output out of git (bench/out/ is ignored)"
    fail=1
  fi
done < <(git ls-files -z)

# A machine path: one of the per-machine roots followed by a path component. Preceded by start of
# line or a character that cannot be part of a longer path (so ".../data/tmp/x" or "$HOME/work/x" do not match).
machine_path='(^|[^A-Za-z0-9_.~$/-])/(work|home|root|tmp|Users|mnt/data)/[A-Za-z0-9_.-]'
hits=$(git grep -nIE "$machine_path" -- . "${allow_paths[@]}" || true)
if [ -n "$hits" ]; then
  echo "check_repo: absolute machine paths in tracked files (write a relative path or a placeholder):"
  echo "$hits" | head -20
  fail=1
fi

history_ref='[Ss]ession [0-9]+|[Ii]ssue[ -]?#?[0-9]+|\(#[0-9]+\)'
hits=$(git grep -nIE "$history_ref" -- python csrc kernels README.md docs 2>/dev/null || true)
if [ -n "$hits" ]; then
  echo "check_repo: work-period or issue references (say what the code does and why; history is in git):"
  echo "$hits" | head -20
  fail=1
fi

if [ "$fail" -ne 0 ]; then
  exit 1
fi
echo "check_repo: ok (no tracked file over ${limit_kb} KB, no machine paths, no work-period references)"
