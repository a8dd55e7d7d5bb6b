import os

import pytest
import torch

# The calibration cache (calibration.py) would make routing and cost curves depend on timings taken
# on this machine earlier, and would write to the user's cache folder: tests run without it, and
# test_calibration.py turns it on in a temporary folder.
os.environ["TOKEN_RECYCLING_CALIBRATION"] = "off"


@pytest.fixture(autouse=True)
def _shared_models_keep_their_attention():
    """Shared tiny models (models.tiny_model) go back to the attention they were built with after each test."""
    yield
    import sys
    models = sys.modules.get("models")
    if models is not None and hasattr(models, "restore_shared_attention"):
        models.restore_shared_attention()


@pytest.fixture(autouse=True)
def _fixed_cost_curve(request, monkeypatch):
    """tree="auto" weighs drafts against a forward-cost curve measured on the machine, so on a loaded
    machine it rightly drafts less, and a test asserting that drafts were accepted would depend on the
    machine's speed. Every test therefore gets a fixed curve shape (a forward of n nodes costs
    1 + 0.01 n units; the timed dummy forwards still run, and the steps still rescale the curve by
    their measured forward times). ``@pytest.mark.measured_cost`` keeps the real measurement."""
    if request.node.get_closest_marker("measured_cost"):
        yield
        return
    from token_recycling import auto_tree, draft

    def fixed(forward_n, sizes=auto_tree.COST_SIZES, context=0, **_):
        for n in sizes:
            forward_n(n)
        return auto_tree.CostModel(list(sizes), [1.0 + 0.01 * n for n in sizes], context)

    monkeypatch.setattr(draft, "measure_cost", fixed)
    monkeypatch.setattr(draft, "remeasure_cost", lambda forward_n, old, sizes=auto_tree.REMEASURE_SIZES, context=0,
                        **_: fixed(forward_n, sizes, context))
    yield


@pytest.fixture
def gen():
    """A seeded generator per test, so failures reproduce; the seed differs per test."""
    g = torch.Generator().manual_seed(torch.randint(0, 2**31 - 1, (1,)).item())
    return g


def random_tree(num_nodes: int, g: torch.Generator, k: int = 8, chain_bias: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random parents (topological) and ranks for a tree of num_nodes nodes (root included)."""
    parents = [-1]
    for i in range(1, num_nodes):
        if chain_bias and torch.rand(1, generator=g).item() < chain_bias:
            parents.append(i - 1)  # deep trees
        else:
            parents.append(int(torch.randint(0, i, (1,), generator=g)))
    ranks = [0] + torch.randint(0, k, (num_nodes - 1,), generator=g).tolist()
    return torch.tensor(parents, dtype=torch.int32), torch.tensor(ranks, dtype=torch.int32)


def ancestor_mask(parents: torch.Tensor) -> torch.Tensor:
    """[N, N] bool: node i sees node j iff j is i or one of its ancestors."""
    n = parents.shape[0]
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        j = i
        while j != -1:
            mask[i, j] = True
            j = int(parents[j])
    return mask
