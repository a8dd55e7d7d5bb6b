"""Tensor parallel under torchrun (``--tp``): the process group, the model loaded with
``tp_plan="auto"``, and the command line's output kept to rank 0.

Every rank runs the same TokenRecycler on the same prompt; the model's layers are split over the
ranks by transformers (gloo on CPUs, NCCL on GPUs), the logits are whole on every rank, and the
recycler keeps its matrix, n-gram index and tree choices identical everywhere (distributed.py).
Every collective waits at most ``timeout_s`` (default 600 s, $TOKEN_RECYCLING_TP_TIMEOUT), so a
rank that died or went its own way ends the run with an error instead of a hang.
"""

from __future__ import annotations

import atexit
import datetime
import os
import shutil
import sys
import tempfile

import torch

from . import models
from ..distributed import rank

TIMEOUT_ENV = "TOKEN_RECYCLING_TP_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0


def launched() -> bool:
    """True in a process started by torchrun (or anything else that sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def timeout_s() -> float:
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        raise models.ModelError(f"${TIMEOUT_ENV} must be a number of seconds, got {text!r}") from None
    if value <= 0:
        raise models.ModelError(f"${TIMEOUT_ENV} must be positive, got {text!r}")
    return value


def init(device: str = "cpu", timeout: float | None = None) -> torch.device:
    """Join the torchrun process group (gloo for ``cpu``, NCCL for ``cuda``: GPU ``LOCAL_RANK``) with a
    timeout on every collective; returns this rank's device. A group that exists already is kept."""
    dist = torch.distributed
    if not launched():
        raise models.ModelError("--tp runs one process per rank under torchrun: "
                                "`torchrun --nproc-per-node N -m token_recycling generate --tp ...`")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        if local_rank >= torch.cuda.device_count():
            raise models.ModelError(f"rank with LOCAL_RANK={local_rank} has no GPU: torch sees "
                                    f"{torch.cuda.device_count()} on this node (one GPU per rank)")
        dev, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(dev)
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        seconds = timeout if timeout is not None else timeout_s()
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=seconds),
                                device_id=dev if backend == "nccl" else None)
    return dev


def check_divisible(config, world: int) -> None:
    """transformers splits attention by heads and the MLP by columns: each must divide by the ranks."""
    sizes = {"num_attention_heads": getattr(config, "num_attention_heads", None),
             "num_key_value_heads": getattr(config, "num_key_value_heads", None),
             "intermediate_size": getattr(config, "intermediate_size", None)}
    bad = {k: v for k, v in sizes.items() if isinstance(v, int) and v % world}
    if bad:
        raise models.ModelError(
            f"this model cannot be split over {world} tensor-parallel ranks: "
            + ", ".join(f"{k}={v}" for k, v in bad.items())
            + f" {'is' if len(bad) == 1 else 'are'} not divisible by {world} (choose --nproc-per-node among the "
              f"common divisors)")


def load(spec: str = models.DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: str = "cpu",
         log: models.Log = models.stderr_log) -> models.Loaded:
    """Like :func:`models.load`, split over the process group's ranks with ``tp_plan="auto"``."""
    init(device)
    kind, path = models.resolve(spec)
    if kind == "gguf":  # convert once, on rank 0; the others wait for its result, then find the folder
        box: list = [None]
        if rank() == 0:
            try:
                models.convert_gguf(path, log)
            except models.ModelError as exc:
                box = [str(exc)]
        torch.distributed.broadcast_object_list(box, src=0)
        if box[0] is not None:
            raise models.ModelError(box[0])
        folder = models.convert_gguf(path, log)
    else:
        folder = path
    models.set_offline()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        check_divisible(AutoConfig.from_pretrained(folder), torch.distributed.get_world_size())
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **tp_plan_kwargs())
    except (OSError, ValueError, NotImplementedError) as exc:
        raise models.ModelError(f"cannot load the model in {folder} with tp_plan='auto': {exc}") from exc
    source = folder / models.SOURCE_FILE
    note = ""
    if source.is_file():
        import json
        note = json.loads(source.read_text()).get("note", "")
    return models.Loaded(model.eval(), tokenizer, spec, folder, note)


def tp_plan_kwargs() -> dict:
    """``distributed_config=DistributedConfig(tp_plan="auto")`` (transformers >= 5.x), else ``tp_plan="auto"``."""
    try:
        from transformers import DistributedConfig
    except ImportError:
        return {"tp_plan": "auto"}
    return {"distributed_config": DistributedConfig(tp_plan="auto")}


# ------------------------------------------------------------------------------ command line


def setup_cli(args) -> None:
    """For ``--tp``: join the group, give every rank rank 0's prompt, and silence the other ranks
    (their stdout and stderr go to /dev/null, their bench files to a temporary folder; an uncaught
    exception still prints, prefixed with the rank)."""
    init(args.device)
    atexit.register(_leave)
    if args.command == "generate":
        _share_prompt(args)
    if rank() == 0:
        return
    r = rank()
    sys.stdout = open(os.devnull, "w")
    sys.stderr = open(os.devnull, "w")

    def excepthook(kind, value, tb):
        import traceback
        lines = traceback.format_exception(kind, value, tb)
        sys.__stderr__.write("".join(f"[rank {r}] {line}" for line in "".join(lines).splitlines(True)))

    sys.excepthook = excepthook
    if hasattr(args, "out"):
        args.out = tempfile.mkdtemp(prefix=f"token-recycling-rank{r}-")
        atexit.register(shutil.rmtree, args.out, True)
        args.progress = False


def _share_prompt(args) -> None:
    """Rank 0 reads the prompt (argument, stdin or the default) and every rank gets it."""
    from .usage import UsageError, read_prompt

    box: list = [None]
    if rank() == 0:
        try:
            box = [("prompt", read_prompt(args))]
        except UsageError as exc:  # every rank stops with rank 0's error
            box = [("error", str(exc))]
    torch.distributed.broadcast_object_list(box, src=0)
    kind, text = box[0]
    if kind == "error":
        raise UsageError(text)
    args.prompt = text


def _leave() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
