"""``export_hf_checkpoint(..., format="compressed-tensors")``: the ``quantization_config`` and the
tensors (layouts in :mod:`qpeft.checkpoint.deploy_formats`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .deploy_formats import ct_weight_tensors, input_args, weight_args
from .deploy_layers import LayerExport, model_tensors

__all__ = ["ct_collect"]


def _scheme(export: LayerExport) -> tuple[str, dict, dict | None, dict[str, torch.Tensor]]:
    """``(format, weights args, input args, input tensors)`` of one layer, or a ValueError."""
    found = weight_args(export.spec)
    inputs = input_args(export.input_quantizer)
    for why in (found, inputs):
        if isinstance(why, str):
            raise ValueError(
                f"export_hf_checkpoint: layer {export.name!r}: compressed-tensors cannot hold {why}"
            )
    fmt, wargs = found
    iargs, itensors = inputs
    return fmt, wargs, iargs, itensors


def ct_collect(
    model: nn.Module, layers: dict[str, LayerExport]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(quantization_config, tensors)``; raises before anything is written."""
    schemes = {name: _scheme(export) for name, export in layers.items()}
    kinds: dict[tuple[str, str, str], str] = {}
    for name, (fmt, wargs, iargs, _) in schemes.items():
        kinds.setdefault((fmt, repr(wargs), repr(iargs)), name)
    if len(kinds) > 1:
        a, b = list(kinds.values())[:2]
        raise ValueError(
            f"export_hf_checkpoint: layers {a!r} and {b!r} are quantized differently; a "
            "compressed-tensors checkpoint written here holds one scheme (transformers "
            "dequantizes every dense layer with the first one)"
        )

    def layer_tensors(export: LayerExport) -> dict[str, torch.Tensor]:
        fmt, _, _, itensors = schemes[export.name]
        return {**ct_weight_tensors(fmt, export.packed, export.spec), **itensors}

    tensors, ignore = model_tensors(model, layers, layer_tensors)
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
