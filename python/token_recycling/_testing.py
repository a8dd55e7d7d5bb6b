"""Test hooks: counters of the decode loop's designated device->host reads.

The tests check that a step reads the device back only where it is meant to: ``StepSync.fetch``
once per step (step_sync.py) and ``emit.to_host`` once per emit when the caller holds no host copy
(emit.py). Those two points bump a counter here only while a test has turned counting on with
:func:`counting`; otherwise each pays one attribute test.

    from token_recycling import _testing
    with _testing.counting() as counts:
        rec.generate(ids, max_new_tokens=40)
    assert counts.syncs == rec.stats.steps
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class Counters:
    enabled: bool = False
    syncs: int = 0        # calls of step_sync.StepSync.fetch
    host_copies: int = 0  # calls of emit.to_host


counters = Counters()


@contextmanager
def counting():
    """Counts from zero inside the block; the counts stay readable after it."""
    previous = counters.enabled
    counters.syncs = counters.host_copies = 0
    counters.enabled = True
    try:
        yield counters
    finally:
        counters.enabled = previous
