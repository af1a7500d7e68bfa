"""Save and restore: a directory holding a JSON manifest and safetensors, never a pickle.

A full checkpoint (``save``) is a directory with

- ``qpeft.json``: ``{"format": "qpeft-checkpoint", "format_version": 1, "modes": <the mode log>,
  "aliases": {tied key: key it shares}, "adapters": {layer: {adapter: {"scale", "enable",
  "merged"}}}, "trainable": [names of parameters with requires_grad]}``;
- ``model.safetensors``: every tensor of ``model.state_dict()`` (base weights, adapter factors
  ``<layer>.adapters.<name>.lora_a: [r, in]`` / ``lora_b: [out, r]``, quantizer buffers), tied
  tensors stored once.

``restore`` replays the mode log on a freshly built model with tensor computations skipped
(:func:`qpeft.core.modes.restoring`), re-applies the saved adapter flags and ``requires_grad``
(which
also captures direct edits such as ``adapter.scale = 2``), checks every key, shape and dtype, then
copies the tensors. It runs through :func:`qpeft.core.transaction.apply_atomically`, so a failure
leaves
the passed model untouched. An adapter file (:mod:`qpeft.checkpoint.adapter_files`) holds only the
adapters.

On a sharded model (FSDP2, tensor parallelism) ``save`` and ``save_adapters`` are collectives that
gather and write on rank 0 (:mod:`qpeft.checkpoint.sharded`), and ``load_adapters`` fills the
existing adapters shard by shard (:mod:`qpeft.checkpoint.sharded`); the files are the same as
from one process.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.modes import replay, restoring, state
from ..core.transaction import apply_atomically
from ..lora.convert import lora_layers
from . import sharded as collective
from .extra_state import tensor_state
from .files import atomic_directory, reading, write_json
from .kinds import manifest_says, own_files
from .loading import check_sizes, check_tensors, load_checked
from .tensor_files import read_header, read_tensors, tensor_table, write_tensors
from .validate import (
    FORMAT_VERSION,
    MANIFEST,
    adapter_flags,
    apply_flags,
    check_full_manifest,
    check_wrappers,
    read_manifest,
    wrapper_map,
)

__all__ = ["save", "restore", "write_checkpoint", "MODEL_FILE", "ADAPTER_FILE", "FORMAT_VERSION"]

MODEL_FILE = "model.safetensors"
ADAPTER_FILE = "adapters.safetensors"
_KINDS = {"qpeft-checkpoint": MODEL_FILE, "qpeft-adapters": ADAPTER_FILE}
_NAMES = {"qpeft-checkpoint": "a qpeft checkpoint", "qpeft-adapters": "a qpeft adapter file"}
#: ``unexpected(dir)`` of each manifest format: only ``qpeft.json`` of that format + its tensors.
UNEXPECTED = {
    fmt: own_files(MANIFEST, manifest_says(fmt), [tensors]) for fmt, tensors in _KINDS.items()
}


def write_checkpoint(
    path: str | os.PathLike, manifest: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> None:
    """Atomically write a manifest and its tensor file (named by the manifest's format) into
    ``path``.

    Only an empty directory or one holding exactly a manifest of the same format and its tensor
    file is replaced (a full checkpoint is never replaced by an adapter file, or the reverse).

    Raises:
        FileExistsError: ``path`` holds anything else (names the entries); nothing is written.
        ValueError, PermissionError, TimeoutError: as
            :func:`qpeft.checkpoint.files.atomic_directory`.
    """
    fmt = manifest["format"]
    with atomic_directory(path, _NAMES[fmt], UNEXPECTED[fmt]) as tmp:
        write_tensors(tmp / _KINDS[fmt], tensors)
        write_json(tmp / MANIFEST, manifest)


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Save ``model`` (mode log, flags and every tensor) into the directory ``path``, atomically.

    On a sharded model (FSDP2 ``fully_shard``, DTensor tensor parallelism, or both) this is a
    collective: every rank of the default process group must call it. The whole tensors are
    gathered, rank 0 alone writes its ``path`` (the same files and keys as a single-process save;
    other ranks write nothing), and every rank returns once the files are in place. A DDP model
    saves its ``module`` locally (no collective).

    Args:
        model: any model, converted or not; plain, DDP, FSDP2 or tensor parallel.
        path: a directory; an existing qpeft checkpoint (or empty directory) there is replaced,
            if it holds nothing but ``qpeft.json`` and ``model.safetensors``.

    Raises:
        FileExistsError: ``path`` is a file, or a non-empty directory holding anything but a
            full checkpoint's two files (an adapter file, a user's notes...; names the entries).
        ValueError: ``path`` is empty, ``.``, a root, the current directory or a symbolic link.
        TimeoutError: another save of ``path`` is in progress (after
            :data:`qpeft.checkpoint.locks.LOCK_TIMEOUT` seconds).
        TypeError: a state-dict entry is not a tensor or has a dtype safetensors cannot store (an
            ``_extra_state`` that is None, as Megatron-Core's layers have, is skipped); an FSDP1
            model. Nothing is written then; on a sharded model rank 0 raises the error and
            the other ranks a ``RuntimeError`` quoting it.
    """
    model = collective.unwrap(model, "qpeft.save")
    sharded = collective.is_sharded(model)
    full = collective.gather_state_dict(model) if sharded else model.state_dict()
    modes, flags = state(model), adapter_flags(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    wrappers = wrapper_map(model)

    def write() -> None:
        tensors, aliases = tensor_table(tensor_state(full))
        manifest = {
            "format": "qpeft-checkpoint",
            "format_version": FORMAT_VERSION,
            "modes": modes,
            "aliases": aliases,
            "adapters": flags,
            "trainable": trainable,
            "wrappers": wrappers,
        }
        write_checkpoint(path, manifest, tensors)

    collective.write_once(sharded, write)


def restore(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Rebuild a saved model on a freshly built base ``model`` and load its tensors bit-exactly.

    ``model`` must be plain: on sharded training, restore on every rank, then shard (FSDP2
    ``fully_shard``, :func:`qpeft.parallelize_lora`).

    Args:
        model: the same architecture as the saved model, freshly built (no qpeft modes applied),
            not sharded.
        path: a directory written by :func:`save`.

    Returns:
        The restored model, to use from now on: ``model`` changed in place (adapters, enable
        flags, scales, merged state, ``requires_grad`` flags, quantizer state and every tensor as
        saved), or, when ``model`` is itself a layer the saved modes wrapped (a bare
        ``nn.Linear``), the rebuilt wrapper around it.

    Raises:
        FileNotFoundError: the directory or one of its files is missing.
        ValueError: corrupt or non-JSON manifest, non-safetensors tensor file, newer format version,
            unknown mode, a model that does not match (names the first mismatching layer or key),
            a sharded model or one on the meta device. ``model`` is then left untouched.
    """
    path = Path(path)
    if collective.is_sharded(model):
        raise ValueError(
            "restore expects a plain model, this one is sharded (DTensor parameters): "
            "restore the freshly built model on every rank, then shard it"
        )
    if state(model) or lora_layers(model):
        raise ValueError(
            "restore expects a freshly built base model; this one already has qpeft modes applied"
        )
    tensors_of = [*model.named_parameters(), *model.named_buffers()]
    meta = next((name for name, t in tensors_of if t.is_meta), None)
    if meta is not None:  # load_state_dict would leave it there, without a word
        raise ValueError(
            f"restore: {meta!r} is on the meta device (no storage to load into); build the model "
            "on a real device, or materialise it first (model.to_empty(device=...))"
        )
    with reading(path, UNEXPECTED["qpeft-checkpoint"]):
        manifest = read_manifest(path, "qpeft-checkpoint")
        check_full_manifest(manifest, path / MANIFEST)
        header = read_header(path / MODEL_FILE)
        tensors = read_tensors(path / MODEL_FILE)
    modes = manifest["modes"]
    aliases = manifest.get("aliases", {})
    check_sizes(modes, header, path / MODEL_FILE)

    def rebuild(target: nn.Module, dry_run: bool) -> nn.Module:
        with restoring():
            for i, entry in enumerate(modes):
                try:
                    target = replay(target, [entry])
                except (ValueError, TypeError, KeyError, AttributeError) as err:
                    raise ValueError(
                        f"{path / MANIFEST}: replaying modes[{i}] ({entry['mode']!r}) failed: {err}"
                    ) from err
        apply_flags(target, manifest)
        check_wrappers(target, manifest, path / MANIFEST)
        check_tensors(target, header, aliases, path / MODEL_FILE, lazy_extras=True)
        load_checked(target, tensors, aliases, path / MODEL_FILE, dry_run=dry_run)
        return target

    return apply_atomically(model, rebuild)
