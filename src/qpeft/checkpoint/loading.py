"""Checked tensor loading: compare a model's ``state_dict`` with a safetensors header, then copy.

Every key the model has is compared (present, shape, dtype) before a single value is written; the
error names the first mismatching key. A key the file has and the model lacks may still be wanted:
modules may create a buffer while loading (a quantizer's ``_amax`` exists only once calibrated), so
with ``lazy_extras`` such keys are offered to ``load_state_dict`` and checked right after it. The
restore path runs all of this on a structural copy first, so the passed model is untouched on
failure.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .extra_state import is_extra_state_key, tensor_state

__all__ = ["Header", "check_tensors", "load_checked", "check_sizes"]


Header = dict[str, tuple[torch.dtype, list[int]]]


def _check_one(
    where: Path, key: str, tensor: torch.Tensor, found: tuple[torch.dtype, list[int]], cast: bool
) -> None:
    dtype, shape = found
    if list(tensor.shape) != shape:
        raise ValueError(
            f"{where}: tensor {key!r} has shape {shape}, the model's has {list(tensor.shape)}"
        )
    if not cast and dtype != tensor.dtype:
        raise ValueError(f"{where}: tensor {key!r} is {dtype}, the model's is {tensor.dtype}")


def check_tensors(
    model: nn.Module,
    header: Header,
    aliases: dict[str, str],
    where: Path,
    only: Collection[str] | None = None,
    cast: bool = False,
    lazy_extras: bool = False,
) -> None:
    """Check that the file described by ``header`` (+ ``aliases``) holds exactly the model's
    tensors.

    Args:
        model: the model to load into.
        header: ``{key: (dtype, shape)}`` of the file (:func:`qpeft.checkpoint.files.read_header`).
        aliases: ``{key: stored key}`` for tied tensors stored once.
        where: the file, for messages.
        only: compare only these model keys (e.g. new adapters); None compares every key.
        cast: accept a dtype that differs from the model's (values are cast on load).
        lazy_extras: leave keys the model lacks to :func:`load_checked` (buffers created on load).

    Raises:
        ValueError: naming the first missing, unexpected, mis-shaped or mis-typed key.
    """
    expected = tensor_state(model.state_dict())
    if only is not None:
        expected = {k: v for k, v in expected.items() if k in only}
    for key, tensor in expected.items():
        source = aliases.get(key, key)
        if source not in header:
            raise ValueError(
                f"{where} has no tensor {key!r}, which the model needs (another architecture or "
                "config?)"
            )
        _check_one(where, key, tensor, header[source], cast)
    dangling = [k for k, source in aliases.items() if source not in header]
    if dangling:
        raise ValueError(
            f"{where}: tied tensor {dangling[0]!r} points to {aliases[dangling[0]]!r}, which the "
            "file lacks"
        )
    extra = [k for k in [*header, *aliases] if k not in expected]
    if extra and not lazy_extras:
        raise ValueError(
            f"{where} has tensor {extra[0]!r}, which the model does not have (another "
            "architecture?)"
        )


@torch.no_grad()
def load_checked(
    model: nn.Module,
    tensors: dict[str, torch.Tensor],
    aliases: dict[str, str],
    where: Path,
    strict: bool = True,
    cast: bool = False,
    dry_run: bool = False,
) -> None:
    """Copy checked ``tensors`` (tied keys expanded from ``aliases``) into ``model``.

    Args:
        strict: the file must cover the model (a full checkpoint); False for a subset (adapters).
        cast: values may be cast to the model's dtype (as accepted by :func:`check_tensors`).
        dry_run: the model is a throw-away structural copy: tensors are assigned, not copied.

    Raises:
        ValueError: a key no module accepted, or a buffer created on load with another
            shape or dtype than the file's (names the key).
    """
    full = {**tensors, **{key: tensors[source] for key, source in aliases.items()}}
    before = set(model.state_dict())
    result = model.load_state_dict(full, strict=False, assign=dry_run)
    state = model.state_dict()  # buffers created while loading are in it now
    # name keys as the file does: load_state_dict reports wrapper-internal names (``.base.``)
    unexpected = [k for k in full if k not in before and k not in state] or result.unexpected_keys
    if unexpected:
        raise ValueError(
            f"{where} has tensor {unexpected[0]!r}, which the model does not have (another "
            "architecture?)"
        )
    missing = [k for k in result.missing_keys if not is_extra_state_key(k)]  # None: not saved
    if strict and missing:
        raise ValueError(f"{where} has no tensor {missing[0]!r}, which the model needs")
    for key, value in full.items():
        if state[key].shape != value.shape or not (cast or state[key].dtype == value.dtype):
            raise ValueError(
                f"{where}: tensor {key!r} did not load as saved (its module holds another shape or "
                "dtype)"
            )


def _numel(shape: Collection[int]) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total


def _check_ranks(entry: dict[str, Any], header: Header, where: Path) -> None:
    config = entry["config"]
    name = config.get("adapter_name")
    for layer, attrs in (config.get("adapter_cfg") or {}).items():
        rank = attrs.get("rank") if isinstance(attrs, dict) else None
        if not isinstance(rank, int) or attrs.get("enable") is False:
            continue  # the config's own validation speaks for a bad rank
        prefix = f"{layer}.adapters.{name}."
        stored = [
            s for k, (_, s) in header.items() if k.startswith(prefix) and k.endswith("lora_a")
        ]
        weight = header.get(f"{layer}.weight", (None, [rank]))[1]
        ranks = {s[-2] for s in stored if len(s) >= 2}
        if (stored and ranks != {rank}) or (not stored and rank > max(weight, default=rank)):
            raise ValueError(
                f"{where}: adapter {name!r} on layer {layer!r} asks for rank {rank}, but the "
                f"tensor file holds {sorted(ranks) or 'no factors of that size'}; nothing was "
                "allocated"
            )


def _check_amax(entry: dict[str, Any], header: Header, where: Path) -> None:
    largest = max((_numel(s) for _, s in header.values()), default=0)
    for layer, quantizers in (entry["config"].get("layers") or {}).items():
        for kind, info in (quantizers if isinstance(quantizers, dict) else {}).items():
            shape = info.get("amax_shape") if isinstance(info, dict) else None
            if shape is None:
                continue
            key = f"{layer}.{kind}._amax"
            ok = isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
            ok = ok and (
                list(header[key][1]) == shape if key in header else _numel(shape) <= largest
            )
            if not ok:
                raise ValueError(
                    f"{where}: quantizer {layer}.{kind} records amax shape {shape}, which the "
                    "tensor file does not hold; nothing was allocated"
                )


def check_sizes(modes: list[dict[str, Any]], header: Header, where: Path) -> None:
    """Before anything is built: every adapter and amax buffer the ``modes`` would allocate has
    the size the tensor file holds (a small hostile manifest cannot ask for terabytes).

    Raises:
        ValueError: naming the adapter and layer, or the quantizer, whose size does not match.
    """
    for entry in modes:
        if entry.get("mode") == "peft":
            _check_ranks(entry, header, where)
        elif entry.get("mode") == "quantize":
            _check_amax(entry, header, where)
