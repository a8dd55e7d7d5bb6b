"""Token Recycling: faster greedy decoding for HuggingFace causal LMs, no training, no draft model.

The library's public names: TokenRecycler (the decode loop), GenerationStats, DraftTree / make_tree,
ops (the native ops) and the build facts BUILT_WITH_TORCH / WITH_CUDA. The vLLM proposer is in
token_recycling.vllm; the command line, benchmarks and model loading in token_recycling.tools; the
test oracle in token_recycling.testing (token_recycling.reference: the same module, loaded on first
use). The library never imports tools, nor testing but for that alias."""

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
