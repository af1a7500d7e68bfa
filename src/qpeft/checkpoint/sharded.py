"""Checkpoints of sharded (FSDP2 / tensor-parallel) models: collective saves and sharded adapter
loading.

Saving sharded models: gather on every rank, write on rank 0, return together.

No rank holds a whole tensor of a model whose parameters or buffers are ``DTensor`` shards
(FSDP2 ``fully_shard``, DTensor tensor parallelism, or both), so ``qpeft.save`` and
``qpeft.save_adapters`` gather such a model first. That is a collective over the default process
group: every rank calls the save, with the same model structure, so that the gathers run in the
same order everywhere. Rank 0 alone then writes the files (through the usual atomic directory
swap, so a failure leaves no partial file); its outcome is broadcast and every rank returns once
the files are in place, or raises if rank 0 failed, instead of waiting forever.

A DDP replica is whole on every rank: its ``module`` is saved locally, with no collective.

Loading an adapter file into a sharded (FSDP2 / tensor-parallel) model.

Sharding fixes a model's parameters: FSDP2 and tensor parallelism shard the parameters present
when ``fully_shard`` / ``parallelize_lora`` ran, and a parameter added afterwards would be neither
sharded nor synchronised. So on a sharded model ``qpeft.load_adapters`` does not add adapters: each
saved adapter must already be on exactly the saved layers, with the saved configuration (created
before sharding, by ``update_model`` or by ``load_adapters`` on the plain model). The saved scale,
enable and trainable flags are applied (recorded as on a plain model), then every rank passes the
whole factors and keeps its own shard.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import chain
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from ..core.transaction import apply_atomically
from ..lora.convert import lora_layers, update_model
from ..lora.layer import adapter_keys
from ..lora.manage import disable_selection
from ..parallel.state_dict import full_state_dict
from .loading import Header, check_tensors

__all__ = [
    "unwrap",
    "is_sharded",
    "gather_state_dict",
    "gather_tensors",
    "write_once",
    "load_adapters_sharded",
]


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
            "fully_shard, or load qpeft.full_state_dict(model) into a plain model built the same "
            "way"
        )
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter or buffer of ``model`` is a ``DTensor`` (FSDP2 or tensor parallel)."""
    return any(isinstance(t, DTensor) for t in chain(model.parameters(), model.buffers()))


def gather_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of a sharded model on rank 0 (CPU, single-process keys); ``{}``
    elsewhere.

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
    """Whole CPU copies of ``tensors``; each ``DTensor`` is gathered (a collective, in dict
    order)."""
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
        raise RuntimeError(
            f"rank 0 failed to write the checkpoint (nothing was written): {outcome[0]}"
        )


def _check_present(model: nn.Module, configs: list[dict[str, Any]], where: Path) -> set[str]:
    """The model's state-dict keys of the saved adapters; each must sit on exactly the saved
    layers."""
    layers = lora_layers(model)
    keys: set[str] = set()
    for cfg in configs:
        name = cfg["adapter_name"]
        have = {ln for ln, layer in layers.items() if name in layer.adapters}
        if not have:
            raise ValueError(
                f"{where}: the model is sharded and has no adapter {name!r}; adapters cannot be "
                "added "
                "after fully_shard / parallelize_lora: call qpeft.load_adapters (or update_model) "
                "on "
                "the model before sharding it"
            )
        saved = {
            ln for ln, attrs in cfg["adapter_cfg"].items() if attrs != {"enable": False}
        }  # not L.<projection>
        for layer_name in sorted(have ^ saved):
            side = "has" if layer_name in have else "lacks"
            raise ValueError(
                f"{where}: the sharded model {side} adapter {name!r} on layer {layer_name!r}, "
                "unlike the file; create it on the saved layers before sharding"
            )
        keys |= adapter_keys(model, [name])
    return keys


def load_adapters_sharded(
    model: nn.Module,
    configs: list[dict[str, Any]],
    disabled: dict[str, list[str]],
    header: Header,
    tensors: dict[str, torch.Tensor],
    where: Path,
) -> nn.Module:
    """Fill a sharded model's existing adapters from a checked adapter file; a collective.

    Args:
        model: an FSDP2 / tensor-parallel model that already has the saved adapters.
        configs: one ``update_model`` config per saved adapter (all layers enabled).
        disabled: ``{layer: [adapter names]}`` saved as disabled.
        header, tensors: the file's header and tensors (whole, on every rank).
        where: the file, for messages.

    Returns:
        ``model``.

    Raises:
        ValueError: a saved adapter missing from the model, or on other layers, or with another
            rank, initializer or dtype (names adapter, layer or key). Raised identically on every
            rank before any collective; ``model`` is then left untouched.
    """
    keys = _check_present(model, configs, where)
    check_tensors(model, header, {}, where, only=keys, cast=True)
    state = model.state_dict()
    values = {k: tensors[k].to(state[k].dtype) for k in sorted(keys)}

    def change(target: nn.Module, dry_run: bool) -> nn.Module:
        for cfg in configs:
            update_model(target, cfg)  # existing adapters: sets scale / enable, checks the rest
        if disabled:
            disable_selection(target, disabled)
        set_model_state_dict(
            target, values, options=StateDictOptions(full_state_dict=True, strict=False)
        )
        return target

    return apply_atomically(model, change, validate=False)
