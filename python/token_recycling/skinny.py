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
multiplies bf16 by bf16 with ``vdpbf16ps``. Where the CPU also has AMX, torch's product overtakes
ours at about 10 rows; routing still stops at ``MAX_ROWS`` because few steps forward 10-12 tokens
and a lower cap gained nothing end to end (bench/RESULTS.md, "What a verification forward costs").
"""

from __future__ import annotations

import contextlib

import torch

from . import ops

MAX_ROWS = 12  # past this BLAS's packed product is as fast (bench/RESULTS.md, "What a verification forward costs")
MIN_ROWS = 1
DTYPES = (torch.float32, torch.bfloat16)  # the weight dtypes the op takes (x and bias match the weight)


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


def _routed_forward(module: torch.nn.Linear, original, max_rows: int, min_rows: int):
    # Called ~200 times per forward: kept to a few attribute reads (the op takes x [..., in] itself).
    op, weight, bias = _op(), module.weight, module.bias
    dtype = weight.dtype
    grad_enabled = torch.is_grad_enabled

    def forward(x: torch.Tensor) -> torch.Tensor:
        last = x.shape[-1] if x.dim() else 0
        if last and min_rows <= x.numel() // last <= max_rows and x.dtype is dtype and not grad_enabled():
            return op(x, weight, bias, True)
        return original(x)
    return forward


@contextlib.contextmanager
def routed(model, enabled: bool = True, max_rows: int = MAX_ROWS, min_rows: int = MIN_ROWS):
    """Route ``model``'s float32/bf16 CPU linears through skinny_linear for min_rows..max_rows rows, then
    restore. The decode loop and the bench's "greedy-skinny"/"pld-skinny" baselines (HF's own decoding)
    use the same rows, 1..12, so ours against those baselines is what drafting gives."""
    patched = []
    if enabled:
        for module in _linears(model):
            had_own = "forward" in module.__dict__
            original = module.forward
            module.forward = _routed_forward(module, original, max_rows, min_rows)
            patched.append((module, had_own, original))
    try:
        yield len(patched)
    finally:
        for module, had_own, original in reversed(patched):
            if had_own:
                module.forward = original
            else:
                del module.forward
