"""The decode step's one host sync.

On CUDA every blocking device->host read waits for the GPU to drain its queue, and a step of an
eager model is only a few milliseconds of launches, so a step reads back exactly once, here:
:meth:`StepSync.fetch` packs what the host needs from the device into one int64 tensor (the accept
length, the accepted nodes, the emitted tokens, every node's top-k candidates for recycling, and the
error record the step's CUDA ops accumulated), copies it to the host in one transfer, raises a
deferred device error if there is one, and returns the host copies. Everything after it in the step
works on those copies (drafting is host work on a host adjacency matrix; the verdict's device tensors
feed only device ops).

What makes the other reads go away:
  - device checks: inside :class:`StepSync` the CUDA ops defer their device-side input checks
    (``ops.deferred_device_errors``); the record they accumulate comes back in the step's copy. A
    compaction's errors (it runs after the copy) come back with the next step's, or with
    :meth:`StepSync.finish` after the last step;
  - the forward's time for the policy: CUDA events around it, read after the copy
    (:class:`ForwardTimer`); on the CPU ``time.perf_counter``;
  - the prefix length: kept on the device for the kernels that take it (compaction, graph steps) and
    as an int on the host, both advanced by the accept length;
  - stopping: the default criteria (max length, EOS) run on the host copy of the emitted tokens.
Still reading back on their own (docs/gpu.md): HF logits processors and user stopping
criteria (they take device tensors), sampling with a generator on another device, tensor-parallel
agreement, and the auto tree's one-off cost measurement before the first step.

On the CPU the same code runs (``fetch`` is a concatenation), so CI runs the path CUDA takes; tests
count its calls (``_testing.counting``) and check that nothing else in a step reads a device result.
"""

from __future__ import annotations

import time

import torch

from . import ops
from ._testing import counters


class StepSync:
    """One designated device->host copy per step; the CUDA ops' checks deferred in between.

    Use as a context manager around the decode loop; :meth:`finish` reads the last record."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        from ._extension import WITH_CUDA
        self.deferred = self.device.type == "cuda" and WITH_CUDA  # CPU ops check at once anyway
        self._previous = False

    def __enter__(self) -> "StepSync":
        if self.deferred:
            self._previous = ops.set_deferred_device_errors(self.device, True)
        return self

    def __exit__(self, *exc) -> None:
        if self.deferred:
            ops.set_deferred_device_errors(self.device, self._previous)

    def fetch(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """The step's one sync: ``tensors`` (integer, any shape, on the device) as flat int64 host
        tensors, in order; raises the ValueError of a CUDA op whose deferred check failed."""
        parts = [t.reshape(-1).to(torch.long) for t in tensors]
        parts.append(ops.take_device_errors(self.device))
        flat = torch.cat(parts).to("cpu")  # the one blocking copy of the step
        if counters.enabled:
            counters.syncs += 1
        host = list(flat.split([p.numel() for p in parts]))
        ops.raise_device_errors(host.pop())
        return host

    def finish(self) -> None:
        """After the last step: the errors of the ops that ran after its copy (one more read, once)."""
        if self.deferred:
            ops.raise_device_errors(ops.take_device_errors(self.device).cpu())


class ForwardTimer:
    """The verification forward's time: CUDA events read after the step's sync (no wait of their
    own), or ``time.perf_counter`` on the CPU (where a forward is done when it returns)."""

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._stop = torch.cuda.Event(enable_timing=True)
        self._t0 = self._t1 = 0.0

    def start(self) -> None:
        if self.cuda:
            self._start.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            self._stop.record()
        else:
            self._t1 = time.perf_counter()

    def seconds(self) -> float:
        """Call after the step's sync: both events have completed by then."""
        if self.cuda:
            return self._start.elapsed_time(self._stop) / 1000.0
        return self._t1 - self._t0
