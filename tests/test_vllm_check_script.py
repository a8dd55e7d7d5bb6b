""".ci/vllm_check.sh cannot pass silently: a failed vLLM install fails it unless the machine is
declared one where vLLM cannot install (TOKEN_RECYCLING_SKIP_VLLM=1)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / ".ci" / "vllm_check.sh"


@pytest.mark.skipif(not SCRIPT.is_file(), reason="needs the source tree's .ci/vllm_check.sh")
@pytest.mark.parametrize("opt_out", [None, "1"])
def test_a_failed_install_fails_the_check_unless_skipping_is_declared(tmp_path, opt_out):
    env = {k: v for k, v in os.environ.items() if k != "TOKEN_RECYCLING_SKIP_VLLM"}
    # A venv that cannot be made (its parent is a file): the first install step fails at once.
    (tmp_path / "file").write_text("")
    env["VLLM_VENV"] = str(tmp_path / "file" / "venv")
    if opt_out:
        env["TOKEN_RECYCLING_SKIP_VLLM"] = opt_out
    run = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    if opt_out:
        assert run.returncode == 0 and "vllm_check: SKIP" in run.stdout, run.stdout + run.stderr
        assert "TOKEN_RECYCLING_SKIP_VLLM=1" in run.stdout
    else:
        assert run.returncode == 1 and "vllm_check: FAIL (cannot create the venv" in run.stdout, run.stdout + run.stderr
