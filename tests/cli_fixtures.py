"""Tiny models for the command-line tests: a byte-level BPE tokenizer trained on a few lines, a
random-weight Llama saved as a HuggingFace folder, and the same kind of model written as a GGUF.

They exercise the real loading, conversion and benchmark code in seconds, without the 98 MB
SmolLM2 file (the slow tests use that one).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Write a function that returns the sum of two numbers.",
    "def add(a, b):\n    return a + b\n",
    "Explain why the sky is blue in simple words.",
    "Token recycling reuses candidate tokens from earlier decoding steps.",
    "Compose a short travel blog post about a trip to Hawaii.",
] * 4


def tokenizer(vocab_size: int = 400):
    """A fast byte-level BPE tokenizer with a ChatML template; eos is <|im_end|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)


def llama_config(vocab_size: int, eos: int, bos: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       tie_word_embeddings=False, eos_token_id=eos, bos_token_id=bos, pad_token_id=bos)


def llama_folder(path: Path, seed: int = 0) -> Path:
    """A random-weight 2-layer Llama + tokenizer saved with save_pretrained."""
    from transformers import LlamaForCausalLM

    tok = tokenizer()
    torch.manual_seed(seed)
    cfg = llama_config(len(tok), tok.eos_token_id, tok.bos_token_id)
    model = LlamaForCausalLM(cfg)
    # Larger weights than the default init make the logits far from ties, so greedy decoding is
    # a well-defined reference in fp32.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def llama_gguf(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """A random-weight 2-layer Llama written as a float32 GGUF with its tokenizer; returns the
    tensors by GGUF name so tests can check what a conversion loaded."""
    import gguf

    tok = tokenizer()
    vocab = len(tok)
    hidden, ffn, layers, heads, kv_heads = 32, 64, 2, 4, 2
    head_dim = hidden // heads
    rng = np.random.default_rng(seed)

    def rand(*shape):
        return rng.normal(0, 0.5, size=shape).astype(np.float32)

    tensors = {"token_embd.weight": rand(vocab, hidden), "output_norm.weight": 1 + rand(hidden) / 10,
               "output.weight": rand(vocab, hidden)}
    for i in range(layers):
        tensors.update({
            f"blk.{i}.attn_norm.weight": 1 + rand(hidden) / 10, f"blk.{i}.ffn_norm.weight": 1 + rand(hidden) / 10,
            f"blk.{i}.attn_q.weight": rand(hidden, hidden), f"blk.{i}.attn_k.weight": rand(kv_heads * head_dim, hidden),
            f"blk.{i}.attn_v.weight": rand(kv_heads * head_dim, hidden), f"blk.{i}.attn_output.weight": rand(hidden, hidden),
            f"blk.{i}.ffn_gate.weight": rand(ffn, hidden), f"blk.{i}.ffn_up.weight": rand(ffn, hidden),
            f"blk.{i}.ffn_down.weight": rand(hidden, ffn),
        })

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(512)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    backend = tok.backend_tokenizer
    ordered = sorted(backend.get_vocab().items(), key=lambda kv: kv[1])
    assert [i for _, i in ordered] == list(range(vocab))
    import json

    merges = json.loads(backend.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in ordered])
    w.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t, _ in ordered])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    for name, t in tensors.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors
