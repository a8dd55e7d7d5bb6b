"""Token Recycling: faster greedy decoding for HuggingFace causal LMs, no training, no draft model."""

from . import ops  # noqa: F401
from ._extension import BUILT_WITH_TORCH, WITH_CUDA  # noqa: F401
from .tree import DraftTree, make_tree  # noqa: F401

__version__ = "0.1.0"
from .recycler import TokenRecycler  # noqa: E402,F401
from .stats import GenerationStats  # noqa: E402,F401


def __getattr__(name: str):
    """``token_recycling.reference``: the test oracle (token_recycling.testing.reference), loaded on first use."""
    if name == "reference":
        from .testing import reference
        return reference
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
