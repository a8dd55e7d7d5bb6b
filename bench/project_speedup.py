"""Projected speedup over greedy on a GPU: a projection, not a measurement.

    speedup = accepted tokens per step x t_greedy / (t_tree(n) + outside)

  accepted tokens per step, tokens forwarded per step n: measured on the CPU for SmolLM2-135M-Instruct
      (4-bit GGUF, dequantized) in float32 greedy per fixed tree (bench/acceptance_by_tree.py);
      acceptance does not depend on the hardware, but it is the small model's, not a 1B's or a 7B's
  t_tree(n): one verification forward of n tree tokens through our tree-attention backend, measured
      on the GPU for random-weight Llama models (Llama-3-8B-shaped by default), bf16
      (bench/gpu_decode.py, "forward" rows; linear between the measured sizes): without graphs the
      "tree" rows (dynamic cache, host prefix: the attention path hf_attention's rule picks); with
      graphs the "tree-static-dev" rows where measured (static cache, prefix on the device: what a
      CUDA-graph step runs), else "tree"
  outside: the measured time a TokenRecycler step spends outside its forward on the same GPU
      ("overhead" rows, at the same prefix, else the nearest measured), with or without graphs
  t_greedy: either the one-token forward alone ("greedy" rows: what the issue asks for, and generous
      to greedy) or the measured per-token time of model.generate(do_sample=False) ("hf_generate")

    python bench/project_speedup.py --timing gpu_decode_timing.json --acceptance acceptance.json [--md]
    # the acceptance of the run in bench/RESULTS.md: --acceptance bench/summary/acceptance_by_tree.json
"""

from __future__ import annotations

import argparse
import json


def interpolate(points: dict[int, float], n: float) -> float:
    """t(n), linear between the measured sizes. A forward of more tokens never costs less: the
    timings are made non-decreasing first (as auto_tree.measure_cost does), so timing noise cannot
    make the last segment fall and the extrapolation past it go below the largest size's time."""
    xs = sorted(points)
    points = dict(zip(xs, (max(points[x] for x in xs[: i + 1]) for i in range(len(xs)))))
    if n <= xs[0]:
        return points[xs[0]]
    for a, b in zip(xs, xs[1:]):
        if n <= b:
            return points[a] + (points[b] - points[a]) * (n - a) / (b - a)
    a, b = xs[-2], xs[-1]  # past the largest size: extend the last segment
    return points[b] + (points[b] - points[a]) * (n - b) / (b - a)


def load_acceptance(path: str) -> list[dict]:
    """Rows {name, forwarded, accepted} from acceptance_by_tree.py's JSON (overall figures)."""
    data = json.load(open(path))
    rows = []
    for name, cfg in data["configs"].items():
        overall = cfg["overall"]
        rows.append({"name": name, "forwarded": overall["forwarded_per_step"],
                     "accepted": overall["accepted_per_step"]})
    return rows


def project(timing: dict, acceptance: list[dict]) -> list[dict]:
    rows = [r for r in timing["rows"] if "error" not in r]
    out = []
    shapes = sorted({r["shape"] for r in rows if r["part"] == "forward"})
    for shape in shapes:
        fwd = [r for r in rows if r["part"] == "forward" and r["shape"] == shape]
        over = [r for r in rows if r["part"] == "overhead" and r["shape"] == shape]
        for prefix in sorted({r["prefix"] for r in fwd}):
            at = [r for r in fwd if r["prefix"] == prefix]
            # (a median difference: noise can make it < 0); the overhead rows nearest this prefix
            nearest = min((abs(r.get("prefix", prefix) - prefix) for r in over), default=None)
            outside = {r["attention"]: max(r["other_ms"], 0.0) for r in over
                       if abs(r.get("prefix", prefix) - prefix) == nearest}
            greedy = next(r["ms"] for r in at if r["path"] == "greedy")
            hf = next((r["ms"] for r in at if r["path"] == "hf_generate"), None)
            for mode, key, paths in (("graphs", "tree+graphs", ("tree-static-dev", "tree")),
                                     ("no graphs", "tree", ("tree",))):
                if key not in outside:
                    continue
                path = next((p for p in paths if any(r["path"] == p for r in at)), None)
                if path is None:
                    continue
                tree = {r["n"]: r["ms"] for r in at if r["path"] == path}
                if len(tree) < 2:
                    continue
                for a in acceptance:
                    step = interpolate(tree, a["forwarded"]) + outside[key]
                    out.append({"shape": shape, "prefix": prefix, "mode": mode, "forward": path, "config": a["name"],
                                "forwarded": a["forwarded"], "accepted": a["accepted"], "step_ms": step,
                                "outside_ms": outside[key], "vs_forward": a["accepted"] * greedy / step,
                                "vs_hf_generate": a["accepted"] * hf / step if hf else None})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timing", required=True)
    parser.add_argument("--acceptance", required=True)
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = project(json.load(open(args.timing)), load_acceptance(args.acceptance))
    print("| shape | prefix | step | config | tokens forwarded | accepted/step | step ms | x greedy forward "
          "| x HF generate |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        hf = "-" if r["vs_hf_generate"] is None else f"{r['vs_hf_generate']:.2f}"
        print(f"| {r['shape']} | {r['prefix']} | {r['mode']} | {r['config']} | {r['forwarded']:.1f} | "
              f"{r['accepted']:.2f} | {r['step_ms']:.2f} | {r['vs_forward']:.2f} | {hf} |")
    if args.json:
        json.dump(rows, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
