"""Sliding-window models: window layers' cache memory and decoding speed at long context.

Compares, on one random-weight Mistral-shaped model (every layer windowed) and its copy with the
window removed (same weights; what keeping full-length caches in the window layers would store
and attend over, i.e. option (b) "full length, window in the mask"):
  * KV bytes held by the window layers after generation,
  * seconds per new token of TokenRecycler (tree="paper"), tree attention off and on
    (window layers take the dense path: window.dense_tree_mask + sdpa).
Outputs are not compared across the two models (the window changes them); each run is checked
lossless against model.generate in --check mode.

    python bench/window_cache.py [--prompt 2048] [--new 64] [--window 128] [--device cpu] [--check]
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers as tf

from token_recycling import TokenRecycler, window


def model_for(window_size: int | None, device: str, hidden: int, layers: int):
    torch.manual_seed(0)
    cfg = tf.MistralConfig(vocab_size=1024, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=8,
                           num_key_value_heads=2, intermediate_size=2 * hidden, max_position_embeddings=65536,
                           sliding_window=window_size)
    model = tf.MistralForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=torch.float32).to(device).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(4.0)
    return model


def kv_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if isinstance(t, torch.Tensor))


def run(model, ids, new: int, tree_attention: bool, check: bool):
    rec = TokenRecycler(model, tree="paper", tree_attention=tree_attention)
    rec.generate(ids[:, :64], max_new_tokens=16)  # warm-up
    t = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new, do_sample=False, custom_generate=rec, return_dict_in_generate=True)
    seconds = time.perf_counter() - t
    model.set_attn_implementation("sdpa")
    if check:
        assert torch.equal(out.sequences, model.generate(ids, max_new_tokens=new, do_sample=False)), "not lossless"
    return seconds / new, kv_bytes(out.past_key_values), rec.stats.mean_accepted


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--prompt", type=int, default=2048)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--check", action="store_true")
    a = p.parse_args()
    ids = torch.randint(3, 1024, (1, a.prompt), generator=torch.Generator().manual_seed(0)).to(a.device)
    print(f"Mistral-shaped random model: {a.layers} layers, hidden {a.hidden}, fp32, {a.device}; "
          f"prompt {a.prompt}, {a.new} new tokens, tree='paper'")
    print(f"{'cache':<36} {'tree attn':>9} {'KV MiB':>8} {'ms/token':>9} {'MAT':>5}")
    for label, size in ((f"window {a.window} (bounded, ours)", a.window), ("full length (window in mask)", None)):
        model = model_for(size, a.device, a.hidden, a.layers)
        for ta in (False, True):
            per_token, nbytes, mat = run(model, ids, a.new, ta, a.check)
            print(f"{label:<36} {str(ta):>9} {nbytes / 2**20:>8.2f} {per_token * 1e3:>9.1f} {mat:>5.2f}")
    print(f"(window layers hold window - 1 = {a.window - 1} positions between steps: "
          f"{window.WindowLayer.__name__})")


if __name__ == "__main__":
    main()
