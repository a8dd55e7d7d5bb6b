"""Host cost of the suffix memory (memory.SuffixMemory): inserting a request and looking up a
continuation, at a given fill, on synthetic token streams that repeat phrases as answers do; and the
drafter's whole candidate step (context n-gram lookup + memory lookup) per decode step.

    python bench/suffix_memory_timing.py [--capacity 262144] [--fill 1.0] [--vocab 49152]

Prints microseconds per inserted token (a 128-token output with its prompt), per lookup (the
context's last 32 tokens, 10-token continuation), per Drafter._candidates call, and bytes per token.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def request(rng, phrases, vocab, prompt: int, output: int) -> np.ndarray:
    """A prompt and output made of stored phrases and fresh tokens."""
    parts, n = [], 0
    while n < prompt + output:
        part = phrases[rng.integers(len(phrases))] if rng.random() < 0.5 else rng.integers(0, vocab, 16)
        parts.append(part)
        n += len(part)
    return np.concatenate(parts)[: prompt + output]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--capacity", type=int, default=262144)
    ap.add_argument("--fill", type=float, default=1.0, help="fraction of the capacity filled before timing")
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--output", type=int, default=128)
    args = ap.parse_args()
    from token_recycling.draft import Drafter
    from token_recycling.memory import MAX_MATCH, SuffixMemory

    rng = np.random.default_rng(0)
    phrases = [rng.integers(0, args.vocab, int(rng.integers(8, 40))) for _ in range(2000)]
    mem = SuffixMemory(args.capacity)
    while len(mem) < args.fill * args.capacity * 0.74:  # below the eviction threshold, so inserts do not rebuild
        mem.add(request(rng, phrases, args.vocab, args.prompt, args.output))

    reqs = [request(rng, phrases, args.vocab, args.prompt, args.output) for _ in range(200)]
    start = time.perf_counter()
    for r in reqs:
        mem.add(r)
    insert = (time.perf_counter() - start) / sum(len(r) for r in reqs)

    contexts = [request(rng, phrases, args.vocab, 0, 64)[-MAX_MATCH:] for _ in range(2000)]
    hits = 0
    start = time.perf_counter()
    for c in contexts:
        hits += mem.lookup(c, 10) is not None
    lookup = (time.perf_counter() - start) / len(contexts)

    evict = SuffixMemory(args.capacity)
    evict.load_state_tensors(mem.state_tensors())
    while len(evict) + len(reqs[0]) <= args.capacity:
        evict.add(reqs[0])
    start = time.perf_counter()
    evict.add(reqs[1])  # over the cap: an eviction and a rebuild
    rebuild = time.perf_counter() - start

    drafter = Drafter(args.vocab, torch.device("cpu"), ngram_history=args.capacity)
    drafter.memory = mem
    seq = torch.from_numpy(request(rng, phrases, args.vocab, 256, 0)).view(1, -1)
    state = drafter.start(seq, 1024)
    with_memory = _time(lambda: drafter._candidates(state))
    drafter.memory = SuffixMemory(0)
    without = _time(lambda: drafter._candidates(state))

    print(f"suffix memory: {len(mem)} tokens (capacity {args.capacity}), {mem.bytes_per_token:.1f} bytes/token")
    print(f"insert: {insert * 1e6:.2f} us/token ({insert * 1e6 * (args.prompt + args.output):.0f} us per "
          f"{args.prompt}+{args.output}-token request)")
    print(f"lookup: {lookup * 1e6:.1f} us ({100 * hits / len(contexts):.0f}% found a continuation)")
    print(f"eviction + rebuild at the cap: {rebuild * 1e3:.1f} ms (once per {args.capacity // 4} tokens inserted)")
    print(f"Drafter._candidates per step: {with_memory * 1e6:.1f} us with the memory, {without * 1e6:.1f} us without")


def _time(fn, n: int = 2000) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


if __name__ == "__main__":
    main()
