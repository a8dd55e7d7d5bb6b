"""The first request of a fresh process: what each `token-recycling generate` call is.

For each prompt and method, a new Python process loads the model, tokenizes the prompt with the chat
template and times its first generate() call (HF greedy: ``model.generate(do_sample=False)``; ours:
``TokenRecycler(model).generate``, which includes building the recycler and any calibration it
does). Methods alternate per prompt. Ours runs in two settings: with the calibration cache as a
machine has it after its first run (``cached``), and with ``TOKEN_RECYCLING_CALIBRATION=refresh``
(``measured``: the skinny_linear routing and the cost curve timed inside the request, what the very
first request on a machine pays).

    python bench/first_request.py --dataset bench/out/unseen40.jsonl --limit 8 [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, time, torch
from token_recycling import TokenRecycler
from token_recycling.tools import models
method, dtype, new, prompt = sys.argv[1], getattr(torch, sys.argv[2]), int(sys.argv[3]), sys.argv[4]
loaded = models.load(dtype=dtype, log=lambda m: None)
model, tok = loaded.model, loaded.tokenizer
ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                              return_tensors="pt", return_dict=True)["input_ids"]
eos = model.generation_config.eos_token_id
start = time.perf_counter()
if method == "greedy":
    out = model.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=eos)
else:
    out = TokenRecycler(model).generate(ids, max_new_tokens=new)
seconds = time.perf_counter() - start
print(json.dumps({"new_tokens": out.shape[1] - ids.shape[1], "seconds": seconds,
                  "threads": torch.get_num_threads()}))
"""


def prompts(path: str, limit: int) -> list[str]:
    out = []
    for line in open(path):
        row = json.loads(line)
        out.append(row["turns"][0] if "turns" in row else row["prompt"])
    return out[:limit]


def child(method: str, dtype: str, new: int, prompt: str, calibration: str) -> dict:
    env = dict(os.environ, TOKEN_RECYCLING_CALIBRATION=calibration)
    res = subprocess.run([sys.executable, "-c", CHILD, method, dtype, str(new), prompt], env=env,
                         capture_output=True, text=True, timeout=900)
    if res.returncode:
        raise SystemExit(f"{method} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--json", help="write the per-prompt figures here")
    args = ap.parse_args()
    methods = [("greedy", "on"), ("ours cached", "on"), ("ours measured", "refresh")]
    child("ours", args.dtype, 8, "Hello", "on")  # the machine's calibration cache as after a first run
    rows = []
    for i, prompt in enumerate(prompts(args.dataset, args.limit)):
        order = methods[i % len(methods):] + methods[: i % len(methods)]
        row = {name: child(name.split()[0], args.dtype, args.max_new_tokens, prompt, cal) for name, cal in order}
        rows.append(row)
        print(" ".join(f"{k}: {v['new_tokens'] / v['seconds']:.1f} tok/s" for k, v in row.items()), flush=True)
    totals = {name: sum(r[name]["new_tokens"] for r in rows) / sum(r[name]["seconds"] for r in rows)
              for name, _ in methods}
    threads = rows[0]["greedy"]["threads"] if rows else "?"
    print(f"first request, {len(rows)} prompts, {args.dtype}, {threads} threads: " + ", ".join(
        f"{k} {v:.1f} tok/s ({v / totals['greedy']:.2f}x greedy)" for k, v in totals.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "totals": totals}, f, indent=1)


if __name__ == "__main__":
    main()
