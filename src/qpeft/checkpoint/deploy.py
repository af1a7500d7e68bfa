"""``export_hf_checkpoint``: a quantized model as a Hugging Face model directory for engines.

The directory holds ``config.json`` (the model's config plus a ``quantization_config``), the
weights (``model.safetensors``, or ``model-0000i-of-0000N.safetensors`` shards and
``model.safetensors.index.json`` over ``max_shard_size``: :mod:`qpeft.checkpoint.shards`), the
tokenizer files when a tokenizer is given, and
every enabled LoRA adapter as a HF PEFT folder ``adapters/<name>/`` (never merged into the
quantized base). Tensor names are the model's own (qpeft's wrapper levels removed), so
``transformers.AutoModelForCausalLM.from_pretrained(path)`` and
``peft.PeftModel.from_pretrained(model, path / "adapters" / name)`` load them.

Formats: ``compressed-tensors`` (:mod:`qpeft.checkpoint.deploy_ct`, layouts in
:mod:`qpeft.checkpoint.deploy_formats`) and ``modelopt`` (:mod:`qpeft.checkpoint.deploy_modelopt`,
plus ``hf_quant_config.json``). Fused groups whose per-tensor scales differ are tied as the engines
tie them, with a warning (:mod:`qpeft.checkpoint.deploy_ties`).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..lora.convert import lora_layers
from .deploy_ct import ct_collect
from .deploy_layers import export_layers
from .deploy_modelopt import HF_QUANT_CONFIG, modelopt_collect
from .deploy_ties import tie_exports
from .files import _default_mode, atomic_directory, read_json, write_json
from .hf_peft import UNEXPECTED as PEFT_UNEXPECTED
from .hf_peft import peft_files, write_peft_files
from .shards import (
    DEFAULT_SHARD_SIZE,
    INDEX_FILE,
    WEIGHTS_FILE,
    is_shard_name,
    shard_size,
    write_weights,
)

__all__ = ["export_hf_checkpoint"]

CONFIG_FILE = "config.json"
FORMATS = ("compressed-tensors", "modelopt")
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
_OWN_FILES = {
    CONFIG_FILE,
    WEIGHTS_FILE,
    INDEX_FILE,
    HF_QUANT_CONFIG,
    "generation_config.json",
    *_TOKENIZER_FILES,
}
_OWN_PREFIXES = ("tokenizer", "vocab", "merges", "chat_template", "special_tokens", "added_tokens")


def _own_file(name: str) -> bool:
    return name in _OWN_FILES or name.startswith(_OWN_PREFIXES) or is_shard_name(name)


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
        problem = None if method in FORMATS else f"quant_method {method!r}"
    except (OSError, ValueError) as err:
        problem = f"unreadable: {err}"
    own_dir = _own_adapters_dir(path / ADAPTERS_DIR)
    foreign = [
        n
        for n in names
        if not (n in regular and _own_file(n)) and not (n == ADAPTERS_DIR and own_dir)
    ]
    return ([f"{CONFIG_FILE} ({problem})"] if problem else []) + foreign


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
    if not out.get("architectures"):  # engines pick the model class from it, as save_pretrained
        out["architectures"] = [type(model).__name__]
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


def _collect(model: nn.Module, fmt: str) -> tuple[dict, dict | None, dict, list[str]]:
    """``(quantization_config, hf_quant_config or None, tensors, tie lines)``; writes nothing."""
    layers, lines = tie_exports(export_layers(model, fmt))
    if fmt == "modelopt":
        hf_quant, quant_config, tensors = modelopt_collect(model, layers)
    else:
        hf_quant, (quant_config, tensors) = None, ct_collect(model, layers)
    return quant_config, hf_quant, tensors, lines


def _warn_ties(lines: list[str]) -> None:
    warnings.warn(
        "export_hf_checkpoint: fused layers (run by vLLM / TensorRT-LLM as one GEMM with one "
        "per-tensor scale) do not share their scales; the checkpoint holds each group "
        "requantized with its largest one, as the engine would run it (the model is unchanged): "
        + "; ".join(lines)
        + ". Quantize with qpeft.quantize(..., tie_fused_scales=True) to train the served "
        "numerics.",
        UserWarning,
        stacklevel=3,
    )


def export_hf_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    format: str = "compressed-tensors",  # noqa: A002 - the public keyword
    tokenizer: Any = None,
    max_shard_size: int | str = DEFAULT_SHARD_SIZE,
) -> Path:
    """Write a quantized transformers model as a Hugging Face model directory, atomically.

    Args:
        model: a transformers model quantized with :func:`qpeft.quantize` (compressed with
            :func:`qpeft.compress` or not), with or without LoRA adapters. It is not changed.
        path: the directory to create or replace (only a directory this function wrote is
            replaced).
        format: ``"compressed-tensors"`` (transformers, vLLM) or ``"modelopt"`` (NVIDIA
            ModelOpt's unified checkpoint for vLLM and TensorRT-LLM: FP8 per tensor, NVFP4,
            W4A16_NVFP4).
        tokenizer: optional; saved with ``tokenizer.save_pretrained``.
        max_shard_size: the largest weights file, in bytes or as ``"5GB"``, ``"500MB"``,
            ``"2GiB"`` (transformers' units); larger weights are written as
            ``model-0000i-of-0000N.safetensors`` shards with ``model.safetensors.index.json``.

    Returns:
        ``path`` as a :class:`pathlib.Path`.

    Warns:
        UserWarning: fused layers (q/k/v, gate/up) whose per-tensor scales differ: they are
            written with the group's shared scale, as the engines run them; the message names
            each group with the fraction of weight elements changed and the largest output
            change on a probe input (:mod:`qpeft.checkpoint.deploy_ties`).

    Raises:
        ValueError: an unknown format or shard size; no quantized layer; a layer the format
            cannot hold (grouped experts, Conv1D, a block size or scale layout it lacks, for
            ``modelopt`` any preset but fp8 / nvfp4 / nvfp4_weight_only; layers quantized with
            different schemes); a merged adapter. Nothing is written then.
        FileExistsError, PermissionError, TimeoutError: as
            :func:`qpeft.checkpoint.files.atomic_directory`.
    """
    if format not in FORMATS:
        raise ValueError(
            f"export_hf_checkpoint: unknown format {format!r} (use 'compressed-tensors' or "
            "'modelopt')"
        )
    limit = shard_size(max_shard_size)
    quant_config, hf_quant, tensors, lines = _collect(model, format)
    tensors = _unshared(tensors)
    config = _model_config(model, tensors)
    config["quantization_config"] = quant_config
    adapters = _adapters(model)
    with atomic_directory(path, "a Hugging Face model directory", _unexpected) as tmp:
        write_weights(tmp, tensors, limit)
        write_json(tmp / CONFIG_FILE, config)
        if hf_quant is not None:
            write_json(tmp / HF_QUANT_CONFIG, hf_quant)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        _write_adapters(tmp, adapters)
    if lines:
        _warn_ties(lines)
    return Path(path)
