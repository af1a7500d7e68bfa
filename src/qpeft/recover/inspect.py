"""``qpeft inspect PATH``: describe a checkpoint folder (a ``qpeft recover`` output, a checkpoint,
or Hugging Face PEFT adapter files) without building a model.

Reads only JSON and safetensors headers (shapes and dtypes; no tensor data, nothing unpickled):
the mode log, every adapter (layer, name, rank, scale, dtype), quantization formats and
quantizer counts, and file sizes. In a folder holding a full checkpoint beside other adapter
files (a run's ``checkpoint/``, ``hf_adapter/``, ``deploy/adapters/``), the adapters are the
checkpoint's, listed once, and the other folders are named as copies. qpeft adapters are the
ones the checkpoint's manifest (``qpeft.json``) lists, with their factors found under the keys
those adapters have (grouped experts: one line per projection); Hugging Face PEFT files are
read by their key names.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from safetensors import safe_open

from ..checkpoint.adapter_files import check_adapter_entries
from ..checkpoint.files import read_json
from ..checkpoint.validate import MANIFEST, check_full_manifest, read_manifest

__all__ = ["describe"]

MODE_CHECKPOINT = "qpeft-checkpoint"
_HF_KEY = re.compile(r"^base_model\.model\.(?P<layer>.+)\.lora_A(?:\.(?P<name>[^.]+))?\.weight$")


def _headers(files: list[Path]) -> dict[Path, dict[str, tuple[list[int], str]]]:
    """``{file: {key: (shape, dtype)}}`` from each safetensors header."""
    shapes: dict[Path, dict[str, tuple[list[int], str]]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                shapes[f] = {}
                for key in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                    piece = handle.get_slice(key)
                    shapes[f][key] = (list(piece.get_shape()), str(piece.get_dtype()))
        except Exception as err:  # safetensors raises its own error types for bad headers
            raise ValueError(f"{f.name}: not a readable safetensors file ({err})") from None
    return shapes


def _mode_log(files: list[Path]) -> list[dict[str, Any]]:
    """The mode log of the first full checkpoint among ``files``, every manifest validated as
    ``restore`` / ``load_adapters`` do."""
    log: list[dict[str, Any]] | None = None
    for f in files:
        if f.name != MANIFEST:
            continue
        data = read_json(f)
        kind = data.get("format") if isinstance(data, dict) else None
        if kind not in ("qpeft-checkpoint", "qpeft-adapters"):
            raise ValueError(f"{f} is not a qpeft manifest (format field {kind!r})")
        manifest = read_manifest(f.parent, kind)
        if kind == "qpeft-checkpoint":
            check_full_manifest(manifest, f)
            log = manifest["modes"] if log is None else log
        else:
            check_adapter_entries(manifest, f)
    return log or []


def _number(config: dict[str, Any], key: str, where: Path) -> float | None:
    value = config.get(key)
    if value is None:
        return None
    try:
        ok = not isinstance(value, bool) and math.isfinite(value) and value > 0
    except (TypeError, OverflowError):
        ok = False
    if not ok:
        raise ValueError(f"{where}: {key} must be a positive finite number, got {str(value)[:40]}")
    return float(value)


def _hf_scale(files: list[Path]) -> tuple[float | None, float | None] | None:
    """``(r, lora_alpha)`` of the first ``adapter_config.json``; None when there is none."""
    for f in files:
        if f.name == "adapter_config.json":
            config = read_json(f)
            if not isinstance(config, dict):
                raise ValueError(f"{f} is not a JSON object")
            try:
                return _number(config, "r", f), _number(config, "lora_alpha", f)
            except OverflowError:
                raise ValueError(f"{f}: r or lora_alpha is too large") from None
    return None


def _manifest_adapters(manifest: Any) -> dict[tuple[str, str], dict[str, Any]]:
    """``{(layer, adapter): attributes}`` a qpeft manifest (checkpoint or adapter file) lists."""
    entries = manifest.get("adapters") if isinstance(manifest, dict) else None
    if not isinstance(entries, dict):
        return {}
    found: dict[tuple[str, str], dict[str, Any]] = {}
    if manifest.get("format") == "qpeft-adapters":  # {name: {"layers": {layer: attributes}}}
        for name, entry in entries.items():
            layers = entry.get("layers") if isinstance(entry, dict) else None
            for layer, attrs in (layers or {}).items():
                found[(layer, name)] = attrs if isinstance(attrs, dict) else {}
    else:  # a full checkpoint: {layer: {name: flags}}
        for layer, names in entries.items():
            for name, flags in (names if isinstance(names, dict) else {}).items():
                found[(layer, name)] = flags if isinstance(flags, dict) else {}
    return found


def _factor_lines(layer, name, attrs, shapes) -> list[str]:
    """One line per factor pair of adapter ``name`` on ``layer``: the layer itself, or each
    projection of a grouped-experts layer (``lora_a: [E, r, in]``), from the tensor file's keys."""
    prefix = f"{layer}.adapters.{name}." if layer else f"adapters.{name}."
    scale = attrs.get("scale")
    scale_text = "?" if scale is None else f"{scale:g}"
    lines = []
    for key, (shape, dtype) in sorted(shapes.items()):
        if not (key.startswith(prefix) and key.endswith("lora_a")):
            continue
        projection = key[len(prefix) : -len("lora_a")].rstrip(".")
        if len(shape) < (3 if projection else 2):
            raise ValueError(f"LoRA factor {key!r} has shape {shape}; it needs [rank, in]")
        where = f"{layer}.{projection}" if projection else layer
        rank = shape[-2] if projection else shape[0]
        experts = f"  {shape[0]} experts" if projection else ""
        lines.append(f"  {where}  [{name}]  rank {rank}  scale {scale_text}  {dtype}{experts}")
    return lines


