"""What this machine's forwards cost, measured once and kept on disk.

Two measurements steer the decode step: which few-row linear layers go to ``skinny_linear`` rather
than torch's product (skinny.py), and the forward-cost curve the drafting policy weighs drafts
against (policy.StepCost). Both depend on the CPU or GPU, the thread count, torch and the model's
shapes, and both take a second or more to measure, which a user pays on the first request of every
process. This module keeps them in ``calibration.json`` in the cache directory (``$TOKEN_RECYCLING_CACHE``,
else ``~/.cache/token-recycling``), one entry per (machine, threads, torch, model shape, dtype, device,
setting): a process that finds its entry skips the measurement. The steps still rescale a loaded
curve by their own forward times (policy.StepCost), so a curve from a quieter moment does no lasting
harm.

``TOKEN_RECYCLING_CALIBRATION`` chooses: ``on`` (default: use and write the file), ``refresh``
(measure again and overwrite), ``off`` (no file; routing keeps skinny.py's fixed row limits and the
cost curve is measured in every process, as without this module).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

CACHE_ENV = "TOKEN_RECYCLING_CACHE"
MODE_ENV = "TOKEN_RECYCLING_CALIBRATION"
MODES = ("on", "off", "refresh")
FILE = "calibration.json"
MAX_ENTRIES = 256  # oldest entries dropped past this (each is a few hundred bytes)
VERSION = 2  # bumped when what an entry means or measures changes (a faster kernel); older entries are then ignored


def cache_dir() -> Path:
    """Where converted models and calibrations are kept (``$TOKEN_RECYCLING_CACHE`` or ~/.cache/token-recycling)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "token-recycling"


def mode() -> str:
    value = os.environ.get(MODE_ENV, "on").strip().lower() or "on"
    if value not in MODES:
        raise ValueError(f"{MODE_ENV} must be one of {', '.join(MODES)}; got {value!r}")
    return value


def _cpu_name() -> str:
    name, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name == "unknown CPU":
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    # Machines sold under one name differ in these (and the kernels' paths with them).
    return name + "".join(f" +{f}" for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags)


def machine(device: torch.device) -> str:
    """The hardware and the thread count torch uses (a curve at 1 thread is not one at 2)."""
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return f"{hw}; {torch.get_num_threads()} threads; torch {torch.__version__}"


def model_shape(model) -> str:
    """What the cost of a forward depends on in the model: its class, sizes and dtype."""
    c = getattr(model, "config", None)
    if c is not None:
        fields = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "vocab_size", "sliding_window")
        sizes = ",".join(f"{f}={getattr(c, f, None)}" for f in fields)
    else:  # a plain module: its parameters' shapes
        sizes = ",".join("x".join(map(str, p.shape)) for p in model.parameters())
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    return f"{type(model).__name__}({sizes}) {dtype}"


def key(model, device: torch.device, setting: str) -> str:
    """The entry of ``model`` on this machine with ``setting`` (what else shapes the measurement)."""
    return f"v{VERSION} | {machine(device)} | {model_shape(model)} | {device.type} | {setting}"


def _path() -> Path:
    return cache_dir() / FILE


def _read() -> dict:
    try:
        data = json.loads(_path().read_text())
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: measured again and rewritten
    return data if isinstance(data, dict) else {}


def load(entry: str) -> dict | None:
    """The stored measurement ``entry`` (from :func:`key`), or None (none stored, mode off or refresh)."""
    if mode() != "on":
        return None
    value = _read().get(entry)
    return value if isinstance(value, dict) else None


def store(entry: str, value: dict) -> None:
    """Keep ``value`` under ``entry``. Atomic (a whole file replaces the old one), and a cache that
    cannot be written costs only the next process a measurement."""
    if mode() == "off":
        return
    data = _read()
    data.pop(entry, None)
    data[entry] = value
    while len(data) > MAX_ENTRIES:
        data.pop(next(iter(data)))
    folder = _path().parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".calibration-", suffix=".json", dir=folder)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1)
            os.replace(tmp, _path())
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass
