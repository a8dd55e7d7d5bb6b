"""bench/gpu_check.sh refuses at once, with a clear message and exit status 2, on a machine that
cannot run it (no driver, no GPU listed, a torch that cannot use CUDA), and runs nothing there."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.sh"
TOOLS = ("dirname", "timeout", "grep", "sed", "head", "tail", "date", "mkdir", "cat")


def fake_bin(tmp_path: Path, **scripts: str) -> Path:
    """A PATH folder with the basic tools the script needs, python3, and the given fake commands."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    (bin_dir / "python3").symlink_to(sys.executable)
    for name, body in scripts.items():
        path = bin_dir / name.replace("_", "-")
        path.write_text("#!/bin/sh\n" + body + "\n")
        path.chmod(0o755)
    return bin_dir


def run_check(bin_dir: Path, tmp_path: Path, **env) -> tuple[subprocess.CompletedProcess, float]:
    out = tmp_path / "out"
    environment = {"PATH": str(bin_dir), "OUT": str(out), "HOME": str(tmp_path),
                   "PYTHONPATH": os.environ.get("PYTHONPATH", ""), **env}
    start = time.monotonic()
    result = subprocess.run(["/bin/bash", str(SCRIPT)], env=environment, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert not out.exists(), "a refused run must not start any step"
    return result, elapsed


def test_refuses_without_nvidia_smi(tmp_path):
    result, elapsed = run_check(fake_bin(tmp_path), tmp_path)
    assert result.returncode == 2, result.stderr
    assert "REFUSED" in result.stderr and "nvidia-smi" in result.stderr
    assert elapsed < 10


def test_refuses_when_no_gpu_is_listed(tmp_path):
    result, elapsed = run_check(fake_bin(tmp_path, nvidia_smi="exit 0"), tmp_path)
    assert result.returncode == 2 and "lists no GPU" in result.stderr
    assert elapsed < 10


def test_refuses_when_torch_cannot_use_cuda(tmp_path):
    """A driver and a GPU listed, but this torch cannot use it (here: a CPU torch, or a fake python)."""
    gpu = 'echo "GPU 0: Fake GPU (UUID: GPU-0)"'
    import torch
    if torch.cuda.is_available():
        python = tmp_path / "fake-python"
        python.write_text("#!/bin/sh\necho 'no: fake torch'\n")
        python.chmod(0o755)
        env = {"PYTHON": str(python)}
    else:
        env = {}  # the real torch of this machine: it has no GPU
    result, elapsed = run_check(fake_bin(tmp_path, nvidia_smi=gpu), tmp_path, **env)
    assert result.returncode == 2, result.stderr
    assert "torch cannot use a CUDA GPU" in result.stderr
    assert elapsed < 60  # importing torch


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi")
def test_refuses_on_this_machine_quickly(tmp_path):
    """As run here, with the real PATH: no GPU, so it stops at once."""
    env = dict(os.environ, OUT=str(tmp_path / "out"))
    start = time.monotonic()
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "REFUSED" in result.stderr
    assert time.monotonic() - start < 60
    assert not (tmp_path / "out").exists()
