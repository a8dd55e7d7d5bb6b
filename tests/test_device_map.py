"""device_map: layers offloaded to CPU RAM or disk by accelerate's hooks work (lossless); a map that
runs layers on several accelerators is refused with a clear error."""

from __future__ import annotations

import pytest
import torch

from models import tiny_model
from token_recycling import TokenRecycler

pytest.importorskip("accelerate")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("device-map") / "llama"
    tiny_model("llama").save_pretrained(path)
    return path


def load(folder, device_map, offload):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map=device_map,
                                                offload_folder=str(offload)).eval()


def test_layer_offloaded_to_disk_is_lossless(folder, tmp_path):
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    model = load(folder, device_map, tmp_path / "offload")
    assert model.hf_device_map["model.layers.1"] == "disk"
    assert model.model.layers[1].self_attn.q_proj.weight.device.type == "meta"  # really offloaded: hooks load it
    reference = load(folder, None, tmp_path / "reference")  # the same weights, never given to a recycler
    rec = TokenRecycler(model)
    g = torch.Generator().manual_seed(1)
    for n in (6, 20):
        ids = torch.randint(3, 320, (1, n), generator=g)
        ref = reference.generate(ids, max_new_tokens=40, do_sample=False)
        assert rec.generate(ids, max_new_tokens=40).tolist() == ref.tolist()


@pytest.mark.parametrize("devices", [(0, 1), ("cuda:0", "cuda:1")])
def test_layers_on_several_accelerators_are_refused(folder, tmp_path, devices):
    model = load(folder, "cpu", tmp_path / "offload")
    a, b = devices  # what accelerate would have recorded for a split over two GPUs
    model.hf_device_map = {"model.embed_tokens": a, "model.layers.0": a, "model.layers.1": b, "lm_head": b}
    with pytest.raises(ValueError, match=r"runs its layers on 2 devices \(cuda:0, cuda:1\).*tp_plan='auto'"):
        TokenRecycler(model)
    model.hf_device_map = {"model.embed_tokens": a, "model.layers.0": "cpu", "model.layers.1": "disk", "lm_head": a}
    TokenRecycler(model)  # one accelerator, the rest offloaded: accepted
