"""One rank of the tensor-parallel tests (tests/test_tp.py launches it under torchrun).

Usage: tp_worker.py OUT_DIR FOLDER...
Loads each folder with tp_plan="auto" over the ranks, runs the default TokenRecycler on the prompts
in OUT_DIR/prompts.json, then forces a desync (rank 1 drafts a smaller tree than rank 0) with the
first model. Writes OUT_DIR/rank<R>.json: the outputs per folder, how the weights were sharded,
the error of the forced desync, and any other error.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import torch

MAX_NEW_TOKENS = 48


def main(out_dir: str, folders: list[str]) -> None:
    from transformers import AutoModelForCausalLM

    from token_recycling import TokenRecycler
    from token_recycling.tools import tp

    tp.init("cpu")
    rank = torch.distributed.get_rank()
    out = Path(out_dir)
    prompts = json.loads((out / "prompts.json").read_text())
    result: dict = {"rank": rank, "world": torch.distributed.get_world_size(), "models": {}}
    try:
        models = []
        for folder in folders:
            start = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **tp.tp_plan_kwargs()).eval()
            models.append(model)
            q = model.model.layers[0].self_attn.q_proj.weight
            local = q.to_local() if hasattr(q, "to_local") else q
            rec = TokenRecycler(model)
            outputs = [rec.generate(torch.tensor([p]), max_new_tokens=MAX_NEW_TOKENS)[0].tolist() for p in prompts]
            result["models"][folder] = {"outputs": outputs, "q_proj_local": list(local.shape),
                                        "q_proj_global": list(q.shape), "tree": rec.describe(),
                                        "seconds": time.perf_counter() - start}
        rec = TokenRecycler(models[0])
        if rank == 1:  # a per-rank decision gone wrong: rank 1 drafts a smaller tree
            draft_rows = rec.drafter.draft_rows
            rec.drafter.draft_rows = lambda *args: [d.truncate(2) for d in draft_rows(*args)]
        try:
            rec.generate(torch.tensor([prompts[0]]), max_new_tokens=MAX_NEW_TOKENS)
        except RuntimeError as exc:
            result["desync_error"] = str(exc)
    except Exception as exc:  # noqa: BLE001 - reported to the test
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
