"""A linear layer's time with its weight in the caches and out of them: torch's product against
``skinny_linear``, for SmolLM2's output layer [49152, 576] and down projection [576, 1536], bf16.

Timed alone in a loop, a weight stays in the caches between repeats; inside a forward it mostly
does not. "cold" writes 256 MB between calls, which pushes the weight out of the caches.

    python bench/linear_cache.py [--rows 1,8,16] [--repeats 30]

Prints the median ms per call for each (layer, rows, path, hot/cold), at torch's default threads.
"""

from __future__ import annotations

import argparse
import time

import torch

from token_recycling import ops

SHAPES = {"output layer [49152, 576]": (49152, 576), "down projection [576, 1536]": (576, 1536)}


def median_ms(fn, flush: torch.Tensor | None, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if flush is not None:
            flush.add_(1)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2] * 1e3


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,8,16")
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    flush = torch.empty(256 << 20, dtype=torch.uint8)
    print(f"threads {torch.get_num_threads()}, bf16, median of {args.repeats} calls, ms")
    print("| layer | rows | torch hot | torch cold | skinny_linear hot | skinny_linear cold |")
    print("|---|---|---|---|---|---|")
    for name, (out_f, in_f) in SHAPES.items():
        weight = torch.randn(out_f, in_f, dtype=torch.bfloat16)
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, in_f, dtype=torch.bfloat16)
            plain = lambda: torch.nn.functional.linear(x, weight)  # noqa: E731
            skinny = lambda: ops.skinny_linear(x, weight)  # noqa: E731
            cells = [median_ms(fn, f, args.repeats) for fn in (plain, skinny) for f in (None, flush)]
            print(f"| {name} | {rows} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
