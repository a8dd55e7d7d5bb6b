"""The decode loop end to end on a GPU: lossless checks, the cost of a verification
forward per tree size for 1B- and 7B-shaped models, and the time a step spends outside the forward.

  lossless   tiny random-weight Llama / Qwen2 / Gemma (head_dim 64, GQA), float32 on the GPU:
             TokenRecycler output == the same GPU model's model.generate(do_sample=False), for
             rec.generate (dynamic cache) and custom_generate (dynamic and static cache), with and
             without the tree-attention backend, and the CUDA-graph step (static cache); then bf16:
             outputs that differ from bf16 greedy, each with the top-2 logit gap of greedy's own
             logits at the first differing token (a near tie is a small gap)
  forward    random-weight Llama shaped like Llama-3-8B (all 32 layers, GQA 32/8; "llama-8b", the
             default) or Llama-3.2-1B ("llama-1b"; "llama-2-7b" is the multi-head Llama-2-7B), bf16,
             prefix 1k / 4k / 16k: one forward of n = 1, 2, 4, ..., 128 tree tokens (a best-first
             tree of n nodes over the cache), through our tree-attention backend with the dynamic
             cache and a host prefix ("tree": the path hf_attention's rule picks, in "attention"),
             with a static cache and a host prefix ("tree-static"), with a static cache and the
             prefix on the device ("tree-static-dev": what a CUDA-graph step runs, the single kernel),
             through sdpa with a dense additive mask ("dense"); and the plain one-token decode
             forward HF greedy runs ("greedy"). CUDA events, median of --reps, cache cut back after
             each call
  overhead   whole TokenRecycler steps (paper tree, 81 tokens, plus the n-gram chain) on the same
             models at each prefix: step wall time minus its forward (CUDA events) = the time outside
             the forward (drafting, verification, recycling, compaction, emitting, launches, the
             step's one sync), with and without CUDA graphs

Random weights give random text, so the forward and overhead rows measure cost, not acceptance.
The speedup projection combines these costs with acceptance measured on the CPU for the real model
(bench/acceptance_by_tree.py); bench/project_speedup.py does that arithmetic.

    python bench/gpu_decode.py --json out.json [--parts lossless,forward,overhead] [--reps 10]
        [--shapes llama-8b] [--prefixes 1024,4096,16384]
The JSON is rewritten after each prefix's rows, so a run cut short keeps what it measured.
    python bench/gpu_decode.py --device cpu --quick     # a tiny smoke run without a GPU
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch

from token_recycling import TokenRecycler, hf_attention, hf_model, make_tree, ops
from token_recycling import cache as kv
from token_recycling.auto_tree import candidate_paths
from token_recycling.tree import best_subtree, prior_score

SIZES = (1, 2, 4, 8, 16, 32, 64, 128)
SHAPES = {
    # name: (hidden, intermediate, layers, heads, kv heads, vocab, tie embeddings)
    "llama-8b": (4096, 14336, 32, 32, 8, 128256, False),  # Llama-3-8B / 3.1-8B (GQA)
    "llama-1b": (2048, 8192, 16, 32, 8, 128256, True),  # Llama-3.2-1B
    "llama-2-7b": (4096, 11008, 32, 32, 32, 32000, False),  # Llama-2-7B (multi-head)
}
PREFIXES = (1024, 4096, 16384)
MAX_POSITIONS = 32768 + 256


def log(*args) -> None:
    print(*args, flush=True)


# ------------------------------------------------------------------------------------------ lossless
def tiny(arch: str, dtype: torch.dtype, device: str):
    import transformers as tf
    cfg_cls, model_cls, extra = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
        "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, {"head_dim": 64}),
    }[arch]
    torch.manual_seed(0)
    cfg = cfg_cls(vocab_size=320, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  intermediate_size=256, max_position_embeddings=1024, **extra)
    cfg.bos_token_id, cfg.eos_token_id = 1, 2
    model = model_cls._from_config(cfg, attn_implementation="sdpa", dtype=torch.float32).eval()
    with torch.no_grad():  # sharper logits: greedy text repeats, so drafts get accepted
        model.get_output_embeddings().weight.mul_(8.0)
    return model.to(device=device, dtype=dtype)


CASES = (
    # name, recycler kwargs, call ("rec" = rec.generate, "hf" = custom_generate), cache
    ("dense/rec/dynamic", dict(tree_attention=False), "rec", None),
    ("dense/hf/dynamic", dict(tree_attention=False), "hf", None),
    ("dense/hf/static", dict(tree_attention=False), "hf", "static"),
    ("tree/rec/dynamic", dict(tree_attention=True), "rec", None),
    ("tree/hf/dynamic", dict(tree_attention=True), "hf", None),
    ("tree/hf/static", dict(tree_attention=True), "hf", "static"),
    ("graphs/rec", dict(cuda_graphs=True), "rec", None),
    ("graphs/hf/static", dict(cuda_graphs=True), "hf", "static"),
)


def run_case(model, kwargs: dict, call: str, cache, ids, new: int, tree: str):
    rec = TokenRecycler(model, tree=tree, **kwargs)
    if call == "rec":
        out = rec.generate(ids, max_new_tokens=new)
    else:
        extra = {"cache_implementation": cache} if cache else {}
        out = model.generate(ids, max_new_tokens=new, do_sample=False, custom_generate=rec, **extra)
    return out, rec


def lossless(device: str, quick: bool) -> list[dict]:
    rows = []
    archs = ("llama",) if quick else ("llama", "qwen2", "gemma")
    new = 24 if quick else 64
    for arch in archs:
        reference = tiny(arch, torch.float32, device)
        prompts = [torch.randint(3, 320, (1, L), generator=torch.Generator().manual_seed(L)).to(device)
                   for L in (9, 200)]
        wants = [reference.generate(p, max_new_tokens=new, do_sample=False) for p in prompts]
        for name, kwargs, call, cache in CASES:
            if quick and name.startswith("graphs/hf"):
                continue
            model = copy.deepcopy(reference)  # the backends switch attn_implementation in place
            row = {"part": "lossless", "arch": arch, "dtype": "float32", "case": name}
            try:
                equal, mat, captures = [], [], 0
                for p, want in zip(prompts, wants):
                    got, rec = run_case(model, kwargs, call, cache, p, new, "paper-16")
                    equal.append(bool(torch.equal(got.cpu(), want.cpu())))
                    mat.append(rec.stats.mean_accepted)
                    if rec.graph is not None:
                        captures += rec.graph.captures
                        row["uncaptured_reason"] = rec.graph.uncaptured_reason
                row.update(equal=all(equal), mean_accepted=statistics.mean(mat),
                           captures=captures if "graphs" in name else None)
            except Exception as e:  # noqa: BLE001 - a failing case is a result, the others still run
                row.update(equal=False, error=f"{type(e).__name__}: {e}"[:400])
            rows.append(row)
            log(f"lossless {arch:6} {name:18} equal={row['equal']} MAT={row.get('mean_accepted', 0):.2f}"
                + (f" captures={row['captures']}" if row.get("captures") is not None else "")
                + (f" ERROR {row['error']}" if "error" in row else ""))
            del model
        rows.append(batch_case(reference, arch, new, device))
        rows.append(sampling_case(reference, arch, device))
    if device == "cuda":
        rows += bf16_divergences(archs, new)
    return rows


def batch_case(reference, arch: str, new: int, device: str) -> dict:
    """B = 3, left-padded prompts of lengths 5 / 17 / 40: every row == HF batched greedy."""
    lengths, pad = (5, 17, 40), 0
    ids = torch.full((3, max(lengths)), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, L in enumerate(lengths):
        ids[b, -L:] = torch.randint(3, 320, (L,), generator=torch.Generator().manual_seed(7 + b))
        mask[b, -L:] = 1
    ids, mask = ids.to(device), mask.to(device)
    reference.generation_config.pad_token_id = pad
    want = reference.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
    row = {"part": "lossless", "arch": arch, "dtype": "float32", "case": "batch3/tree"}
    try:
        model = copy.deepcopy(reference)
        rec = TokenRecycler(model, tree="paper-16", tree_attention=device == "cuda")
        got = rec.generate(ids, attention_mask=mask, max_new_tokens=new)
        row.update(equal=bool(torch.equal(got.cpu(), want.cpu())), mean_accepted=rec.stats.mean_accepted)
    except Exception as e:  # noqa: BLE001
        row.update(equal=False, error=f"{type(e).__name__}: {e}"[:400])
    log(f"lossless {arch:6} {'batch3/tree':18} equal={row['equal']} MAT={row.get('mean_accepted', 0):.2f}"
        + (f" ERROR {row['error']}" if "error" in row else ""))
    return row


def sampling_case(reference, arch: str, device: str) -> dict:
    """Sampling runs on the GPU (verify_sample's CUDA kernel), seeded: the same seed gives the same
    text twice. Its distribution is tested against HF's on the CPU (tests/test_sampling.py)."""
    row = {"part": "lossless", "arch": arch, "dtype": "float32", "case": "sample/reproducible"}
    try:
        model = copy.deepcopy(reference)
        rec = TokenRecycler(model, tree="paper-16", tree_attention=device == "cuda")
        p = torch.randint(3, 320, (1, 9), generator=torch.Generator().manual_seed(5)).to(device)
        outs = []
        for _ in range(2):
            torch.manual_seed(1234)
            outs.append(rec.generate(p, max_new_tokens=32, do_sample=True, temperature=0.8).cpu())
        row.update(equal=bool(torch.equal(outs[0], outs[1])), mean_accepted=rec.stats.mean_accepted)
    except Exception as e:  # noqa: BLE001
        row.update(equal=False, error=f"{type(e).__name__}: {e}"[:400])
    log(f"lossless {arch:6} {'sample/reproducible':18} equal={row['equal']}"
        + (f" ERROR {row['error']}" if "error" in row else ""))
    return row


def top2_gap(model, ctx) -> float:
    with torch.no_grad():
        top2 = model(ctx).logits[0, -1].float().topk(2).values
    return (top2[0] - top2[1]).item()


def bf16_divergences(archs, new: int) -> list[dict]:
    """bf16: a multi-token forward may round a near-tied top-2 differently from a one-token one."""
    rows = []
    for arch in archs:
        reference = tiny(arch, torch.bfloat16, "cuda")
        for tree_attention in (False, True):
            model = copy.deepcopy(reference)
            rec = TokenRecycler(model, tree="paper-16", tree_attention=tree_attention)
            differ, gaps, n = 0, [], 8
            for seed in range(n):
                p = torch.randint(3, 320, (1, 12), generator=torch.Generator().manual_seed(100 + seed)).cuda()
                want = reference.generate(p, max_new_tokens=new, do_sample=False)
                got = rec.generate(p, max_new_tokens=new)
                if not torch.equal(got, want):
                    differ += 1
                    k = int((got[0, :want.shape[1]] != want[0, :got.shape[1]]).nonzero()[0])
                    gaps.append(round(top2_gap(reference, want[:, :k]), 4))
            row = {"part": "bf16", "arch": arch, "tree_attention": tree_attention, "prompts": n, "differ": differ,
                   "top2_gaps_at_divergence": gaps}
            rows.append(row)
            log(f"bf16     {arch:6} tree_attention={tree_attention!s:5} {differ}/{n} differ, top-2 gaps {gaps}")
    return rows


# ------------------------------------------------------------------------------------- forward cost
def build(shape: str, device: str, quick: bool):
    from transformers import LlamaConfig, LlamaForCausalLM
    if quick:
        hidden, inter, layers, heads, kv, vocab, tie = 128, 256, 2, 2, 1, 320, False
    else:
        hidden, inter, layers, heads, kv, vocab, tie = SHAPES[shape]
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=MAX_POSITIONS,
                      tie_word_embeddings=tie)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    return model.eval()


