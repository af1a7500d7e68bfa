"""Tiny models shared by the tests: plain torch stacks and Hugging Face models built from
configs."""

from __future__ import annotations

import torch
from torch import nn


class TinyMLP(nn.Module):
    """Two linear layers with named submodules, like a transformer block's MLP."""

    def __init__(self, d_in: int = 8, d_hidden: int = 16, d_out: int = 4) -> None:
        super().__init__()
        self.up = nn.Linear(d_in, d_hidden)
        self.act = nn.GELU()
        self.down = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


class TinyBlock(nn.Module):
    """Attention-like projections plus an MLP and an output head."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.attn = nn.ModuleDict(
            {"q_proj": nn.Linear(d, d), "v_proj": nn.Linear(d, d, bias=False)}
        )
        self.mlp = TinyMLP(d, 2 * d, d)
        self.lm_head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attn["q_proj"](x) * torch.sigmoid(self.attn["v_proj"](x))
        return self.lm_head(h + self.mlp(h))


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    return BertModel(cfg).eval()


HF_MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


# Tiny transformers 5.x MoE models (experts stored as 3-D tensors). Sizes are multiples of 8 so
# the default grouped_mm experts implementation can run them on CPU (16-byte strides).
def tiny_qwen3_moe():
    """Fused ``gate_up_proj [E, 2I, H]`` ([gate; up]), ``down_proj [E, H, I]``, no bias."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    return Qwen3MoeForCausalLM(cfg).eval()


def tiny_mixtral():
    """Same layout as Qwen3-MoE, top-3 routing over 6 experts."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=6,
        num_experts_per_tok=3,
        max_position_embeddings=64,
    )
    return MixtralForCausalLM(cfg).eval()


def tiny_gpt_oss():
    """Transposed ``gate_up_proj [E, H, 2I]`` (interleaved gate/up) with biases, ``down_proj [E, I,
    H]``."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    cfg = GptOssConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        head_dim=8,
        max_position_embeddings=64,
    )
    model = GptOssForCausalLM(cfg).eval()
    with torch.no_grad():  # transformers leaves the expert biases at zero; make them count
        for name, param in model.named_parameters():
            if name.endswith("_bias") and ".experts." in name:
                param.normal_(0, 0.02)
    return model


MOE_MODELS = {"qwen3_moe": tiny_qwen3_moe, "mixtral": tiny_mixtral, "gpt_oss": tiny_gpt_oss}


def token_ids(length: int = 12, batch: int = 2, vocab: int = 64) -> torch.Tensor:
    """Deterministic token ids for the tiny HF models."""
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (batch, length), generator=generator)


def hf_output(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a causal LM, last hidden state of an encoder."""
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def fit_random_target(
    model: nn.Module, ids: torch.Tensor, steps: int, lr: float = 5e-3
) -> list[float]:
    """AdamW steps on the trainable parameters towards a fixed random target; the losses."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    target = torch.randn_like(hf_output(model, ids))
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(hf_output(model, ids), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
