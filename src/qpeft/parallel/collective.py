"""Saving sharded models: gather on every rank, write on rank 0, return together.

No rank holds a whole tensor of a model whose parameters or buffers are ``DTensor`` shards
(FSDP2 ``fully_shard``, DTensor tensor parallelism, or both), so ``qpeft.save`` and
``qpeft.save_adapters`` gather such a model first. That is a collective over the default process
group: every rank calls the save, with the same model structure, so that the gathers run in the
same order everywhere. Rank 0 alone then writes the files (through the usual atomic directory
swap, so a failure leaves no partial file); its outcome is broadcast and every rank returns once
the files are in place, or raises if rank 0 failed, instead of waiting forever.

A DDP replica is whole on every rank: its ``module`` is saved locally, with no collective.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import chain

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from .state_dict import full_state_dict

__all__ = ["unwrap", "is_sharded", "gather_state_dict", "gather_tensors", "write_once"]


def unwrap(model: nn.Module, what: str) -> nn.Module:
    """The model whose tensors and mode log are saved: DDP's ``module``, else ``model``.

    Args:
        model: a plain, DDP, FSDP2 or tensor-parallel model.
        what: the calling function, for the message.

    Raises:
        TypeError: an FSDP1 (``FullyShardedDataParallel``) model, whose flat parameters have
            other names and shapes than the model's.
    """
    while isinstance(model, DistributedDataParallel):
        model = model.module
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise TypeError(
            f"{what} does not support FSDP1 (FullyShardedDataParallel) models: shard with FSDP2 "
            "fully_shard, or load qpeft.full_state_dict(model) into a plain model built the same way"
        )
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter or buffer of ``model`` is a ``DTensor`` (FSDP2 or tensor parallel)."""
    return any(isinstance(t, DTensor) for t in chain(model.parameters(), model.buffers()))


def gather_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of a sharded model on rank 0 (CPU, single-process keys); ``{}`` elsewhere.

    A collective. Tied keys (one parameter under two names) get one shared tensor again, as in a
    single-process state dict, so the file stores it once.
    """
    full = full_state_dict(model, rank0_only=True)
    first: dict[int, str] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        source = first.setdefault(id(value), key)
        if source != key and key in full and source in full:
            full[key] = full[source]
    return full


def gather_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole CPU copies of ``tensors``; each ``DTensor`` is gathered (a collective, in dict order)."""
    out = {}
    for key, value in tensors.items():
        whole = value.full_tensor() if isinstance(value, DTensor) else value
        out[key] = whole.detach().cpu()
    return out


def write_once(sharded: bool, write: Callable[[], None]) -> None:
    """Run ``write()``; for a sharded model on rank 0 only, every rank returning after it.

    Args:
        sharded: whether the model is sharded (:func:`is_sharded`): then this is a collective.
        write: writes the files.

    Raises:
        Whatever ``write`` raised; for a sharded model only rank 0 raises that, the other ranks a
        ``RuntimeError`` quoting it.
    """
    if not sharded:
        write()
        return
    error: Exception | None = None
    if dist.get_rank() == 0:
        try:
            write()
        except Exception as err:  # noqa: BLE001 - reported to every rank, then re-raised
            error = err
    outcome = [None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(outcome, src=0)
    dist.barrier()
    if error is not None:
        raise error
    if outcome[0] is not None:
        raise RuntimeError(f"rank 0 failed to write the checkpoint (nothing was written): {outcome[0]}")
