"""Per-call time of the hybrid-draft host ops on a 2k-token context (B=1): they must cost
microseconds, not milliseconds, next to a model forward.

    PYTHONPATH=python python bench/ngram_ops.py [--context 2048] [--max-ngram 4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from token_recycling import ops
from token_recycling.ngram import NgramIndex, new_ngram_table
from token_recycling.tree import make_tree


def per_call_us(fn, reps: int) -> float:
    """Median over 5 rounds of the mean time of `reps` calls, in microseconds."""
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        rounds.append((time.perf_counter() - start) / reps * 1e6)
    return statistics.median(rounds)


def context(length: int, seed: int = 0) -> torch.Tensor:
    """Code-like text: random tokens with copied spans, so lookups find long matches."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.randint(0, 32000, (length,), generator=gen)
    for _ in range(length // 40):
        src, dst, n = torch.randint(0, length - 32, (3,), generator=gen).tolist()
        n = 8 + n % 24
        if src + n < dst:
            out[dst : dst + n] = out[src : src + n]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--max-ngram", type=int, default=4)
    parser.add_argument("--reps", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    n, g = args.context, args.max_ngram
    appends = 200  # calls per round of the append timing, 3 tokens each
    capacity = n + 3 * appends * 5 + 8
    history = context(capacity).view(1, -1)

    table = new_ngram_table(1, capacity, g)
    start = time.perf_counter()
    ops.ngram_index_append(table, history, torch.tensor([0]), torch.tensor([n]))
    print(f"index the {n}-token prompt (max_ngram={g}): {(time.perf_counter() - start) * 1e6:9.1f} us once")

    length = torch.tensor([n])
    lookup_us = per_call_us(lambda: ops.ngram_lookup(table, history, length, g, 8), args.reps)
    print(f"ngram_lookup (max_tokens=8):                {lookup_us:9.1f} us/call")

    # Append 3 tokens per call (a typical accepted path), growing the same index as decoding does.
    ends = iter(range(n, capacity, 3))

    def append3():
        end = next(ends)
        ops.ngram_index_append(table, history, torch.tensor([end]), torch.tensor([end + 3]))

    print(f"ngram_index_append (+3 tokens):             {per_call_us(append3, appends):9.1f} us/call"
          f"  ({table.numel() * 8 / 1e6:.1f} MB table, tensor creation included)")

    # The index outgrows the 2k context here (cost per call does not depend on its length).
    index = NgramIndex(1, n + 4 * args.reps * 5 + 8, g)
    index.extend(history[:, :n])
    step = history[:, n : n + 4]
    print(f"NgramIndex.extend(4) + .lookup(8):          "
          f"{per_call_us(lambda: (index.extend(step), index.lookup(8)), args.reps):9.1f} us/call")

    tree = make_tree("paper")
    matrix = torch.randint(0, 32000, (32000, 8), dtype=torch.int32)
    tokens = ops.build_draft_tree(matrix, torch.tensor([5]), tree.parents, tree.ranks)
    chain, chain_len = torch.randint(0, 32000, (1, 8)), torch.tensor([8])
    print(f"graft_chain (paper tree, N={tree.num_nodes}, C=8):       "
          f"{per_call_us(lambda: ops.graft_chain(tokens, tree.parents, chain, chain_len), args.reps):9.1f} us/call")


if __name__ == "__main__":
    main()
