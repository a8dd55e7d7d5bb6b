"""Lossless sampling with a deterministic draft tree.

Drafts (matrix and n-gram) do not depend on the random draws, so exact speculative sampling is a walk:
at a node, draw the next token from the model's processed distribution at that node (HF's logits
processors and warpers applied with that node's own context); if a child holds that token, move
there and draw again; otherwise emit the drawn token and stop. Every emitted token is then a fresh
draw from the target distribution given its own context, as ``model.generate(do_sample=True)``
makes it. The walk itself is the ``verify_sample`` op.

Randomness: uniforms come from the caller's ``torch.Generator`` (or torch's default generator)
through a stream, and the k-th token a generation emits uses the stream's k-th uniform (the op's
d-th draw of a step uses the step's d-th uniform, and a step consumes exactly as many as it emits).
So a seeded call is reproducible and its output depends on the seed alone, not on the drafts: a hot
or a cold matrix, any tree, gives the same text for the same seed (up to floating-point rounding of
the tree forward against a one-token forward).
"""

from __future__ import annotations

import torch

from . import ops
from .verify import Pending, pending, process_tree_logits

_ROOT_ONLY = torch.tensor([-1], dtype=torch.int32)


def sampling_processors(generation_config, temperature=None, top_k=None, top_p=None, min_p=None,
                        repetition_penalty=None):
    """HF's processors for sampling, in HF's order; arguments left None take the model's
    generation_config values (as ``model.generate(do_sample=True)`` does)."""
    from transformers.generation.logits_process import (LogitsProcessorList, MinPLogitsWarper,
                                                        RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    from transformers import GenerationConfig

    defaults = getattr(GenerationConfig, "_get_default_generation_params", lambda: {})()

    def pick(value, name):  # HF's priority: argument > the model's generation_config > HF's global default
        if value is not None:
            return value
        value = getattr(generation_config, name, None)
        return value if value is not None else defaults.get(name)

    temperature, top_k, top_p = pick(temperature, "temperature"), pick(top_k, "top_k"), pick(top_p, "top_p")
    min_p, repetition_penalty = pick(min_p, "min_p"), pick(repetition_penalty, "repetition_penalty")
    for name, value in (("temperature", temperature), ("top_p", top_p), ("repetition_penalty", repetition_penalty)):
        if value is not None and not (isinstance(value, (int, float)) and value > 0):
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    if top_k is not None and not (isinstance(top_k, int) and top_k >= 0):
        raise ValueError(f"top_k must be an int >= 0, got {top_k!r}")
    if top_p is not None and top_p > 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if min_p is not None and not (isinstance(min_p, (int, float)) and 0 <= min_p <= 1):
        raise ValueError(f"min_p must be in [0, 1], got {min_p!r}")
    processors = LogitsProcessorList()
    if repetition_penalty is not None and repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(penalty=repetition_penalty))
    if temperature is not None and temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if top_k:
        processors.append(TopKLogitsWarper(top_k=top_k))
    if top_p is not None and top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p=top_p))
    if min_p:
        processors.append(MinPLogitsWarper(min_p=min_p))
    return processors


class UniformStream:
    """Uniforms in [0, 1) from a generator, handed out in order: ``peek(n)`` shows the next n,
    ``consume(n)`` moves past them. Draws from the generator in blocks."""

    def __init__(self, generator: torch.Generator | None, device, block: int = 256):
        self.generator = generator
        self.device = device
        self.block = block
        self.buffer = torch.empty(0, dtype=torch.float64, device=device)

    def peek(self, n: int) -> torch.Tensor:
        if self.buffer.shape[0] < n:
            g = self.generator
            fresh = torch.rand(max(self.block, n), dtype=torch.float64, generator=g,
                               device=g.device if g is not None else self.device)
            self.buffer = torch.cat([self.buffer, fresh.to(self.device)])
        return self.buffer[:n]

    def consume(self, n: int) -> None:
        self.buffer = self.buffer[n:]


class SamplingVerifier:
    """Sampling: the first token is drawn after the prefill, and a step walks the tree with one draw
    per visited node (``ops.verify_sample``). Recycling keeps the top-k of every node's processed
    logits, as under greedy."""

    def __init__(self, processors, topk: int, generator: torch.Generator | None = None):
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        self.processors = processors if processors is not None and len(processors) else None
        self.topk = topk
        self.generator = generator
        self.stream: UniformStream | None = None  # one per generation, made by first()
        self.description = "sample(" + ", ".join(_describe(p) for p in (self.processors or [])) + ")"

    def _process(self, seq, tokens, parents, logits) -> torch.Tensor:
        if self.processors is None:
            return logits.float()
        return process_tree_logits(self.processors, seq, tokens, parents, logits)

    def first(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """A draw from the prefill's last logits [1, V] (a one-node walk): [1]."""
        root = input_ids[:, -1:]  # a one-node tree whose context is the prompt; its token is never emitted
        probs = torch.softmax(self._process(input_ids, root, _ROOT_ONLY, logits.unsqueeze(1)), dim=-1)
        parents = _ROOT_ONLY.to(logits.device)
        self.stream = UniformStream(self.generator, logits.device)
        token = ops.verify_sample(root, parents, probs, self.stream.peek(1).view(1, 1))[2]
        self.stream.consume(1)
        return token

    def verify(self, seq: torch.Tensor, draft, logits: torch.Tensor) -> tuple[Pending, torch.Tensor]:
        """The step's pending verdict (drawn path + bonus) and the top-k candidates of every node."""
        host = draft.on_host
        scores = self._process(seq, host.tokens, host.parents, logits)
        candidates = scores.topk(self.topk, dim=-1).indices
        probs = torch.softmax(scores, dim=-1)
        accept_len, nodes, bonus = ops.verify_sample(draft.tokens, draft.parents, probs,
                                                     self.stream.peek(draft.size).view(1, -1))
        # As many draws as tokens emitted, once the step's sync has brought the count back.
        return pending(draft.tokens, accept_len, nodes, bonus, settle=self.stream.consume), candidates


def _describe(processor) -> str:
    name = type(processor).__name__.replace("LogitsWarper", "").replace("LogitsProcessor", "")
    for attr in ("temperature", "top_k", "top_p", "min_p", "penalty"):
        if hasattr(processor, attr):
            return f"{name}={getattr(processor, attr)}"
    return name