def tree_of(n: int, device: str):
    """A best-first tree of n nodes (root included), as forward_tree takes it; random tokens."""
    cands = candidate_paths()
    paths = best_subtree(cands, [prior_score(p) for p in cands], n - 1)
    tree = make_tree(paths).to(device)
    return tree


class Timer:
    def __init__(self, device: str):
        self.device = device

    def __call__(self, fn, reps: int) -> float:
        """Median seconds of fn() over reps calls, after two warm-ups."""
        fn(), fn()
        times = []
        for _ in range(reps):
            if self.device == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                times.append((a, b))
            else:
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        if self.device == "cuda":
            torch.cuda.synchronize()
            times = [a.elapsed_time(b) / 1e3 for a, b in times]
        return statistics.median(times)


def hf_greedy_per_token(model, prompt, device: str, tokens: int = 32) -> float:
    """Wall seconds per token of model.generate(do_sample=False) (its whole loop, not only the
    forward): (time for 1 + tokens new tokens - time for 1) / tokens, so the prefill cancels."""
    def run(n):
        sync_ = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        sync_()
        t = time.perf_counter()
        model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        sync_()
        return time.perf_counter() - t
    run(2)
    return (min(run(1 + tokens) for _ in range(2)) - min(run(1) for _ in range(2))) / tokens


