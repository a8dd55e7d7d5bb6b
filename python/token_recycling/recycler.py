"""TokenRecycler: the decode loop. Each step reads like the method:

    prompt -> draft tree (matrix) -> verify (one forward) -> accept -> compact cache -> recycle
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Sequence

import torch

from . import hf_model, ops
from .adjacency import AdjacencyMatrix
from .auto_tree import COST_SIZES, AutoTree, measure_cost, sync
from .ngram import NgramIndex
from .stats import GenerationStats
from .tree import DraftTree, TreeSpec, make_tree


class TokenRecycler:
    """Lossless greedy speculative decoding with Token Recycling for a HuggingFace causal LM.

    Args:
        model: a transformers causal LM (eager or sdpa attention).
        tree: "auto" (default: shaped by measured acceptance and cost, see auto_tree.py), a preset
            name ("paper", "paper-16", "chain-4", ...) or a list of rank paths.
        topk: candidates kept per token in the adjacency matrix (k).
        seed_from_prompt: fill the prompt tokens' rows from the prefill's top-k (cold-start help).
        ngram: graft the continuation of the longest earlier match of the context's last
            1..max_ngram tokens (up to ngram_tokens tokens) onto the tree each step. False gives
            the paper's method.
        tree_attention: run verification forwards through our tree-attention kernel (registered
            with transformers as attn_implementation "token_recycling"; every other call of the
            model goes to sdpa) instead of a dense [N, prefix + N] additive mask. None (default):
            on CUDA builds for sdpa models. The model's attn_implementation is switched in place.
    """

    def __init__(self, model, tree: TreeSpec = "auto", topk: int = 8, *, seed_from_prompt: bool = False,
                 ngram: bool = True, max_ngram: int = 4, ngram_tokens: int = 10,
                 tree_attention: bool | None = None):
        hf_model.check_supported(model, extra_implementations=("token_recycling",))
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        if ngram and (max_ngram < 1 or ngram_tokens < 1):
            raise ValueError(f"max_ngram and ngram_tokens must be >= 1, got {max_ngram}, {ngram_tokens}")
        self.model = model
        self.device = hf_model.model_device(model)
        self.matrix = AdjacencyMatrix(hf_model.vocab_size(model), topk, self.device)
        self.topk = topk
        self.tree_spec = tree
        self.auto: AutoTree | None = None
        if isinstance(tree, str) and tree == "auto":
            self.auto = AutoTree(topk, max_chain=ngram_tokens if ngram else 0)
        self.tree: DraftTree = make_tree(self.auto.choose() if self.auto else tree, topk).to(self.device)
        self.seed_from_prompt = seed_from_prompt
        self.ngram, self.max_ngram, self.ngram_tokens = ngram, max_ngram, ngram_tokens
        self.stats = GenerationStats()
        self._cache_kwarg = hf_model.cache_kwarg(model)
        self.tree_attention = self._setup_tree_attention(tree_attention)

    # ------------------------------------------------------------------------------ public API
    def describe(self) -> str:
        chain = self.auto.chain if self.auto is not None and self.ngram else self.ngram_tokens
        ngram = f"ngram<={self.max_ngram}->{chain}" if self.ngram else "no ngram"
        return (f"TokenRecycler(tree={self.tree_spec!r}: {self.tree.num_nodes - 1} nodes, k={self.topk}, "
                f"{ngram})")

    def reset(self) -> None:
        """Cold start: forget everything the matrix (and the auto tree's statistics) learned."""
        self.matrix.reset()
        if self.auto is not None:
            cost = self.auto.cost
            self.auto = AutoTree(self.topk, max_chain=self.auto.max_chain)
            self.auto.cost = cost  # the hardware did not change
            self.tree = make_tree(self.auto.choose(), self.topk).to(self.device)

    def save(self, path: str | os.PathLike) -> None:
        """Save the matrix, the tree (and the auto tree's statistics) as safetensors, with vocab size and k."""
        extra = {"tree": [list(p) for p in self.tree.paths]}
        if self.auto is not None:
            extra["auto"] = self.auto.state()
        self.matrix.save(path, extra=extra)

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
        if rec.auto is not None and extra.get("auto"):
            rec.auto.load_state(extra["auto"])
            saved = [list(p) for p in extra.get("tree", [])]
            rec.tree = make_tree(saved or rec.auto.choose(), rec.topk).to(rec.device)
            rec.auto.budget = rec.tree.num_nodes - 1
        return rec

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 128, eos_token_id: int | Sequence[int] | None = None,
                 streamer=None) -> torch.Tensor:
        """Greedy generation, token-for-token what `model.generate(do_sample=False)` returns (fp32).

        Returns a LongTensor [1, prompt + new]. Stops at `max_new_tokens` or at an EOS token
        (default: the model's generation_config.eos_token_id), which is included.
        """
        from transformers.generation.stopping_criteria import (EosTokenCriteria, MaxLengthCriteria,
                                                               StoppingCriteriaList)

        input_ids = self._check_input(input_ids, attention_mask)
        if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if eos_token_id is None:
            eos_token_id = getattr(self.model.generation_config, "eos_token_id", None)
        criteria = StoppingCriteriaList([MaxLengthCriteria(max_length=input_ids.shape[1] + max_new_tokens)])
        if eos_token_id is not None:
            criteria.append(EosTokenCriteria(eos_token_id=eos_token_id))
        if streamer is not None:
            streamer.put(input_ids.cpu())
        cache = self._new_cache()
        return self._decode(input_ids, cache, criteria, None, streamer, input_ids.shape[1] + max_new_tokens + 1)

    @torch.no_grad()
    def __call__(self, model, input_ids, logits_processor=None, stopping_criteria=None, generation_config=None,
                 synced_gpus: bool = False, streamer=None, **model_kwargs):
        """transformers' `custom_generate` hook: `model.generate(..., custom_generate=rec)`."""
        if model is not self.model:
            raise ValueError("this TokenRecycler was built for another model")
        if generation_config is not None:
            if generation_config.do_sample:
                raise NotImplementedError("TokenRecycler is greedy-only for now: pass do_sample=False")
            if (generation_config.num_beams or 1) > 1:
                raise NotImplementedError("TokenRecycler does not do beam search (num_beams must be 1)")
        input_ids = self._check_input(input_ids, model_kwargs.get("attention_mask"))
        cache = model_kwargs.get("cache", model_kwargs.get("past_key_values")) or self._new_cache()
        if cache.get_seq_length() != 0:
            raise NotImplementedError("TokenRecycler starts from an empty cache; a pre-filled cache was given")
        processors = logits_processor if logits_processor is not None and len(logits_processor) else None
        max_length = getattr(generation_config, "max_length", None) or input_ids.shape[1] + 1024
        sequences = self._decode(input_ids, cache, stopping_criteria, processors, streamer, max_length + 1)
        if generation_config is not None and generation_config.return_dict_in_generate:
            from transformers.generation.utils import GenerateDecoderOnlyOutput
            return GenerateDecoderOnlyOutput(sequences=sequences, past_key_values=cache)
        return sequences

    # ------------------------------------------------------------------------------ the loop
    def _decode(self, input_ids, cache, stopping, processors, streamer, capacity: int) -> torch.Tensor:
        start = time.perf_counter()
        stats = self.stats = GenerationStats()
        root, seq, done = self._prefill(input_ids, cache, stopping, processors, streamer)
        index = self._new_ngram_index(seq, capacity) if self.ngram else None
        if self.auto is not None and not done:
            self._tune_auto(cache, root, seq.shape[1] - 1)
        while not done:
            t_step = time.perf_counter()
            prefix = seq.shape[1] - 1  # the root is emitted but not yet in the cache
            tree = self.tree
            tokens = ops.build_draft_tree(self.matrix.table, root, tree.parents, tree.ranks)
            tokens, parents, depths, mask = self._graft_ngram(index, tokens, tree)
            tokens, parents, depths, mask = self._fit_cache(cache, prefix, tokens, parents, depths, mask)
            forwarded = tokens.shape[1]
            hf_model.check_cache(cache, forwarded)
            logits = self._forward_tree(tokens, depths, mask, prefix, cache)
            if processors is not None:
                logits = self._process_tree_logits(processors, seq, tokens, parents, logits)
            greedy, candidates = self._greedy_and_candidates(logits)
            accept_len, nodes, bonus = ops.verify_greedy(tokens, greedy, parents)
            n_acc = int(accept_len[0])  # the one device-to-host sync of the step
            path = nodes[0, :n_acc]
            new_tokens = torch.cat([tokens[0, path[1:]], bonus])
            if self.auto is not None:  # draft-time rows of the accepted tokens, before recycling
                self.auto.observe(self.matrix.table[tokens[0, path]].cpu().numpy(), new_tokens.cpu().numpy())
            ops.update_adjacency(self.matrix.table, tokens, candidates)
            hf_model.compact_cache(cache, _prefix_tensor(prefix, self.device), nodes, accept_len, n_acc, forwarded)
            seq, done, emitted = self._emit(seq, new_tokens, stopping, streamer)
            if index is not None and not done:
                self._extend_ngram(index, seq, emitted)
            self._record(stats, path.tolist(), tree, forwarded, time.perf_counter() - t_step)
            root = bonus
        if streamer is not None:
            streamer.end()
        stats.new_tokens = seq.shape[1] - input_ids.shape[1]
        stats.seconds = time.perf_counter() - start
        stats.tree, stats.tree_size = self.describe(), self.tree.num_nodes - 1
        if self.auto is not None:
            stats.predicted_speedup = self.auto.predicted_speedup
            base = self.auto.cost(1) + self.auto.overhead
            if stats.steps:
                step_time = stats.seconds / stats.steps
                stats.measured_speedup = stats.mean_accepted * base / step_time
        return seq

    # ---------------------------------------------------------------- hybrid drafts (n-gram chain)
    def _new_ngram_index(self, seq, capacity: int) -> NgramIndex:
        index = NgramIndex(1, max(capacity, seq.shape[1] + 1), self.max_ngram)
        index.extend(seq)
        return index

    def _extend_ngram(self, index: NgramIndex, seq, emitted: int) -> None:
        if index.lengths[0] + emitted > index.capacity:  # generation ran past the planned length
            fresh = self._new_ngram_index(seq, 2 * index.capacity)
            index.__dict__.update(fresh.__dict__)
        else:
            index.extend(seq[:, seq.shape[1] - emitted:])

    def _graft_ngram(self, index, tokens, tree: DraftTree):
        """The draft for this step: the matrix tree, plus the n-gram continuation grafted under the
        root (merged with matching tree nodes). Returns tokens [1, M], parents, depths, mask."""
        if index is None:
            return tokens, tree.parents, tree.depths, tree.mask
        length = self.auto.chain if self.auto is not None else self.ngram_tokens
        if length == 0:
            return tokens, tree.parents, tree.depths, tree.mask
        chain, count = index.lookup(length)
        if int(count[0]) == 0:
            return tokens, tree.parents, tree.depths, tree.mask
        host = tokens.cpu()
        out, parents, depths, mask, num = ops.graft_chain(host, tree.parents.cpu(), chain, count)
        m = int(num[0])
        to = lambda t: t.to(self.device, non_blocking=True)  # noqa: E731
        return to(out[:, :m]), to(parents[0, :m]), to(depths[0, :m]), to(mask[0, :m, :m])

    # ---------------------------------------------------------------- auto tree
    def _tune_auto(self, cache, root, prefix: int) -> None:
        auto = self.auto
        capacity = hf_model.static_capacity(cache)
        sizes = [n for n in COST_SIZES if capacity is None or prefix + n <= capacity]
        if not auto.cost.measured and len(sizes) >= 3:  # else: measured on a later call with more room
            auto.cost = measure_cost(lambda n: self._timed_dummy_forward(cache, root, prefix, n), sizes=sizes,
                                     context=prefix)
        self._retune()

    def _retune(self) -> None:
        paths = self.auto.choose()
        if [tuple(p) for p in paths] != list(self.tree.paths):
            self.tree = make_tree(paths, self.topk).to(self.device)

    def _timed_dummy_forward(self, cache, root, prefix: int, n: int) -> None:
        """A verification-shaped forward of n tokens (a chain), then the cache restored."""
        tokens = root.view(1, 1).expand(1, n).contiguous()
        chain = torch.ones(n, n, dtype=torch.bool, device=self.device).tril()
        depths = torch.arange(n, device=self.device)
        self._forward_tree(tokens, depths, chain, prefix, cache)
        sync(self.device)
        cache.crop(-n)

    def _prefill(self, input_ids, cache, stopping, processors, streamer):
        keep_all = self.seed_from_prompt
        out = self.model(input_ids=input_ids, use_cache=True, logits_to_keep=0 if keep_all else 1,
                         **{self._cache_kwarg: cache})
        if keep_all and input_ids.shape[1] > 0:
            cand = out.logits[:, :, :].topk(self.topk, dim=-1).indices
            ops.update_adjacency(self.matrix.table, input_ids, cand)
        last = out.logits[:, -1, :]
        if processors is not None:
            last = processors(input_ids, last.float())
        root = last.argmax(-1)
        seq, done, _ = self._emit(input_ids, root, stopping, streamer)
        return root, seq, done

    def _fit_cache(self, cache, prefix: int, tokens, parents, depths, mask):
        """A static cache has a fixed length: near its end, forward only the first nodes that fit
        (nodes are in breadth-first order, so any prefix of them is a tree)."""
        capacity = hf_model.static_capacity(cache)
        if capacity is None or prefix + tokens.shape[1] <= capacity:
            return tokens, parents, depths, mask
        room = capacity - prefix
        if room < 1:
            raise ValueError(f"the static cache ({capacity} positions) is full at {prefix} tokens")
        return tokens[:, :room], parents[:room], depths[:room], mask[:room, :room]

    def _forward_tree(self, tokens, depths, tree_mask, prefix: int, cache) -> torch.Tensor:
        """One forward of the whole tree: node i at position prefix + depth(i), seeing the prefix
        and its ancestors. Returns logits [1, N, V]."""
        if self.tree_attention:  # the [1, 1, N, N] protocol of hf_attention: prefix implied
            mask = tree_mask.view(1, 1, *tree_mask.shape[-2:])
        else:
            mask = hf_model.TreeMask(tree_mask, hf_model.model_dtype(self.model), self.device)(
                prefix, hf_model.static_capacity(cache))
        out = self.model(input_ids=tokens, attention_mask=mask, position_ids=(depths + prefix).view(1, -1),
                         use_cache=True, **{self._cache_kwarg: cache})
        return out.logits

    def _greedy_and_candidates(self, logits):
        """(argmax [1, N], top-k ids [1, N, k]) from one top-k pass. The top-1 id is the argmax
        unless the two best logits tie (not rare in bf16); only then is argmax's first-index rule,
        which greedy generate() uses, looked up."""
        values, candidates = logits.topk(self.topk, dim=-1)
        greedy = candidates[..., 0]
        if self.topk == 1:
            return logits.argmax(-1), candidates
        tie = values[..., 0] == values[..., 1]
        if logits.device.type != "cpu" or bool(tie.any()):  # on a GPU, no sync just to look
            greedy = torch.where(tie, logits.argmax(-1), greedy)
        return greedy, candidates

    def _process_tree_logits(self, processors, seq, tokens, parents, logits):
        """Apply logits processors node by node, each with its own context (prefix + its path), so
        processors that look at the history stay exact. Only used when processors are present."""
        rows = []
        parents = parents.tolist()
        tok = tokens[0].tolist()
        for i in range(tokens.shape[1]):
            path, j = [], i
            while j > 0:
                path.append(tok[j])
                j = parents[j]
            ids = torch.cat([seq[0], torch.tensor(path[::-1], dtype=seq.dtype, device=seq.device)])
            rows.append(processors(ids.view(1, -1), logits[:, i].float()))
        return torch.stack(rows, dim=1)

    def _emit(self, seq, new_tokens, stopping, streamer):
        """Append accepted tokens one at a time, stopping exactly where the criteria say."""
        emitted, done = [], False
        for t in new_tokens.view(-1):
            seq = torch.cat([seq, t.view(1, 1)], dim=1)
            emitted.append(t)
            if bool(stopping(seq, None).any()):
                done = True
                break
        if streamer is not None and emitted:
            streamer.put(torch.stack(emitted).cpu())
        return seq, done, len(emitted)

    def _record(self, stats: GenerationStats, path: list[int], tree: DraftTree, forwarded: int,
                seconds: float) -> None:
        n_tree = tree.num_nodes
        from_chain = sum(1 for node in path if node >= n_tree)
        stats.steps += 1
        stats.accept_lengths.append(len(path))
        stats.tree_nodes.append(forwarded)
        stats.from_matrix += len(path) - 1 - from_chain
        stats.from_ngram += from_chain
        for node in path[1:]:
            if node < n_tree:
                key = ",".join(map(str, tree.paths[node - 1]))
                stats.node_matches[key] = stats.node_matches.get(key, 0) + 1
        if self.auto is not None:
            self.auto.observe_step(seconds, forwarded, forwarded - n_tree, from_chain)
            if self.auto.due():
                self._retune()

    # ------------------------------------------------------------------------------ helpers
    def _setup_tree_attention(self, wanted: bool | None) -> bool:
        from ._extension import WITH_CUDA
        impl = hf_model.attn_implementation(self.model)
        if wanted is None:
            wanted = self.device.type == "cuda" and WITH_CUDA and impl in ("sdpa", "token_recycling")
        if not wanted:
            if impl == "token_recycling":
                raise ValueError("the model uses attn_implementation='token_recycling'; pass tree_attention=True")
            return False
        from . import hf_attention
        if not hf_attention.use_tree_attention(self.model):
            raise ValueError(f"{type(self.model).__name__} does not dispatch attention through transformers' "
                             f"AttentionInterface, so tree_attention=True cannot apply")
        return True

    def _new_cache(self):
        from transformers import DynamicCache
        return DynamicCache(config=self.model.config)

    def _check_input(self, input_ids, attention_mask) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError("input_ids must be an integer torch.Tensor [batch, seq]")
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [batch, seq] with seq >= 1, got shape {tuple(input_ids.shape)}")
        if input_ids.shape[0] != 1:
            raise NotImplementedError(
                f"TokenRecycler generates one sequence at a time for now (batch size 1); got batch "
                f"{input_ids.shape[0]}. Call it per sequence.")
        if attention_mask is not None and not bool((attention_mask == 1).all()):
            raise NotImplementedError("padding (attention_mask with zeros) is not supported with batch size 1")
        v = self.matrix.vocab_size
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= v:
            raise ValueError(f"input_ids hold token ids outside [0, {v})")
        return input_ids.to(self.device, torch.long)


def _prefix_tensor(prefix: int, device) -> torch.Tensor:
    return torch.tensor([prefix], dtype=torch.long, device=device)


def _saved_topk(path) -> int:
    from safetensors import safe_open
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            return int((f.metadata() or {}).get("topk", 8))
    except Exception:
        return 8  # AdjacencyMatrix.read gives the precise error
