"""Tiny causal LM directories (random weights, word-level tokenizer) built offline.

:func:`build_tiny_causal_lm` saves one of three architectures with ``save_pretrained``: ``llama``
(``LlamaForCausalLM``), ``qwen3_moe`` (``Qwen3MoeForCausalLM``: every decoder layer's MLP is a
sparse MoE block whose experts are transformers 5's fused 3-D ``gate_up_proj`` / ``down_proj``) and
``gpt2`` (``GPT2LMHeadModel``: ``Conv1D`` layers, the head tied to the input embedding, and, as the
real GPT-2, a tokenizer without a pad token).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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

ARCHS = ("llama", "qwen3_moe", "gpt2")
SPECIALS = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3}


def corpus_lines(copies: int = 6) -> list[str]:
    """Every sentence rotated by 0, 1, ... ``copies - 1`` words (distinct lines)."""
    lines = []
    for k in range(copies):
        for s in SENTENCES:
            words = s.split()
            lines.append(" ".join(words[k % len(words) :] + words[: k % len(words)]))
    return lines


def write_corpus(path: Path, copies: int = 6) -> Path:
    """A text file with one sentence per line, each sentence rotated to give distinct lines."""
    path.write_text("\n".join(corpus_lines(copies)) + "\n", encoding="utf-8")
    return path


def _tokenizer(pad: bool) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for s in SENTENCES for w in s.split()})
    vocab = {**SPECIALS, **{w: i + len(SPECIALS) for i, w in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    special = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
    return PreTrainedTokenizerFast(
        tokenizer_object=core, **special, **({"pad_token": "<pad>"} if pad else {})
    )


def _model(
    arch: str, vocab: int, hidden: int, experts_size: int, extra: dict[str, Any]
) -> torch.nn.Module:
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=64,
            **extra,
        )
        return LlamaForCausalLM(config)
    if arch == "qwen3_moe":
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        config = Qwen3MoeConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            moe_intermediate_size=experts_size,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            max_position_embeddings=64,
            **extra,
        )
        return Qwen3MoeForCausalLM(config)
    if arch == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            vocab_size=vocab, n_positions=64, n_embd=hidden, n_layer=2, n_head=4, **extra
        )
        return GPT2LMHeadModel(config)
    raise ValueError(f"unknown tiny architecture {arch!r}; choose from {', '.join(ARCHS)}")


def build_tiny_causal_lm(
    folder: Path,
    hidden: int = 64,
    arch: str = "llama",
    tie_word_embeddings: bool | None = None,
    pad_token: bool | None = None,
    seed: int = 0,
    init_range: float = 0.02,
    moe_intermediate: int | None = None,
) -> Path:
    """Save a 2-layer causal LM of architecture ``arch`` (one of :data:`ARCHS`) with a word-level
    tokenizer into ``folder``, offline; return ``folder``.

    Args:
        hidden: the hidden size (a multiple of 4).
        tie_word_embeddings: None keeps the architecture's default (tied for GPT-2 only).
        pad_token: whether the tokenizer has a pad token; None: all but GPT-2.
        seed: seeds the random weights.
        init_range: the std of the random weights (the config's ``initializer_range``); ~0.1
            gives peaked logits, so quantization moves them measurably.
        moe_intermediate: the experts' intermediate size (``qwen3_moe``; None: ``hidden // 2``).
    """
    pad = arch != "gpt2" if pad_token is None else pad_token
    tokenizer = _tokenizer(pad)
    torch.manual_seed(seed)
    extra = {"pad_token_id": 0 if pad else None, "bos_token_id": 2, "eos_token_id": 3}
    extra["initializer_range"] = init_range
    if tie_word_embeddings is not None:
        extra["tie_word_embeddings"] = tie_word_embeddings
    experts_size = moe_intermediate or hidden // 2
    model = _model(arch, len(tokenizer), hidden, experts_size, extra)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
