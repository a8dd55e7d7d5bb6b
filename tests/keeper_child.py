"""A process that serves the fake engine (fake_vllm.py) with TOKEN_RECYCLING_MATRIX set, for
test_vllm_keeper.py: it learns, prints the SHA-256 of its matrix, says ``ready`` and then idles
until a signal stops it (or the parent kills it). It leaves with ``os._exit``, as vLLM's forked
worker processes do, so ``atexit`` saves cannot be what the tests see.

    python keeper_child.py MODE

MODE: ``vllm`` (a Python SIGTERM/SIGINT handler installed before the proposer, like vLLM's engine
process: it only records the signal), ``default`` (Python's own handlers: SIGINT raises
KeyboardInterrupt, SIGTERM kills), ``hang`` (as ``vllm``, but writing the file never finishes),
``torn`` (learn, save, learn more, then a save that writes half its temporary file and stops there),
``loop`` (save again and again, each time after learning more), ``drop`` (learn, then drop the
proposer and leave, with no signal: what vLLM's worker does when its engine ends it in order).
"""

from __future__ import annotations

import faulthandler
import hashlib
import os
import signal
import sys
import time

import numpy as np

from fake_vllm import BigramModel, FakeEngine, Request, fake_config

from token_recycling.vllm import TokenRecyclingProposer

VOCAB = 40
IDLE_LIMIT = 60.0  # seconds: the child never outlives a test that forgot it


def say(*words) -> None:
    # One write(2), not print(): a signal handler that raises inside print's buffered flush can leave
    # the child stuck on its next print; os.write has no buffer and no lock to leave behind.
    os.write(1, (" ".join(str(w) for w in words) + "\n").encode())


def sha(proposer) -> str:
    return hashlib.sha256(proposer.matrix.table.contiguous().numpy().tobytes()).hexdigest()


def learn(proposer, model, seed: int) -> None:
    rng = np.random.default_rng(seed)
    engine = FakeEngine(proposer, model)
    for i in range(2):
        engine.add(Request(i, rng.integers(0, VOCAB, 12).tolist(), 25))
    for _ in range(200):
        if not engine.running:
            break
        engine.step()


def main(mode: str) -> None:
    # A test that waited in vain sends SIGUSR2: every thread's stack goes to stdout for its message.
    faulthandler.register(signal.SIGUSR2, file=sys.stdout, all_threads=True)
    got = []
    # The handlers each mode names, whatever this process inherited: a shell starts background jobs
    # with SIGINT ignored, and Python then leaves it ignored instead of raising KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if mode in ("vllm", "hang"):
        def previous(signum, frame):  # what vLLM's engine process does: note it, stop the loop later
            say("previous handler", signal.Signals(signum).name)
            got.append(signum)
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous)
    proposer = TokenRecyclingProposer(fake_config(4, 512, VOCAB))
    model = BigramModel(VOCAB, 0)
    proposer.load_model(model)
    if mode == "hang":
        def stuck(fd):
            say("in fsync")
            time.sleep(3600)
        os.fsync = stuck  # the atomic write's fsync: a disk that never answers
    learn(proposer, model, 1)
    if mode == "torn":
        path = os.environ["TOKEN_RECYCLING_MATRIX"]
        proposer.save(path)
        say("old", sha(proposer))
        learn(proposer, model, 2)
        say("new", sha(proposer))

        def torn(fd):  # the temporary file is cut in half, and the process stops before the rename
            os.ftruncate(fd, os.fstat(fd).st_size // 2)
            say("in save")
            time.sleep(3600)
        os.fsync = torn
        proposer.save(path)
        return
    if mode == "loop":
        path = os.environ["TOKEN_RECYCLING_MATRIX"]
        for seed in range(2, 10_000):
            learn(proposer, model, seed)
            say("saving", sha(proposer))
            proposer.save(path)
            say("saved", sha(proposer))
        return
    say("learned", sha(proposer))
    if mode == "drop":
        del proposer, model  # the last references: the proposer goes now, not at a later collection
        say("dropped")
        return
    deadline = time.monotonic() + IDLE_LIMIT
    try:
        # Inside the try: the test signals as soon as it reads "ready", before say() may have returned.
        say("ready")
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
    except KeyboardInterrupt:
        say("KeyboardInterrupt")
    say("stopping", "saves", proposer.keeper.saves if proposer.keeper else None)


if __name__ == "__main__":
    main(sys.argv[1])
    sys.stdout.flush()
    os._exit(0)
