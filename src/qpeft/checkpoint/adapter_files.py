"""Adapter files: ``save_adapters`` writes only the adapters of a model, ``load_adapters`` adds
them.

An adapter file is a directory with ``qpeft.json`` (``{"format": "qpeft-adapters",
"format_version": 1, "adapters": {name: {"layers": {layer: attributes}, "trainable": bool,
"skipped_projections": {experts layer: [projections]}}}}``) and ``adapters.safetensors``
(``<layer>.adapters.<name>.lora_a`` / ``.lora_b``; grouped experts
``<layer>.adapters.<name>.<projection>.lora_a``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.modes import restoring
from ..core.transaction import apply_atomically
from ..lora.config import PEFTAttributeConfig
from ..lora.convert import candidate_layers, lora_layers, update_model
from ..lora.layer import adapter_keys, adapter_state
from ..lora.manage import disable_selection
from ..lora.targets import is_target_name, skipped_projections
from . import sharded as collective
from .files import reading
from .full import ADAPTER_FILE, FORMAT_VERSION, UNEXPECTED, write_checkpoint
from .loading import check_sizes, check_tensors, load_checked
from .sharded import load_adapters_sharded
from .tensor_files import read_header, read_tensors
from .validate import MANIFEST, read_manifest

__all__ = ["save_adapters", "load_adapters", "check_adapter_entries"]


def save_adapters(
    model: nn.Module, path: str | os.PathLike, adapter_names: list[str] | None = None
) -> None:
    """Save only adapters (factors and per-layer attributes) into the directory ``path``,
    atomically.

    On a sharded model this is a collective, as :func:`save`: every rank must call it; only the
    adapter factors are gathered, and rank 0 alone writes.

    Args:
        model: a converted model; plain, DDP, FSDP2 or tensor parallel.
        path: a directory; an existing adapter file (or empty directory) there is replaced, if it
            holds nothing but ``qpeft.json`` and ``adapters.safetensors``.
        adapter_names: the adapters to save; None saves every adapter.

    Raises:
        ValueError: the model has no LoRA layers, or an adapter name is unknown (names it).
        FileExistsError: ``path`` holds anything but an adapter file's two files (a full
            checkpoint too: it is never replaced by an adapters-only one; names the entries).
        TypeError, ValueError, TimeoutError: as :func:`save`.
    """
    model = collective.unwrap(model, "qpeft.save_adapters")
    layers = lora_layers(model)
    present = {n for layer in layers.values() for n in layer.adapters}
    if not present:
        raise ValueError("model has no adapters to save; call qpeft.update_model first")
    names = sorted(present) if adapter_names is None else list(adapter_names)
    for name in names:
        if name not in present:
            raise ValueError(f"no adapter named {name!r}; the model has {sorted(present)}")
    entries: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name in names:
        holders = {
            ln: layer.adapters[name] for ln, layer in layers.items() if name in layer.adapters
        }
        entries[name] = {
            "layers": {ln: a.config.model_dump() for ln, a in holders.items()},
            "trainable": any(p.requires_grad for a in holders.values() for p in a.parameters()),
        }
        skipped = skipped_projections(layers, holders)
        if skipped:
            entries[name]["skipped_projections"] = skipped
        tensors.update(adapter_state(model, [name]))
    whole = {
        k: t.contiguous() for k, t in collective.gather_tensors(tensors).items()
    }  # same order on every rank
    manifest = {"format": "qpeft-adapters", "format_version": FORMAT_VERSION, "adapters": entries}
    collective.write_once(
        collective.is_sharded(model), lambda: write_checkpoint(path, manifest, whole)
    )


def _adapter_config(
    name: str, entry: Any, where: Path
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """The ``update_model`` config that recreates adapter ``name``, and the layers where it is
    off."""
    if not (isinstance(entry, dict) and isinstance(entry.get("layers"), dict) and entry["layers"]):
        raise ValueError(f"{where}: adapter {name!r} has no 'layers' map")
    layers: dict[str, Any] = {}
    saved: dict[str, PEFTAttributeConfig] = {}
    for layer_name, attrs in entry["layers"].items():
        try:  # the same (strict) rules as the API's
            saved[layer_name] = PEFTAttributeConfig.model_validate(attrs)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{where}: adapter {name!r} on layer {layer_name!r}: {err}") from None
        # created enabled (update_model skips disabled layers), then disabled as recorded
        layers[layer_name] = {**saved[layer_name].model_dump(), "enable": True}
    trainable = entry.get("trainable", True)
    if not isinstance(trainable, bool):
        raise ValueError(
            f"{where}: adapter {name!r}: 'trainable' must be a bool, got {trainable!r}"
        )
    skipped = entry.get("skipped_projections", {})
    if not isinstance(skipped, dict) or not all(
        isinstance(v, list) and all(isinstance(p, str) for p in v) and ln in layers
        for ln, v in skipped.items()
    ):
        raise ValueError(
            f"{where}: adapter {name!r}: 'skipped_projections' must map its layers to projection "
            "lists"
        )
    for ln, projections in skipped.items():
        layers.update(
            {f"{ln}.{p}": {"enable": False} for p in projections}
        )  # see qpeft.lora.targets
    disabled = {ln: [name] for ln, attrs in saved.items() if not attrs.enable}
    cfg = {"adapter_name": name, "adapter_cfg": layers, "freeze_lora_weights": not trainable}
    return cfg, disabled


def check_adapter_entries(
    manifest: dict[str, Any], where: Path
) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    """Check the ``adapters`` section of an adapter file's manifest.

    Returns:
        The ``update_model`` configs recreating each adapter, and ``{layer: [adapters off]}``.

    Raises:
        ValueError: no adapters, or a malformed entry (names the adapter and layer).
    """
    entries = manifest.get("adapters")
    if not isinstance(entries, dict) or not entries:
        raise ValueError(f"{where}: no adapters listed")
    configs, disabled = [], {}
    for name, entry in entries.items():
        cfg, off = _adapter_config(name, entry, where)
        configs.append(cfg)
        for ln, names in off.items():
            disabled.setdefault(ln, []).extend(names)
    return configs, disabled


def load_adapters(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Add the adapters saved by :func:`save_adapters` to ``model`` (same base architecture).

    Factors are cast to each new adapter's dtype (``lora_dtype``, or the base weight's). The base
    is frozen as by :func:`qpeft.update_model`; each adapter is trainable as when saved.

    On a sharded model (FSDP2, tensor parallelism) adapters cannot be added: each saved adapter
    must already be on exactly the saved layers with the saved configuration (created before
    sharding). Its scale, enable and trainable flags are set as saved and each rank keeps its
    shard of the factors. A collective: every rank must call it (each reads the files).

    Returns:
        The model to use from now on: ``model`` changed in place (one ``peft`` mode recorded per
        adapter), or the LoRA layer around it when ``model`` is itself a bare layer.

    Raises:
        FileNotFoundError: missing directory or file. ValueError: corrupt files, an adapter name
            the model already has (a sharded model: lacks, or has on other layers or with another
            configuration), a layer the model lacks, or a shape mismatch (names adapter, layer or
            key). ``model`` is then left untouched.
    """
    path = Path(path)
    with reading(path, UNEXPECTED["qpeft-adapters"]):
        manifest = read_manifest(path, "qpeft-adapters")
        header, tensors = read_header(path / ADAPTER_FILE), read_tensors(path / ADAPTER_FILE)
    where = path / MANIFEST
    configs, disabled = check_adapter_entries(manifest, where)
    check_sizes([{"mode": "peft", "config": cfg} for cfg in configs], header, path / ADAPTER_FILE)
    if collective.is_sharded(model):
        return load_adapters_sharded(model, configs, disabled, header, tensors, path / ADAPTER_FILE)
    existing = {n for layer in lora_layers(model).values() for n in layer.adapters}
    targets = candidate_layers(model)
    for cfg in configs:
        if cfg["adapter_name"] in existing:
            raise ValueError(
                f"model already has an adapter named {cfg['adapter_name']!r}; delete it first"
            )
        missing = [ln for ln in cfg["adapter_cfg"] if not is_target_name(ln, targets)]
        if missing:
            raise ValueError(
                f"{where}: adapter {cfg['adapter_name']!r} targets layer {missing[0]!r}, which the "
                "model lacks"
            )

    def attach(target: nn.Module, dry_run: bool) -> nn.Module:
        with restoring():
            for cfg in configs:
                target = update_model(target, cfg)
        if disabled:
            disable_selection(target, disabled)
        keys = adapter_keys(target, {cfg["adapter_name"] for cfg in configs})
        check_tensors(target, header, {}, path / ADAPTER_FILE, only=keys, cast=True)
        load_checked(
            target, tensors, {}, path / ADAPTER_FILE, strict=False, cast=True, dry_run=dry_run
        )
        return target

    return apply_atomically(model, attach)
