"""Gathered (full) state dicts of parallelized qpeft models, with single-process keys.

Whatever wraps the model (DDP's ``module.``, FSDP1's ``_fsdp_wrapped_module.``, FSDP2 or tensor
parallel ``DTensor`` shards), :func:`full_state_dict` returns plain CPU tensors under the keys the
same model has on one process (``mlp.up.weight``, ``mlp.up.adapters.default.lora_a``), so a file
written from it loads into a single-process model and back. It builds on
``torch.distributed.checkpoint.state_dict``; for sharded checkpoints use that module's
``get_model_state_dict`` with ``torch.distributed.checkpoint.save`` / ``load`` directly.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.nn.parallel import DistributedDataParallel

from ..lora.layer import adapter_keys

__all__ = ["full_state_dict", "load_full_state_dict", "is_adapter_key", "model_adapter_keys"]

# The name shapes of adapter factors, for is_adapter_key only: the functions here take the keys
# from the model's adapters (model_adapter_keys), never from a pattern.
_ADAPTER_KEY = re.compile(r"(^|\.)adapters\.[^.]+\.([^.]+\.)?lora_[ab]$")
# Module levels that wrappers insert and single-process keys do not have (FSDP1, activation
# checkpointing, torch.compile), as torch.distributed.checkpoint.state_dict drops them.
_WRAPPER_LEVELS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


def is_adapter_key(key: str) -> bool:
    """Whether a state-dict key has the shape of a LoRA adapter factor's key.

    ``...adapters.<name>.lora_a|b``, or ``...adapters.<name>.<projection>.lora_a|b`` for grouped
    experts. A test of the name only; with a model at hand use :func:`model_adapter_keys`.
    """
    return bool(_ADAPTER_KEY.search(key))


def model_adapter_keys(model: nn.Module) -> set[str]:
    """The single-process state-dict keys of every adapter factor of a possibly wrapped model.

    Taken from the adapters themselves (:func:`qpeft.lora.layer.adapter_keys`) with the levels
    DDP (``module.``), FSDP1, activation checkpointing and ``torch.compile`` add removed, so they
    are the keys :func:`full_state_dict` returns.
    """
    while isinstance(model, DistributedDataParallel):
        model = model.module
    return {_single_process_key(k) for k in adapter_keys(model)}


def _single_process_key(key: str) -> str:
    return ".".join(part for part in key.split(".") if part not in _WRAPPER_LEVELS)


def full_state_dict(
    model: nn.Module, *, adapters_only: bool = False, rank0_only: bool = False
) -> dict[str, torch.Tensor]:
    """The whole (gathered) state dict of a possibly parallelized model, as CPU tensors.

    A collective when the model is sharded: every rank must call it.

    Args:
        model: a qpeft model, plain or wrapped by DDP / FSDP1 / FSDP2 / tensor parallelism.
        adapters_only: keep only the adapter factors (``...adapters.<name>.lora_a|b``, grouped
            experts ``...adapters.<name>.<projection>.lora_a|b``), as the adapters name them.
        rank0_only: gather on rank 0 only (other ranks get ``{}``), to spare memory.

    Returns:
        key -> full CPU tensor, keys as on a single process.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=rank0_only)
    state = get_model_state_dict(model, options=options)
    keep = model_adapter_keys(model) if adapters_only else None
    return {k: v.detach().cpu() for k, v in state.items() if keep is None or k in keep}


def load_full_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Load a full (single-process-keyed) state dict into a possibly parallelized model.

    Every rank passes the same full dict; each keeps its own shard. A dict holding only adapter
    factors (``full_state_dict(..., adapters_only=True)``) loads the adapters and leaves the base.

    Args:
        model: the model to fill in place (plain, DDP, FSDP1, FSDP2 or tensor parallel).
        state_dict: key -> full tensor.

    Returns:
        ``model``.

    Raises:
        KeyError: keys the model does not have, or (for a dict that is not adapters-only) keys of
            the model it lacks; named, checked before anything is loaded.
        ValueError: a tensor whose shape differs from the model's (names the key).
    """
    current = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    adapters = model_adapter_keys(model)
    _check_keys(current, state_dict, adapters)
    for key in sorted(state_dict):
        if tuple(state_dict[key].shape) != tuple(current[key].shape):
            raise ValueError(
                f"state dict key {key!r}: shape {tuple(state_dict[key].shape)} does not match the "
                f"model's {tuple(current[key].shape)}"
            )
    strict = not set(state_dict) <= adapters
    set_model_state_dict(  # a copy: torch fills the dict it is given with the model's other keys
        model, dict(state_dict), options=StateDictOptions(full_state_dict=True, strict=strict)
    )
    return model


def _check_keys(
    current: dict[str, torch.Tensor], given: dict[str, torch.Tensor], adapters: set[str]
) -> None:
    unexpected = sorted(set(given) - set(current))
    if unexpected:
        raise KeyError(f"state dict keys the model does not have: {unexpected[:5]}")
    if set(given) <= adapters:
        expected = sorted(k for k in current if k in adapters)
    else:
        expected = sorted(current)
    missing = [k for k in expected if k not in given]
    if missing:
        raise KeyError(f"state dict lacks keys of the model: {missing[:5]}")
