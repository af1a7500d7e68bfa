"""``export_hf_checkpoint``: a quantized model as a Hugging Face model directory for engines.

The directory holds ``config.json`` (the model's config plus a ``quantization_config``),
``model.safetensors`` (one file, not sharded), the tokenizer files when a tokenizer is given, and
every enabled LoRA adapter as a HF PEFT folder ``adapters/<name>/`` (never merged into the
quantized base). Tensor names are the model's own (qpeft's wrapper levels removed), so
``transformers.AutoModelForCausalLM.from_pretrained(path)`` and
``peft.PeftModel.from_pretrained(model, path / "adapters" / name)`` load them.

Formats: ``compressed-tensors`` (:mod:`qpeft.checkpoint.deploy_formats`); ``modelopt`` is not
implemented yet.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.wrapping import ModuleWrapper, innermost
from ..lora.convert import lora_layers
from ..quant.compress import packed_weight
from ..quant.compressed import PackedLinear
from ..quant.layer import QuantLinear, QuantModule
from ..quant.targets import logical_named_modules, quantized_layers
from .deploy_formats import ct_weight_tensors, input_args, weight_args
from .files import _default_mode, atomic_directory, read_json, write_json
from .hf_peft import UNEXPECTED as PEFT_UNEXPECTED
from .hf_peft import peft_files, write_peft_files
from .tensor_files import write_tensors

__all__ = ["export_hf_checkpoint"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
ADAPTERS_DIR = "adapters"
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)
_OWN_FILES = {CONFIG_FILE, WEIGHTS_FILE, "generation_config.json", *_TOKENIZER_FILES}
_OWN_PREFIXES = ("tokenizer", "vocab", "merges", "chat_template", "special_tokens", "added_tokens")


def _own_file(name: str) -> bool:
    return name in _OWN_FILES or name.startswith(_OWN_PREFIXES)


def _own_adapters_dir(adapters: Path) -> bool:
    """Whether ``adapters`` is a folder of HF PEFT adapter folders only (as an export writes)."""
    if not adapters.is_dir() or adapters.is_symlink():
        return False
    return all(
        a.is_dir() and not a.is_symlink() and not PEFT_UNEXPECTED(a) for a in adapters.iterdir()
    )


def _unexpected(path: Path) -> list[str]:
    """Entries of ``path`` that an export would not have written (see ``atomic_directory``)."""
    names = sorted(os.listdir(path))
    regular = {n for n in names if (path / n).is_file() and not (path / n).is_symlink()}
    if CONFIG_FILE not in regular:
        return names
    try:
        config = read_json(path / CONFIG_FILE)
        quant = config.get("quantization_config") if isinstance(config, dict) else None
        method = quant.get("quant_method") if isinstance(quant, dict) else None
        problem = None if method == "compressed-tensors" else f"quant_method {method!r}"
    except (OSError, ValueError) as err:
        problem = f"unreadable: {err}"
    own_dir = _own_adapters_dir(path / ADAPTERS_DIR)
    foreign = [
        n
        for n in names
        if not (n in regular and _own_file(n)) and not (n == ADAPTERS_DIR and own_dir)
    ]
    return ([f"{CONFIG_FILE} ({problem})"] if problem else []) + foreign


def _own_tensors(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    out = {f"{prefix}{k}": v for k, v in module._parameters.items() if v is not None}
    skip = module._non_persistent_buffers_set
    out.update(
        {f"{prefix}{k}": v for k, v in module._buffers.items() if v is not None and k not in skip}
    )
    return out


def _layer_tensors(name: str, layer: QuantModule) -> tuple[str, dict, dict | None, dict]:
    """``(format, weights args, input args, tensors)`` of one quantized linear layer."""
    if not isinstance(layer, QuantLinear) or not isinstance(
        innermost(layer), (nn.Linear, PackedLinear)
    ):
        kind = type(layer).__name__
        hint = "grouped experts" if "Experts" in kind else f"{kind} layers"
        raise ValueError(
            f"export_hf_checkpoint: layer {name!r}: {hint} have no compressed-tensors layout "
            "(only quantized nn.Linear layers); disable its quantizers to export it unquantized"
        )
    try:
        spec, packed = packed_weight(layer)
    except ValueError as err:
        raise ValueError(f"export_hf_checkpoint: layer {name!r}: {err}") from None
    found = weight_args(spec)
    inputs = input_args(getattr(layer, "input_quantizer", None))
    for why in (found, inputs):
        if isinstance(why, str):
            raise ValueError(
                f"export_hf_checkpoint: layer {name!r}: compressed-tensors cannot hold {why}"
            )
    fmt, wargs = found
    iargs, itensors = inputs
    tensors = {f"{name}.{k}": v for k, v in ct_weight_tensors(fmt, packed, spec).items()}
    tensors.update({f"{name}.{k}": v for k, v in itensors.items()})
    bias = innermost(layer).bias
    if bias is not None:
        tensors[f"{name}.bias"] = bias
    return fmt, wargs, iargs, tensors


def _is_quantized(layer: QuantModule) -> bool:
    return any(
        k.endswith("weight_quantizer") and q.is_enabled for k, q in layer.quantizers().items()
    )


def _collect(model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(quantization_config, tensors)`` of the whole model; raises before anything is written."""
    quantized = {n: layer for n, layer in quantized_layers(model).items() if _is_quantized(layer)}
    if not quantized:
        raise ValueError(
            "export_hf_checkpoint: the model has no quantized layer (call qpeft.quantize first)"
        )
    tensors, schemes, ignore = {}, {}, []
    for _, logical, module in logical_named_modules(model):
        if isinstance(module, ModuleWrapper):
            continue
        if logical in quantized:
            fmt, wargs, iargs, layer_tensors = _layer_tensors(logical, quantized[logical])
            schemes.setdefault((fmt, repr(wargs), repr(iargs)), (fmt, wargs, iargs, logical))
            tensors.update(layer_tensors)
            continue
        if isinstance(module, nn.Linear):
            ignore.append(logical)
        tensors.update(_own_tensors(module, f"{logical}." if logical else ""))
    if len(schemes) > 1:
        (_, _, _, a), (_, _, _, b) = list(schemes.values())[:2]
        raise ValueError(
            f"export_hf_checkpoint: layers {a!r} and {b!r} are quantized differently; a "
            "compressed-tensors checkpoint written here holds one scheme (transformers "
            "dequantizes every dense layer with the first one)"
        )
    fmt, wargs, iargs, _ = next(iter(schemes.values()))
    config = {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": wargs,
                "input_activations": iargs,
                "output_activations": None,
                "format": fmt,
            }
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
    }
    return config, tensors


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, no two entries sharing storage (tied embeddings are written twice)."""
    out, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().cpu().contiguous()
        key = (v.untyped_storage().data_ptr(), v.storage_offset())
        out[k] = v.clone() if key in seen else v
        seen.add(key)
    return out


def _model_config(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ValueError(
            "export_hf_checkpoint: the model has no Hugging Face config (model.config); "
            "only transformers models are exported"
        )
    out = config.to_dict()
    floats = [v.dtype for v in tensors.values() if v.dtype in (torch.bfloat16, torch.float16)]
    floats += [v.dtype for v in tensors.values() if v.dtype == torch.float32]
    if floats:
        out["dtype"] = str(floats[0]).removeprefix("torch.")
    out.pop("torch_dtype", None)
    return out


def _adapters(model: nn.Module) -> dict[str, tuple[dict, dict]]:
    """``{name: peft_files(...)}`` of every adapter enabled on at least one layer."""
    for layer_name, layer in lora_layers(model).items():
        for name, adapter in layer.adapters.items():
            if adapter.merged:
                raise ValueError(
                    f"export_hf_checkpoint: adapter {name!r} is merged into layer "
                    f"{layer_name!r}; adapters are exported beside the quantized base, never "
                    "merged into it: call qpeft.unmerge_adapters first"
                )
    layers = lora_layers(model).values()
    names = sorted({a for layer in layers for a, ad in layer.adapters.items() if ad.enable})
    return {n: peft_files(model, n) for n in names}


def _write_adapters(tmp: Path, adapters: dict[str, tuple[dict, dict]]) -> None:
    mode = _default_mode()
    for name, (adapter_config, adapter_tensors) in adapters.items():
        folder = tmp / ADAPTERS_DIR / name
        folder.mkdir(parents=True)
        write_peft_files(folder, adapter_config, adapter_tensors)
        for child in folder.iterdir():
            os.chmod(child, mode & 0o666)
        os.chmod(folder, mode)
    if adapters:
        os.chmod(tmp / ADAPTERS_DIR, mode)


def export_hf_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    format: str = "compressed-tensors",  # noqa: A002 - the public keyword
    tokenizer: Any = None,
) -> Path:
    """Write a quantized transformers model as a Hugging Face model directory, atomically.

    Args:
        model: a transformers model quantized with :func:`qpeft.quantize` (compressed with
            :func:`qpeft.compress` or not), with or without LoRA adapters.
        path: the directory to create or replace (only a directory this function wrote is
            replaced).
        format: ``"compressed-tensors"`` (``"modelopt"`` is not implemented yet).
        tokenizer: optional; saved with ``tokenizer.save_pretrained``.

    Returns:
        ``path`` as a :class:`pathlib.Path`.

    Raises:
        ValueError: an unknown or unimplemented format; no quantized layer; a layer the format
            cannot hold (grouped experts, Conv1D, a block size or scale layout it lacks, layers
            quantized with different schemes). Nothing is written then.
        FileExistsError, PermissionError, TimeoutError: as
            :func:`qpeft.checkpoint.files.atomic_directory`.
    """
    if format == "modelopt":
        raise ValueError(
            "export_hf_checkpoint: format 'modelopt' is not implemented yet; use "
            "format='compressed-tensors' (read by transformers and vLLM)"
        )
    if format != "compressed-tensors":
        raise ValueError(
            f"export_hf_checkpoint: unknown format {format!r} (use 'compressed-tensors')"
        )
    quant_config, tensors = _collect(model)
    tensors = _unshared(tensors)
    config = _model_config(model, tensors)
    config["quantization_config"] = quant_config
    adapters = _adapters(model)
    with atomic_directory(path, "a Hugging Face model directory", _unexpected) as tmp:
        write_tensors(tmp / WEIGHTS_FILE, tensors)
        write_json(tmp / CONFIG_FILE, config)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        _write_adapters(tmp, adapters)
    return Path(path)
