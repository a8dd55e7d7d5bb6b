"""Benchmark runner: greedy, prompt lookup (PLD) and Token Recycling on the same prompts.

Methods run interleaved per prompt (the order rotates from prompt to prompt) so that a slow
phase of a shared machine hits every method alike. One Token Recycling object serves every
prompt, so its adjacency matrix stays hot as it would in a server. Each method's output is
checked token for token against greedy decoding: Token Recycling is lossless, so in fp32 any
difference is a bug, while in bf16/fp16 a near-tie between two logits can flip.
"""

from __future__ import annotations

import datetime as _dt
import platform
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .. import __version__
from .datasets import Prompt
from .models import hardware

METHODS = ("greedy", "pld", "greedy-skinny", "pld-skinny", "paper", "torch-linear", "no-history", "suffix",
           "suffix-tree", "ours")
# "paper": the paper's method (its 80-node tree, no n-gram drafts); "torch-linear": the default with
# torch's linear layers (skinny_linear=False), which measures what skinny.py gives on the CPU;
# "no-history": the default with ngram_history=0 (n-grams from the current context only);
# "greedy-skinny" / "pld-skinny": HF's greedy / prompt lookup with every forward of 1..12 tokens through
# skinny_linear (skinny.routed, as the decode loop routes them): the same kernel as ours, so ours
# against them is what drafting gives, and greedy-skinny against greedy what the kernel gives.
# "suffix" / "suffix-tree": SuffixDecoding's drafts (arctic-inference; a chain as vLLM drafts it, or its
# tree) verified by a TokenRecycler's own step (tools/suffix.py): only the drafter differs from ours.
HF_METHODS = ("greedy", "pld", "greedy-skinny", "pld-skinny")
RECYCLERS = ("paper", "torch-linear", "no-history", "suffix", "suffix-tree", "ours")
PRESET_PREFIX = "tr:"  # "tr:<tree>": Token Recycling with a fixed tree (+ the n-gram chain), e.g. tr:paper-8
PRESET_ALIASES = {"chain": [[0]]}  # tr:chain: one matrix node + the n-gram chain


def preset_tree(method: str):
    """The fixed tree of a "tr:<tree>" method: a preset name, "chain" or a JSON list of rank paths."""
    import json

    from ..tree import make_tree

    if not method.startswith(PRESET_PREFIX):
        raise ValueError(f"{method!r} is not a fixed-tree method (tr:<preset or rank paths>)")
    text = method[len(PRESET_PREFIX):]
    spec = PRESET_ALIASES.get(text, text)
    if isinstance(spec, str) and spec.lstrip().startswith("["):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{method!r}: {text!r} is not valid JSON ({exc.msg})") from exc
    if spec == "auto":
        raise ValueError(f"{method!r}: tr: methods are fixed trees; the default (auto) is \"ours\"")
    make_tree(spec, 8)  # validates
    return spec


def is_recycler(method: str) -> bool:
    return method in RECYCLERS or method.startswith(PRESET_PREFIX)
PLD_TOKENS = 10  # prompt_lookup_num_tokens, as in transformers' examples
WARMUP_PROMPT = "Write three sentences about the history of the bicycle."
FORMAT = 1  # results.json layout version


@dataclass
class BenchConfig:
    max_new_tokens: int = 128
    methods: tuple[str, ...] = METHODS
    multi_turn: bool = False
    chat_template: bool = True
    warmup: bool = True
    sampling: dict | None = None  # generate() keywords for every method (do_sample=True, ...); None: greedy


def encode(tokenizer, messages: list[dict], chat_template: bool, device) -> dict:
    """input_ids + attention_mask for a conversation, through the chat template when asked for."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
    else:  # plain text: the turns one after another
        enc = tokenizer("\n\n".join(m["content"] for m in messages), return_tensors="pt")
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}


def first_mismatch(reference: list[int], other: list[int]) -> int | None:
    """First position where two token lists differ (a length difference counts), or None."""
    for i, (a, b) in enumerate(zip(reference, other)):
        if a != b:
            return i
    return None if len(reference) == len(other) else min(len(reference), len(other))


@contextmanager
def count_forwards(model):
    """Counts model forwards by the input embedding's calls (one per forward, whatever the method).
    The count wraps the embedding's ``forward`` rather than adding a hook: a hooked model keeps
    transformers' own forward in the decode loop (lean_forward.py), so a hook would change what is
    measured."""
    counter = [0]
    embedding = model.get_input_embeddings()
    had_own = "forward" in embedding.__dict__
    original = embedding.forward

    def counted(*args, **kwargs):
        counter[0] += 1
        return original(*args, **kwargs)

    embedding.forward = counted
    try:
        yield counter
    finally:
        if had_own:
            embedding.forward = original
        else:
            del embedding.forward


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _recyclers(rec) -> dict:
    """{"ours": rec} for one TokenRecycler, or the dict given ({"ours": ..., "paper": ...})."""
    return rec if isinstance(rec, dict) else {"ours": rec}


def run_method(method: str, model, rec, inputs: dict, max_new_tokens: int,
               sampling: dict | None = None) -> tuple[list[int], dict]:
    """(new tokens, record) of one method on one prompt; the record holds what results.json keeps.
    ``rec``: the TokenRecycler of "ours", or a dict of recyclers by method name. ``sampling``
    (do_sample=True, temperature, top_p) makes every method sample: "greedy" is then HF's plain
    sampling and "pld" HF's prompt lookup with sampling."""
    sampling = {k: v for k, v in (sampling or {}).items() if v is not None}
    recs = _recyclers(rec)
    gen = model.generation_config
    eos = gen.eos_token_id
    pad = gen.pad_token_id if gen.pad_token_id is not None else eos
    common = {**dict(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad), **sampling}
    device = inputs["input_ids"].device
    from .. import hf_attention, skinny
    # The "-skinny" baselines route as the recyclers do: the same calibrated per-shape row limits.
    table = skinny.routing_table(model) if method.endswith("-skinny") else None
    with torch.inference_mode(), count_forwards(model) as forwards:
        _sync(device)
        start = time.perf_counter()
        if method in HF_METHODS:
            lookup = {"prompt_lookup_num_tokens": PLD_TOKENS} if method.startswith("pld") else {}
            # HF's methods as users have them: transformers' sdpa, not the backend a recycler switched to.
            with skinny.routed(model, method.endswith("-skinny"), table=table), hf_attention.transformers_sdpa(model):
                out = model.generate(**inputs, **common, **lookup)
        elif is_recycler(method):
            out = recs[method].generate(inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                        max_new_tokens=max_new_tokens, eos_token_id=eos, **sampling)
        else:
            raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
        _sync(device)
        seconds = time.perf_counter() - start
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    record = {"new_tokens": len(new), "seconds": seconds, "forwards": forwards[0]}
    if is_recycler(method):
        stats = recs[method].stats
        record["steps"] = stats.steps
        record["accept_lengths"] = list(stats.accept_lengths)
        record["stats"] = stats.as_dict()
    return new, record


