""".ci/suffix_check.sh cannot pass silently: a failed arctic-inference install fails it unless the
machine is declared one where it cannot build (TOKEN_RECYCLING_SKIP_SUFFIX=1)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / ".ci" / "suffix_check.sh"


@pytest.mark.skipif(not SCRIPT.is_file(), reason="needs the source tree's .ci/suffix_check.sh")
@pytest.mark.parametrize("opt_out", [None, "1"])
def test_a_failed_install_fails_the_check_unless_skipping_is_declared(tmp_path, opt_out):
    env = {k: v for k, v in os.environ.items() if k != "TOKEN_RECYCLING_SKIP_SUFFIX"}
    env["SUFFIX_PYTHON"] = str(tmp_path / "no-such-python")  # the first step fails at once
    if opt_out:
        env["TOKEN_RECYCLING_SKIP_SUFFIX"] = opt_out
    run = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    if opt_out:
        assert run.returncode == 0 and "suffix_check: SKIP" in run.stdout, run.stdout + run.stderr
        assert "TOKEN_RECYCLING_SKIP_SUFFIX=1" in run.stdout
    else:
        assert run.returncode == 1 and "suffix_check: FAIL (cannot run" in run.stdout, run.stdout + run.stderr
