"""Tree attention (token_recycling) vs what transformers' sdpa backend runs for the same verification
step, and an unmasked FlashAttention-class reference for the same bytes.

  ours   ops.tree_attention (one kernel: prefix + tree block)
  two    two-part tree attention (hf_attention.two_part_attention): the prefix through torch's flash
         SDPA with its LSE (GQA folded into query rows), the tree block through ops.tree_attention_lse,
         merged by ops.merge_attention_states
  hf     transformers' sdpa_attention_forward with an additive mask [1, 1, N, P + N]: repeat_kv (a
         copy of K/V for GQA; none for MHA, as repeat_kv returns its input when n_rep == 1), then
         torch SDPA (the memory-efficient kernel, the one that takes a mask)
  flash  torch SDPA over the prefix only, no mask, GQA folded into query rows q [1, Hkv, G*N, D]:
         what a FlashAttention-class kernel costs for the prefix part; a floor, not a full answer

Llama-3-8B / Llama-2-7B attention shapes: B=1, 32 query heads, 8 (GQA) or 32 (MHA) kv heads, head_dim
128, trees of 16, 64, 81 and 128 nodes (best-first cuts of the paper's tree, the paper's, and a
best-first tree of 128 over the auto-tree candidates), prefix 1k..32k, bf16. Timed with CUDA events:
median of --reps calls after warm-up, the L2 cache flushed (a 256 MB write) before every timed call,
so K/V come from HBM. Per row: ms, the % of the GPU's HBM peak the bytes that must move (q, K, V, out)
reach, TFLOP/s, each path's time over the floor's, and the path hf_attention's rule picks now
("rule"). The outputs are compared too. Rows go to --json as each one is measured (a run cut short
keeps what it measured).

--rule-json PATH writes the attention path table hf_attention reads (hf_attention.path_table): per
GQA group and tree size, the smallest measured prefix from which two-part beat the single kernel at
every longer prefix measured (null: never). Copy it to python/token_recycling/attention_paths.json,
or point TOKEN_RECYCLING_ATTENTION_TABLE at it, to route by it.

--device cpu --quick runs a tiny smoke version on a machine without a GPU.

    python bench/attention_vs_sdpa.py [--quick] [--device cuda] [--json out.json] [--rule-json paths.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from token_recycling import hf_attention, make_tree, ops
from token_recycling.auto_tree import candidate_paths
from token_recycling.tree import best_subtree, prior_score

TREE_SIZES = (16, 64, 81, 128)
PREFIXES = (1024, 2048, 4096, 8192, 16384, 32768)


def hbm_peak_bytes_per_s() -> float | None:
    """The GPU's HBM peak from its memory clock and bus width (double data rate), else None."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2.0 * clock_khz * 1e3 * bus_bits / 8
    known = {"H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12, "H200": 4.8e12, "A100-SXM4-80GB": 2.04e12}
    name = torch.cuda.get_device_name()
    return next((v for k, v in known.items() if k in name), None)


_L2_FLUSH: list[torch.Tensor] = []


def flush_l2(device: str) -> None:
    if device != "cuda":
        return
    if not _L2_FLUSH:
        _L2_FLUSH.append(torch.empty(256 * 2**20, dtype=torch.uint8, device=device))
    _L2_FLUSH[0].zero_()


def median_seconds(fn, reps: int, device: str) -> float:
    fn()
    times = []
    for _ in range(reps):
        flush_l2(device)
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


def tree_mask(n: int) -> torch.Tensor:
    """The [n, n] ancestor mask of an n-node tree (root included): the paper's tree cut best-first
    (n <= 81; 81 is the paper's), else a best-first tree over the auto-tree candidates."""
    if n <= 81:
        return make_tree("paper" if n == 81 else f"paper-{n - 1}").mask
    cands = candidate_paths()
    return make_tree(best_subtree(cands, [prior_score(p) for p in cands], n - 1)).mask


def rule_table(rows: list[dict], device_type: str, device: str) -> dict:
    """hf_attention's path table from measured rows: per (GQA group, tree size), the smallest
    measured prefix from which two-part is faster than the single kernel at it and at every longer
    prefix measured; None when the longest prefix does not favour it (or two-part failed)."""
    rules = []
    for group, n in sorted({(r["hq"] // r["hkv"], r["n"]) for r in rows}):
        at = sorted((r for r in rows if r["hq"] // r["hkv"] == group and r["n"] == n), key=lambda r: r["prefix"])
        start = None
        for r in reversed(at):
            if r["two_ms"] == r["two_ms"] and r["two_ms"] < r["ours_ms"]:  # (NaN: two-part failed)
                start = r["prefix"]
            else:
                break
        rules.append({"group": group, "max_nodes": n, "two_part_min_prefix": start})
    dtypes = sorted({r["dtype"] for r in rows})
    return {"device_type": device_type, "device": device, "dtype": ",".join(dtypes), "torch": torch.__version__,
            "source": "bench/attention_vs_sdpa.py", "rules": rules}


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

    def hf():  # transformers' sdpa_attention_forward with a mask: repeat_kv (none for MHA), then SDPA
        kr, vr = (k, v) if hq == hkv else (k.repeat_interleave(hq // hkv, dim=1), v.repeat_interleave(hq // hkv, dim=1))
        return F.scaled_dot_product_attention(q, kr, vr, attn_mask=additive, scale=scale)

    group = hq // hkv
    q_folded = q.reshape(1, hkv, group * n, d)  # query rows of one kv head together: no K/V copy
    k_prefix, v_prefix = k[:, :, :prefix], v[:, :, :prefix]

    def flash():  # the prefix part alone, no mask: the FlashAttention-class floor
        return F.scaled_dot_product_attention(q_folded, k_prefix, v_prefix, scale=scale)

    def two():
        return hf_attention.two_part_attention(q, k, v, prefix, mask, scale)

    diff = (ours().float() - hf().float()).abs().max().item()
    try:  # the two-part path has not run on a GPU yet: report its failure, keep the other columns
        diff_two = (two().float() - hf().float()).abs().max().item()
        two_error = None
    except Exception as e:  # noqa: BLE001
        diff_two, two_error = float("nan"), f"{type(e).__name__}: {e}"
        print(f"# two-part failed at prefix {prefix}, Hkv {hkv}: {two_error}", flush=True)
    t_ours, t_hf, t_flash = (median_seconds(f, reps, device) for f in (ours, hf, flash))
    t_two = median_seconds(two, reps, device) if two_error is None else float("nan")
    flops = 4.0 * hq * n * (prefix + n) * d
    moved = (2 * hkv * (prefix + n) + 2 * hq * n) * d * q.element_size()  # K, V read; q read, out written
    peak = hbm_peak_bytes_per_s() if device == "cuda" else None
    row = {"hq": hq, "hkv": hkv, "d": d, "n": n, "prefix": prefix, "dtype": str(dtype).removeprefix("torch."),
           "max_abs_diff": diff, "max_abs_diff_two": diff_two, "two_error": two_error, "bytes": moved}
    for name, t in (("ours", t_ours), ("two", t_two), ("hf", t_hf), ("flash", t_flash)):
        row[f"{name}_ms"] = t * 1e3
        row[f"{name}_tflops"] = flops / t / 1e12
        row[f"{name}_hbm_pct"] = 100.0 * moved / t / peak if peak else None
    row["speedup_vs_hf"] = t_hf / t_ours
    for name, t in (("ours", t_ours), ("two", t_two), ("hf", t_hf)):
        row[f"{name}_vs_flash"] = t / t_flash
    row["rule"] = hf_attention.path_rule(prefix, hq, hkv, n, q.device.type, dtype)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repetitions")
    parser.add_argument("--reps", type=int, default=None, help="timed calls per path (default 20; --quick 3)")
    parser.add_argument("--prefixes", help="comma-separated prefix lengths (default 1k..32k)")
    parser.add_argument("--trees", help="comma-separated tree sizes in nodes (default 16,64,81,128)")
    parser.add_argument("--json", help="also write the rows here (rewritten after each row)")
    parser.add_argument("--rule-json", help="write the attention path table (hf_attention.path_table) here")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --device cpu --quick for a smoke run)")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    if args.quick:
        sizes, shapes, reps = [16], [(4, hkv, 64, p) for hkv in (2, 4) for p in (64, 256)], 3
    else:
        sizes, reps = list(TREE_SIZES), 20
        shapes = [(32, hkv, 128, p) for hkv in (8, 32) for p in PREFIXES]
    if args.prefixes:
        wanted = [int(p) for p in args.prefixes.split(",")]
        shapes = [(hq, hkv, d, p) for hq, hkv, d in dict.fromkeys(s[:3] for s in shapes) for p in wanted]
    if args.trees:
        sizes = [int(n) for n in args.trees.split(",")]
    reps = args.reps or reps
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    if args.device == "cuda":
        print(f"# {device_name}, torch {torch.__version__}")
        peak = hbm_peak_bytes_per_s()
        print(f"# HBM peak {peak / 1e12:.2f} TB/s" if peak else "# HBM peak unknown: no % column")
    print("# L2 flushed before every timed call; % of HBM peak = (q + K + V + out bytes) / time / peak; "
          "x flash = time / the unmasked floor's; rule = the path hf_attention picks now")
    cols = "".join(f" {name + ' ms':>10} {'%HBM':>5} {'TFLOP/s':>7}" for name in ("ours", "two", "hf", "flash"))
    print(f"{'Hq':>3} {'Hkv':>4} {'D':>4} {'N':>4} {'prefix':>7}{cols} {'ours/fl':>7} {'two/fl':>6} {'ours/hf':>7} "
          f"{'rule':>8} {'max|diff|':>10}", flush=True)
    rows = []
    for hq, hkv, d, prefix in shapes:  # prefix-major within a head layout: the long, costly rows come last
        for n in sizes:
            r = compare(hq, hkv, d, prefix, tree_mask(n), dtype, args.device, reps)
            rows.append(r)
            cells = "".join(f" {r[name + '_ms']:>10.3f} {_pct(r[name + '_hbm_pct']):>5} {r[name + '_tflops']:>7.2f}"
                            for name in ("ours", "two", "hf", "flash"))
            print(f"{hq:>3} {hkv:>4} {d:>4} {r['n']:>4} {prefix:>7}{cells} {r['ours_vs_flash']:>7.2f} "
                  f"{r['two_vs_flash']:>6.2f} {r['speedup_vs_hf']:>7.2f} {r['rule']:>8} "
                  f"{max(r['max_abs_diff'], r['max_abs_diff_two']):>10.2e}", flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(rows, f, indent=1)
            if args.rule_json:
                with open(args.rule_json, "w") as f:
                    json.dump(rule_table(rows, args.device, device_name), f, indent=1)
    if any(r["two_error"] for r in rows):
        raise SystemExit("two-part attention failed on some rows (see above)")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


if __name__ == "__main__":
    main()
