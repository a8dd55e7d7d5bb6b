"""TokenRecycler: the decode loop. Each step reads like the method:

    prompt -> draft (draft.py) -> forward (hf_model.py) -> verify (verify.py) -> recycle (draft.py)
           -> compact the cache (cache.py) -> emit (emit.py)
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Sequence

import torch

from . import cache as kv
from . import distributed, hf_model, sample, skinny, verify, window
from .adjacency import AdjacencyMatrix
from .auto_tree import sync
from .batch import check_left_padded
from .draft import Draft, Drafter
from .emit import Emitter
from .graph_step import BUCKETS, GraphStep
from .stats import GenerationStats
from .step_sync import ForwardTimer, StepSync
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
        ngram_history: the n-gram lookup also searches the last ngram_history tokens this
            recycler generated for earlier (batch-1) requests, like the matrix a memory that
            outlives one call (ngram.RecentOutputs; ``reset()`` forgets it). 0 turns it off. Drafts
            only: the output is the model's either way.
        tree_attention: run verification forwards through our tree-attention kernel (registered
            with transformers as attn_implementation "token_recycling"; every other call of the
            model goes to sdpa) instead of a dense [N, prefix + N] additive mask. None (default):
            for sdpa models on CUDA builds, and on a CPU with AVX2/FMA when the model is float32 or
            bf16 with a head_dim that is a multiple of 8 (the kernel's vectorized path,
            ``hf_attention.cpu_kernel_vectorized``). Other CPU sdpa models keep the dense mask but
            take it through the same backend, whose CPU path runs torch's sdpa with grouped-query
            heads folded in (transformers copies K/V per query head whenever a mask is given).
            ``rec.attention`` says which ("tree-kernel", "dense-gqa" or "model"). Both switch the
            model's attn_implementation in place; False leaves it as it is (dense masks, through
            whichever backend the model has).
        cuda_graphs: verification forwards padded to bucket sizes over a static cache with a
            device-side prefix length (graph_step.py); implies tree_attention. On CUDA each bucket's
            forward is captured once per generate() call and replayed; elsewhere, or where capture is
            impossible (``rec.graph.uncaptured_reason``), the same forward runs uncaptured.
        skinny_linear: during generate(), the model's float32 or bf16 CPU ``nn.Linear`` layers take
            ``ops.skinny_linear`` for forwards of 1..12 tokens (skinny.py: a forward of up to 4 tokens
            then costs about what torch's one-token forward does, instead of 1.7-2x). None (default):
            on where it applies and this CPU has its AVX2/FMA path. The model is restored after each
            call.
    """

    def __init__(self, model, tree: TreeSpec = "auto", topk: int = 8, *, seed_from_prompt: bool = False,
                 ngram: bool = True, max_ngram: int = 4, ngram_tokens: int = 10, ngram_history: int = 4096,
                 tree_attention: bool | None = None, cuda_graphs: bool = False,
                 skinny_linear: bool | None = None):
        hf_model.check_supported(model, extra_implementations=("token_recycling",))
        self.model = model
        self.device = hf_model.model_device(model)
        self.drafter = Drafter(hf_model.vocab_size(model), self.device, tree, topk, ngram=ngram,
                               max_ngram=max_ngram, ngram_tokens=ngram_tokens, ngram_history=ngram_history)
        self.topk = topk
        self.seed_from_prompt = seed_from_prompt
        self.stats = GenerationStats()
        self._cache_kwarg = hf_model.cache_kwarg(model)
        if cuda_graphs and tree_attention is False:
            raise ValueError("cuda_graphs=True needs tree_attention (the device-side prefix length goes to it)")
        self.tree_attention = self._setup_tree_attention(True if cuda_graphs else tree_attention)
        self.graph = GraphStep(model, self._cache_kwarg) if cuda_graphs else None
        self._batch = None  # batch.BatchDecoder, made on the first batched call
        self.skinny_linear = self._setup_skinny_linear(skinny_linear)

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
        """Cold start: forget everything the matrix (and the auto tree's statistics, the recent outputs) learned."""
        self.drafter.reset()

    def save(self, path: str | os.PathLike) -> None:
        """Save the matrix, the tree (and the auto tree's statistics) as safetensors, with vocab size and k."""
        self.matrix.save(path, extra=self.drafter.extra_state())

    @classmethod
    def load(cls, model, path: str | os.PathLike, **kwargs) -> "TokenRecycler":
        """A recycler for `model` with the matrix (and tree, unless `tree=` is given) saved at `path`."""
        topk = kwargs.pop("topk", None)
        rec_topk = topk if topk is not None else _saved_topk(path)
        table, extra = AdjacencyMatrix.read(path, hf_model.vocab_size(model), rec_topk)
        if "tree" not in kwargs and extra.get("tree") and "auto" not in extra:
            kwargs["tree"] = extra["tree"]
        rec = cls(model, topk=rec_topk, **kwargs)
        rec.matrix.table.copy_(table)
        rec.drafter.load_extra_state(extra)
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
        or a padded row must be left-padded with `attention_mask` (batch.py); rows that stop early
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
        if streamer is not None and pads is None:  # (a batch refuses a streamer below)
            streamer.put(input_ids.cpu())
        if do_sample:
            processors = sample.sampling_processors(self.model.generation_config, temperature, top_k, top_p, min_p,
                                                    repetition_penalty)
            verifier = sample.SamplingVerifier(processors, self.topk, generator)
        else:
            verifier = verify.GreedyVerifier(None, self.topk)
        capacity = input_ids.shape[1] + max_new_tokens + 1
        if pads is not None:
            eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
            pad = getattr(self.model.generation_config, "pad_token_id", None)
            return self._decode_batch(input_ids, pads, kv.new_cache(self.model), criteria, verifier, streamer,
                                      capacity, pad if pad is not None else (eos[0] if eos else 0))
        # Graph steps: room for the largest bucket at the end, so no step's draft is cut for room.
        cache = kv.new_cache(self.model, capacity + BUCKETS[-1] if self.graph else None)
        return self._decode(input_ids, cache, criteria, verifier, streamer, capacity)

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
            if (generation_config.num_beams or 1) > 1:
                raise NotImplementedError("TokenRecycler does not do beam search (num_beams must be 1)")
        input_ids, pads = self._check_input(input_ids, model_kwargs.get("attention_mask"))
        cache = model_kwargs.get("cache", model_kwargs.get("past_key_values")) or kv.new_cache(self.model)
        if cache.get_seq_length() != 0:
            raise NotImplementedError("TokenRecycler starts from an empty cache; a pre-filled cache was given")
        processors = logits_processor if logits_processor is not None and len(logits_processor) else None
        max_length = getattr(generation_config, "max_length", None) or input_ids.shape[1] + 1024
        if generation_config is not None and generation_config.do_sample:
            verifier = sample.SamplingVerifier(processors, self.topk, generator)
        else:
            verifier = verify.GreedyVerifier(processors, self.topk)
        if pads is not None:
            pad = getattr(generation_config, "pad_token_id", None)
            pad = pad if pad is not None else getattr(self.model.generation_config, "pad_token_id", None)
            sequences = self._decode_batch(input_ids, pads, cache, stopping_criteria, verifier, streamer,
                                           max_length + 1, _first_eos(generation_config) if pad is None else pad)
        else:
            sequences = self._decode(input_ids, cache, stopping_criteria, verifier, streamer, max_length + 1)
        if generation_config is not None and generation_config.return_dict_in_generate:
            from transformers.generation.utils import GenerateDecoderOnlyOutput
            return GenerateDecoderOnlyOutput(sequences=sequences, past_key_values=cache)
        return sequences

    # ------------------------------------------------------------------------------ the loop
    def _decode(self, input_ids, cache, stopping, verifier, streamer, capacity: int) -> torch.Tensor:
        with skinny.routed(self.model, self.skinny_linear):  # few-token forwards' linears (CPU)
            return self._decode_steps(input_ids, cache, stopping, verifier, streamer, capacity)

    def _decode_steps(self, input_ids, cache, stopping, verifier, streamer, capacity: int) -> torch.Tensor:
        start = time.perf_counter()
        stats = self.stats = GenerationStats(decoding=verifier.description)
        emitter = Emitter(stopping, streamer)
        distributed.check_prompt(input_ids)
        window.prepare(self.model, cache)  # sliding-window layers that tree decoding can compact
        root, seq, done = self._prefill(input_ids, cache, verifier, emitter)
        state = self.drafter.start(seq, capacity)
        if not done:
            self.drafter.tune(lambda n: self._timed_dummy_forward(cache, root, seq.shape[1] - 1, n),
                              seq.shape[1] - 1, kv.static_capacity(cache))
        root = root.cpu()  # drafting is host work (draft.py)
        prefix_len = _prefix_tensor(seq.shape[1] - 1, self.device)  # on the device, for the kernels that take it
        timer = ForwardTimer(self.device)
        with StepSync(self.device) as step_sync:  # the step's one host sync (step_sync.py)
            while not done:
                t_step = time.perf_counter()
                prefix = seq.shape[1] - 1  # the root is emitted but not yet in the cache
                draft, forwarded = self._fit(cache, prefix, self.drafter.draft(state, root))
                distributed.check_draft(draft, stats.steps)  # tensor parallel: a desync is an error, not a hang
                kv.check_cache(cache, forwarded)
                timer.start()
                logits = self._forward(draft, prefix, cache, forwarded, prefix_len)
                timer.stop()
                pending, candidates = verifier.verify(seq, draft, logits)  # greedy or sampling walk
                *parts, candidates = step_sync.fetch(*pending.device_parts(), candidates)
                verdict = pending.resolve(*parts)  # from here on: host copies
                self.drafter.observe(state, draft, verdict.path, verdict.new_host)
                self.drafter.recycle(draft.on_host.tokens, candidates.view(1, draft.size, -1))
                kv.compact(cache, prefix_len, verdict.accepted_nodes, verdict.accept_len, verdict.accepted,
                           forwarded)
                seq, done, emitted = emitter.emit(seq, verdict.new_tokens, verdict.new_host.tolist())
                if not done:
                    state.accept(seq, emitted, verdict.new_host)
                stats.record_step(verdict.path.tolist(), draft)
                self.drafter.step_done(time.perf_counter() - t_step, timer.seconds(), draft)
                root, prefix_len = verdict.new_host[-1:], prefix_len + verdict.accept_len[:1]
            step_sync.finish()
        if self.graph is not None:
            self.graph.release()
        emitter.end()
        self.drafter.finish(seq[0, input_ids.shape[1]:])  # later requests' n-grams search this output
        stats.new_tokens = seq.shape[1] - input_ids.shape[1]
        stats.seconds = time.perf_counter() - start
        stats.tree, stats.tree_size = self.describe(), self.tree.num_nodes - 1
        stats.predicted_speedup = self.drafter.predicted_speedup()
        base = self.drafter.single_step_seconds()
        if base is not None and stats.steps:
            stats.measured_speedup = stats.mean_accepted * base / (stats.seconds / stats.steps)
        return seq

    def _decode_batch(self, input_ids, pads, cache, stopping, verifier, streamer, capacity: int,
                      pad_token_id: int) -> torch.Tensor:
        """Several rows, or one left-padded row: batch.py's loop (the rows' own trees, one forward)."""
        if streamer is not None:
            raise ValueError("streamer works with one unpadded sequence only (batch size 1, no padding in "
                             "attention_mask); got a batch or a padded row")
        if self.graph is not None:
            raise NotImplementedError("cuda_graphs=True supports batch size 1 only")
        if kv.static_capacity(cache) is not None:
            raise NotImplementedError("cache_implementation='static' is not supported with batch size > 1 or "
                                      "padding yet; use the default dynamic cache")
        if window.SLIDING in window._layer_types(self.model):
            raise NotImplementedError("sliding-window models are supported with batch size 1 only (no padding)")
        if self._batch is None:
            from .batch import BatchDecoder
            self._batch = BatchDecoder(self)
        distributed.check_prompt(input_ids)
        with skinny.routed(self.model, self.skinny_linear):
            return self._batch.decode(input_ids, pads, cache, stopping, verifier, pad_token_id, capacity)

    def _prefill(self, input_ids, cache, verifier, emitter: Emitter):
        keep_all = self.seed_from_prompt
        out = self.model(input_ids=input_ids, use_cache=True, logits_to_keep=0 if keep_all else 1,
                         **{self._cache_kwarg: cache})
        if keep_all and input_ids.shape[1] > 0:
            self.drafter.recycle(input_ids, out.logits.topk(self.topk, dim=-1).indices)
        root = verifier.first(input_ids, out.logits[:, -1, :])
        seq, done, _ = emitter.emit(input_ids, root)
        return root, seq, done

    def _fit(self, cache, prefix: int, draft):
        """(the draft that fits the cache, how many cache entries its forward writes)."""
        if self.graph is None:
            draft = kv.fit(cache, prefix, draft)
            return draft, draft.size
        draft, size = self.graph.fit(cache, prefix, draft)
        return draft, size or draft.size

    def _forward(self, draft, prefix: int, cache, forwarded: int | None = None,
                 prefix_len: torch.Tensor | None = None) -> torch.Tensor:
        if self.graph is not None and forwarded is not None:
            return self.graph.forward(draft, prefix_len, cache, forwarded)
        return hf_model.forward_tree(self.model, draft, prefix, cache, self.tree_attention, self._cache_kwarg)

    def _timed_dummy_forward(self, cache, root, prefix: int, n: int) -> None:
        """A verification-shaped forward of n tokens (a chain), then the cache restored."""
        tokens = root.view(1, 1).expand(1, n).contiguous()
        chain = torch.ones(n, n, dtype=torch.bool, device=self.device).tril()
        depths = torch.arange(n, device=self.device)
        self._forward(Draft(tokens, torch.arange(-1, n - 1, device=self.device, dtype=torch.int32), depths, chain,
                            self.tree), prefix, cache)
        sync(self.device)
        kv.trim(cache, n)

    def _greedy_and_candidates(self, logits):
        return verify.greedy_and_candidates(logits, self.topk)

    # ------------------------------------------------------------------------------ helpers
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
        from . import hf_attention
        impl = hf_model.attn_implementation(self.model)
        self.attention = "model"
        if wanted is None:
            if self.device.type == "cpu" and impl in ("sdpa", "token_recycling"):
                if not hf_attention.use_tree_attention(self.model):
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
        if not hf_attention.use_tree_attention(self.model):
            raise ValueError(f"{type(self.model).__name__} does not dispatch attention through transformers' "
                             f"AttentionInterface, so tree_attention=True cannot apply")
        return True

    def _check_input(self, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(input_ids [B, S] on the device, the pad count of every row, or None for one unpadded row)."""
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
        if input_ids.shape[0] == 1 and int(pads[0]) == 0:
            pads = None  # the batch-1 loop
        return input_ids.to(self.device, torch.long), pads


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
