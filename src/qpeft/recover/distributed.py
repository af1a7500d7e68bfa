"""``qpeft recover`` on several ranks (``torchrun --nproc-per-node N -m qpeft recover ...``).

:class:`Parallel` says how a run is spread; ``Parallel()`` is the one-process run and changes
nothing. With ``mode`` ``ddp`` or ``fsdp2`` over ``world`` ranks:

* data: every rank builds the same global batches; rank ``r`` keeps rows
  ``[r c, (r + 1) c)`` of each (``c = ceil(rows / world)``), padded to ``c`` rows with copies of a
  real row of weight 0 (``row_weight``). Each batch carries ``norm = global count / world`` (texts
  for encoders, tokens for causal LMs) so that a rank's loss ``sum of its weighted per-row
  (per-token) losses / norm``, averaged over ranks by DDP / FSDP2, has the one-process gradient;
* models: with ``fsdp2`` the teacher and, after quantization and adapter init, the student are
  sharded with ``fully_shard`` (every transformer block, then the root); with ``ddp`` the student
  is wrapped in ``DistributedDataParallel`` for the end-to-end phase (the block-wise phase
  averages the block's gradients itself);
* under ``fsdp2`` the quantized student forgets ``Q(W)`` after each layer's forward and its
  blocks recompute their forward in the backward pass (a cached or autograd-saved whole ``Q(W)``
  per layer would undo the sharding); the numbers are the same;
* logged losses are averaged over ranks, so every rank takes the same early-stopping decisions.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..quant.layer import QuantModule

__all__ = ["MODES", "Parallel", "block_list"]

MODES = ("none", "ddp", "fsdp2")
Batch = dict[str, torch.Tensor]


def block_list(model: nn.Module) -> nn.ModuleList | None:
    """The model's transformer blocks: the ``nn.ModuleList`` holding the most parameters."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return max(lists, key=count, default=None)


def _forget_weights(module: nn.Module, _args: Any, _out: Any) -> None:
    module.clear_weight_caches()


