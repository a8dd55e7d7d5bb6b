"""Loads the compiled extension once and says how to fix it when it cannot be loaded."""

from __future__ import annotations

import torch

_REBUILD = (
    "Rebuild it against the torch you have: `pip install --no-build-isolation .` "
    "(or `-e .`) from the token-recycling source tree, with torch installed first."
)

try:
    from . import _C  # noqa: F401  (registers torch.ops.token_recycling.*)
except ImportError as exc:  # missing build, or built against another torch ABI
    raise ImportError(
        f"token_recycling's native extension could not be loaded ({exc}). {_REBUILD}"
    ) from exc

BUILT_WITH_TORCH: str = _C.built_with_torch
WITH_CUDA: bool = bool(_C.with_cuda)


def _same_release(a: str, b: str) -> bool:
    return a.split("+")[0].split(".")[:2] == b.split("+")[0].split(".")[:2]


if not _same_release(BUILT_WITH_TORCH, torch.__version__):
    raise ImportError(
        f"token_recycling was built against torch {BUILT_WITH_TORCH} but torch {torch.__version__} "
        f"is installed; C++ extensions are tied to one torch release. {_REBUILD}"
    )
