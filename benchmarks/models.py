"""The benchmark model and its LoRA variants (qpeft, HF PEFT), built identically from one seed.

Llama-shaped: hidden 512, intermediate 1376, 4 layers, 8 heads, vocab 4096, fp32, random init;
LoRA on all seven projections; batch 4 x 128 tokens.
"""

from __future__ import annotations

import copy

import torch

import qpeft

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH, SEQ, VOCAB = 4, 128, 4096


def base_model() -> torch.nn.Module:
    """A fresh, randomly initialised Llama-shaped model (seed 0), in train mode, fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(cfg)
    model.config.use_cache = False
    return model


def token_batch(batch: int = BATCH, seq: int = SEQ, seed: int = 1) -> torch.Tensor:
    """Random token ids ``[batch, seq]``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=gen)


def floor_model(model: torch.nn.Module) -> torch.nn.Module:
    """The frozen base with activation gradients on (backward runs through every layer)."""
    model = copy.deepcopy(model)
    model.requires_grad_(False)
    model.enable_input_require_grads()
    return model


def qpeft_model(model: torch.nn.Module, rank: int, names=("default",), scale: float = 2.0):
    """A copy of ``model`` with qpeft adapters ``names`` of ``rank`` on the seven projections."""
    model = copy.deepcopy(model)
    for name in names:
        qpeft.update_model(
            model,
            {
                "adapter_name": name,
                "adapter_cfg": {
                    "*": {"enable": False},
                    **{
                        f"*{p}": {"enable": True, "rank": rank, "scale": scale} for p in PROJECTIONS
                    },
                },
            },
        )
    return model


def hf_model(model: torch.nn.Module, rank: int, names=("default",), scale: float = 2.0):
    """A copy of ``model`` wrapped by HF PEFT with LoRA adapters ``names`` (alpha = scale *
    rank)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=scale * rank, target_modules=PROJECTIONS, lora_dropout=0.0)
    peft_model = get_peft_model(copy.deepcopy(model), cfg, adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, cfg)
    return peft_model


def randomize_hf(peft_model, seed: int = 3) -> None:
    """Give every HF LoRA factor random values (B is zero at init, which would hide errors)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)


def copy_hf_into_qpeft(peft_model, model: torch.nn.Module) -> None:
    """Copy HF PEFT's factors into the qpeft model built with the same adapter names and ranks."""
    hf = dict(peft_model.named_parameters())
    with torch.no_grad():
        for layer_name, layer in qpeft.lora_layers(model).items():
            for name, adapter in layer.adapters.items():
                prefix = f"base_model.model.{layer_name}"
                adapter.lora_a.copy_(hf[f"{prefix}.lora_A.{name}.weight"])
                adapter.lora_b.copy_(hf[f"{prefix}.lora_B.{name}.weight"])
