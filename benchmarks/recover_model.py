"""A Llama-shaped model directory for the distributed ``qpeft recover`` benchmark, built offline.

Random weights from a config; a word-level tokenizer whose vocabulary is the most frequent words
of the recipe's default texts (the standard library's docstrings), so the default data tokenizes
to real ids.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import torch

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]


def _vocabulary(size: int) -> dict[str, int]:
    from qpeft.recover.data import load_texts

    splits = load_texts(None)
    words = Counter(w for t in splits.train for w in re.findall(r"\w+|[^\w\s]", t))
    chosen = [w for w, _ in words.most_common(size - len(SPECIAL))]
    return {w: i for i, w in enumerate(SPECIAL + chosen)}


def build(folder: Path, hidden: int, layers: int, vocab: int = 512) -> Path:
    """Save a ``layers``-block Llama of width ``hidden`` (MLP ``2.75 * hidden``) and a tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    table = _vocabulary(vocab)
    core = Tokenizer(models.WordLevel(vocab=table, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    names = dict(zip(("pad_token", "unk_token", "bos_token", "eos_token"), SPECIAL, strict=True))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, **names)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(table),
        hidden_size=hidden,
        intermediate_size=int(2.75 * hidden),
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