TREE_PATHS = (
    # path, tree attention, static cache, prefix on the device
    ("tree", True, False, False),
    ("tree-static", True, True, False),
    ("tree-static-dev", True, True, True),
    ("dense", False, False, False),
)


@torch.no_grad()
def forward_cost(model, shape: str, prefixes, sizes, reps: int, device: str, sink=None) -> list[dict]:
    """Rows per prefix; ``sink(rows)`` gets each prefix's rows as soon as they exist."""
    rows = []
    timer = Timer(device)
    cfg = model.config
    vocab = cfg.vocab_size
    kw = hf_model.cache_kwarg(model)
    dtype = next(model.parameters()).dtype
    for prefix in prefixes:
        at: list[dict] = []
        prompt = torch.randint(3, vocab, (1, prefix), generator=torch.Generator().manual_seed(prefix)).to(device)
        model.set_attn_implementation("sdpa")
        cache = kv.new_cache(model)
        model(input_ids=prompt, use_cache=True, logits_to_keep=1, **{kw: cache})

        def greedy_step():
            tok = prompt[:, -1:]
            model(input_ids=tok, use_cache=True, position_ids=torch.full((1, 1), prefix, device=device),
                  **{kw: cache})
            cache.crop(-1)

        t1 = timer(greedy_step, reps)
        at.append({"part": "forward", "shape": shape, "prefix": prefix, "path": "greedy", "n": 1, "ms": t1 * 1e3})
        hf = hf_greedy_per_token(model, prompt, device)
        at.append({"part": "forward", "shape": shape, "prefix": prefix, "path": "hf_generate", "n": 1,
                   "ms": hf * 1e3})
        line = [f"greedy forward {t1 * 1e3:.2f} ms, HF generate {hf * 1e3:.2f} ms/token"]
        static = None
        for path, tree_attention, use_static, on_device in TREE_PATHS:
            if tree_attention:
                hf_attention.use_tree_attention(model)  # the backend a recycler enters during its calls
            else:
                model.set_attn_implementation("sdpa")
            if use_static and static is None:  # one static cache (room for the largest tree) for both rows
                static = kv.new_cache(model, static_len=prefix + max(sizes))
                model(input_ids=prompt, use_cache=True, logits_to_keep=1, **{kw: static})
            run_cache = static if use_static else cache
            at_prefix = torch.tensor([prefix], device=device) if on_device else prefix
            for n in sizes:
                tree = tree_of(n, device)
                tokens = torch.randint(3, vocab, (1, n), device=device)

                def tree_step():
                    hf_model.forward_tree(model, tokens, tree.depths.view(1, -1), tree.mask.view(1, n, n), at_prefix,
                                          run_cache, tree_attention, kw)
                    kv.trim(run_cache, n)

                if on_device and device == "cuda":  # as in the decode loop: the kernels' checks wait for
                    undeferred = tree_step            # the step's one sync, not a read-back per layer

                    def tree_step():
                        with ops.deferred_device_errors(device):
                            undeferred()
                        ops.take_device_errors(device)  # a device tensor: no wait

                try:
                    t = timer(tree_step, reps)
                except Exception as e:  # noqa: BLE001 - a failing path is a result; the others still run
                    log(f"forward {shape} prefix {prefix} {path}{n}: ERROR {type(e).__name__}: {e}"[:600])
                    at.append({"part": "forward", "shape": shape, "prefix": prefix, "path": path, "n": n,
                               "error": f"{type(e).__name__}: {e}"[:400]})
                    break
                attention = ("dense" if not tree_attention else "single" if on_device else
                             hf_attention.choose_path(prefix, torch.empty(1, cfg.num_attention_heads, n, 1,
                                                                          dtype=dtype, device=device),
                                                      torch.empty(1, cfg.num_key_value_heads, 1, 1, device=device)))
                at.append({"part": "forward", "shape": shape, "prefix": prefix, "path": path, "n": n,
                           "ms": t * 1e3, "ratio_to_greedy": t / t1, "attention": attention})
                line.append(f"{path}{n} {t / t1:.2f}x")
        log(f"forward {shape} prefix {prefix}: " + ", ".join(line))
        del cache, static
        if device == "cuda":
            torch.cuda.empty_cache()
        rows += at
        if sink is not None:
            sink(at)
    model.set_attn_implementation("sdpa")
    return rows


