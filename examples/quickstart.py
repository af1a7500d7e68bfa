"""Quickstart: put LoRA adapters on a small Llama built from a config and train them a few steps.

Run with ``make demo`` (until the ``qpeft recover`` command lands) or ``python
examples/quickstart.py``.
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import qpeft


def main() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config)
    qpeft.update_model(
        model,
        {
            "adapter_name": "default",
            "adapter_cfg": {
                "*": {"rank": 8},
                "*self_attn*": {"scale": 2.0},
                "*lm_head*": {"enable": False},
            },
        },
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(
        f"LoRA layers: {len(qpeft.lora_layers(model))}, trainable {trainable:,} of {total:,} "
        "parameters"
    )

    ids = torch.randint(0, 256, (8, 32))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(30):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 5 == 0 or step == 29:
            print(f"step {step:2d}  loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
