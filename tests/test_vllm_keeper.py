"""The proposer's matrix file survives every way a server stops, without vLLM.

keeper_child.py serves the fake engine with TOKEN_RECYCLING_MATRIX set in a child process that
leaves with ``os._exit`` (as vLLM's forked engine processes do: no ``atexit``); these tests stop it
with SIGTERM, SIGINT, ``kill -9`` in the middle of a save, or let it idle, and check the file: it
holds exactly the matrix the child had, the handler that was there before ours still ran, and a
restart loads the last complete save, never a torn one, and says which.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fake_vllm import fake_config
from token_recycling.adjacency import TEMP_PREFIX, AdjacencyMatrix, CorruptMatrixFile
from token_recycling.vllm import ProposerOptions, TokenRecyclingProposer
from token_recycling.vllm import keeper

VOCAB = 40
TOPK = 8
HERE = Path(__file__).resolve().parent
WAIT = 60.0  # seconds: a generous bound that only catches a hang, never a slow machine


class Child:
    def __init__(self, mode: str, matrix: Path, save_every: int = 3600):
        env = dict(os.environ, TOKEN_RECYCLING_MATRIX=str(matrix), TOKEN_RECYCLING_SAVE_EVERY=str(save_every),
                   PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, str(HERE / "keeper_child.py"), mode], cwd=HERE, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []

    def wait_for(self, word: str) -> list[str]:
        """Read lines until one starts with ``word``; that line's words."""
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line.rstrip("\n"))
            if line.startswith(word):
                return line.split()
        raise AssertionError(f"the child never printed {word!r}:\n" + "\n".join(self.lines) + self.stacks())

    def finish(self) -> int:
        try:
            out, _ = self.proc.communicate(timeout=WAIT)
        except subprocess.TimeoutExpired:
            raise AssertionError("the child did not exit:\n" + "\n".join(self.lines) + self.stacks())
        self.lines.extend(out.splitlines())
        return self.proc.returncode

    def stacks(self) -> str:
        """Where a child that did not exit is stuck: its threads' stacks (keeper_child.py dumps them on
        SIGUSR2), then it is killed."""
        dump = ""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR2)
            try:
                dump, _ = self.proc.communicate(timeout=5)
            except subprocess.TimeoutExpired as exc:
                dump = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        self.kill()
        return "\nits threads (faulthandler, on SIGUSR2):\n" + (dump or "(nothing)")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def children():
    made: list[Child] = []
    yield lambda *a, **k: made.append(Child(*a, **k)) or made[-1]
    for c in made:
        c.kill()


def file_sha(path: Path) -> str:
    table, _ = AdjacencyMatrix.read(path, VOCAB, TOPK)
    return hashlib.sha256(table.contiguous().numpy().tobytes()).hexdigest()


def fresh_proposer(path: Path) -> TokenRecyclingProposer:
    proposer = TokenRecyclingProposer(fake_config(4, 512, VOCAB), ProposerOptions(matrix_path=str(path), save_every=0))
    proposer.close()  # this test process keeps no saver
    return proposer


@pytest.mark.parametrize("mode,sig", [("vllm", signal.SIGTERM), ("vllm", signal.SIGINT),
                                      ("default", signal.SIGINT), ("default", signal.SIGTERM)])
def test_a_signal_saves_the_matrix_and_the_previous_handler_still_runs(tmp_path, children, mode, sig):
    path = tmp_path / "m.safetensors"
    child = children(mode, path)
    learned = child.wait_for("learned")[1]
    child.wait_for("ready")
    assert not path.exists()  # periodic saves are an hour apart: only the signal can write it
    child.proc.send_signal(sig)
    code = child.finish()
    if mode == "vllm":  # vLLM's handler ran after ours and the process went on to its own exit
        assert f"previous handler {sig.name}" in child.text and code == 0, child.text
    elif sig == signal.SIGINT:  # Python's default: KeyboardInterrupt, as without the proposer
        assert "KeyboardInterrupt" in child.text and code == 0, child.text
    else:  # no handler before ours: the process dies of the signal, as it would have
        assert code == -signal.SIGTERM, (code, child.text)
    assert file_sha(path) == learned
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TEMP_PREFIX)]


