"""One rank of the tensor-parallel tests (tests/test_tp.py launches it under torchrun).

Usage: tp_worker.py OUT_DIR MODE FOLDER...  (MODE: "generate", or "desync": rank 1 drafts a smaller tree)
Loads each folder with tp_plan="auto" over the ranks, runs the default TokenRecycler on the prompts
in OUT_DIR/prompts.json and writes OUT_DIR/rank<R>.json: the outputs per folder, how the weights
were sharded, and the error if generation raised one.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import torch


def main(out_dir: str, mode: str, folders: list[str]) -> None:
    from transformers import AutoModelForCausalLM

    from token_recycling import TokenRecycler, tp

    tp.init("cpu")
    rank = torch.distributed.get_rank()
    out = Path(out_dir)
    prompts = json.loads((out / "prompts.json").read_text())
    result: dict = {"rank": rank, "world": torch.distributed.get_world_size(), "models": {}}
    try:
        for folder in folders:
            start = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **tp.tp_plan_kwargs()).eval()
            q = model.model.layers[0].self_attn.q_proj.weight
            local = q.to_local() if hasattr(q, "to_local") else q
            rec = TokenRecycler(model)
            if mode == "desync" and rank == 1:  # a per-rank decision gone wrong: rank 1 drafts a smaller tree
                draft = rec.drafter.draft
                rec.drafter.draft = lambda state, root: draft(state, root).truncate(2)
            outputs = [rec.generate(torch.tensor([p]), max_new_tokens=48)[0].tolist() for p in prompts]
            result["models"][folder] = {"outputs": outputs, "q_proj_local": list(local.shape),
                                        "q_proj_global": list(q.shape), "tree": rec.describe(),
                                        "seconds": time.perf_counter() - start}
    except Exception as exc:  # noqa: BLE001 - reported to the test
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