@dataclass
class Parallel:
    """How a run is spread over ranks (see the module docstring); the default is one process."""

    mode: str = "none"
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def active(self) -> bool:
        """Whether the run is spread over a process group (``ddp`` / ``fsdp2``)."""
        return self.mode != "none"

    # -- data -----------------------------------------------------------------------------------
    def place(self, batches: list[Batch]) -> list[Batch]:
        """The batches on this rank's device (unchanged on the CPU)."""
        if self.device.type == "cpu":
            return batches
        return [{k: v.to(self.device) for k, v in b.items()} for b in batches]

    def share(self, batches: list[Batch], kind: str) -> list[Batch]:
        """This rank's share of every global batch (the batches themselves in one process)."""
        if not self.active:
            return batches
        return self.place([self._share(b, kind) for b in batches])

    def _share(self, batch: Batch, kind: str) -> Batch:
        rows = batch["input_ids"].shape[0]
        chunk = math.ceil(rows / self.world)
        mine = list(range(self.rank * chunk, min(rows, (self.rank + 1) * chunk)))
        index = mine + [0] * (chunk - len(mine))  # padding rows: copies of a real row, weight 0
        out = {k: v[index] for k, v in batch.items()}
        out["row_weight"] = torch.tensor([1.0] * len(mine) + [0.0] * (chunk - len(mine)))
        count = rows if kind == "encoder" else int(batch["attention_mask"].sum())
        out["norm"] = torch.tensor(max(count, 1) / self.world)
        return out

    # -- models ---------------------------------------------------------------------------------
    def prepare_teacher(self, teacher: nn.Module) -> nn.Module:
        """The teacher on this rank's device; sharded (every block, then the root) under fsdp2."""
        teacher = teacher.to(self.device)
        if self.mode == "fsdp2":
            self._fully_shard(teacher)
        return teacher

    def quantized(self, student: nn.Module) -> None:
        """Under fsdp2, make every quantized layer forget ``Q(W)`` after its forward."""
        if self.mode != "fsdp2":
            return
        for module in student.modules():
            if isinstance(module, QuantModule):
                module.clear_weight_caches()
                module.register_forward_hook(_forget_weights)

    def shard_student(self, student: nn.Module) -> nn.Module:
        """The student sharded like the teacher under fsdp2 (after quantization and init), each
        block recomputing its forward in the backward pass (activation checkpointing: autograd
        would otherwise keep every layer's whole ``Q(W)`` until the backward)."""
        if self.mode != "fsdp2":
            return student
        from torch.utils.checkpoint import checkpoint

        for block in block_list(student) or []:
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
        self._fully_shard(student)
        return student

    def for_training(self, student: nn.Module) -> nn.Module:
        """The module the end-to-end phase trains: ``DistributedDataParallel`` under ddp."""
        if self.mode != "ddp":
            return student
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        # buffers (quantizer amaxes) are equal on every rank: no need to resend them each step
        new = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        quiet = {"forward_sync_buffers" if new else "broadcast_buffers": False}
        return DistributedDataParallel(student, device_ids=ids, **quiet)

    def _fully_shard(self, model: nn.Module) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.device.type, (self.world,))
        blocks = block_list(model)
        for block in blocks if blocks is not None else []:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)

    def unsharded(
        self, fn: Callable[[nn.Module, list[str]], dict], model: nn.Module, names: list[str]
    ) -> dict:
        """``fn(model, names)``; under fsdp2 one FSDP unit at a time, unsharded (a collective),
        for the layers inside it, so that ``fn`` sees whole weights."""
        if self.mode != "fsdp2":
            return fn(model, names)
        from torch.distributed.fsdp import FSDPModule

        out: dict = {}
        units = [(n, m) for n, m in model.named_modules() if isinstance(m, FSDPModule) and n]
        rest = set(names)
        for unit_name, unit in [*units, ("", model)]:
            inside = lambda n, u=unit_name: not u or n.startswith(u + ".")  # noqa: E731
            mine = [n for n in names if n in rest and inside(n)]
            rest -= set(mine)
            unit.unshard()
            try:
                out.update(fn(model, mine) if mine else {})
            finally:
                unit.reshard()
        return {n: out[n] for n in names}

    # -- collectives ----------------------------------------------------------------------------
    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over ranks (a copy; itself in one process)."""
        if not self.active:
            return tensor
        out = tensor.detach().to(self.device, copy=True)
        dist.all_reduce(out)
        return out.to(tensor.device)

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` averaged over ranks."""
        return self.sum(tensor) / self.world

    def gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (same shape everywhere), in rank order."""
        if not self.active:
            return [tensor]
        local = tensor.detach().to(self.device).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local)
        return [p.to(tensor.device) for p in parts]

    def sync_grads(self, params: list[nn.Parameter]) -> None:
        """Average the gradients of ``params`` over ranks (ddp's block-wise phase, which runs one
        block outside the DDP wrapper); nothing otherwise (fsdp2 blocks reduce their own)."""
        grads = [p.grad for p in params if p.grad is not None]
        if self.mode != "ddp" or not grads:
            return
        flat = self.mean(torch.cat([g.reshape(-1) for g in grads]))
        for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            g.copy_(part.view_as(g))

    def block_collective(self) -> Parallel | None:
        """What the block-wise phase needs to reduce over ranks (None in one process)."""
        return self if self.active else None

    def loss_mean(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The average over ranks of a logged loss (None in one process)."""
        return self.mean if self.active else None

    def agree(self, error: BaseException | None) -> None:
        """A collective: raise ``error`` on its rank, and a ``ValueError`` quoting the first
        rank's error on the others, when any rank has one."""
        if not self.active:
            if error is not None:
                raise error
            return
        text = None if error is None else _one_line(error)
        texts: list[str | None] = [None] * self.world
        dist.all_gather_object(texts, text)
        if error is not None:
            raise error
        first = next((t for t in texts if t is not None), None)
        if first is not None:
            raise ValueError(first)

    def close(self) -> None:
        """Leave the process group (nothing in one process)."""
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror and error.filename:
        return f"{error.strerror}: {error.filename}"
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