def test_an_idle_server_saves_periodically_and_only_when_something_changed(tmp_path, children):
    path = tmp_path / "m.safetensors"
    child = children("vllm", path, save_every=1)
    learned = child.wait_for("learned")[1]
    child.wait_for("ready")  # from here on the child only sleeps: no propose() calls
    deadline = time.monotonic() + WAIT
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert path.exists(), child.text
    assert file_sha(path) == learned
    first = path.stat().st_mtime_ns
    time.sleep(3.5)  # three more periods with nothing learned: no rewrite
    assert path.stat().st_mtime_ns == first
    child.proc.send_signal(signal.SIGTERM)
    assert child.finish() == 0
    assert path.stat().st_mtime_ns == first  # nothing new to save on the signal either
    assert "saves 1" in child.text, child.text


def test_a_proposer_dropped_without_a_signal_saves_the_matrix(tmp_path, children):
    # vLLM's worker, ended in order by its engine (a SIGTERM to the API server alone), drops its model
    # runner and leaves with os._exit: no signal reaches it and no atexit hook runs.
    path = tmp_path / "m.safetensors"
    child = children("drop", path)
    learned = child.wait_for("learned")[1]
    child.wait_for("dropped")
    assert child.finish() == 0, child.text
    assert file_sha(path) == learned, child.text
    _, extra = AdjacencyMatrix.read(path, VOCAB, TOPK)
    assert extra["reason"] == "exit"


def test_a_closed_proposer_is_not_saved_when_dropped(tmp_path):
    path = tmp_path / "m.safetensors"
    proposer = TokenRecyclingProposer(fake_config(4, 512, VOCAB), ProposerOptions(matrix_path=str(path), save_every=0))
    proposer._version += 1  # as if it had learned something
    proposer.close()
    del proposer
    assert not path.exists()


def test_a_save_that_hangs_does_not_hold_up_shutdown(tmp_path, children):
    path = tmp_path / "m.safetensors"
    child = children("hang", path)
    child.wait_for("ready")
    sent = time.monotonic()
    child.proc.send_signal(signal.SIGTERM)
    assert child.finish() == 0, child.text
    took = time.monotonic() - sent
    assert "in fsync" in child.text and "previous handler SIGTERM" in child.text, child.text
    assert took < keeper.SIGNAL_SAVE_SECONDS + 20, took  # bounded by the save timeout (plus a slow exit)
    assert "took over" in child.text  # the warning says the save was given up
    assert not path.exists()  # the unfinished save never reached the file


def test_kill_9_in_the_middle_of_a_save_leaves_the_old_file_and_a_restart_says_so(tmp_path, children, caplog):
    path = tmp_path / "m.safetensors"
    child = children("torn", path)
    old = child.wait_for("old")[1]
    new = child.wait_for("new")[1]
    assert old != new
    child.wait_for("in save")
    child.proc.kill()  # kill -9 with half of the new matrix written
    child.proc.wait()
    temps = [p for p in tmp_path.iterdir() if p.name.startswith(TEMP_PREFIX)]
    assert len(temps) == 1 and temps[0].stat().st_size > 0  # the torn half-file is there ...
    with pytest.raises(ValueError, match="truncated or corrupt"):  # ... and is not a matrix
        AdjacencyMatrix.read(temps[0], VOCAB, TOPK)
    assert file_sha(path) == old  # the file is the last complete save
    aged = time.time() - keeper.STALE_TEMP_SECONDS - 5
    os.utime(temps[0], (aged, aged))
    with caplog.at_level(logging.INFO, logger="vllm.token_recycling"):
        proposer = fresh_proposer(path)
    table, extra = AdjacencyMatrix.read(path, VOCAB, TOPK)
    assert torch.equal(proposer.matrix.table, table)
    filled = int((table != 0).any(-1).sum())
    assert filled > 0 and proposer.loaded["filled_rows"] == filled
    assert proposer.loaded["steps"] == extra["steps"] > 0 and proposer.loaded["saved_at"] == extra["saved_at"]
    assert f"{filled} of {VOCAB} rows filled, saved at {extra['saved_at']}" in caplog.text
    assert "interrupted" in caplog.text and not temps[0].exists()  # the leftover is cleaned up


