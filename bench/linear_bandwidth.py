"""How fast each few-row product reads its weights: ``skinny_linear`` against oneDNN's product of the
packed weight (what routing compares, skinny.py), for SmolLM2-135M's bf16 layer shapes, at 1 and 2
threads, beside the bandwidth of a plain sum (the limit for a product that reads each weight once).

Each shape is timed as the routing calibration times it: every layer of that shape in turn (random
weights, as many layers as the model has, so they do not stay in the caches between repeats), best
of ``--repeats``, through ``skinny._time_both``.

    python bench/linear_bandwidth.py [--rows 1,4,8] [--threads 1,2] [--repeats 5]

Prints one line per (threads, shape, rows): milliseconds for all layers of the shape and GB/s.
"""

from __future__ import annotations

import argparse
import time

import torch

from token_recycling import skinny

# SmolLM2-135M: (out, in) -> layers of that shape (q/o, k/v, gate/up, down, the output layer)
SHAPES = {(576, 576): 60, (192, 576): 60, (1536, 576): 60, (576, 1536): 30, (49152, 576): 1}


def sum_bandwidth(repeats: int, mib: int = 256) -> float:
    big = torch.randn(mib * 2**19, dtype=torch.bfloat16)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        big.sum()
        best = min(best, time.perf_counter() - start)
    return big.numel() * 2 / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,4,8")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="two small shapes, one repeat (a smoke test)")
    args = parser.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    shapes = {(64, 64): 4, (128, 64): 2} if args.quick else SHAPES
    repeats = 1 if args.quick else args.repeats
    torch.manual_seed(0)
    pack = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        print(f"threads {threads}: a plain sum reads {sum_bandwidth(repeats, 16 if args.quick else 256):.1f} GB/s")
        for (out, inp), layers in shapes.items():
            weights = [torch.randn(out, inp, dtype=torch.bfloat16) for _ in range(layers)]
            packed = [skinny.packed_weight(w) for w in weights] if pack else None
            gb = sum(w.numel() * 2 for w in weights) / 1e9
            for n in rows:
                ours, theirs = skinny._time_both(weights, n, repeats, packed)
                other = "oneDNN packed" if pack else "torch"
                print(f"  [{out}, {inp}] x{layers}, {n} rows: skinny_linear {1000 * ours:.2f} ms "
                      f"({gb / ours:.1f} GB/s), {other} {1000 * theirs:.2f} ms ({gb / theirs:.1f} GB/s)")


if __name__ == "__main__":
    main()
