"""``token-recycling bench --batch-size 1,2,4,8``: batched Token Recycling against HF batched greedy.

For each batch size B the prompts (first turns) are taken B at a time, left-padded, and decoded by
``model.generate(batch, attention_mask=..., do_sample=False)`` and by a ``TokenRecycler``
(``rec.generate(batch, attention_mask=...)``), the order alternating from batch to batch, after one
warm-up batch per batch size that is not counted (the auto tree measures its forward-cost curve
once per batch size: that happens there). The recycler is reset before and after each size's
warm-up: it learns across the batches of one size, as a server would, but never sees a prompt twice. Throughput is the whole batch's: new tokens of every row (up to
and including its EOS, padding not counted) over the batch's seconds. Every row is compared with
greedy's, token for token (in fp32 any difference is a bug). The tree sizes the auto policy chose
are reported per batch size (mean nodes forwarded per row per step).
"""

from __future__ import annotations

import time

import torch

from .bench import _sync, count_forwards, encode, first_mismatch


def padded_batch(tokenizer, prompts, chat_template: bool, device) -> dict:
    """Left-padded input_ids + attention_mask of the prompts' first turns."""
    rows = [encode(tokenizer, [{"role": "user", "content": p.turns[0]}], chat_template, device)["input_ids"][0]
            for p in prompts]
    width = max(r.numel() for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long, device=device)
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    for b, r in enumerate(rows):
        ids[b, width - r.numel():] = r
        mask[b, width - r.numel():] = 1
    return {"input_ids": ids, "attention_mask": mask}


def row_tokens(out: torch.Tensor, prompt_len: int, eos: set[int]) -> list[list[int]]:
    """Each row's new tokens, cut after its first EOS (what follows is padding)."""
    rows = []
    for row in out[:, prompt_len:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:end])
    return rows


def run_batch(method: str, model, rec, inputs: dict, max_new_tokens: int) -> tuple[list[list[int]], dict]:
    gen = model.generation_config
    eos = gen.eos_token_id
    pad = gen.pad_token_id if gen.pad_token_id is not None else (eos if isinstance(eos, int) else eos[0])
    eos_set = set([eos] if isinstance(eos, int) else (eos or []))
    device = inputs["input_ids"].device
    with torch.inference_mode(), count_forwards(model) as forwards:
        _sync(device)
        start = time.perf_counter()
        if method == "greedy":
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                                 pad_token_id=pad)
        else:
            out = rec.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"],
                               max_new_tokens=max_new_tokens, eos_token_id=eos)
        _sync(device)
        seconds = time.perf_counter() - start
    rows = row_tokens(out, inputs["input_ids"].shape[1], eos_set)
    record = {"new_tokens": sum(len(r) for r in rows), "seconds": seconds, "forwards": forwards[0]}
    if method == "ours":
        st = rec.stats
        rows_stats = st.rows or [st]  # one unpadded row runs the batch-1 loop: its stats are the row's
        steps = [r.steps for r in rows_stats]
        record.update(steps=st.steps, tokens_per_forward=st.mean_accepted,
                      nodes_per_row_step=sum(sum(r.tree_nodes) for r in rows_stats) / max(sum(steps), 1),
                      row_mean_accepted=[r.mean_accepted for r in rows_stats])
    return rows, record


def run(model, tokenizer, rec, prompts, batch_sizes: list[int], max_new_tokens: int, chat_template: bool = True,
        warmup: bool = True) -> list[dict]:
    """One record per (batch size, batch of prompts)."""
    device = model.device
    samples = []
    for size in batch_sizes:
        # Every batch size starts from a cold matrix and no remembered outputs: the same prompts run at
        # every size, and a recycler that had seen them would copy its own earlier answers. The cost
        # curves measured in the warm-up stay (reset() keeps what the hardware costs).
        rec.reset()
        if warmup:
            warm = padded_batch(tokenizer, prompts[:size], chat_template, device)
            for method in ("greedy", "ours"):
                run_batch(method, model, rec, warm, min(max_new_tokens, 16))
            rec.reset()
        for i in range(0, len(prompts) - size + 1, size):
            inputs = padded_batch(tokenizer, prompts[i:i + size], chat_template, device)
            order = ("greedy", "ours") if len(samples) % 2 == 0 else ("ours", "greedy")
            tokens, records = {}, {}
            for method in order:
                tokens[method], records[method] = run_batch(method, model, rec, inputs, max_new_tokens)
            mismatched = [b for b, (g, o) in enumerate(zip(tokens["greedy"], tokens["ours"]))
                          if first_mismatch(g, o) is not None]
            samples.append({"batch_size": size, "ids": [p.id for p in prompts[i:i + size]], "order": list(order),
                            "methods": records, "mismatched_rows": mismatched})
    return samples


def summarize(samples: list[dict]) -> list[dict]:
    """Per batch size: tokens/s of each method (total tokens / total seconds), speedup, tree sizes."""
    out = []
    for size in sorted({s["batch_size"] for s in samples}):
        group = [s for s in samples if s["batch_size"] == size]
        rate = {m: sum(s["methods"][m]["new_tokens"] for s in group) / max(sum(s["methods"][m]["seconds"] for s in group), 1e-9)
                for m in ("greedy", "ours")}
        ours = [s["methods"]["ours"] for s in group]
        out.append({"batch_size": size, "batches": len(group), "greedy_tok_s": rate["greedy"], "ours_tok_s": rate["ours"],
                    "speedup": rate["ours"] / rate["greedy"] if rate["greedy"] else None,
                    "tokens_per_forward": sum(o["new_tokens"] for o in ours) / max(sum(o["steps"] for o in ours), 1),
                    "nodes_per_row_step": sum(o["nodes_per_row_step"] for o in ours) / len(ours),
                    "mismatched_rows": sum(len(s["mismatched_rows"]) for s in group)})
    return out


def report(summary: list[dict], config: dict, env: dict) -> str:
    lines = [f"# Batched Token Recycling vs HF batched greedy", "",
             f"model {config['model']} ({config.get('model_note') or ''}), dtype {config['dtype']}, "
             f"max_new_tokens {config['max_new_tokens']}, dataset {config['dataset']} (limit {config['limit']}), "
             f"{env['hardware']}, torch {env['torch']}, transformers {env['transformers']}, "
             f"{env['torch_threads']} threads", "",
             "| batch | batches | HF greedy tok/s | Token Recycling tok/s | speedup | tokens/forward "
             "| tree nodes/row/step | mismatching rows |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in summary:
        speed = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        lines.append(f"| {r['batch_size']} | {r['batches']} | {r['greedy_tok_s']:.1f} | {r['ours_tok_s']:.1f} | {speed} "
                     f"| {r['tokens_per_forward']:.2f} | {r['nodes_per_row_step']:.1f} | {r['mismatched_rows']} |")
    lines += ["", "tokens/s: all rows' new tokens (to EOS) / the batch's seconds, summed over batches; tokens/forward: "
              "new tokens of the whole batch per verification forward (the prefill's token excluded from forwards)."]
    return "\n".join(lines) + "\n"