# ----------------------------------------------------------------------------------------- overhead
def overhead(model, shape: str, prefixes, steps: int, device: str, sink=None) -> list[dict]:
    """Rows per prefix (with and without CUDA graphs, and dense); ``sink(rows)`` gets each as it exists."""
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from step_breakdown import measure
    rows = []
    for prefix in prefixes:
        for tree_attention, graphs in ((True, True), (True, False), (False, False)):
            try:
                r = measure(model, prefix, tree_attention, steps, device, graphs, ngram=True)
            except Exception as e:  # noqa: BLE001 - a failing configuration is a result; the others still run
                r = {"prefix": prefix, "attention": "tree+graphs" if graphs else "tree" if tree_attention else "dense",
                     "error": f"{type(e).__name__}: {e}"[:400]}
                log(f"overhead {shape} prefix {prefix} {r['attention']:>11}: ERROR {r['error']}")
            r.update(part="overhead", shape=shape)
            rows.append(r)
            if sink is not None:
                sink([r])
            if "error" in r:
                continue
            syncs = "-" if r["syncs_per_step"] is None else f"{r['syncs_per_step']:.0f}"
            log(f"overhead {shape} prefix {prefix} {r['attention']:>11}: forward {r['forward_ms']:.2f} ms, step "
                f"{r['step_ms']:.2f} ms, outside the forward {r['other_ms']:.2f} ms, syncs/step {syncs}")
    model.set_attn_implementation("sdpa")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny models and sizes (smoke run)")
    parser.add_argument("--parts", default="lossless,forward,overhead")
    parser.add_argument("--shapes", default="llama-8b", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--prefixes", help="comma-separated prefix lengths (default 1024,4096,16384)")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--steps", type=int, default=16, help="decode steps per overhead row")
    parser.add_argument("--json", help="write every row here (rewritten as rows come)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --device cpu --quick for a smoke run)")
    from token_recycling import WITH_CUDA
    parts = args.parts.split(",")
    rows: list[dict] = []
    env = {"torch": torch.__version__, "with_cuda": WITH_CUDA,
           "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}
    log(f"# {env}")

    def save(new_rows=()):
        rows.extend(new_rows)
        if args.json:
            with open(args.json + ".tmp", "w") as f:
                json.dump({"env": env, "rows": rows}, f, indent=1)
            os.replace(args.json + ".tmp", args.json)

    if "lossless" in parts:
        save(lossless(args.device, args.quick))
    prefixes = (64, 256) if args.quick else PREFIXES
    if args.prefixes:
        prefixes = tuple(int(p) for p in args.prefixes.split(","))
    sizes = (1, 4, 16) if args.quick else SIZES
    for shape in args.shapes.split(","):
        if not {"forward", "overhead"} & set(parts):
            break
        t = time.perf_counter()
        model = build(shape, args.device, args.quick)
        log(f"# {shape}: built in {time.perf_counter() - t:.1f} s, "
            f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters")
        if "forward" in parts:
            forward_cost(model, shape, prefixes, sizes, args.reps, args.device, sink=save)
        if "overhead" in parts:
            overhead(model, shape, prefixes, args.steps, args.device, sink=save)
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
    bad = [r for r in rows if r["part"] == "lossless" and not r["equal"]]
    failed = [r for r in rows if r["part"] in ("forward", "overhead") and "error" in r]
    log(f"# lossless failures: {len(bad)}")
    log(f"# timing rows that failed: {len(failed)}")
    sys.exit(1 if bad or failed else 0)


if __name__ == "__main__":
    main()
