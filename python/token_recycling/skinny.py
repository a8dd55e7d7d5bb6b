"""Few-token forwards on the CPU: a verification forward's linear layers through ``ops.skinny_linear``.

A decode step forwards a handful of tokens. On the CPU, BLAS's matrix product packs the weights
before multiplying, and for two to a dozen rows that costs far more than the multiplication, so
every drafted token has to pay that back. ``skinny_linear`` streams each weight row once for all the
rows, prefetching the next rows while it multiplies, so a forward of a few tokens costs about what
torch's one-token forward does (bench/RESULTS.md, "What a verification forward costs").

:func:`routed` is a context manager the decode loop enters for the length of one generate() call:
inside it, every plain ``nn.Linear`` of the model with float32 or bfloat16 CPU weights takes
``skinny_linear`` for inputs of 1..``max_rows`` rows (tokens x batch) of the weight's dtype when
autograd is off; everything else (the prefill, other dtypes) goes to torch. One-token
forwards are routed too: the op is faster than torch's there as well, so part of the decode loop's
speed on the CPU is the kernel's, not drafting's; the bench's "greedy-skinny" and "pld-skinny"
baselines (HF's decoding with the same routing) measure the two apart. The model is restored on
exit. The sums are in float32 in a different order than BLAS's, which verification tolerates like
any other change of kernel: the lossless tests compare against ``model.generate`` with it on. In
bfloat16 on an AVX2 CPU (no native bf16 arithmetic) the op widens the bf16 weights in registers; a
bf16 result, rounded once from a float32 sum, can differ from torch's by an ulp, which is the
documented bf16 near-tie divergence, not a loss in float32. On CPUs with AVX512-BF16 the op
multiplies bf16 by bf16 with ``vdpbf16ps``.

Where torch's product overtakes ours depends on the layer's shape, the dtype, the CPU and the thread
count: on a 2-core Xeon with AMX at 2 threads, ours is faster for a [49152, 576] bf16 output layer up
to 4 rows and for a [1536, 576] one up to 10 (docs/cpu.md). So each
distinct weight shape gets its own row limit, measured on the machine (:func:`calibrate`: every layer
of that shape timed both ways at 1..16 rows, the weights streamed as a forward streams them) and kept
in the calibration cache (calibration.py). Without a calibration every shape takes ``MAX_ROWS``.

Above a shape's limit, bf16 layers take oneDNN's product with the weight packed once into its
blocked layout (``torch.ops.mkldnn._reorder_linear_weight``), where oneDNN has a native bf16 path:
torch's own product repacks the weight at every call, which a verification forward of 8 tokens pays
in every layer (a SmolLM2 forward of 8 tokens: about 12% less time packed; bench/RESULTS.md). The
packed copies are this module's, not the model's: made at the first routed call, kept while the
weight lives and made again when it is changed in place, and made only while they take at most a
quarter of the memory available (``PACK_MEMORY_SHARE``). ``TOKEN_RECYCLING_PACKED_WEIGHTS=off``
keeps torch's product. The calibration then times ``skinny_linear`` against the packed product.
"""

from __future__ import annotations

import contextlib
import os
import time
import weakref
from typing import Callable

import torch

from . import calibration, ops

MAX_ROWS = 12  # without a calibration: past this BLAS's packed product is as fast on the CPUs measured
MIN_ROWS = 1
CALIBRATION_ROWS = (1, 2, 3, 4, 6, 8, 10, 12, 16)  # the row counts calibrate() times
DTYPES = (torch.float32, torch.bfloat16)  # the weight dtypes the op takes (x and bias match the weight)


PACK_ENV = "TOKEN_RECYCLING_PACKED_WEIGHTS"  # "off": bf16 layers above the row limit take torch's product
PACK_HINT = 8  # the row count oneDNN's packed layout is chosen for (any row count works with it)
PACK_MEMORY_SHARE = 0.25  # pack only while the copies take at most this share of MemAvailable

_packed: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}  # id(weight) -> (weight, _version, packed)
_routes: dict[torch.nn.Module, tuple[int, int]] = {}  # a routed layer -> its (min_rows, max_rows), while routed


def available() -> bool:
    """True when this build's skinny_linear has a vectorized path for this CPU (AVX2 + FMA)."""
    return ops.skinny_linear_vectorized()


