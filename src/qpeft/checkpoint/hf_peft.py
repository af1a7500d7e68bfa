"""Hugging Face PEFT LoRA files, both ways (what vLLM and TensorRT-LLM load).

A HF PEFT LoRA adapter is a directory with

- ``adapter_config.json``: ``peft_type: "LORA"``, ``r``, ``lora_alpha``, ``target_modules``,
  ``rank_pattern`` / ``alpha_pattern`` (``{regex: value}``, matched against a module name as
  ``(.*\\.)?(regex)$``, first match wins), ``use_rslora``, ...;
- ``adapter_model.safetensors``: ``base_model.model.<module>.lora_A.weight: [r, in]`` and
  ``base_model.model.<module>.lora_B.weight: [out, r]``.

HF PEFT adds ``scaling * B(A(x))`` with ``scaling = lora_alpha / r`` (rsLoRA: ``lora_alpha /
sqrt(r)``), so a qpeft adapter of rank ``r`` and scale ``s`` is written with ``alpha = s * r``; the
most common rank and alpha become ``r`` / ``lora_alpha`` and the other layers go into the patterns
(as their full module names). ``target_modules`` lists short names (``q_proj``) when they select
exactly the adapted layers, full names otherwise. The factors keep their layout for transformers'
``Conv1D`` too (only
merging transposes), so ``fan_in_fan_out`` is set for HF PEFT's sake alone. DoRA and the other
variants change the forward, so importing them is an error.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from torch import nn

from ..lora.convert import lora_layers
from ..lora.layer import LoRAModule
from .files import atomic_directory, write_json
from .kinds import own_files
from .tensor_files import write_tensors

__all__ = ["export_hf_peft", "grouped_experts_layers", "peft_files", "write_peft_files"]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
_FACTORS = {"lora_A.weight": "lora_a", "lora_B.weight": "lora_b"}


def _not_lora_config(config: Any) -> str | None:
    found = config.get("peft_type") if isinstance(config, dict) else None
    return None if found == "LORA" else f"peft_type {found!r}, not 'LORA'"


#: ``unexpected(dir)`` of an exported adapter: only its config and weights.
UNEXPECTED = own_files(CONFIG_FILE, _not_lora_config, [WEIGHTS_FILE])

# HF PEFT config fields that turn plain LoRA into a variant qpeft does not implement.
_VARIANTS = {
    "use_dora": "DoRA",
    "lora_bias": "LoRA bias",
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "activated LoRA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "arrow_config": "Arrow",
    "kasa_config": "KaSA",
    "use_bdlora": "BD-LoRA",
    "layer_replication": "layer replication",
    "target_parameters": "parameter targeting",
    "trainable_token_indices": "trainable tokens",
    "modules_to_save": "modules_to_save",
}


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else float(value)


def _stores_in_out(layer: LoRAModule) -> bool:
    """Whether the base weight is stored ``[in, out]`` (transformers' ``Conv1D``)."""
    return type(layer).to_out_in is not LoRAModule.to_out_in


def _target_modules(model: nn.Module, names: list[str]) -> list[str]:
    """Short names (``q_proj``) when they pick out exactly ``names``, as most tools expect; else
    full names.

    HF PEFT targets every module whose name ends with ``.<target>``, so a short name is used only
    if every module of the model with that last component is in ``names``.
    """
    chosen = set(names)
    short = {n.rsplit(".", 1)[-1] for n in names}
    clash = any(
        n.rsplit(".", 1)[-1] in short and n not in chosen for n, _ in model.named_modules() if n
    )
    return sorted(chosen) if clash else sorted(short)


def _hf_config(
    model: nn.Module, layers: dict[str, LoRAModule], adapter_name: str
) -> dict[str, Any]:
    adapters = {n: layers[n].adapters[adapter_name] for n in layers}
    ranks = {n: a.rank for n, a in adapters.items()}
    alphas = {n: _number(a.scale * a.rank) for n, a in adapters.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {
        "peft_type": "LORA",
        "task_type": None,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": _target_modules(model, list(adapters)),
        "rank_pattern": {n: v for n, v in ranks.items() if v != r},
        "alpha_pattern": {n: v for n, v in alphas.items() if v != alpha},
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": any(_stores_in_out(layer) for layer in layers.values()),
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def _enabled_layers(model: nn.Module, adapter_name: str) -> dict[str, LoRAModule]:
    return {
        n: layer
        for n, layer in lora_layers(model).items()
        if adapter_name in layer.adapters and layer.adapters[adapter_name].enable
    }


def grouped_experts_layers(model: nn.Module, adapter_name: str = "default") -> list[str]:
    """Names of the layers where adapter ``adapter_name`` is enabled on grouped experts (one
    ``[E, r, in]`` / ``[E, out, r]`` pair per projection), which HF PEFT files cannot hold."""
    return [
        n
        for n, layer in _enabled_layers(model, adapter_name).items()
        if not hasattr(layer.adapters[adapter_name], "lora_a")
    ]


def peft_files(
    model: nn.Module, adapter_name: str = "default", skip_grouped: bool = False
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(adapter_config.json contents, adapter_model.safetensors tensors)`` of one adapter.

    Args:
        skip_grouped: leave the grouped-experts layers (:func:`grouped_experts_layers`) out
            instead of raising; the caller then says what is missing.

    Raises:
        ValueError: the model has no enabled adapter ``adapter_name``; it sits on grouped experts
            (no HF PEFT layout) and ``skip_grouped`` is False; or on grouped experts only.
    """
    layers = _enabled_layers(model, adapter_name)
    if not layers:
        known = sorted({a for layer in lora_layers(model).values() for a in layer.adapters})
        raise ValueError(
            f"no enabled adapter named {adapter_name!r} to export; the model has {known}"
        )
    grouped = grouped_experts_layers(model, adapter_name)
    if grouped and (not skip_grouped or len(grouped) == len(layers)):
        # one [E, r, in] pair per projection has no lora_A/lora_B module equivalent here
        only = " (it is on no other layer)" if len(grouped) == len(layers) else ""
        raise ValueError(
            f"adapter {adapter_name!r} on grouped-experts layer {grouped[0]!r} has no HF PEFT "
            f"layout{only}"
        )
    layers = {n: layer for n, layer in layers.items() if n not in grouped}
    config = _hf_config(model, layers, adapter_name)
    tensors = {
        f"{PREFIX}{name}.{hf}": getattr(layer.adapters[adapter_name], ours)
        .detach()
        .cpu()
        .contiguous()
        for name, layer in layers.items()
        for hf, ours in _FACTORS.items()
    }
    return config, tensors


def write_peft_files(folder: Path, config: dict[str, Any], tensors: dict[str, Any]) -> None:
    """Write :func:`peft_files`' output into the (existing, empty) ``folder``."""
    write_tensors(folder / WEIGHTS_FILE, tensors)
    write_json(folder / CONFIG_FILE, config)


def export_hf_peft(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = "default",
    skip_grouped: bool = False,
) -> list[str]:
    """Write adapter ``adapter_name`` as a HF PEFT LoRA adapter directory, atomically.

    Only layers where the adapter is enabled are written (a disabled layer is by-passed in qpeft,
    and HF PEFT has no per-layer switch). Load it with ``peft.PeftModel.from_pretrained(base,
    path)``.

    Args:
        model: the model holding the adapter.
        path: the directory to write.
        adapter_name: the adapter to export.
        skip_grouped: write the other layers and leave out the grouped-experts ones, which HF
            PEFT cannot hold (otherwise they are an error); the caller must say so.

    Returns:
        The names of the layers left out (grouped experts; empty without ``skip_grouped``).

    Raises:
        ValueError: the model has no enabled adapter ``adapter_name``; it is on grouped experts
            and ``skip_grouped`` is False, or on grouped experts only.
        FileExistsError: ``path`` is a file or a non-empty directory holding anything but a LoRA
            ``adapter_config.json`` and ``adapter_model.safetensors`` (a trainer's output folder
            with its README.md, checkpoints...; names the entries). Nothing is written then.
        ValueError, PermissionError, TimeoutError: as
            :func:`qpeft.checkpoint.files.atomic_directory`.
    """
    config, tensors = peft_files(model, adapter_name, skip_grouped)
    with atomic_directory(path, "a HF PEFT LoRA adapter", UNEXPECTED) as tmp:
        write_peft_files(tmp, config, tensors)
    return grouped_experts_layers(model, adapter_name) if skip_grouped else []
