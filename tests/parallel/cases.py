"""Models, data and the training loop shared by the ranks and by the single-process reference.

Every rank builds the same model from the same seed; the reference runs the same loop on one
process over the whole batch. Records hold the first step's output and adapter gradients and the
adapter factors after ``STEPS`` SGD steps, keyed by single-process parameter names.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

import qpeft
from tests.models import TinyBlock, tiny_gpt2, tiny_llama

STEPS = 3
LR = 0.01
BATCH = 8
NORMAL = "torch.nn.init.normal_"  # non-zero B so that A gets a gradient from the first step
# Wrapper levels that DDP / FSDP1 insert into parameter names.
_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "module.")


def device() -> torch.device:
    """Where the ranks compute: ``QPEFT_TEST_DEVICE`` (``cpu`` by default, ``cuda`` for nccl)."""
    kind = os.environ.get("QPEFT_TEST_DEVICE", "cpu")
    if kind == "cuda":
        return torch.device("cuda", int(os.environ.get("RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def block_model(
    disable_b: bool = False, quant: str | None = None, compress: bool = False
) -> TinyBlock:
    """TinyBlock with adapter ``a`` on every layer and ``b`` on the MLP (optionally disabled).

    ``quant``: a ``qpeft.quantize`` preset applied (and calibrated on the batch) before LoRA;
    ``compress``: then ``qpeft.compress`` (packed codes and scales instead of master weights).
    """
    torch.manual_seed(0)
    model = TinyBlock(16)
    if quant is not None:
        x = block_batch()[0]
        qpeft.quantize(model, quant, forward_loop=lambda m: m(x))
    qpeft.update_model(
        model, {"adapter_name": "a", "adapter_cfg": {"*": {"rank": 4, "lora_b_init": NORMAL}}}
    )
    qpeft.update_model(
        model,
        {
            "adapter_name": "b",
            "adapter_cfg": {"*mlp*": {"rank": 2, "scale": 0.5, "lora_b_init": NORMAL}},
        },
    )
    if disable_b:
        qpeft.disable_adapters(model, adapters_to_disable="b")
    return qpeft.compress(model) if compress else model


def trained_block(quant: str | None = None, compress: bool = False) -> TinyBlock:
    """The single-process reference: ``block_model`` after ``STEPS`` steps on the whole batch."""
    model = block_model(quant=quant, compress=compress)
    train(model, block_batch(), block_loss)
    return model


def block_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 16, generator=gen), torch.randn(BATCH, 10, generator=gen)


def block_loss(
    model: nn.Module, batch: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch
    out = model(x)
    return out, F.mse_loss(out, y)


def llama_model() -> nn.Module:
    """Tiny Llama with adapter ``a`` on every projection and ``b`` on the MLP projections."""
    model = tiny_llama()
    torch.manual_seed(0)
    qpeft.update_model(
        model, {"adapter_name": "a", "adapter_cfg": {"*proj*": {"rank": 4, "lora_b_init": NORMAL}}}
    )
    qpeft.update_model(
        model, {"adapter_name": "b", "adapter_cfg": {"*mlp*": {"rank": 2, "lora_b_init": NORMAL}}}
    )
    return model


def gpt2_model() -> nn.Module:
    """Tiny GPT-2 (``Conv1D`` layers, weight stored ``[in, out]``) with adapter ``a`` everywhere."""
    model = tiny_gpt2()
    torch.manual_seed(0)
    return qpeft.update_model(
        model, {"adapter_name": "a", "adapter_cfg": {"*": {"rank": 4, "lora_b_init": NORMAL}}}
    )


def llama_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 64, (2, 9), generator=gen)
    return ids[:, :-1], ids[:, 1:]


def llama_loss(
    model: nn.Module, batch: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    ids, labels = batch
    logits = model(ids).logits
    return logits, F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def full(t: torch.Tensor) -> torch.Tensor:
    """A detached CPU copy of the whole tensor (gathering a DTensor's shards)."""
    t = t.full_tensor() if isinstance(t, DTensor) else t
    return t.detach().cpu().clone()


def clean(name: str) -> str:
    """A parameter name as on one process (without DDP / FSDP1 wrapper levels)."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def placements(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """How each DTensor parameter is laid out on the mesh, e.g. ``("S(0)",)`` for ``Shard(0)``."""
    return {
        clean(n): tuple(str(p) for p in t.placements)
        for n, t in sorted(model.named_parameters())
        if isinstance(t, DTensor)
    }


def adapter_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        clean(n): full(p) for n, p in sorted(model.named_parameters()) if ".adapters." in clean(n)
    }


def adapter_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        clean(n): full(p.grad)
        for n, p in sorted(model.named_parameters())
        if ".adapters." in clean(n) and p.grad is not None
    }


def train(model: nn.Module, batch, loss_fn, steps: int = STEPS, view=nullcontext) -> dict:
    """SGD on the trainable parameters; records step 0's output and grads and the final adapters.

    ``view(model)`` is the context under which parameters and grads read whole (FSDP1 needs
    ``summon_full_params``).
    """
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    record: dict = {}
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        out, loss = loss_fn(model, batch)
        loss.backward()
        if step == 0:
            with view(model):
                record["out"], record["grads"] = full(out), adapter_grads(model)
        opt.step()
    with view(model):
        record["params"] = adapter_params(model)
    return record


def shard(batch: tuple[torch.Tensor, ...], rank: int, world: int) -> tuple[torch.Tensor, ...]:
    """Rank ``rank``'s equal slice of the batch (dim 0), as data parallelism splits it."""
    return tuple(t.chunk(world)[rank] for t in batch)
