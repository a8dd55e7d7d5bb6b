"""Tiny random-weight models of each common architecture, built offline from configs."""

from __future__ import annotations

import copy
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

WINDOW = 16
# Sliding-window and hybrid models (window 16): Mistral (every layer windowed), Gemma 2 (window, then full;
# soft-capped attention logits, so eager), Gemma 3 (window, then full), Qwen2 (full, then window).
WINDOW_ARCHS = ("mistral-window", "gemma2", "gemma3", "qwen2-window")


def _window_configs():
    import transformers as tf
    hybrid = ["sliding_attention", "full_attention"]
    return {
        "mistral-window": (tf.MistralConfig, tf.MistralForCausalLM, {"sliding_window": WINDOW}, "sdpa"),
        "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, {"head_dim": 16, "sliding_window": WINDOW,
                                                            "layer_types": hybrid}, "eager"),
        "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, {"head_dim": 16, "sliding_window": WINDOW,
                                                                "layer_types": hybrid}, "sdpa"),
        "qwen2-window": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {"sliding_window": WINDOW, "use_sliding_window": True,
                                                               "max_window_layers": 1}, "sdpa"),
    }


@functools.lru_cache(maxsize=None)
def tiny_model(arch: str, attn: str | None = None, dtype: torch.dtype = torch.float32, seed: int = 0,
               window: int = WINDOW, sharpen: float | None = None):
    if arch in WINDOW_ARCHS:
        cfg_cls, model_cls, extra, default_attn = _window_configs()[arch]
        extra = {**extra, "sliding_window": window}
        sharpen = sharpen or 3.0  # sharper: the text soon repeats one token, where a window hardly matters
    else:
        (cfg_cls, model_cls, extra), default_attn = _configs()[arch], "sdpa"
    attn = attn or default_attn
    torch.manual_seed(seed)
    cfg = cfg_cls(**COMMON, **extra)
    cfg.bos_token_id, cfg.eos_token_id = 1, 2
    model = model_cls._from_config(cfg, attn_implementation=attn, dtype=dtype).eval()
    # Random weights give nearly flat logits; sharpen them so greedy text has structure
    # (repeats, like real text), which is what makes drafts get accepted.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(sharpen or 8.0)
    SHARED.append((model, attn))
    return model


# Every cached model with the attention it was built with: a recycler made with the CPU defaults switches
# its model to the "token_recycling" backend in place, and conftest switches the shared ones back after each
# test, so a shared model used as the reference runs transformers' own attention.
SHARED: list = []


def restore_shared_attention() -> None:
    for model, attn in SHARED:
        if model.config._attn_implementation != attn:
            model.set_attn_implementation(attn)


def private_copy(arch: str):
    """(the shared tiny model, a private copy of it with the same weights and generation config):
    for tests that switch the copy's attention backend in place (the cached one keeps sdpa)."""
    reference = tiny_model(arch)
    model = type(reference)._from_config(copy.deepcopy(reference.config), attn_implementation="sdpa").eval()
    model.load_state_dict(reference.state_dict())
    model.generation_config = reference.generation_config
    return reference, model
