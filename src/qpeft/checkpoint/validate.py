"""Validation of what a checkpoint holds: the JSON manifest, then its tensors against the model.

Everything in the manifest is checked for type and shape here, before a model is touched, so a
hand-edited or corrupt manifest gives an error naming the field instead of a crash mid-restore.

Checked tensor loading: compare a model's ``state_dict`` with a safetensors header, then copy.

Every key the model has is compared (present, shape, dtype) before a single value is written; the
error names the first mismatching key. A key the file has and the model lacks may still be wanted:
modules may create a buffer while loading (a quantizer's ``_amax`` exists only once calibrated), so
with ``lazy_extras`` such keys are offered to ``load_state_dict`` and checked right after it. The
restore path runs all of this on a deep copy first, so the passed model is untouched on failure.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.modes import known_modes, unknown_mode_message
from ..lora.config import PEFTAttributeConfig
from ..lora.convert import lora_layers
from .extra_state import is_extra_state_key, tensor_state
from .files import read_json, recover

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "read_manifest",
    "check_full_manifest",
    "adapter_flags",
    "apply_flags",
    "check_tensors",
    "load_checked",
]


FORMAT_VERSION = 1
MANIFEST = "qpeft.json"


def read_manifest(path: Path, kind: str) -> dict[str, Any]:
    """Read ``path/qpeft.json`` (after :func:`qpeft.checkpoint.files.recover`) and check format and
    version.

    Raises:
        FileNotFoundError: no directory or manifest. ValueError: not JSON, another kind, a bad or
            newer ``format_version``.
    """
    recover(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    where = path / MANIFEST
    manifest = read_json(where)
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found != kind:
        raise ValueError(f"{where} is not a {kind} manifest (format field {found!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"{where}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{where}: format_version {version} is newer than this qpeft supports "
            f"({FORMAT_VERSION})"
        )
    return manifest


def _require(ok: bool, where: Path, what: str) -> None:
    if not ok:
        raise ValueError(f"{where}: {what}")


def _check_modes(modes: Any, where: Path) -> None:
    _require(isinstance(modes, list), where, "'modes' must be a list")
    for i, entry in enumerate(modes):
        _require(
            isinstance(entry, dict)
            and isinstance(entry.get("mode"), str)
            and isinstance(entry.get("config"), dict),
            where,
            f"modes[{i}] is not a {{'mode': str, 'config': dict}} entry",
        )
        _require(
            entry["mode"] in known_modes(),
            where,
            f"modes[{i}]: {unknown_mode_message(entry['mode'])}",
        )


def _check_flags(flags: Any, where: Path) -> None:
    _require(isinstance(flags, dict), where, "'adapters' must be a map")
    for layer_name, adapters in flags.items():
        _require(isinstance(adapters, dict), where, f"adapters[{layer_name!r}] must be a map")
        for name, attrs in adapters.items():
            ok = (
                isinstance(attrs, dict)
                and set(attrs) == {"scale", "enable", "merged"}
                and isinstance(attrs["enable"], bool)
                and isinstance(attrs["merged"], bool)
            )
            _require(
                ok,
                where,
                f"adapter {name!r} on layer {layer_name!r} needs exactly a 'scale' and the bools "
                "'enable', 'merged'",
            )
            try:  # the same rule as the API's
                PEFTAttributeConfig(scale=attrs["scale"])
            except ValueError as err:
                problem = err.errors()[0]["msg"] if hasattr(err, "errors") else str(err)
                raise ValueError(
                    f"{where}: adapter {name!r} on layer {layer_name!r}: scale "
                    f"{attrs['scale']!r} is invalid ({problem})"
                ) from None


def check_full_manifest(manifest: dict[str, Any], where: Path) -> None:
    """Check the sections of a full checkpoint's manifest: modes, aliases, adapters, trainable.

    Raises:
        ValueError: naming the first malformed field or an unknown mode.
    """
    _check_modes(manifest.get("modes"), where)
    aliases = manifest.get("aliases", {})
    _require(
        isinstance(aliases, dict) and all(isinstance(v, str) for v in aliases.values()),
        where,
        "'aliases' must map keys to keys",
    )
    for key, source in aliases.items():  # a tied key points straight at a stored key
        _require(
            source != key and source not in aliases,
            where,
            f"alias {key!r} -> {source!r} points at an alias (a chain or cycle), not a stored key",
        )
    _check_flags(manifest.get("adapters", {}), where)
    trainable = manifest.get("trainable", [])
    _require(
        isinstance(trainable, list) and all(isinstance(n, str) for n in trainable),
        where,
        "'trainable' must be a list of parameter names",
    )


def adapter_flags(model: nn.Module) -> dict[str, dict[str, dict[str, Any]]]:
    """``{layer: {adapter: {"scale", "enable", "merged"}}}`` of every adapter of ``model``."""
    return {
        layer_name: {
            n: {"scale": a.scale, "enable": a.enable, "merged": a.merged}
            for n, a in layer.adapters.items()
        }
        for layer_name, layer in lora_layers(model).items()
    }


def apply_flags(model: nn.Module, manifest: dict[str, Any]) -> None:
    """Set every adapter's scale/enable/merged and every parameter's ``requires_grad`` as saved.

    Raises:
        ValueError: the replayed model's adapters or parameters differ from the manifest's.
    """
    layers = lora_layers(model)
    flags = manifest.get("adapters", {})
    for layer_name, layer in layers.items():
        extra = sorted(set(layer.adapters) - set(flags.get(layer_name, {})))
        if extra:
            raise ValueError(
                f"replaying the log created adapter {extra[0]!r} on layer {layer_name!r}, which "
                "the checkpoint lacks"
            )
    for layer_name, adapters in flags.items():
        for name, attrs in adapters.items():
            if layer_name not in layers or name not in layers[layer_name].adapters:
                raise ValueError(
                    f"checkpoint has adapter {name!r} on layer {layer_name!r}, which replaying its "
                    "log did not create"
                )
            adapter = layers[layer_name].adapters[name]
            if attrs["merged"] != adapter.merged:  # only merge_adapters folds an update in
                raise ValueError(
                    f"checkpoint marks adapter {name!r} on layer {layer_name!r} merged="
                    f"{attrs['merged']}, but its mode log leaves it merged={adapter.merged}"
                )
            adapter.scale, adapter.enable = float(attrs["scale"]), attrs["enable"]
    trainable = set(manifest.get("trainable", []))
    params = dict(model.named_parameters())
    unknown = sorted(trainable - set(params))
    if unknown:
        raise ValueError(
            f"checkpoint marks parameter {unknown[0]!r} trainable, but the model has no such "
            "parameter"
        )
    for name, param in params.items():
        param.requires_grad_(name in trainable)


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
