import json
import pathlib

import pytest
import torch

from token_recycling.tree import DraftTree, make_tree, best_subtree, prior_score

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "paper_tree.json"


def test_paper_tree_shape():
    t = make_tree("paper")
    assert t.num_nodes == 81 and t.max_depth == 6
    per_depth = torch.bincount(t.depths)[1:].tolist()
    assert per_depth == [8, 21, 25, 15, 8, 3]


@pytest.mark.skipif(not SHARED.exists(), reason="shared/data/paper_tree.json not beside the checkout")
def test_paper_tree_equals_the_published_list():
    assert [list(p) for p in make_tree("paper").paths] == json.loads(SHARED.read_text())


@pytest.mark.parametrize("name", ["paper", "paper-8", "paper-16", "paper-32", "chain-4"])
def test_presets_are_valid_trees(name):
    t = make_tree(name)
    n = t.num_nodes
    par = t.parents.tolist()
    assert par[0] == -1 and all(0 <= par[i] < i for i in range(1, n))
    # mask: i sees j iff j is i or an ancestor
    for i in range(n):
        anc, j = set(), i
        while j != -1:
            anc.add(j)
            j = par[j]
        assert set(torch.nonzero(t.mask[i]).flatten().tolist()) == anc
    for i in range(1, n):
        assert t.depths[i] == t.depths[par[i]] + 1
        assert list(t.paths[i - 1][:-1]) == (list(t.paths[par[i] - 1]) if par[i] else [])
        assert t.ranks[i] == t.paths[i - 1][-1]


def test_small_presets_keep_the_top_chain():
    t = make_tree("paper-16")
    assert t.num_nodes == 17 and (0,) in t.paths and (0, 0) in t.paths


@pytest.mark.parametrize("bad,match", [
    ([[0], [0, 1, 2]], "no parent"),
    ([[0], [0]], "more than once"),
    ([[8]], "outside"),
    ([[-1]], "outside"),
    ([[]], "non-empty"),
    ([[0.5]], "non-integer"),
    (["ab"], "not a list"),
])
def test_bad_templates_are_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        DraftTree.from_paths(bad, topk=8)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown tree preset"):
        make_tree("bushy")


def test_best_subtree_is_closed_under_ancestors_and_picks_best():
    paths = [list(p) for p in make_tree("paper").paths]
    scores = [prior_score(p) for p in paths]
    for budget in (1, 5, 30, 80, 200):
        chosen = best_subtree(paths, scores, budget)
        assert len(chosen) == min(budget, 80)
        s = {tuple(p) for p in chosen}
        assert all(len(p) == 1 or tuple(p[:-1]) in s for p in chosen)
    assert best_subtree(paths, scores, 1) == [[0]]