def applies(model) -> bool:
    """Whether routing would change anything for ``model``: float32/bf16 weights on the CPU, one process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return False  # tensor-parallel shards keep torch's linear (tp.py)
    return bool(_linears(model))


def _linears(model) -> list[torch.nn.Linear]:
    found = []
    for module in model.modules():
        w = getattr(module, "weight", None)
        # Exactly nn.Linear: subclasses (LoRA, quantized layers) have forwards of their own.
        if type(module) is torch.nn.Linear and type(w) is torch.nn.Parameter and w.dtype in DTYPES \
                and w.device.type == "cpu" and (module.bias is None or module.bias.dtype == w.dtype):
            found.append(module)
    return found


def _op():
    """The op the routed layers call (looked up once per generate() call; tests substitute a spy)."""
    return torch.ops.token_recycling.skinny_linear.default


def shape_key(weight: torch.Tensor) -> str:
    """The routing table's key of a weight: its dtype and [out, in] shape."""
    return f"{str(weight.dtype).replace('torch.', '')} {weight.shape[0]}x{weight.shape[1]}"


def _memory_available() -> int | None:
    """MemAvailable in bytes (Linux), None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def packs(model) -> bool:
    """Whether routing packs ``model``'s bf16 linears for oneDNN (module doc): oneDNN with a native bf16
    path, not turned off, and the copies within PACK_MEMORY_SHARE of the memory available."""
    if os.environ.get(PACK_ENV, "").lower() in ("off", "0", "false", "no"):
        return False
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False
    need = sum(m.weight.numel() * 2 for m in _linears(model) if m.weight.dtype is torch.bfloat16)
    if need == 0:
        return False
    free = _memory_available()
    return free is not None and need <= PACK_MEMORY_SHARE * free


def packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` ([out, in], bf16) in oneDNN's packed layout, made once and again after an in-place change."""
    entry = _packed.get(id(weight))
    if entry is not None and entry[0]() is weight and entry[1] == weight._version:
        return entry[2]
    for key in [k for k, e in _packed.items() if e[0]() is None]:  # weights that are gone
        del _packed[key]
    with torch.no_grad():
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_HINT)
    _packed[id(weight)] = (weakref.ref(weight), weight._version, packed)
    return packed


def _packed_op():
    return torch.ops.mkldnn._linear_pointwise.default


def _routed_forward(module: torch.nn.Linear, original, max_rows: int, min_rows: int,
                    packed: torch.Tensor | None = None):
    # Called ~200 times per forward: kept to a few attribute reads (the op takes x [..., in] itself).
    op, weight, bias = _op(), module.weight, module.bias
    dtype = weight.dtype
    grad_enabled = torch.is_grad_enabled
    packed_op = _packed_op() if packed is not None else None

    def forward(x: torch.Tensor) -> torch.Tensor:
        last = x.shape[-1] if x.dim() else 0
        if last and x.dtype is dtype and not grad_enabled():
            if min_rows <= x.numel() // last <= max_rows:
                return op(x, weight, bias, True)
            if packed_op is not None:
                return packed_op(x.contiguous(), packed, bias, "none", [], "")
        return original(x)
    return forward


@contextlib.contextmanager
def routed(model, enabled: bool = True, max_rows: int = MAX_ROWS, min_rows: int = MIN_ROWS,
           table: dict[str, int] | None = None):
    """Route ``model``'s float32/bf16 CPU linears through skinny_linear for min_rows..max_rows rows, then
    restore. ``table`` (from :func:`calibrate` or :func:`routing_table`) gives a shape's own row limit
    in place of ``max_rows`` (0: that shape always takes torch's product). The decode loop and the
    bench's "greedy-skinny"/"pld-skinny" baselines (HF's own decoding) route with the same table, so
    ours against those baselines is what drafting gives."""
    patched = []
    if enabled:
        pack = packs(model)
        for module in _linears(model):
            limit = max_rows if table is None else int(table.get(shape_key(module.weight), max_rows))
            had_own = "forward" in module.__dict__
            original = module.forward
            packed = packed_weight(module.weight) if pack and module.weight.dtype is torch.bfloat16 else None
            module.forward = _routed_forward(module, original, limit, min_rows, packed)
            patched.append((module, had_own, original, _routes.get(module)))
            _routes[module] = (min_rows, limit)
    try:
        yield len(patched)
    finally:
        for module, had_own, original, route in reversed(patched):
            if had_own:
                module.forward = original
            else:
                del module.forward
            if route is None:
                _routes.pop(module, None)
            else:
                _routes[module] = route


def _cat_op():
    return torch.ops.token_recycling.skinny_linear_cat.default