def _qpeft_adapter_lines(manifests, headers) -> list[str]:
    lines = []
    for f in manifests:
        tensors = {
            k: v for t, shapes in headers.items() if t.parent == f.parent for k, v in shapes.items()
        }
        for (layer, name), attrs in _manifest_adapters(read_json(f)).items():
            lines += _factor_lines(layer, name, attrs, tensors)
    return lines


def _hf_adapter_lines(headers, hf_config: tuple[float | None, float | None]) -> list[str]:
    r, alpha = hf_config
    lines = []
    for shapes in headers.values():
        for key, (shape, dtype) in sorted(shapes.items()):
            match = _HF_KEY.match(key)
            if not match:
                continue
            if len(shape) < 2:
                raise ValueError(f"LoRA factor {key!r} has shape {shape}; it needs [rank, in]")
            layer, name = match["layer"], match["name"] or "default"
            scale = (alpha or shape[0]) / (r or max(shape[0], 1))
            lines.append(f"  {layer}  [{name}]  rank {shape[0]}  scale {scale:g}  {dtype}")
    return lines


def describe(path: str | Path) -> str:
    """A text description of the checkpoint at ``path`` (see the module docstring).

    Raises:
        ValueError: ``path`` is missing, holds no JSON or safetensors file, or a file is unreadable.
    """
    root = Path(path)
    if not root.exists():
        raise ValueError(f"{str(root)!r} does not exist")
    files = sorted(p for p in ([root] if root.is_file() else root.rglob("*")) if p.is_file())
    tensors = [f for f in files if f.suffix == ".safetensors"]
    jsons = [f for f in files if f.suffix == ".json"]
    if not tensors and not jsons:
        raise ValueError(f"{str(root)!r} holds no JSON or safetensors file")
    headers, log = _headers(tensors), _mode_log(jsons)
    hf_config = _hf_scale(jsons)
    manifests = [f for f in jsons if f.name == MANIFEST]
    sources = manifests + [f for f in jsons if f.name == "adapter_config.json"]
    primary = next((f for f in manifests if read_json(f).get("format") == MODE_CHECKPOINT), None)
    copies = [f.parent for f in sources if f is not primary] if primary else []
    if copies:  # a run folder: the checkpoint's adapters, once; the other folders hold copies
        adapters = _qpeft_adapter_lines([primary], headers)
    else:
        adapters = _qpeft_adapter_lines(manifests, headers)
        if hf_config is not None:
            adapters += _hf_adapter_lines(headers, hf_config)
    quantizers = [k for shapes in headers.values() for k in shapes if "quantizer" in k]
    formats = _formats(log)
    out = [f"checkpoint {root}", f"mode log ({len(log)} entries):"]
    out += [f"  {i}. {e['mode']}  {_brief(e.get('config', {}))}" for i, e in enumerate(log, 1)]
    where = f", from {_rel(primary.parent, root)}" if copies else ""
    out += [f"adapters ({len(adapters)} layer adapters{where}):", *adapters]
    if copies:
        held = ", ".join(_rel(c, root) for c in copies)
        out.append(f"  copies of these adapters (not counted again): {held}")
    out += [f"quantization ({len(quantizers)} quantizer tensors):"]
    out += [f"  {what}: {count} layers" for what, count in sorted(formats.items())] or [
        "  none recorded"
    ]
    out += _served_lines(root, jsons)
    out += ["files:"] + [
        f"  {f.relative_to(root) if root.is_dir() else f.name}  {_mb(f.stat().st_size)}"
        for f in tensors + jsons
    ]
    out.append(f"total {_mb(sum(f.stat().st_size for f in files))}")
    return "\n".join(out)


