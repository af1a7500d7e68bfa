"""Reading Hugging Face PEFT LoRA files into a model (:func:`import_hf_peft`).

The file is validated as strictly as the API: ``r`` and every ``rank_pattern`` value are integers
(not bools or floats), ``lora_alpha`` and ``alpha_pattern`` values finite positive numbers, the
resulting scale within :class:`~qpeft.PEFTAttributeConfig`'s range, ``target_modules`` a string or
a list of strings that selects every module the weights hold (HF PEFT's rule: a string is a
regular expression matched in full, a list entry matches a module name or its last components).
Patterns come from a file, so they are matched with a time budget (the ``regex`` engine's timeout)
and a length limit: a catastrophic pattern is refused, never left to hang.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import regex
import torch
from torch import nn

from ..core.modes import restoring
from ..core.transaction import apply_atomically
from ..lora.config import PEFTAttributeConfig
from ..lora.convert import candidate_layers, lora_layers, update_model
from .files import read_json, reading
from .hf_peft import _FACTORS, _VARIANTS, CONFIG_FILE, PREFIX, UNEXPECTED, WEIGHTS_FILE
from .loading import check_tensors, load_checked
from .tensor_files import read_header, read_tensors

__all__ = ["import_hf_peft"]

MAX_PATTERN = 512  # characters of one rank/alpha/target pattern
MATCH_BUDGET = 2.0  # seconds of pattern matching for one file


class _Matcher:
    """Regular expressions from a file, matched under one time budget."""

    def __init__(self, where: Path) -> None:
        self.where, self.deadline = where, time.monotonic() + MATCH_BUDGET

    def __call__(self, pattern: str, text: str, field: str) -> bool:
        if not isinstance(pattern, str) or len(pattern) > MAX_PATTERN:
            raise ValueError(
                f"{self.where}: {field} pattern {str(pattern)[:60]!r} is not a string "
                f"of at most {MAX_PATTERN} characters"
            )
        left = self.deadline - time.monotonic()
        try:
            return regex.fullmatch(pattern, text, timeout=max(left, 1e-3)) is not None
        except TimeoutError:
            raise ValueError(
                f"{self.where}: {field} pattern {pattern[:60]!r} takes too long to "
                "match (catastrophic backtracking?); refused"
            ) from None
        except regex.error as err:
            raise ValueError(
                f"{self.where}: {field} pattern {pattern[:60]!r} is not a valid "
                f"regular expression ({err})"
            ) from None


def _finite_positive(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def _is_rank(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_pattern_maps(config: dict[str, Any], where: Path) -> None:
    for key, ok, what in (
        ("rank_pattern", _is_rank, "a positive integer"),
        ("alpha_pattern", _finite_positive, "a finite positive number"),
    ):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            raise ValueError(f"{where}: {key} must be a map {{pattern: value}}")
        for pattern, value in patterns.items():
            if not ok(value):
                raise ValueError(f"{where}: {key}[{pattern[:60]!r}] must be {what}, got {value!r}")
    targets = config.get("target_modules")
    if not (
        targets is None
        or isinstance(targets, str)
        or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))
    ):
        raise ValueError(f"{where}: target_modules must be a string or a list of strings")


def _check_plain_lora(config: Any, where: Path) -> None:
    if not isinstance(config, dict):
        raise ValueError(f"{where} is not a JSON object")
    if config.get("peft_type") != "LORA":
        raise ValueError(
            f"{where}: peft_type {config.get('peft_type')!r} is not supported; only 'LORA'"
        )
    for key, variant in _VARIANTS.items():
        if config.get(key):
            raise ValueError(
                f"{where}: {variant} ({key}={config[key]!r}) is not supported; "
                "only plain LoRA and rsLoRA"
            )
    if config.get("bias", "none") != "none":
        raise ValueError(f"{where}: bias={config['bias']!r} is not supported; only 'none'")
    if not _is_rank(config.get("r")):
        raise ValueError(f"{where}: r must be a positive integer, got {config.get('r')!r}")
    if not _finite_positive(config.get("lora_alpha")):
        raise ValueError(
            f"{where}: lora_alpha must be a finite positive number, got "
            f"{config.get('lora_alpha')!r}"
        )
    if not isinstance(config.get("use_rslora", False), bool):
        raise ValueError(f"{where}: use_rslora must be a bool")
    _check_pattern_maps(config, where)


def _pattern_value(patterns: Any, module: str, default: Any, match: _Matcher, field: str) -> Any:
    for key, value in (patterns or {}).items():
        if match(rf"(.*\.)?({key})", module, field):  # HF PEFT's own rule, anchored at the end
            return value
    return default


def _targeted(config: dict[str, Any], module: str, match: _Matcher) -> bool:
    targets = config.get("target_modules")
    if targets is None:
        return True
    if isinstance(targets, str):
        return match(targets, module, "target_modules")
    return any(module == t or module.endswith("." + t) for t in targets)


def _split_keys(
    tensors: dict[str, torch.Tensor], where: Path
) -> dict[str, dict[str, torch.Tensor]]:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        suffix = next((s for s in _FACTORS if key.endswith("." + s)), None)
        if not key.startswith(PREFIX) or suffix is None:
            raise ValueError(
                f"{where}: tensor {key!r} is not a plain LoRA factor "
                f"({PREFIX}<module>.lora_A.weight / lora_B.weight); DoRA, embedding or other "
                "variants are not supported"
            )
        if tensor.dim() != 2:
            raise ValueError(
                f"{where}: tensor {key!r} has shape {list(tensor.shape)}; only linear LoRA factors "
                "are supported"
            )
        modules.setdefault(key[len(PREFIX) : -len(suffix) - 1], {})[_FACTORS[suffix]] = tensor
    for module, factors in modules.items():
        if set(factors) != {"lora_a", "lora_b"}:
            raise ValueError(
                f"{where}: module {module!r} lacks {'lora_B' if 'lora_a' in factors else 'lora_A'}"
            )
    return modules


def _adapter_cfg(
    config: dict[str, Any], modules: dict[str, dict[str, torch.Tensor]], where: Path
) -> dict[str, Any]:
    cfg: dict[str, Any] = {}
    match = _Matcher(where)
    for module, factors in modules.items():
        if not _targeted(config, module, match):
            raise ValueError(
                f"{where}: the weights hold module {module!r}, which target_modules "
                f"{config['target_modules']!r} does not select"
            )
        rank = _pattern_value(
            config.get("rank_pattern"), module, config["r"], match, "rank_pattern"
        )
        alpha = _pattern_value(
            config.get("alpha_pattern"), module, config["lora_alpha"], match, "alpha_pattern"
        )
        if factors["lora_a"].shape[0] != rank or factors["lora_b"].shape[1] != rank:
            raise ValueError(
                f"{where}: module {module!r} has rank {factors['lora_a'].shape[0]} in its factors, "
                f"the config says {rank}"
            )
        scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        try:  # the API's range for a scale
            PEFTAttributeConfig(rank=rank, scale=float(scale))
        except ValueError as err:
            raise ValueError(
                f"{where}: module {module!r}: lora_alpha {alpha!r} over rank {rank} "
                f"gives scale {scale!r}, out of range ({err.errors()[0]['msg']})"
            ) from None
        cfg[module] = {"rank": rank, "scale": float(scale)}
    return cfg


def import_hf_peft(
    model: nn.Module, path: str | os.PathLike, adapter_name: str = "default"
) -> nn.Module:
    """Load a HF PEFT LoRA adapter directory into ``model`` as adapter ``adapter_name``.

    Plain LoRA and rsLoRA, with ``rank_pattern`` / ``alpha_pattern``, are supported; factors are
    cast to the base weight's dtype. The base is frozen as by :func:`qpeft.update_model`.

    Returns:
        ``model``, changed in place (a ``peft`` mode is recorded).

    Raises:
        FileNotFoundError: a file is missing. ValueError: a non-JSON config or non-safetensors
            weights, a variant (DoRA...), an unknown key, a module the model lacks, mismatching
            shapes, or an adapter name the model already has (names the key or module). ``model``
            is then left untouched.
    """
    path = Path(path)
    if not (path / WEIGHTS_FILE).exists() and (path / "adapter_model.bin").exists():
        raise ValueError(
            f"{path} holds adapter_model.bin, a pickle; only {WEIGHTS_FILE} is read (never "
            "unpickled)"
        )
    with reading(path, UNEXPECTED):
        config = read_json(path / CONFIG_FILE)
        _check_plain_lora(config, path / CONFIG_FILE)
        read_header(path / WEIGHTS_FILE)
        weights = read_tensors(path / WEIGHTS_FILE)
    modules = _split_keys(weights, path / WEIGHTS_FILE)
    if not modules:
        raise ValueError(f"{path / WEIGHTS_FILE} holds no LoRA factors")
    adapter_cfg = _adapter_cfg(config, modules, path / CONFIG_FILE)
    targets = candidate_layers(model)
    for module in modules:
        if module not in targets:
            raise ValueError(
                f"{path / WEIGHTS_FILE}: module {module!r} is not a LoRA-capable layer of the model"
            )
    if any(adapter_name in layer.adapters for layer in lora_layers(model).values()):
        raise ValueError(f"model already has an adapter named {adapter_name!r}; delete it first")
    tensors = {
        f"{m}.adapters.{adapter_name}.{f}": t for m, fs in modules.items() for f, t in fs.items()
    }
    header = {k: (t.dtype, list(t.shape)) for k, t in tensors.items()}

    def attach(target: nn.Module, dry_run: bool) -> nn.Module:
        with restoring():
            update_model(target, {"adapter_name": adapter_name, "adapter_cfg": adapter_cfg})
        check_tensors(target, header, {}, path / WEIGHTS_FILE, only=set(tensors), cast=True)
        load_checked(
            target, tensors, {}, path / WEIGHTS_FILE, strict=False, cast=True, dry_run=dry_run
        )
        return target

    return apply_atomically(model, attach)