def joint(modules: list[torch.nn.Linear]) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """The forward of linear layers that take the same input (a layer's q, k and v projections, or its
    gate and up projections), as a function of that input returning their outputs: where the routing
    entered now (:func:`routed`) gives every one of them ``skinny_linear`` for x's rows, one
    ``skinny_linear_cat`` call, its output split (equal bit for bit to the separate calls: one
    dispatch and one split between threads instead of one per layer); otherwise each layer's own
    forward. Made per generate() call, inside the routing (lean_forward.Parts)."""
    def separate(x: torch.Tensor) -> list[torch.Tensor]:
        return [m.forward(x) for m in modules]

    routes = [_routes.get(m) for m in modules]
    if len(modules) < 2 or any(r is None for r in routes):
        return separate
    weights, biases = [m.weight for m in modules], [m.bias for m in modules]
    dtype = weights[0].dtype
    if any(w.dtype is not dtype for w in weights) or any((b is None) != (biases[0] is None) for b in biases):
        return separate
    low, high = max(r[0] for r in routes), min(r[1] for r in routes)
    op, sizes, grad_enabled = _cat_op(), [w.shape[0] for w in weights], torch.is_grad_enabled
    biases = [] if biases[0] is None else biases

    def forward(x: torch.Tensor) -> list[torch.Tensor]:
        last = x.shape[-1] if x.dim() else 0
        if last and x.dtype is dtype and not grad_enabled() and low <= x.numel() // last <= high:
            return op(x, weights, biases, True).split(sizes, -1)
        return separate(x)
    return forward


def _time_both(weights: list[torch.Tensor], rows: int, repeats: int, packed: list[torch.Tensor] | None = None
               ) -> tuple[float, float]:
    """Best-of-``repeats`` seconds of x @ w.T over all ``weights`` through skinny_linear and torch
    (oneDNN's product of the ``packed`` weights where given, as routing runs it)."""
    op, linear = _op(), torch.nn.functional.linear
    x = torch.randn(rows, weights[0].shape[1], dtype=weights[0].dtype)
    packed_op = _packed_op()  # looked up once, as a routed layer does, not inside the timed loop
    other = [(lambda p=p: packed_op(x, p, None, "none", [], "")) for p in packed] if packed else \
        [(lambda w=w: linear(x, w)) for w in weights]
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for i in (0, 1):  # interleaved: a burst of load elsewhere hits both alike
            start = time.perf_counter()
            if i == 0:
                for w in weights:
                    op(x, w, None, True)
            else:
                for call in other:
                    call()
            best[i] = min(best[i], time.perf_counter() - start)
    return best[0], best[1]


def calibrate(model, rows: tuple[int, ...] = CALIBRATION_ROWS, repeats: int = 3,
              timer: Callable[[list[torch.Tensor], int, int], tuple[float, float]] | None = None) -> dict[str, int]:
    """Measure, per weight shape of ``model``, the most rows for which skinny_linear is faster than
    torch's product: {shape_key: row limit}. Every layer of a shape is timed in turn (a forward streams
    each layer's weights once, so no layer is timed from a warm cache) at each of ``rows``, both
    ways, the best of ``repeats``. A shape's limit is the largest row count up to which skinny_linear
    won at every size (0 where torch wins at one row); row counts between two measured sizes take the
    routing of the smaller one. ``timer(weights, rows, repeats) -> (skinny seconds, torch seconds)``
    replaces the clock in tests."""
    pack = timer is None and packs(model)
    timer = timer or _time_both
    groups: dict[str, list[torch.Tensor]] = {}
    packed: dict[str, list[torch.Tensor]] = {}
    for module in _linears(model):
        groups.setdefault(shape_key(module.weight), []).append(module.weight.detach())
        if pack and module.weight.dtype is torch.bfloat16:
            packed.setdefault(shape_key(module.weight), []).append(packed_weight(module.weight))
    table = {}
    with torch.no_grad():
        for shape, weights in groups.items():
            limit = 0
            for n in sorted(rows):
                ours, theirs = timer(weights, n, repeats, packed[shape]) if shape in packed else \
                    timer(weights, n, repeats)
                if ours >= theirs:
                    break
                limit = n
            table[shape] = limit
    return table


def routing_table(model, device: torch.device | None = None) -> dict[str, int] | None:
    """The calibrated row limits for ``model`` on this machine at torch's current thread count: from
    the calibration cache, else measured now (about a second for a 135M model on 2 cores) and kept.
    None where calibration is off (``TOKEN_RECYCLING_CALIBRATION=off``): every shape takes MAX_ROWS."""
    if calibration.mode() == "off" or not _linears(model):
        return None
    setting = "skinny_linear routing" + ("; above it oneDNN packed" if packs(model) else "")
    entry = calibration.key(model, device or torch.device("cpu"), setting)
    stored = calibration.load(entry)
    if stored is not None and isinstance(stored.get("rows"), dict):
        return {k: int(v) for k, v in stored["rows"].items()}
    table = calibrate(model)
    calibration.store(entry, {"rows": table})
    return table
