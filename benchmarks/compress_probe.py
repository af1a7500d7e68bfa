"""Child process of the compress scenario: peak RSS of LoRA r16 AdamW steps for one variant.

``python -m benchmarks.compress_probe VARIANT [--small]`` with VARIANT one of ``compressed``
(qpeft nvfp4 + ``qpeft.compress``), ``fake-quant`` (qpeft nvfp4, cached ``Q(W)``), ``hf-peft``
(HF PEFT LoRA on the dense bf16 model) and ``torchao-nf4`` (torchao NF4 weights + a bf16 LoRA
branch; only if torchao is installed). Prints one JSON line ``{"setup_mb", "step_peak_mb"}``:
the RSS once the model is set up, and the peak RSS of the steps alone (the kernel's high-water
mark is reset after set-up through ``/proc/self/clear_refs``).
"""

from __future__ import annotations

import json
import sys

import torch
from torch import nn

RANK, STEPS = 16, 2


def llama(small: bool) -> nn.Module:
    """A Llama whose weights dominate: hidden 1024, 12 layers (``small``: 256, 2), bf16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hidden, layers = (256, 2) if small else (1024, 12)
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75),
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(cfg).to(torch.bfloat16)


def batch(small: bool) -> torch.Tensor:
    return torch.randint(
        0, 512, (2, 32 if small else 128), generator=torch.Generator().manual_seed(0)
    )


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def qpeft_model(model: nn.Module, ids: torch.Tensor, compressed: bool) -> nn.Module:
    import qpeft

    model = qpeft.quantize(model, "nvfp4_weight_only")
    qpeft.update_model(
        model, {"adapter_cfg": {"*": {"rank": RANK}, "*lm_head*": {"enable": False}}}
    )
    if compressed:
        model = qpeft.compress(model)
    else:
        with torch.no_grad():  # fill the Q(W) caches, as training does at its first step
            model(input_ids=ids[:, :2])
    return model


def hf_model(model: nn.Module) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=RANK, target_modules=TARGETS))


class NF4LoRA(nn.Module):
    """torchao NF4 base weight plus a bf16 LoRA branch (QLoRA)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        try:
            from torchao.dtypes.nf4tensor import linear_nf4, to_nf4
        except ImportError:  # torchao >= 0.15 moved it
            from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4, to_nf4

        self.weight = nn.Parameter(to_nf4(linear.weight.detach()), requires_grad=False)
        self.linear_nf4 = linear_nf4
        self.lora_a = nn.Parameter(
            torch.randn(RANK, linear.in_features, dtype=torch.bfloat16) * 0.01
        )
        self.lora_b = nn.Parameter(torch.zeros(linear.out_features, RANK, dtype=torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_nf4(x, self.weight) + (x @ self.lora_a.t()) @ self.lora_b.t()


def torchao_model(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in TARGETS:
            model.set_submodule(name, NF4LoRA(module))
    return model


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def _return_freed_memory() -> None:
    """Give the set-up's freed heap back to the OS (glibc keeps it, and its mmap threshold grows
    with every freed weight), so the peak measures what the variant holds, not what it built."""
    import contextlib
    import ctypes
    import gc

    gc.collect()
    # not glibc: the figure then includes the retained heap
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def main(variant: str, small: bool) -> None:
    torch.set_num_threads(2)
    ids = batch(small)
    base = llama(small)
    if variant in ("compressed", "fake-quant"):
        model = qpeft_model(base, ids, variant == "compressed")
    elif variant == "hf-peft":
        model = hf_model(base)
    else:
        model = torchao_model(base)
    del base
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    _return_freed_memory()
    setup = _status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    found = {"setup_mb": setup, "step_peak_mb": _status_mb("VmHWM")}
    if variant == "compressed":
        found.update(weight_mb(model))
    print(json.dumps(found))


def weight_mb(model: nn.Module) -> dict[str, float]:
    """MiB of the compressed layers' weights: dense (in the compute dtype) and packed."""
    import math

    from qpeft.quant.compressed import PackedDense
    from qpeft.quant.packing import packed_bytes

    layers = [m for m in model.modules() if isinstance(m, PackedDense)]
    dense = sum(
        math.prod(m.spec.shape) * torch.empty((), dtype=m.compute_dtype).element_size()
        for m in layers
    )
    packed = sum(packed_bytes(m.packed_tensors()) for m in layers)
    return {"dense_mb": dense / 2**20, "packed_mb": packed / 2**20}


if __name__ == "__main__":
    main(sys.argv[1], "--small" in sys.argv[2:])
