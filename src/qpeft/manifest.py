"""The JSON manifest of a qpeft checkpoint: reading, validating, and applying its flags.

Everything in the manifest is checked for type and shape here, before a model is touched, so a
hand-edited or corrupt manifest gives an error naming the field instead of a crash mid-restore.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .modes import known_modes
from .peft import lora_layers
from .safeio import read_json, recover

__all__ = ["FORMAT_VERSION", "MANIFEST", "read_manifest", "check_full_manifest", "adapter_flags", "apply_flags"]

FORMAT_VERSION = 1
MANIFEST = "qpeft.json"


def read_manifest(path: Path, kind: str) -> dict[str, Any]:
    """Read ``path/qpeft.json`` (after :func:`qpeft.safeio.recover`) and check format and version.

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
        raise ValueError(f"{where}: format_version {version} is newer than this qpeft supports ({FORMAT_VERSION})")
    return manifest


def _require(ok: bool, where: Path, what: str) -> None:
    if not ok:
        raise ValueError(f"{where}: {what}")


def _check_modes(modes: Any, where: Path) -> None:
    _require(isinstance(modes, list), where, "'modes' must be a list")
    for i, entry in enumerate(modes):
        _require(isinstance(entry, dict) and isinstance(entry.get("mode"), str) and isinstance(entry.get("config"), dict),
                 where, f"modes[{i}] is not a {{'mode': str, 'config': dict}} entry")
        _require(entry["mode"] in known_modes(), where, f"modes[{i}] is mode {entry['mode']!r}, which this qpeft cannot replay")


def _check_flags(flags: Any, where: Path) -> None:
    _require(isinstance(flags, dict), where, "'adapters' must be a map")
    for layer_name, adapters in flags.items():
        _require(isinstance(adapters, dict), where, f"adapters[{layer_name!r}] must be a map")
        for name, attrs in adapters.items():
            ok = (isinstance(attrs, dict) and isinstance(attrs.get("scale"), int | float)
                  and isinstance(attrs.get("enable"), bool) and isinstance(attrs.get("merged"), bool))
            _require(ok, where, f"adapter {name!r} on layer {layer_name!r} needs a number 'scale' and bools 'enable', 'merged'")


def check_full_manifest(manifest: dict[str, Any], where: Path) -> None:
    """Check the sections of a full checkpoint's manifest: modes, aliases, adapters, trainable.

    Raises:
        ValueError: naming the first malformed field or an unknown mode.
    """
    _check_modes(manifest.get("modes"), where)
    aliases = manifest.get("aliases", {})
    _require(isinstance(aliases, dict) and all(isinstance(v, str) for v in aliases.values()),
             where, "'aliases' must map keys to keys")
    _check_flags(manifest.get("adapters", {}), where)
    trainable = manifest.get("trainable", [])
    _require(isinstance(trainable, list) and all(isinstance(n, str) for n in trainable),
             where, "'trainable' must be a list of parameter names")


def adapter_flags(model: nn.Module) -> dict[str, dict[str, dict[str, Any]]]:
    """``{layer: {adapter: {"scale", "enable", "merged"}}}`` of every adapter of ``model``."""
    return {
        layer_name: {n: {"scale": a.scale, "enable": a.enable, "merged": a.merged} for n, a in layer.adapters.items()}
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
            raise ValueError(f"replaying the log created adapter {extra[0]!r} on layer {layer_name!r}, which the checkpoint lacks")
    for layer_name, adapters in flags.items():
        for name, attrs in adapters.items():
            if layer_name not in layers or name not in layers[layer_name].adapters:
                raise ValueError(f"checkpoint has adapter {name!r} on layer {layer_name!r}, which replaying its log did not create")
            adapter = layers[layer_name].adapters[name]
            adapter.scale, adapter.enable, adapter.merged = float(attrs["scale"]), attrs["enable"], attrs["merged"]
    trainable = set(manifest.get("trainable", []))
    params = dict(model.named_parameters())
    unknown = sorted(trainable - set(params))
    if unknown:
        raise ValueError(f"checkpoint marks parameter {unknown[0]!r} trainable, but the model has no such parameter")
    for name, param in params.items():
        param.requires_grad_(name in trainable)
