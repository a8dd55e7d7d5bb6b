""".ci/vllm_check.sh and .ci/suffix_check.sh cannot pass silently: a failed install of vLLM or of
arctic-inference fails the check, unless the machine is declared one where it cannot be installed
(TOKEN_RECYCLING_SKIP_VLLM=1, TOKEN_RECYCLING_SKIP_SUFFIX=1)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

CI = Path(__file__).resolve().parent.parent / ".ci"


def _venv_under_a_file(tmp_path: Path) -> dict:
    # A venv that cannot be made (its parent is a file): the first install step fails at once.
    (tmp_path / "file").write_text("")
    return {"VLLM_VENV": str(tmp_path / "file" / "venv")}


def _no_python(tmp_path: Path) -> dict:
    return {"SUFFIX_PYTHON": str(tmp_path / "no-such-python")}  # the first step fails at once


# name, script, the variable that declares the install impossible, how to break the install, the FAIL line
CHECKS = [("vllm", "vllm_check.sh", "TOKEN_RECYCLING_SKIP_VLLM", _venv_under_a_file, "FAIL (cannot create the venv"),
          ("suffix", "suffix_check.sh", "TOKEN_RECYCLING_SKIP_SUFFIX", _no_python, "FAIL (cannot run")]


@pytest.mark.parametrize("name,script,skip_var,broken,fail_line", CHECKS, ids=[c[0] for c in CHECKS])
@pytest.mark.parametrize("opt_out", [None, "1"])
def test_a_failed_install_fails_the_check_unless_skipping_is_declared(tmp_path, name, script, skip_var, broken,
                                                                      fail_line, opt_out):
    path = CI / script
    if not path.is_file():
        pytest.skip(f"needs the source tree's .ci/{script}")
    env = {k: v for k, v in os.environ.items() if k != skip_var}
    env.update(broken(tmp_path))
    if opt_out:
        env[skip_var] = opt_out
    run = subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True, timeout=120)
    prefix = script.removesuffix(".sh")
    if opt_out:
        assert run.returncode == 0 and f"{prefix}: SKIP" in run.stdout, run.stdout + run.stderr
        assert f"{skip_var}=1" in run.stdout
    else:
        assert run.returncode == 1 and f"{prefix}: {fail_line}" in run.stdout, run.stdout + run.stderr
