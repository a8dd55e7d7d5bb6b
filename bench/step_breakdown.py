"""Where one decode step's time goes: TokenRecycler on a random-weight Llama-7B-shaped model.

Llama-2-7B shapes (hidden 4096, 32 heads, 32 kv heads, MLP 11008, vocab 32000) with only --layers
layers (default 2), bf16, the paper's 81-node tree, prefix 1k/4k/16k (random prompt tokens). For
each prefix and attention path (tree = our tree-attention backend, dense = sdpa with a dense
additive mask) it runs --steps decode steps and reports per step (medians):
  forward ms  the verification forward, timed with CUDA events (no extra syncs)
  step ms     the whole step, wall clock
  other ms    step - forward: drafting, verification, recycling, compaction, emitting, launches
  syncs       blocking host syncs per step, counted by torch.cuda.set_sync_debug_mode("warn")
Random weights give random text, so few drafts are accepted: this measures the cost of a step,
not the speedup. "tree+graphs" rows: cuda_graphs=True (static cache, the 81-node tree padded to the
128-node bucket, its forward captured as a CUDA graph in the call's first step and replayed after).

    python bench/step_breakdown.py [--layers 2] [--steps 12] [--json out.json]
    python bench/step_breakdown.py --device cpu --quick     # tiny smoke run without a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch


def build_model(device: str, layers: int, quick: bool):
    from transformers import LlamaConfig, LlamaForCausalLM
    if quick:
        cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096)
    else:
        cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                          num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=32768)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    return model.eval()


def measure(model, prefix: int, tree_attention: bool, steps: int, device: str, graphs: bool = False,
            ngram: bool = False, tree: str = "paper") -> dict:
    from token_recycling import TokenRecycler
    model.set_attn_implementation("sdpa")
    rec = TokenRecycler(model, tree=tree, ngram=ngram, tree_attention=tree_attention, cuda_graphs=graphs)
    prompt = torch.randint(3, model.config.vocab_size, (1, prefix), generator=torch.Generator().manual_seed(prefix))
    prompt = prompt.to(device)
    rec.generate(prompt, max_new_tokens=2, eos_token_id=-1)  # warm-up

    events, step_seconds, sync_marks = [], [], []
    caught: list = []
    real_forward, real_done = rec._decoder._forward, rec.drafter.step_done

    def timed_forward(*args, **kwargs):
        if device != "cuda":
            t = time.perf_counter()
            out = real_forward(*args, **kwargs)
            events.append(time.perf_counter() - t)
            return out
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = real_forward(*args, **kwargs)
        stop.record()
        events.append((start, stop))
        return out

    def done(seconds, *args, **kwargs):
        step_seconds.append(seconds)
        sync_marks.append(len(caught))
        return real_done(seconds, *args, **kwargs)

    rec._decoder._forward, rec.drafter.step_done = timed_forward, done
    with warnings.catch_warnings(record=True) as caught_list:
        warnings.simplefilter("always")
        caught = caught_list
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            rec.generate(prompt, max_new_tokens=steps, eos_token_id=-1)
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    if device == "cuda":
        torch.cuda.synchronize()
        forward = [a.elapsed_time(b) / 1e3 for a, b in events]
    else:
        forward = events
    syncs = [b - a for a, b in zip(sync_marks, sync_marks[1:])]  # steps after the first (which has the prefill)
    fwd, step = statistics.median(forward), statistics.median(step_seconds)
    name = ("tree+graphs" if rec.graph.captures else "tree+uncapt") if graphs else "tree" if tree_attention else "dense"
    return {"prefix": prefix, "attention": name, "steps": len(step_seconds),
            "forward_ms": fwd * 1e3, "step_ms": step * 1e3, "other_ms": (step - fwd) * 1e3,
            "syncs_per_step": statistics.median(syncs) if syncs and device == "cuda" else None,
            "mean_accepted": rec.stats.mean_accepted}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny model and prefixes (smoke run)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --device cpu --quick for a smoke run)")
    from token_recycling import WITH_CUDA
    model = build_model(args.device, args.layers, args.quick)
    prefixes = (64, 256) if args.quick else (1024, 4096, 16384)
    if args.device == "cuda":
        print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, token_recycling WITH_CUDA={WITH_CUDA}")
    print(f"# random-weight Llama-shaped model, {args.layers} layers, {next(model.parameters()).dtype}, "
          f"paper tree (81 nodes), medians over {args.steps} steps")
    print(f"{'prefix':>7} {'attention':>11} {'forward ms':>10} {'step ms':>8} {'other ms':>8} {'other %':>7} "
          f"{'syncs':>5}")
    rows = []
    for prefix in prefixes:
        for tree_attention, graphs in ((True, False), (True, True), (False, False)):
            r = measure(model, prefix, tree_attention, args.steps, args.device, graphs)
            rows.append(r)
            syncs = "-" if r["syncs_per_step"] is None else f"{r['syncs_per_step']:.0f}"
            print(f"{prefix:>7} {r['attention']:>11} {r['forward_ms']:>10.2f} {r['step_ms']:>8.2f} "
                  f"{r['other_ms']:>8.2f} {100 * r['other_ms'] / r['step_ms']:>7.0f} {syncs:>5}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
