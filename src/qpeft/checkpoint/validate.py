"""Validation of a checkpoint's JSON manifest and of the model its log rebuilds.

Everything in the manifest is checked for type and shape here, before a model is touched, so a
hand-edited or corrupt manifest gives an error naming the field instead of a crash mid-restore.

Checked tensor loading lives in :mod:`qpeft.checkpoint.loading`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..core.modes import known_modes, unknown_mode_message
from ..core.wrapping import ModuleWrapper
from ..lora.config import PEFTAttributeConfig
from ..lora.convert import lora_layers
from ..lora.layer import LoRAModule
from ..quant.targets import logical_named_modules
from .files import read_json

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "read_manifest",
    "check_full_manifest",
    "adapter_flags",
    "apply_flags",
    "wrapper_map",
    "check_wrappers",
]


FORMAT_VERSION = 1
MANIFEST = "qpeft.json"


def read_manifest(path: Path, kind: str) -> dict[str, Any]:
    """Read ``path/qpeft.json`` and check format and version (callers hold
    :func:`qpeft.checkpoint.files.reading`).

    Raises:
        FileNotFoundError: no directory or manifest. ValueError: not JSON, another kind, a bad or
            newer ``format_version``.
    """
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
    wrappers = manifest.get("wrappers", {})
    _require(
        isinstance(wrappers, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in wrappers.items()),
        where,
        "'wrappers' must map module paths to class names",
    )
    trainable = manifest.get("trainable", [])
    _require(
        isinstance(trainable, list) and all(isinstance(n, str) for n in trainable),
        where,
        "'trainable' must be a list of parameter names",
    )


def wrapper_map(model: nn.Module) -> dict[str, str]:
    """``{logical layer name: "Outer/Inner"}``: the qpeft wrappers around each layer, outermost
    first (``LoRALinear/QuantLinear``). A LoRA layer left without adapters (all deleted) computes
    as its base and is not listed."""
    chains: dict[str, list[str]] = {}
    for _, logical, module in logical_named_modules(model):
        empty_lora = isinstance(module, LoRAModule) and not len(module.adapters)
        if isinstance(module, ModuleWrapper) and not empty_lora:
            chains.setdefault(logical, []).append(_class_name(module))
    return {name: "/".join(classes) for name, classes in chains.items()}


def _class_name(module: nn.Module) -> str:
    """The module's class name; for a module ``fully_shard`` sharded (its class swapped for a
    dynamic ``FSDP<Name>(FSDPModule, <Name>)``) the name of the class it had before."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(module)
    if isinstance(module, FSDPModule):
        cls = next(c for c in cls.__mro__ if not issubclass(c, FSDPModule))
    return cls.__name__


def check_wrappers(model: nn.Module, manifest: dict[str, Any], where: Path) -> None:
    """The replayed ``model`` has exactly the wrappers the saved one had (``wrappers``), so a log
    that lost or gained an entry cannot restore a layer unquantized or unadapted. Checkpoints
    written before the field existed are not checked.

    Raises:
        ValueError: naming the first layer whose wrapper differs.
    """
    saved = manifest.get("wrappers")
    if saved is None:
        return
    rebuilt = wrapper_map(model)
    for name in sorted(set(saved) | set(rebuilt)):
        now, then = rebuilt.get(name, "plain module"), saved.get(name, "plain module")
        if now != then:
            raise ValueError(
                f"{where}: replaying the mode log makes {name!r} a {now}, but the saved model had "
                f"a {then} there (the log and the checkpoint disagree)"
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
