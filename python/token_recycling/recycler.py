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
from .stats import GenerationStats
from .tree import DraftTree, TreeSpec, make_tree


class TokenRecycler:
    """Lossless greedy speculative decoding with Token Recycling for a HuggingFace causal LM.

    Args:
        model: a transformers causal LM (eager or sdpa attention).
        tree: draft tree: a preset name ("paper", "paper-16", "chain-4", ...) or a list of rank paths.
        topk: candidates kept per token in the adjacency matrix (k).
        seed_from_prompt: fill the prompt tokens' rows from the prefill's top-k (cold-start help).
    """

    def __init__(self, model, tree: TreeSpec = "paper", topk: int = 8, *, seed_from_prompt: bool = False):
        hf_model.check_supported(model)
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        self.model = model
        self.device = hf_model.model_device(model)
        self.matrix = AdjacencyMatrix(hf_model.vocab_size(model), topk, self.device)
        self.topk = topk
        self.tree_spec = tree
        self.tree: DraftTree = make_tree(tree, topk).to(self.device)
        self.seed_from_prompt = seed_from_prompt
        self.stats = GenerationStats()
        self._cache_kwarg = hf_model.cache_kwarg(model)

    # ------------------------------------------------------------------------------ public API
    def describe(self) -> str:
        return f"TokenRecycler(tree={self.tree_spec!r}: {self.tree.num_nodes - 1} nodes, k={self.topk})"

    def reset(self) -> None:
        """Cold start: forget everything the matrix learned."""
        self.matrix.reset()

    def save(self, path: str | os.PathLike) -> None:
        """Save the matrix (and the tree) as safetensors, with vocab size and k."""
        self.matrix.save(path, extra={"tree": [list(p) for p in self.tree.paths]})

    @classmethod
    def load(cls, model, path: str | os.PathLike, **kwargs) -> "TokenRecycler":
        """A recycler for `model` with the matrix (and tree, unless `tree=` is given) saved at `path`."""
        topk = kwargs.pop("topk", None)
        rec_topk = topk if topk is not None else _saved_topk(path)
        table, extra = AdjacencyMatrix.read(path, hf_model.vocab_size(model), rec_topk)
        if "tree" not in kwargs and extra.get("tree"):
            kwargs["tree"] = extra["tree"]
        rec = cls(model, topk=rec_topk, **kwargs)
        rec.matrix.table.copy_(table)
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
        return self._decode(input_ids, cache, criteria, None, streamer)

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
        sequences = self._decode(input_ids, cache, stopping_criteria, processors, streamer)
        if generation_config is not None and generation_config.return_dict_in_generate:
            from transformers.generation.utils import GenerateDecoderOnlyOutput
            return GenerateDecoderOnlyOutput(sequences=sequences, past_key_values=cache)
        return sequences

    # ------------------------------------------------------------------------------ the loop
    def _decode(self, input_ids, cache, stopping, processors, streamer) -> torch.Tensor:
        start = time.perf_counter()
        stats = self.stats = GenerationStats(node_matches=[0] * self.tree.num_nodes)
        tree = self.tree
        seq = input_ids
        root, seq, done = self._prefill(input_ids, cache, stopping, processors, streamer)
        while not done:
            prefix = seq.shape[1] - 1  # the root is emitted but not yet in the cache
            hf_model.check_cache(cache, tree.num_nodes)
            tokens = ops.build_draft_tree(self.matrix.table, root, tree.parents, tree.ranks)
            logits = self._forward_tree(tokens, tree.depths, tree.mask, prefix, cache)
            if processors is not None:
                logits = self._process_tree_logits(processors, seq, tokens, tree, logits)
            accept_len, nodes, bonus = ops.verify_greedy(tokens, logits.argmax(-1), tree.parents)
            ops.update_adjacency(self.matrix.table, tokens, logits.topk(self.topk, dim=-1).indices)
            n_acc = int(accept_len[0])  # the one device-to-host sync of the step
            hf_model.compact_cache(cache, _prefix_tensor(prefix, self.device), nodes, accept_len, n_acc,
                                   tree.num_nodes)
            path = nodes[0, :n_acc]
            new_tokens = torch.cat([tokens[0, path[1:]], bonus])
            self._record(stats, path.tolist(), tree.num_nodes)
            seq, done = self._emit(seq, new_tokens, stopping, streamer)
            root = bonus
        if streamer is not None:
            streamer.end()
        stats.new_tokens = seq.shape[1] - input_ids.shape[1]
        stats.seconds = time.perf_counter() - start
        stats.tree, stats.tree_size = str(self.tree_spec), tree.num_nodes - 1
        return seq

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
        seq, done = self._emit(input_ids, root, stopping, streamer)
        return root, seq, done

    def _forward_tree(self, tokens, depths, tree_mask, prefix: int, cache) -> torch.Tensor:
        """One forward of the whole tree: node i at position prefix + depth(i), seeing the prefix
        and its ancestors. Returns logits [1, N, V]."""
        dtype = hf_model.model_dtype(self.model)
        mask = hf_model.TreeMask(tree_mask, dtype, self.device)(prefix)
        out = self.model(input_ids=tokens, attention_mask=mask, position_ids=(depths + prefix).view(1, -1),
                         use_cache=True, **{self._cache_kwarg: cache})
        return out.logits

    def _process_tree_logits(self, processors, seq, tokens, tree: DraftTree, logits):
        """Apply logits processors node by node, each with its own context (prefix + its path), so
        processors that look at the history stay exact. Only used when processors are present."""
        rows = []
        parents = tree.parents.tolist()
        tok = tokens[0].tolist()
        for i in range(tree.num_nodes):
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
        return seq, done

    def _record(self, stats: GenerationStats, path: list[int], forwarded: int) -> None:
        stats.steps += 1
        stats.accept_lengths.append(len(path))
        stats.tree_nodes.append(forwarded)
        stats.from_matrix += len(path) - 1
        for node in path:
            if node < len(stats.node_matches):
                stats.node_matches[node] += 1

    # ------------------------------------------------------------------------------ helpers
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
