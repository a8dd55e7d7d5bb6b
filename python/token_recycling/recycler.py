"""TokenRecycler: the public entry point. It checks the input, builds the verifier and stopping
criteria as ``generate()`` does, enters the model's decode-time settings (attention backend,
``skinny_linear`` routing) for the length of one call, and runs the decode step (step.py):

    prompt -> draft (draft.py) -> forward (hf_model.py) -> verify (verify.py) -> recycle (draft.py)
           -> compact the cache (cache.py) -> emit (emit.py)

for one row or many.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Sequence

import torch

from . import cache as kv
from . import distributed, hf_attention, hf_model, sample, skinny, verify, window
from .adjacency import AdjacencyMatrix
from .draft import DEFAULT_MEMORY_TOKENS, Drafter
from .graph_step import BUCKETS, GraphStep
from .stats import GenerationStats
from .step import Decoder
from .tree import TreeSpec


class TokenRecycler:
    """Lossless speculative decoding (greedy or sampling) with Token Recycling for a HuggingFace causal LM.

    Args:
        model: a transformers causal LM (eager or sdpa attention).
        tree: "auto" (default: tree size and n-gram chains chosen per step from measured acceptance
            and cost, see policy.py), a preset
            name ("paper", "paper-16", "chain-4", ...) or a list of rank paths.
        topk: candidates kept per token in the adjacency matrix (k).
        seed_from_prompt: fill the prompt tokens' rows from the prefill's top-k (cold-start help).
        ngram: graft the continuation of the longest earlier match of the context's last
            1..max_ngram tokens (up to ngram_tokens tokens) onto the tree each step. False gives
            the paper's method.
        ngram_history: the capacity, in tokens, of the suffix memory (memory.SuffixMemory): every
            earlier request's prompt and output, searched each step for the longest match of the
            context's suffix and the continuation most of its occurrences went on with; like the
            matrix a memory that outlives one call, saved with it (``save``), shared by every row
            of a batch. Past the capacity the least recently used requests are forgotten;
            ``reset()`` forgets all. About 16 bytes per token (``drafter.memory.bytes_per_token``).
            0 turns it off. Drafts only: the output is the model's either way.
        tree_attention: run verification forwards through our tree-attention kernel (registered
            with transformers as attn_implementation "token_recycling"; every other call of the
            model goes to sdpa) instead of a dense [N, prefix + N] additive mask. None (default):
            for sdpa models on CUDA builds, and on a CPU with AVX2/FMA when the model is float32 or
            bf16 with a head_dim that is a multiple of 8 (the kernel's vectorized path,
            ``hf_attention.cpu_kernel_vectorized``). Other CPU sdpa models keep the dense mask but
            take it through the same backend, whose CPU path runs torch's sdpa with grouped-query
            heads folded in (transformers copies K/V per query head whenever a mask is given).
            ``rec.attention`` says which ("tree-kernel", "dense-gqa" or "model"). Both switch the
            model's attn_implementation for the length of each generate() call and switch it back
            on return; False leaves it as it is (dense masks, through whichever backend the model has).
        cuda_graphs: verification forwards padded to bucket sizes over a static cache with a
            device-side prefix length (graph_step.py); implies tree_attention. On CUDA each bucket's
            forward is captured once per generate() call and replayed; elsewhere, or where capture is
            impossible (``rec.graph.uncaptured_reason``), the same forward runs uncaptured.
        skinny_linear: during generate(), the model's float32 or bf16 CPU ``nn.Linear`` layers take
            ``ops.skinny_linear`` for forwards of a few tokens (skinny.py: a forward of up to 4 tokens
            then costs about what torch's one-token forward does, instead of 1.7-2x), up to a row count
            measured per layer shape on this machine and cached (calibration.py). None (default): on
            where it applies and this CPU has its AVX2/FMA path. The model is restored after each call.
        drafter: a :class:`Drafter` (or subclass) to draft with instead of the one ``tree``, ``topk`` and
            the n-gram arguments would build (those are then ignored); verification, the cache and the
            kernels stay this recycler's. For other drafting methods side by side with the default, such
            as the benchmark's ``suffix`` baseline (token_recycling.tools.suffix). Its vocabulary must be
            the model's.
    """

    def __init__(self, model, tree: TreeSpec = "auto", topk: int = 8, *, seed_from_prompt: bool = False,
                 ngram: bool = True, max_ngram: int = 4, ngram_tokens: int = 10,
                 ngram_history: int = DEFAULT_MEMORY_TOKENS,
                 tree_attention: bool | None = None, cuda_graphs: bool = False,
                 skinny_linear: bool | None = None, drafter: Drafter | None = None):
        hf_model.check_supported(model, extra_implementations=("token_recycling",))
        self.model = model
        self.device = hf_model.model_device(model)
        if drafter is None:
            drafter = Drafter(hf_model.vocab_size(model), self.device, tree, topk, ngram=ngram,
                              max_ngram=max_ngram, ngram_tokens=ngram_tokens, ngram_history=ngram_history)
        elif not isinstance(drafter, Drafter):
            raise TypeError(f"drafter must be a token_recycling.draft.Drafter, got {type(drafter).__name__}")
        elif drafter.matrix.vocab_size != hf_model.vocab_size(model):
            raise ValueError(f"drafter has a vocabulary of {drafter.matrix.vocab_size} tokens, the model "
                             f"{hf_model.vocab_size(model)}")
        elif torch.device(drafter.device) != self.device:
            raise ValueError(f"drafter sends its drafts to {drafter.device}, the model is on {self.device}")
        self.drafter = drafter
        self.topk = drafter.topk
        self.seed_from_prompt = seed_from_prompt
        self.stats = GenerationStats()
        self._cache_kwarg = hf_model.cache_kwarg(model)
        if cuda_graphs and tree_attention is False:
            raise ValueError("cuda_graphs=True needs tree_attention (the device-side prefix length goes to it)")
        self.tree_attention = self._setup_tree_attention(True if cuda_graphs else tree_attention)
        self.graph = GraphStep(model, self._cache_kwarg) if cuda_graphs else None
        self._decoder = Decoder(self)
        self.skinny_linear = self._setup_skinny_linear(skinny_linear)
        self._routing: dict[int, dict[str, int] | None] = {}  # threads -> skinny_linear's row limits

    # The drafter's shared state, as attributes of the recycler.
    matrix = property(lambda self: self.drafter.matrix, doc="the AdjacencyMatrix (shared by every call)")
    tree = property(lambda self: self.drafter.tree, doc="the matrix tree drafted with now")
    auto = property(lambda self: self.drafter.auto, doc="the AutoTree (tree='auto'), else None")
    tree_spec = property(lambda self: self.drafter.tree_spec)
    ngram = property(lambda self: self.drafter.ngram)

    # ------------------------------------------------------------------------------ public API
    def describe(self) -> str:
        return f"TokenRecycler({self.drafter.describe()})"

    def reset(self) -> None:
        """Cold start: forget everything the matrix (and the auto tree's statistics, the suffix memory) learned."""
        self.drafter.reset()

    def save(self, path: str | os.PathLike) -> None:
        """Save the matrix, the tree (and the auto tree's statistics) and the suffix memory as
        safetensors, with vocab size and k."""
        self.matrix.save(path, extra=self.drafter.extra_state(), tensors=self.drafter.extra_tensors())

    def use_cost_curve(self, sizes: Sequence[int], seconds: Sequence[float]) -> None:
        """tree="auto": weigh drafts against this forward-cost curve (seconds of a forward of n nodes per
        row, at the sizes given, linear in between) at every batch size and context, instead of one
        measured on this machine. The steps still rescale it by their measured forward times, but its
        shape stays. For tests and reproducible comparisons; a measured curve is better for speed."""
        from .auto_tree import CostModel
        if self.drafter.policy is None:
            raise ValueError("use_cost_curve needs tree='auto' (a fixed tree has no policy to weigh drafts)")
        if len(sizes) != len(seconds) or len(sizes) < 2 or list(sizes) != sorted(set(sizes)) or min(sizes) < 1:
            raise ValueError(f"sizes must be >= 2 increasing ints >= 1 with one seconds value each, got {sizes!r}, "
                             f"{seconds!r}")
        if not all(s > 0 for s in seconds):
            raise ValueError(f"seconds must be positive, got {seconds!r}")
        curve = CostModel([int(n) for n in sizes], [float(s) for s in seconds], context=2**62)  # never re-measured
        self.drafter.policy.cost.set_curve(curve)
        self._decoder.fixed = curve
        self._decoder.costs.clear()

    @classmethod
    def load(cls, model, path: str | os.PathLike, **kwargs) -> "TokenRecycler":
        """A recycler for `model` with the matrix (and tree, unless `tree=` is given, and the suffix
        memory, when the file has one) saved at `path`."""
        topk = kwargs.pop("topk", None)
        rec_topk = topk if topk is not None else _saved_topk(path)
        table, extra = AdjacencyMatrix.read(path, hf_model.vocab_size(model), rec_topk)
        if "tree" not in kwargs and extra.get("tree") and "auto" not in extra:
            kwargs["tree"] = extra["tree"]
        rec = cls(model, topk=rec_topk, **kwargs)
        rec.matrix.table.copy_(table)
        rec.drafter.load_extra_state(extra)
        rec.drafter.load_extra_tensors(AdjacencyMatrix.read_tensors(path))
        return rec

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 128, eos_token_id: int | Sequence[int] | None = None,
                 streamer=None, *, do_sample: bool = False, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                 repetition_penalty: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Greedy generation, token-for-token what `model.generate(do_sample=False)` returns (fp32);
        with `do_sample=True`, sampling with the distribution of `model.generate(do_sample=True)`
        (temperature, top_k, top_p, min_p, repetition_penalty: None takes the model's
        generation_config value, as HF does; `generator` seeds the draws, else torch's default).

        Returns a LongTensor [B, prompt + new]. Stops at `max_new_tokens` or at an EOS token
        (default: the model's generation_config.eos_token_id), which is included. A batch (B > 1)
        or a padded row must be left-padded with `attention_mask` (step.py); rows that stop early
        are filled with the model's pad_token_id (else the first EOS id), as generate() does.
        """
        from transformers.generation.stopping_criteria import (EosTokenCriteria, MaxLengthCriteria,
                                                               StoppingCriteriaList)

        input_ids, pads = self._check_input(input_ids, attention_mask)
        if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if eos_token_id is None:
            eos_token_id = getattr(self.model.generation_config, "eos_token_id", None)
        criteria = StoppingCriteriaList([MaxLengthCriteria(max_length=input_ids.shape[1] + max_new_tokens)])
        if eos_token_id is not None:
            criteria.append(EosTokenCriteria(eos_token_id=eos_token_id))
        self._check_features(input_ids, pads, streamer)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        if do_sample:
            processors = sample.sampling_processors(self.model.generation_config, temperature, top_k, top_p, min_p,
                                                    repetition_penalty)
            verifier = sample.SamplingVerifier(processors, self.topk, generator)
        else:
            verifier = verify.GreedyVerifier(None, self.topk)
        capacity = input_ids.shape[1] + max_new_tokens + 1
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        pad = getattr(self.model.generation_config, "pad_token_id", None)
        # Graph steps: room for the largest bucket at the end, so no step's draft is cut for room.
        cache = kv.new_cache(self.model, capacity + BUCKETS[-1] if self.graph else None)
        return self._decode(input_ids, pads, cache, criteria, verifier, streamer, capacity,
                            pad if pad is not None else (eos[0] if eos else 0))

    @torch.no_grad()
    def __call__(self, model, input_ids, logits_processor=None, stopping_criteria=None, generation_config=None,
                 synced_gpus: bool = False, streamer=None, **model_kwargs):
        """transformers' `custom_generate` hook: `model.generate(..., custom_generate=rec)`. With
        `do_sample=True` HF's processors and warpers are applied per node; a `generator=` keyword
        (a torch.Generator) seeds the draws, else torch's default generator does."""
        if model is not self.model:
            raise ValueError("this TokenRecycler was built for another model")
        generator = model_kwargs.pop("generator", None)
        if generation_config is not None:
            check_generation_config(generation_config)
        input_ids, pads = self._check_input(input_ids, model_kwargs.get("attention_mask"))
        self._check_features(input_ids, pads, streamer)
        cache = model_kwargs.get("cache", model_kwargs.get("past_key_values")) or kv.new_cache(self.model)
        if cache.get_seq_length() != 0:
            raise NotImplementedError("TokenRecycler starts from an empty cache; a pre-filled cache was given")
        processors = logits_processor if logits_processor is not None and len(logits_processor) else None
        max_length = getattr(generation_config, "max_length", None) or input_ids.shape[1] + 1024
        if generation_config is not None and generation_config.do_sample:
            verifier = sample.SamplingVerifier(processors, self.topk, generator)
        else:
            verifier = verify.GreedyVerifier(processors, self.topk)
        pad = getattr(generation_config, "pad_token_id", None)
        pad = pad if pad is not None else getattr(self.model.generation_config, "pad_token_id", None)
        sequences = self._decode(input_ids, pads, cache, stopping_criteria, verifier, streamer, max_length + 1,
                                 _first_eos(generation_config) if pad is None else pad)
        if generation_config is not None and generation_config.return_dict_in_generate:
            from transformers.generation.utils import GenerateDecoderOnlyOutput
            return GenerateDecoderOnlyOutput(sequences=sequences, past_key_values=cache)
        return sequences

    # ------------------------------------------------------------------------------ the call
    def _decode(self, input_ids, pads, cache, stopping, verifier, streamer, capacity: int,
                pad_token_id: int) -> torch.Tensor:
        """One generation through the decode step, with the model's decode-time settings entered for
        its length and restored on return (also on an exception)."""
        distributed.check_prompt(input_ids)
        with hf_attention.entered(self.model, self.attention != "model"), \
                skinny.routed(self.model, self.skinny_linear, table=self._routing_table()):  # few-token linears (CPU)
            window.prepare(self.model, cache)  # sliding-window layers that tree decoding can compact
            return self._decoder.decode(input_ids, pads, cache, stopping, verifier, streamer, capacity,
                                        pad_token_id)

    def _check_features(self, input_ids, pads, streamer) -> None:
        """What works with one row only (as generate() has it for streamers), refused before any work."""
        rows = input_ids.shape[0]
        if streamer is not None and (rows > 1 or bool(pads.any())):
            raise ValueError("streamer works with one unpadded sequence only (batch size 1, no padding in "
                             "attention_mask), as in transformers' generate(); got a batch or a padded row")
        if self.graph is not None and rows > 1:
            raise NotImplementedError("cuda_graphs=True decodes one row at a time; use cuda_graphs=False for a batch")
        if rows > 1 and window.SLIDING in window._layer_types(self.model):
            raise NotImplementedError("sliding-window models are decoded one row at a time; call generate() "
                                      "once per prompt")

    # ------------------------------------------------------------------------------ helpers
    def _routing_table(self) -> dict[str, int] | None:
        """skinny_linear's per-shape row limits at torch's current thread count (skinny.routing_table:
        measured once per machine and model, then read from the calibration cache)."""
        if not self.skinny_linear:
            return None
        threads = torch.get_num_threads()
        if threads not in self._routing:
            self._routing[threads] = skinny.routing_table(self.model, self.device)
        return self._routing[threads]

    def _setup_skinny_linear(self, wanted: bool | None) -> bool:
        if wanted is None:
            return self.device.type == "cpu" and skinny.available() and skinny.applies(self.model)
        if not isinstance(wanted, bool):
            raise TypeError(f"skinny_linear must be True, False or None, got {wanted!r}")
        if wanted and not skinny.applies(self.model):
            raise ValueError("skinny_linear=True needs nn.Linear layers with float32 or bfloat16 weights on the CPU "
                             "(and no torch.distributed run); this model has none")
        return wanted

    def _setup_tree_attention(self, wanted: bool | None) -> bool:
        """Whether verification forwards send the bare tree mask to our kernel (else a dense mask).
        Sets ``self.attention``: "tree-kernel", "dense-gqa" (the dense mask through our backend, whose
        CPU path folds grouped-query heads into sdpa instead of copying K/V) or "model" (the model's
        own attention)."""
        from ._extension import WITH_CUDA
        impl = hf_model.attn_implementation(self.model)
        self.attention = "model"
        if wanted is None:
            if self.device.type == "cpu" and impl in ("sdpa", "token_recycling"):
                if not hf_attention.can_use(self.model):
                    return False
                if hf_attention.cpu_kernel_vectorized(self.model):
                    self.attention = "tree-kernel"
                    return True
                self.attention = "dense-gqa"
                return False
            wanted = self.device.type == "cuda" and WITH_CUDA and impl in ("sdpa", "token_recycling")
        if not wanted:
            if impl == "token_recycling":  # switched by an earlier recycler: dense masks through our backend
                self.attention = "dense-gqa"
            return False
        self.attention = "tree-kernel"
        if not hf_attention.can_use(self.model):
            raise ValueError(f"{type(self.model).__name__} does not dispatch attention through transformers' "
                             f"AttentionInterface, so tree_attention=True cannot apply")
        return True

    def _check_input(self, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids [B, S] on the device, the pad count of every row [B] on the host)."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError("input_ids must be an integer torch.Tensor [batch, seq]")
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [batch, seq] with seq >= 1, got shape {tuple(input_ids.shape)}")
        pads = check_left_padded(input_ids, attention_mask)
        v = self.matrix.vocab_size
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= v:  # padding too: the prefill embeds it
            raise ValueError(f"input_ids hold token ids outside [0, {v})")
        return input_ids.to(self.device, torch.long), pads


def check_left_padded(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The pad count of every row [B] (CPU); refuses right padding, empty rows and a bad mask."""
    batch, seq = input_ids.shape
    if attention_mask is None:
        return torch.zeros(batch, dtype=torch.long)
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 1:
        attention_mask = attention_mask.unsqueeze(0)
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (batch, seq):
        raise ValueError(f"attention_mask must be a tensor of the shape of input_ids {(batch, seq)}, got "
                         f"{getattr(attention_mask, 'shape', type(attention_mask).__name__)}")
    mask = attention_mask.detach().cpu()
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (tokens)")
    mask = mask.long()
    pads = seq - mask.sum(1)
    if bool((pads == seq).any()):
        raise ValueError("attention_mask has a row with no token (all zeros)")
    want = torch.arange(seq).view(1, -1) >= pads.view(-1, 1)
    if not torch.equal(mask.bool(), want):
        raise ValueError("attention_mask is not left-padded: TokenRecycler needs the padding of every row before "
                         "its tokens (tokenizer.padding_side = 'left', as transformers' generate() expects "
                         "for decoder-only models); right padding is not supported")
    return pads


def check_generation_config(generation_config) -> None:
    """Refuse what ``model.generate(custom_generate=rec)`` would otherwise ignore without a word: other
    decoding methods (their output is not greedy's or sampling's), other drafters, and per-step outputs
    that ``return_dict_in_generate`` would return (the tree forwards have no one-token scores,
    attentions or hidden states). ``num_return_sequences`` works: HF repeats each prompt before the call."""
    cfg = generation_config
    if (cfg.num_beams or 1) > 1:
        raise NotImplementedError("TokenRecycler does not do beam search (num_beams must be 1)")
    refused = {
        "penalty_alpha": (cfg.penalty_alpha or 0) > 0 and (cfg.top_k or 0) > 1,  # contrastive search
        "dola_layers": cfg.dola_layers is not None,
        "constraints": cfg.constraints is not None,
        "force_words_ids": cfg.force_words_ids is not None,
        "prompt_lookup_num_tokens": cfg.prompt_lookup_num_tokens is not None,
        "assistant_early_exit": cfg.assistant_early_exit is not None,
        "use_mtp": bool(getattr(cfg, "use_mtp", False)),
    }
    for name, is_set in refused.items():
        if is_set:
            raise NotImplementedError(f"{name} selects another decoding method than greedy or sampling, which "
                                      f"TokenRecycler does not do (drop {name} to decode with TokenRecycler)")
    if cfg.return_dict_in_generate:
        for name in ("output_scores", "output_logits", "output_attentions", "output_hidden_states"):
            if getattr(cfg, name, False):
                raise NotImplementedError(f"{name}=True is not supported by TokenRecycler: a step verifies a "
                                          f"whole draft tree in one forward, so there are no per-token {name[7:]} "
                                          f"to return (return_dict_in_generate gives sequences and the cache)")


def _first_eos(generation_config) -> int:
    eos = getattr(generation_config, "eos_token_id", None)
    if isinstance(eos, torch.Tensor):
        eos = eos.view(-1).tolist()
    eos = [eos] if isinstance(eos, int) else list(eos or [0])
    return int(eos[0])


def _prefix_tensor(prefix: int, device) -> torch.Tensor:
    return torch.tensor([prefix], dtype=torch.long, device=device)


def _saved_topk(path) -> int:
    from safetensors import safe_open
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            return int((f.metadata() or {}).get("topk", 8))
    except Exception:
        return 8  # AdjacencyMatrix.read gives the precise error
