"""A tiny causal LM directory (Llama config, random weights, word-level tokenizer) built offline."""

from __future__ import annotations

from pathlib import Path

import torch

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a small model learns to predict the next word",
    "quantization rounds every weight to a coarse grid",
    "the adapter learns what the rounding took away",
    "every layer keeps its name and its weight",
    "the teacher shows the student what to say",
    "low rank updates are small and cheap to train",
    "the loss goes down when the learning rate is right",
]


def write_corpus(path: Path, copies: int = 6) -> Path:
    """A text file with one sentence per line, each sentence rotated to give distinct lines."""
    lines = []
    for k in range(copies):
        for s in SENTENCES:
            words = s.split()
            lines.append(" ".join(words[k % len(words) :] + words[: k % len(words)]))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def build_tiny_causal_lm(folder: Path, hidden: int = 64) -> Path:
    """Save a 2-layer Llama with a word-level tokenizer into ``folder`` (``save_pretrained``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = sorted({w for s in SENTENCES for w in s.split()})
    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