def _rel(folder: Path, root: Path) -> str:
    return (folder.relative_to(root).as_posix() if root.is_dir() else ".") + "/"


def _served_lines(root: Path, jsons: list[Path]) -> list[str]:
    """One line per Hugging Face model directory (``config.json`` with a compressed-tensors
    ``quantization_config``, as ``export_hf_checkpoint`` and a run's ``deploy/`` write)."""
    lines = []
    for f in jsons:
        if f.name != "config.json":
            continue
        config = read_json(f)
        quant = config.get("quantization_config") if isinstance(config, dict) else None
        if not isinstance(quant, dict) or quant.get("quant_method") != "compressed-tensors":
            continue
        where = f.parent.relative_to(root).as_posix() if root.is_dir() else "."
        ignore = quant.get("ignore")
        unquantized = len(ignore) if isinstance(ignore, list) else 0
        lines.append(
            f"served model {where}/: compressed-tensors {str(quant.get('format'))[:40]}, "
            f"{unquantized} linear layers left unquantized"
        )
    return lines


def _format_name(attrs: dict[str, Any]) -> str:
    """A short name for one quantizer's attributes (as the ``quantize`` mode records them)."""
    bits, blocks = attrs.get("num_bits"), attrs.get("block_sizes") or {}
    scale = tuple(blocks.get("scale_bits") or ())
    if isinstance(bits, list):
        name = {(2, 1, 4, 3): "nvfp4", (2, 1, 8, 0): "mxfp4"}.get(
            (*bits, *scale), "fp8" if bits == [4, 3] else f"e{bits[0]}m{bits[1]}"
        )
    else:
        name = f"int{bits}"
    block = blocks.get("-1", blocks.get(-1))
    return f"{name} block {block}" if block and name.startswith("int") else name


def _formats(log: list[dict[str, Any]]) -> dict[str, int]:
    """``{"weight nvfp4": layers, ...}`` over every enabled quantizer in the log's quantize
    entries."""
    found: dict[str, int] = {}
    for entry in log:
        layers = entry["config"].get("layers")
        if entry["mode"] != "quantize" or not isinstance(layers, dict):
            continue
        for quantizers in layers.values():
            for kind, info in (quantizers if isinstance(quantizers, dict) else {}).items():
                attrs = info.get("attributes") if isinstance(info, dict) else None
                if isinstance(attrs, dict) and attrs.get("enable"):
                    try:
                        name = _format_name(attrs)
                    except (TypeError, ValueError, IndexError, AttributeError):
                        name = "unrecognised format"
                    key = f"{kind.split('_')[0]} {name}"
                    found[key] = found.get(key, 0) + 1
    return found


def _brief(config: dict[str, Any]) -> str:
    shown = {
        k: (f"{len(v)} layers" if k in ("adapter_cfg", "layers") else f"{len(v)} entries")
        if isinstance(v, dict | list) and len(json.dumps(v)) > 60
        else v
        for k, v in sorted(config.items(), key=lambda kv: kv[0] not in ("adapter_cfg", "layers"))
    }
    text = json.dumps(shown)
    return text if len(text) <= 120 else text[:117] + "..."


def _mb(size: int) -> str:
    return f"{size / 2**20:.2f} MB"
