"""Tree attention (token_recycling) vs what transformers' sdpa backend runs for the same verification
step: repeat_kv + torch SDPA with an additive float mask [1, 1, N, P + N].

Llama-7B shapes: B=1, 32 query heads, 8 or 32 kv heads, head_dim 128, the paper's 81-node tree,
prefix 512..32k, bf16. Timed with CUDA events (median of --reps calls after warm-up); the outputs
are compared too. --device cpu --quick runs a tiny smoke version on a machine without a GPU.

    python bench/attention_vs_sdpa.py [--quick] [--device cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from token_recycling import make_tree, ops


def median_seconds(fn, reps: int, device: str) -> float:
    fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def compare(hq: int, hkv: int, d: int, prefix: int, tree_mask: torch.Tensor, dtype: torch.dtype, device: str,
            reps: int) -> dict:
    n = tree_mask.shape[0]
    gen = torch.Generator(device=device).manual_seed(prefix + hkv)
    q = torch.randn(1, n, hq, d, generator=gen, device=device, dtype=dtype).transpose(1, 2)  # as a model makes it
    k = torch.randn(1, hkv, prefix + n, d, generator=gen, device=device, dtype=dtype)
    v = torch.randn(1, hkv, prefix + n, d, generator=gen, device=device, dtype=dtype)
    scale = d ** -0.5
    mask = tree_mask.to(device)
    prefix_len = torch.tensor([prefix])  # on the CPU, as the transformers backend passes it
    additive = torch.zeros(1, 1, n, prefix + n, device=device, dtype=dtype)
    additive[..., prefix:].masked_fill_(~mask, torch.finfo(dtype).min)

    def ours():
        return ops.tree_attention(q, k, v, prefix_len, mask, scale)

    def sdpa():  # transformers' sdpa_attention_forward with a mask: repeat_kv, then SDPA
        kr = k.repeat_interleave(hq // hkv, dim=1)
        vr = v.repeat_interleave(hq // hkv, dim=1)
        return F.scaled_dot_product_attention(q, kr, vr, attn_mask=additive, scale=scale)

    diff = (ours().float() - sdpa().float()).abs().max().item()
    t_ours, t_sdpa = median_seconds(ours, reps, device), median_seconds(sdpa, reps, device)
    flops = 4.0 * hq * n * (prefix + n) * d
    return {"hq": hq, "hkv": hkv, "d": d, "n": n, "prefix": prefix, "dtype": str(dtype).removeprefix("torch."),
            "ours_ms": t_ours * 1e3, "sdpa_ms": t_sdpa * 1e3, "speedup": t_sdpa / t_ours,
            "ours_tflops": flops / t_ours / 1e12, "max_abs_diff": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repetitions")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --device cpu --quick for a smoke run)")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    if args.quick:
        tree, shapes, reps = make_tree("paper-16").mask, [(4, 2, 64, p) for p in (64, 256)], 3
    else:
        tree, reps = make_tree("paper").mask, 20
        shapes = [(32, hkv, 128, p) for hkv in (8, 32) for p in (512, 2048, 8192, 32768)]
    if args.device == "cuda":
        print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'Hq':>3} {'Hkv':>4} {'D':>4} {'N':>4} {'prefix':>7} {'ours ms':>9} {'sdpa ms':>9} {'speedup':>8} "
          f"{'TFLOP/s':>8} {'max|diff|':>10}")
    rows = []
    for hq, hkv, d, prefix in shapes:
        r = compare(hq, hkv, d, prefix, tree, dtype, args.device, reps)
        rows.append(r)
        print(f"{hq:>3} {hkv:>4} {d:>4} {r['n']:>4} {prefix:>7} {r['ours_ms']:>9.3f} {r['sdpa_ms']:>9.3f} "
              f"{r['speedup']:>8.2f} {r['ours_tflops']:>8.2f} {r['max_abs_diff']:>10.2e}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
