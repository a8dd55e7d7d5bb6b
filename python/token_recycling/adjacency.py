"""The adjacency matrix: for every token, the top-k next tokens the model last predicted after it.

It starts empty (all zeros: every candidate is token 0, which verification simply rejects), persists
across calls (hot start) and is saved with safetensors together with its vocab size, k and,
optionally, the draft tree and tree statistics, and tensors beside the matrix (the suffix memory:
``memory_*``), which carry a checksum of their own (``tensors_sha256``) so that a reader that knows
only the matrix still reads it.

A save is atomic: the bytes go to a temporary file in the same folder, which is flushed to disk and
then renamed over the target (and the folder flushed), so a process killed mid-save leaves the old
file or the new one, never a mix. The file carries a SHA-256 of the matrix and its metadata, which
``read`` checks: a file damaged afterwards is refused with a message that says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

FORMAT = "token-recycling/1"
TEMP_PREFIX = ".tr-save-"  # temporary files of an unfinished save: f"{TEMP_PREFIX}{name}-XXXX"


class CorruptMatrixFile(ValueError):
    """A matrix file that cannot be read back whole: cut short, or changed after it was written."""


def _checksum(table: torch.Tensor, meta: dict[str, str]) -> str:
    """SHA-256 of the matrix's bytes and every metadata field but the checksum itself."""
    h = hashlib.sha256(table.contiguous().numpy().tobytes())
    for key in sorted(meta):
        if key != "sha256":
            h.update(f"\0{key}\0{meta[key]}".encode())
    return h.hexdigest()


def _tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of named tensors: each name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader, or a restart after a crash at any point, sees the
    old file or the new one whole: temp file in the same folder, fsync, rename, fsync the folder."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.path.basename(path)}-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a folder that cannot be opened (some platforms): the rename is still atomic
        return
    try:
        os.fsync(dir_fd)  # the rename itself reaches the disk
    except OSError:
        pass
    finally:
        os.close(dir_fd)


class AdjacencyMatrix:
    def __init__(self, vocab_size: int, topk: int = 8, device: torch.device | str = "cpu"):
        if vocab_size <= 0 or topk <= 0:
            raise ValueError(f"vocab_size and topk must be positive, got {vocab_size}, {topk}")
        self.vocab_size, self.topk = int(vocab_size), int(topk)
        self.table = torch.zeros(self.vocab_size, self.topk, dtype=torch.int32, device=device)

    def reset(self) -> None:
        self.table.zero_()

    @property
    def nbytes(self) -> int:
        return self.table.numel() * self.table.element_size()

    def save(self, path: str | os.PathLike, extra: dict[str, Any] | None = None,
             tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Write the matrix, ``extra`` (JSON-able) and ``tensors`` (CPU tensors kept beside the matrix,
        e.g. the suffix memory) to ``path``, atomically (module doc)."""
        self.write(path, self.table.cpu().clone(), json.dumps(extra or {}), tensors)

    @staticmethod
    def write(path: str | os.PathLike, table: torch.Tensor, extra_json: str = "{}",
              tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Write a [vocab, k] int32 CPU table, its JSON ``extra`` and ``tensors`` (named CPU tensors,
        not "matrix") atomically: a copy taken under a lock can be written outside it (the vLLM
        proposer's saves do)."""
        if table.dim() != 2 or table.dtype != torch.int32 or table.device.type != "cpu":
            raise ValueError(f"table must be a 2-D int32 CPU tensor, got {tuple(table.shape)} {table.dtype} "
                             f"on {table.device}")
        tensors = {name: t.detach().cpu().contiguous() for name, t in (tensors or {}).items()}
        if "matrix" in tensors:
            raise ValueError("tensors must not be named 'matrix' (the matrix itself)")
        table = table.contiguous()
        meta = {"format": FORMAT, "vocab_size": str(table.shape[0]), "topk": str(table.shape[1]),
                "extra": extra_json}
        if tensors:
            meta["tensors_sha256"] = _tensors_checksum(tensors)
        meta["sha256"] = _checksum(table, meta)
        write_atomic(path, safetensors_bytes({"matrix": table, **tensors}, metadata=meta))

    @staticmethod
    def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
        """The tensors saved beside the matrix (``write``'s ``tensors``; {} for a file without any),
        checked against their checksum. Call after ``read``, which checks the rest of the file."""
        path = os.fspath(path)
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys() if name != "matrix"}
        except Exception as exc:
            raise CorruptMatrixFile(f"{path!r} is not a token-recycling matrix file, or is truncated or corrupt "
                                    f"({type(exc).__name__}: {exc})") from exc
        if tensors and meta.get("tensors_sha256") != _tensors_checksum(tensors):
            raise CorruptMatrixFile(f"{path!r} is corrupt: the checksum of the tensors beside the matrix "
                                    f"({', '.join(sorted(tensors))}) does not match them")
        return tensors

    @staticmethod
    def read(path: str | os.PathLike, vocab_size: int, topk: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Load a saved matrix, refusing one made for another vocab or k. Returns (table, extra)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no token-recycling matrix file at {path!r}")
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                table = f.get_tensor("matrix")
        except Exception as exc:  # not a safetensors file, cut short, or no "matrix" inside
            raise CorruptMatrixFile(f"{path!r} is not a token-recycling matrix file, or is truncated or corrupt "
                             f"({type(exc).__name__}: {exc})") from exc
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path!r} is not a token-recycling matrix file (format {meta.get('format')!r})")
        if "sha256" in meta and meta["sha256"] != _checksum(table, meta):  # files written before it have none
            raise CorruptMatrixFile(f"{path!r} is corrupt: its checksum does not match its contents (the file was "
                             "changed or damaged after it was written)")
        v, k = int(meta["vocab_size"]), int(meta["topk"])
        if (v, k) != (vocab_size, topk) or tuple(table.shape) != (v, k):
            raise ValueError(f"{path!r} holds a matrix for vocab_size={v}, k={k}, but this model/recycler "
                             f"needs vocab_size={vocab_size}, k={topk}")
        if table.dtype != torch.int32 or (table.numel() and (table.min() < 0 or table.max() >= v)):
            raise ValueError(f"{path!r} holds token ids outside [0, {v}) or of dtype {table.dtype}")
        return table, json.loads(meta.get("extra", "{}"))