def rotated(methods: tuple[str, ...], i: int) -> list[str]:
    k = i % len(methods)
    return list(methods[k:] + methods[:k])


def run(model, tokenizer, rec, prompts: list[Prompt], cfg: BenchConfig, progress: bool = True,
        samples: list[dict] | None = None, on_sample=None) -> list[dict]:
    """One record per (prompt, turn): per-method new tokens, seconds, forwards; mismatches vs greedy.

    Records are appended to ``samples`` (pass a list to keep what was measured if the run is
    interrupted) and ``on_sample(samples)`` is called after each one.
    """
    from tqdm.auto import tqdm

    device = model.device
    if cfg.warmup:
        warm = encode(tokenizer, [{"role": "user", "content": WARMUP_PROMPT}], cfg.chat_template, device)
        for method in cfg.methods:
            run_method(method, model, rec, warm, min(cfg.max_new_tokens, 32), cfg.sampling)

    turns_total = sum(len(p.turns) if cfg.multi_turn else 1 for p in prompts)
    bar = tqdm(total=turns_total, desc="bench", unit="turn", file=sys.stderr, disable=not progress)
    samples = [] if samples is None else samples
    for p in prompts:
        messages: list[dict] = []
        for turn, text in enumerate(p.turns if cfg.multi_turn else p.turns[:1]):
            messages.append({"role": "user", "content": text})
            inputs = encode(tokenizer, messages, cfg.chat_template, device)
            order = rotated(cfg.methods, len(samples))
            tokens, records = {}, {}
            for method in order:
                tokens[method], records[method] = run_method(method, model, rec, inputs, cfg.max_new_tokens,
                                                             cfg.sampling)
            mismatch = {m: first_mismatch(tokens["greedy"], tokens[m]) for m in tokens if m != "greedy"} \
                if "greedy" in tokens and not cfg.sampling else {}  # samples differ by design
            samples.append({"id": p.id, "category": p.category_of(turn), "turn": turn,
                            "prompt_tokens": int(inputs["input_ids"].shape[1]), "order": order,
                            "methods": records, "mismatch": mismatch})
            # Later turns see the greedy answer (every method's, when they agree).
            answer = tokens["greedy"] if "greedy" in tokens else tokens[order[0]]
            messages.append({"role": "assistant", "content": tokenizer.decode(answer, skip_special_tokens=True)})
            bar.update(1)
            if on_sample is not None:
                on_sample(samples)
    bar.close()
    return samples


def weight_bytes(model) -> int:
    """Bytes of the model's parameters, each storage once (tied embeddings count once): what a forward
    reads at least, the output layer reading the whole embedding table."""
    seen, total = set(), 0
    for p in model.parameters():
        key = (p.untyped_storage().data_ptr(), p.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += key[1]
    return total


def read_seconds(nbytes: int, device, repeats: int = 5) -> float | None:
    """Best-of-``repeats`` seconds for torch to read ``nbytes`` of memory once (a sum over a buffer that
    size, at torch's thread count): the least time a forward that reads that many bytes of weights can
    take on this machine. CPU only (None elsewhere)."""
    if torch.device(device).type != "cpu":
        return None
    buf = torch.ones(max(nbytes // 4, 1), dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats + 1):  # the first touches the pages
        start = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - start)
    return best


def environment(device, model=None) -> dict:
    """The run's machine and versions; with ``model``, its weight bytes and the time this machine takes
    to read that many bytes (the physical limit the report puts beside the rates)."""
    import transformers

    from .. import WITH_CUDA

    limit = {}
    if model is not None:
        nbytes = weight_bytes(model)
        limit = {"weight_bytes": nbytes, "weight_read_seconds": read_seconds(nbytes, device)}
    return {**limit,
        "hardware": hardware(str(device)),
        "device": str(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "token_recycling": __version__,
        "extension_with_cuda": WITH_CUDA,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "timestamp": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def results_dict(config: dict, env: dict, samples: list[dict], complete: bool = True) -> dict:
    """``complete`` is False for a run that was interrupted (its samples are what was measured)."""
    return {"format": FORMAT, "complete": complete, "config": config, "environment": env, "samples": samples}