def test_kill_9_at_random_moments_of_repeated_saves_never_leaves_a_torn_file(tmp_path, children):
    path = tmp_path / "m.safetensors"
    for trial in range(3):
        child = children("loop", path)
        saved, saving = None, None
        stop_after = 3 + 4 * trial
        while True:
            words = child.wait_for("sav")
            if words[0] == "saved":
                saved = words[1]
                stop_after -= 1
                if stop_after == 0:
                    break
            else:
                saving = words[1]
        time.sleep(0.001 * trial)  # somewhere in the next learn-and-save
        child.kill()
        # The output may run ahead of what was read: the file is one of the versions the child saved.
        rest = child.proc.stdout.read().split()
        versions = {saved, saving} | {w for w in rest if len(w) == 64}
        assert file_sha(path) in versions


def test_a_corrupt_or_truncated_file_is_refused_set_aside_and_the_server_starts_cold(tmp_path, caplog):
    path = tmp_path / "m.safetensors"
    m = AdjacencyMatrix(VOCAB, TOPK)
    m.table.copy_(torch.randint(1, VOCAB, (VOCAB, TOPK), dtype=torch.int32))
    m.save(path, extra={"steps": 7})
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # one token id in the matrix changed: still a valid safetensors file
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum does not match"):
        AdjacencyMatrix.read(path, VOCAB, TOPK)
    with caplog.at_level(logging.INFO, logger="vllm.token_recycling"):
        proposer = fresh_proposer(path)
    assert "refusing the matrix file" in caplog.text and "checksum" in caplog.text
    assert int(proposer.matrix.table.abs().sum()) == 0 and proposer.loaded is None
    assert not path.exists() and (tmp_path / "m.safetensors.corrupt").read_bytes() == bytes(data)

    m.save(path)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        AdjacencyMatrix.read(path, VOCAB, TOPK)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vllm.token_recycling"):
        proposer = fresh_proposer(path)
    assert "refusing the matrix file" in caplog.text and "truncated or corrupt" in caplog.text
    assert proposer.loaded is None


def test_a_whole_file_for_another_model_is_an_error_and_stays_where_it_is(tmp_path):
    path = tmp_path / "m.safetensors"
    AdjacencyMatrix(VOCAB + 1, TOPK).save(path)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="vocab_size=41") as info:
        TokenRecyclingProposer(fake_config(4, 512, VOCAB), ProposerOptions(matrix_path=str(path), save_every=0))
    assert not isinstance(info.value, CorruptMatrixFile)
    assert path.read_bytes() == before and not (tmp_path / "m.safetensors.corrupt").exists()


def test_save_writes_when_and_after_how_many_steps_and_the_file_reads_back(tmp_path):
    path = tmp_path / "m.safetensors"
    proposer = fresh_proposer(path)
    proposer.stats.steps = 5
    proposer.save(path)
    table, extra = AdjacencyMatrix.read(path, VOCAB, TOPK)
    assert extra["steps"] == 5 and extra["source"] == "vllm" and extra["saved_at"].endswith("Z")
    assert extra["filled_rows"] == 0 and torch.equal(table, proposer.matrix.table)
    warm = fresh_proposer(path)
    assert warm.loaded["steps"] == 5
    warm.stats.steps = 2
    warm.save(path)
    assert AdjacencyMatrix.read(path, VOCAB, TOPK)[1]["steps"] == 7  # counted across restarts
