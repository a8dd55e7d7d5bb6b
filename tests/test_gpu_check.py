"""bench/gpu_check.sh refuses, with a clear message and exit status 2, on a machine that cannot run it
(no driver, no GPU listed, a torch that cannot use CUDA), and runs nothing there; past the refusal
(faked here: a fake driver, nvcc and python), every step writes its result into $OUT as it ends, in
the order of value, and a failed step does not stop the rest. No test depends on how fast this machine
is: the only time limit is a generous one against a hang."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.sh"
TOOLS = ("dirname", "timeout", "grep", "sed", "head", "tail", "date", "mkdir", "cat", "tee", "nproc")
HANG = 600  # seconds: only against a hang; the refusals take seconds, importing torch included


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


def run_check(bin_dir: Path, tmp_path: Path, **env) -> subprocess.CompletedProcess:
    out = tmp_path / "out"
    environment = {"PATH": str(bin_dir), "OUT": str(out), "HOME": str(tmp_path),
                   "PYTHONPATH": os.environ.get("PYTHONPATH", ""), **env}
    result = subprocess.run(["/bin/bash", str(SCRIPT)], env=environment, capture_output=True, text=True,
                            timeout=HANG)
    assert not out.exists(), "a refused run must not start any step"
    return result


def test_refuses_without_nvidia_smi(tmp_path):
    result = run_check(fake_bin(tmp_path), tmp_path)
    assert result.returncode == 2, result.stderr
    assert "REFUSED" in result.stderr and "nvidia-smi" in result.stderr


def test_refuses_when_no_gpu_is_listed(tmp_path):
    result = run_check(fake_bin(tmp_path, nvidia_smi="exit 0"), tmp_path)
    assert result.returncode == 2 and "lists no GPU" in result.stderr


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
    result = run_check(fake_bin(tmp_path, nvidia_smi=gpu), tmp_path, **env)
    assert result.returncode == 2, result.stderr
    assert "torch cannot use a CUDA GPU" in result.stderr


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi")
def test_refuses_on_this_machine(tmp_path):
    """As run here, with the real PATH: no GPU, so it stops before any step."""
    env = dict(os.environ, OUT=str(tmp_path / "out"))
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=HANG)
    assert result.returncode == 2 and "REFUSED" in result.stderr
    assert not (tmp_path / "out").exists()


# A python that answers the script's probes as a CUDA machine's would and "runs" everything else at
# once; the attention benchmark fails (exit 3), as a broken step would.
FAKE_PYTHON = """#!/bin/sh
case "$*" in
  *is_available*) echo yes ;;
  *WITH_CUDA*) echo True ;;
  *xml.etree*) echo "0 3" ;;
  *attention_vs_sdpa.py*) echo "attention broke"; exit 3 ;;
  *) echo "ran: $*" | cut -c1-200 ;;
esac
exit 0
"""


def test_steps_write_into_out_in_order_and_a_failure_does_not_stop_the_rest(tmp_path):
    bin_dir = fake_bin(tmp_path, nvidia_smi='echo "GPU 0: Fake GPU (UUID: GPU-0)"', nvcc="echo fake nvcc")
    for tool in ("cut",):
        if shutil.which(tool):
            (bin_dir / tool).symlink_to(shutil.which(tool))
    python = tmp_path / "fake-python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    out = tmp_path / "out"
    env = {"PATH": str(bin_dir), "OUT": str(out), "HOME": str(tmp_path), "PYTHON": str(python),
           "GPU_CHECK_SKIP": "cpp_bench,kernel_check"}
    result = subprocess.run(["/bin/bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=HANG)
    summary = (out / "summary.txt").read_text().splitlines()
    names = [line.split()[0] for line in summary]
    # Most valuable first: the attention table, the decode timings, the CUDA tests, the projection,
    # then what the time left allows.
    order = ["build", "with_cuda", "error_message", "bench_build", "attention", "decode_timing", "tests",
             "test_skips", "projection", "racecheck"]
    assert [n for n in names if n in order] == order, summary
    assert "gpu_decode_lossless" in names
    lines = dict(zip(names, summary))
    assert "rc=3" in lines["attention"]  # failed, and every later step still ran:
    for name in ("decode_timing", "tests", "projection"):
        assert "rc=0" in lines[name], lines[name]
        assert (out / f"{name}.log").is_file()
    assert "attention broke" in (out / "attention.log").read_text()
    assert (out / "environment.txt").is_file()
    # No bench/cpp build here (no cmake), no sanitizer: both fail; the exit status counts failures.
    failed = [line for line in summary if "FAILED" in line or ("rc=" in line and "rc=0 " not in line)]
    assert {line.split()[0] for line in failed} == {"attention", "bench_build", "racecheck"}, summary
    assert result.returncode == len(failed), result.stdout[-3000:]
    # The commands the GPU run will take: results written into $OUT.
    decode = (out / "decode_timing.log").read_text()
    assert "--shapes llama-8b" in decode and f"--json {out}/gpu_decode_timing.json" in decode
    assert f"--timing {out}/gpu_decode_timing.json" in (out / "projection.log").read_text()
