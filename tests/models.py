"""Tiny random-weight models of each common architecture, built offline from configs."""

from __future__ import annotations

import functools

import torch

COMMON = dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=128, max_position_embeddings=512)


def _configs():
    import transformers as tf
    return {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {"head_dim": 16}),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {"sliding_window": None}),
        "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, {"head_dim": 16}),
        "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, {"pad_token_id": 0}),
    }


ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma", "phi3")


@functools.lru_cache(maxsize=None)
def tiny_model(arch: str, attn: str = "sdpa", dtype: torch.dtype = torch.float32, seed: int = 0):
    cfg_cls, model_cls, extra = _configs()[arch]
    torch.manual_seed(seed)
    cfg = cfg_cls(**COMMON, **extra)
    cfg.bos_token_id, cfg.eos_token_id = 1, 2
    model = model_cls._from_config(cfg, attn_implementation=attn, dtype=dtype).eval()
    # Random weights give nearly flat logits; sharpen them so greedy text has structure
    # (repeats, like real text), which is what makes drafts get accepted.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model
