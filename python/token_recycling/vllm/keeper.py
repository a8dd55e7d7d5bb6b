"""Keeping a server's matrix on disk however the server stops.

vLLM builds the proposer in its engine process and stops that process with SIGTERM (the front end
sends it on its own SIGINT or SIGTERM; Ctrl-C reaches every process of the group as SIGINT), and it
leaves worker processes with ``os._exit`` (``multiprocessing``'s children end so), so ``atexit`` hooks
never run there. A :class:`MatrixKeeper` therefore saves

* from a background thread every ``every`` seconds when the matrix changed since the last save, so an
  idle server saves too (nothing is written while nothing is learned);
* on SIGINT and SIGTERM, then hands the signal to the handler that was installed before (vLLM's, which
  starts its own orderly shutdown, or Python's default): vLLM's behaviour is kept, never replaced.
  The save in the handler is bounded (``SIGNAL_SAVE_SECONDS``; vLLM kills an engine process 5 s after
  its SIGTERM), so it can never hang a shutdown;
* at interpreter exit where that runs (an engine in the caller's process);
* when its owner is dropped (``save(..., owner=...)`` from the owner's ``__del__``).

The proposer lives in vLLM's worker process. A signal to the server's whole process group (Ctrl-C in
a terminal, systemd's default KillMode) reaches it, and its handler saves. A SIGTERM to the API
server alone (``docker stop``) does not reach the worker: the API server sends SIGTERM to the engine
process, which closes its pipe to the worker; the worker leaves its loop and drops its model runner,
and the proposer saves as it goes. That needs vLLM's ``--shutdown-timeout`` of 1 s or more: with 0
the API server SIGKILLs the engine and the worker at once, and the last periodic save survives.

Every save is atomic (``adjacency.write_atomic``): a process killed mid-save (``kill -9``) leaves the
old file or the new one. Temporary files of such a save are ignored by the loader and removed when
they are older than ``STALE_TEMP_SECONDS``.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
import time
import weakref
from typing import Callable

from ..adjacency import TEMP_PREFIX

# vLLM configures the "vllm" logger (handler, level INFO) in every process it starts; a child of it
# prints with vLLM's own messages. Outside vLLM nothing is configured and only warnings show.
logger = logging.getLogger("vllm.token_recycling")

SIGNALS = (signal.SIGINT, signal.SIGTERM)
SIGNAL_SAVE_SECONDS = 3.0
STALE_TEMP_SECONDS = 60.0

_keepers: "weakref.WeakSet[MatrixKeeper]" = weakref.WeakSet()  # every live keeper of this process
_previous: dict[int, object] = {}  # the handler each signal had before ours


def _on_signal(signum, frame) -> None:
    """Save every live keeper's matrix (bounded), then do what the previous handler would have done."""
    name = signal.Signals(signum).name
    for keeper in list(_keepers):
        keeper.save_on_signal(name)
    previous = _previous.get(signum)
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_IGN:
        return
    else:  # SIG_DFL, or a handler set outside Python (None): die of the signal, as before
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _install_signal_handlers() -> bool:
    """Put _on_signal in front of SIGINT and SIGTERM (again, if someone replaced it since). Only the
    main thread may set handlers; elsewhere the periodic and exit saves remain."""
    if threading.current_thread() is not threading.main_thread():
        return False
    for sig in SIGNALS:
        current = signal.getsignal(sig)
        if current is not _on_signal:
            _previous[sig] = current
            signal.signal(sig, _on_signal)
    return True


class MatrixKeeper:
    """Saves a matrix to ``path`` periodically, on SIGINT/SIGTERM and at exit (module doc).

    ``snapshot(owner, reason)`` returns a consistent copy of what to save, or None when the file already
    holds it (the owner tracks that); ``write(owner, copy, reason)`` writes a copy and returns a
    description of what it wrote, for the log.
    The keeper holds the owner weakly: once the owner is gone, nothing is saved and the thread ends.
    """

    def __init__(self, owner, snapshot: Callable, write: Callable, every: float):
        self._owner = weakref.ref(owner)
        self._snapshot, self._write = snapshot, write
        self.every = float(every)
        self.saves = 0
        self.failures = 0
        self.signal_saved = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        _keepers.add(self)
        self.handles_signals = _install_signal_handlers()
        ref = weakref.ref(self)
        atexit.register(lambda: ref() is not None and ref().save("exit", timeout=SIGNAL_SAVE_SECONDS))
        if self.every > 0:
            self._thread = threading.Thread(target=MatrixKeeper._periodic, args=(ref, self._stop, self.every),
                                            name="token-recycling-save", daemon=True)
            self._thread.start()

    @staticmethod
    def _periodic(ref, stop: threading.Event, every: float) -> None:
        while not stop.wait(every):
            keeper = ref()
            if keeper is None:
                return
            keeper.save("periodic")
            del keeper  # hold no reference while waiting

    def save(self, reason: str, timeout: float | None = None, owner=None) -> bool:
        """Save now if something changed. With ``timeout``, the write runs in a thread that is waited
        for at most that long (a stuck disk cannot hold up the caller). True when a file was written.
        ``owner``: the owner itself, from its ``__del__`` (where the keeper's weak reference may
        already be dead)."""
        owner = owner if owner is not None else self._owner()
        if owner is None or self._stop.is_set():
            return False
        try:
            copy = self._snapshot(owner, reason)
        except Exception:
            self.failures += 1
            logger.exception("token-recycling: could not copy the matrix for a save (%s)", reason)
            return False
        if copy is None:
            return False
        if timeout is None:
            return self._write_logged(owner, copy, reason)
        done: list[bool] = []
        writer = threading.Thread(target=lambda: done.append(self._write_logged(owner, copy, reason)),
                                  name="token-recycling-save-now", daemon=True)
        writer.start()
        writer.join(timeout)
        if writer.is_alive():
            self.failures += 1
            logger.warning("token-recycling: saving the matrix on %s took over %.1f s; going on without waiting "
                           "(the file on disk is the last complete save)", reason, timeout)
            return False
        return bool(done and done[0])

    def _write_logged(self, owner, copy, reason: str) -> bool:
        start = time.perf_counter()
        try:
            where = self._write(owner, copy, reason)
        except Exception:
            self.failures += 1
            logger.exception("token-recycling: saving the matrix (%s) failed; the file on disk is the last "
                             "complete save", reason)
            return False
        self.saves += 1
        logger.info("token-recycling: saved the matrix (%s) to %s in %.3f s", reason, where,
                    time.perf_counter() - start)
        return True

    def save_on_signal(self, name: str) -> None:
        if self.signal_saved:  # a second Ctrl-C goes straight to the previous handler
            return
        self.signal_saved = True
        self.save(name, timeout=SIGNAL_SAVE_SECONDS)

    def stop(self) -> None:
        """No more saves from this keeper (its thread ends at its next wake-up)."""
        self._stop.set()
        _keepers.discard(self)


def remove_stale_temp_files(path: str) -> list[str]:
    """Remove what saves to ``path`` that were killed midway left behind (older than STALE_TEMP_SECONDS,
    so a save in progress in another process is left alone). Returns the names removed."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    prefix = f"{TEMP_PREFIX}{os.path.basename(path)}-"
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    now = time.time()
    for name in names:
        if not name.startswith(prefix):
            continue
        full = os.path.join(folder, name)
        try:
            if now - os.path.getmtime(full) > STALE_TEMP_SECONDS:
                os.unlink(full)
                removed.append(name)
        except OSError:
            pass
    return removed
