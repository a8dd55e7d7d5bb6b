"""Token Recycling as a speculative proposer for vLLM (``method="custom_class"``).

    LLM(model, speculative_config={"method": "custom_class",
                                   "model": "token_recycling.vllm.TokenRecyclingProposer",
                                   "num_speculative_tokens": 4})

vLLM builds the proposer inside its worker process with the engine's config and calls
``propose(...)`` once per step for the whole batch; its rejection sampler verifies the drafts, so
the output is what the engine would produce without speculation (greedy: token for token).

Nothing here imports vLLM at module level (the proposer only reads the config it is handed), and
``import token_recycling`` never imports this subpackage.
"""

from .options import ProposerOptions  # noqa: F401
from .proposer import TokenRecyclingProposer  # noqa: F401
from .worker import TokenRecyclingWorkerExtension  # noqa: F401

PROPOSER = "token_recycling.vllm.TokenRecyclingProposer"
WORKER_EXTENSION = "token_recycling.vllm.TokenRecyclingWorkerExtension"


def speculative_config(num_speculative_tokens: int = 4) -> dict:
    """The ``speculative_config`` that makes vLLM draft with Token Recycling."""
    if not isinstance(num_speculative_tokens, int) or num_speculative_tokens < 1:
        raise ValueError(f"num_speculative_tokens must be a positive int, got {num_speculative_tokens!r}")
    return {"method": "custom_class", "model": PROPOSER, "num_speculative_tokens": num_speculative_tokens}
