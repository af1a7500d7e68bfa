"""``export_hf_checkpoint(..., format="modelopt")``: NVIDIA ModelOpt's unified HF checkpoint.

The layout is ModelOpt 0.47's ``export_hf_checkpoint`` for the three algorithms vLLM and
TensorRT-LLM serve from it; the codes and scales are qpeft's (:mod:`qpeft.quant.packing`), so they
decode to the fake-quantized weight. Per quantized linear layer ``L``:

* ``FP8`` (preset ``fp8``: fp8 weights per tensor, static fp8 inputs per tensor):
  ``L.weight`` float8_e4m3fn ``[out, in]``; ``L.weight_scale`` fp32 ``[]``, the factor qpeft
  multiplies the codes by (``reciprocal(448 / amax)``; ModelOpt writes ``amax / 448``, which may
  differ from it by one ulp); ``L.input_scale`` fp32 ``[]``, likewise for the input amax.
  Decoding: ``fp32(weight) * weight_scale``.
* ``NVFP4`` (preset ``nvfp4``) and ``W4A16_NVFP4`` (``nvfp4_weight_only``): ``L.weight`` uint8
  ``[out, in / 2]``, two E2M1 codes per byte (element ``2i`` in the low nibble, sign in bit 3);
  ``L.weight_scale`` float8_e4m3fn ``[out, in / 16]``; ``L.weight_scale_2`` fp32 ``[]``,
  ``amax / 2688``; ``NVFP4`` adds ``L.input_scale`` fp32 ``[]``, the input amax / 2688.
  Decoding (ModelOpt's ``NVFP4QTensor.dequantize``): ``e2m1 * (fp32(weight_scale) *
  weight_scale_2)``.

Files: ``hf_quant_config.json`` (``{"producer", "quantization": {"quant_algo",
"kv_cache_quant_algo", "group_size" (nvfp4), "exclude_modules"}}``) and, in ``config.json``, the
``quantization_config`` ModelOpt derives from it (``config_groups``, with no
``input_activations`` for W4A16_NVFP4; ``ignore``; ``quant_algo``; ``producer``;
``quant_method: "modelopt"``). ``exclude_modules`` summarizes, with ModelOpt's prefix wildcards,
the unquantized modules ModelOpt gives a quantizer to (those with a weight among linear,
embedding, convolution and norm layers: ``["lm_head", "model.embed_tokens"]`` for a Llama;
``model.layers.3*`` when a whole block is left out; ``model.layers.1.*`` where ``model.layers.1*``
would also match ``model.layers.10``).

Checked against ModelOpt 0.47's own export (``benchmarks/modelopt_export.py``): the same tensor
names, dtypes and shapes and the same two JSON documents but the producer. The codes differ on
purpose: ModelOpt writes a negative element that rounds to zero as E2M1 ``-0`` (code 8), qpeft
as ``+0`` (the same value; a compressed layer no longer knows the sign); ModelOpt's FP8 codes of a
bf16 model are rounded in bf16 first; ModelOpt leaves FP8 weight scales of fused layers untied.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.wrapping import ModuleWrapper
from ..quant.numerics import E2M1_MAX, E4M3_MAX, TINY_AMAX
from ..quant.targets import logical_named_modules
from .deploy_layers import LayerExport, model_tensors

__all__ = ["HF_QUANT_CONFIG", "modelopt_collect"]

HF_QUANT_CONFIG = "hf_quant_config.json"
# The module types ModelOpt 0.47 gives quantizers to that have a weight: an unquantized one with
# a weight is listed in exclude_modules (its QuantModuleRegistry; norms carry input quantizers).
_MODELOPT_MODULES = (
    nn.Linear,
    nn.Embedding,
    nn.LayerNorm,
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
)
_HINT = (
    "format='modelopt' writes FP8 per tensor (preset 'fp8'), NVFP4 ('nvfp4') and W4A16_NVFP4 "
    "('nvfp4_weight_only'), the algorithms vLLM and TensorRT-LLM read from a ModelOpt "
    "checkpoint; use format='compressed-tensors' for this model"
)


def _describe(export: LayerExport) -> str:
    spec = export.spec
    name = f"int{spec.num_bits}" if spec.fmt == "int" else spec.fmt
    if spec.block_sizes is not None:
        return f"{name} weights in blocks {dict(spec.block_sizes)}"
    return f"{name} weights " + ("per tensor" if spec.axis is None else f"per axis {spec.axis}")


def _static_tensor(q: Any, fmt: str) -> bool:
    return (
        q is not None
        and q.fmt == fmt
        and not q.dynamic
        and q.axis is None
        and q.amax is not None
        and q.amax.numel() == 1
        and (q.block_sizes is None if fmt == "fp8" else q.block_size == 16)
    )


def _algo(export: LayerExport) -> str:
    """ModelOpt's ``quant_algo`` for one layer, or a ValueError naming what it lacks."""
    spec, iq = export.spec, export.input_quantizer
    why = None
    if spec.fmt == "fp8" and spec.block_sizes is None and spec.axis is None:
        if _static_tensor(iq, "fp8"):
            return "FP8"
        why = "fp8 weights without a static per-tensor fp8 input quantizer (ModelOpt FP8 has one)"
    elif spec.fmt == "nvfp4" and dict(spec.block_sizes or {}) == {-1: 16}:
        if spec.shape[-1] % 16:
            why = f"{spec.shape[-1]} input features, not a multiple of the nvfp4 16-block"
        elif iq is None:
            return "W4A16_NVFP4"
        elif _static_tensor(iq, "nvfp4"):
            return "NVFP4"
        else:
            why = "nvfp4 weights with an input quantizer other than nvfp4 with one global amax"
    if why is None:
        why = _describe(export)
    raise ValueError(
        f"export_hf_checkpoint: layer {export.name!r}: format 'modelopt' has no layout for "
        f"{why}; {_HINT}"
    )


def _scalar(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().cpu().reshape(()).contiguous()


def _fp8_input_scale(amax: torch.Tensor) -> torch.Tensor:
    a = _scalar(amax)
    safe = torch.where(a <= TINY_AMAX, torch.ones(()), a)
    return torch.reciprocal(torch.reciprocal(safe) * torch.tensor(E4M3_MAX))


def _nvfp4_global(amax: torch.Tensor) -> torch.Tensor:
    g = _scalar(amax) / torch.tensor(E2M1_MAX * E4M3_MAX)
    return torch.where(g > 0, g, torch.ones(()))


def modelopt_tensors(export: LayerExport, algo: str) -> dict[str, torch.Tensor]:
    """The tensors ModelOpt writes for one layer (names relative to it)."""
    p = {k: v.detach().cpu() for k, v in export.packed.items()}
    if algo == "FP8":
        return {
            "weight": p["packed"].contiguous(),
            "weight_scale": torch.reciprocal(_scalar(p["scale"])),
            "input_scale": _fp8_input_scale(export.input_quantizer.amax),
        }
    out = {
        "weight": p["packed"].contiguous(),
        "weight_scale": p["scale"].contiguous(),
        "weight_scale_2": _scalar(p["scale_2"]),
    }
    if algo == "NVFP4":
        out["input_scale"] = _nvfp4_global(export.input_quantizer.amax)
    return out


def _candidates(name: str) -> list[list[str]]:
    out = []
    for i, ch in enumerate(name):
        if ch == ".":
            out += [[name[:i] + "*"], [name[:i], name[:i] + ".*"]]
    return [*out, [name]]


def exclude_modules(unquantized: list[str], quantized: list[str]) -> list[str]:
    """ModelOpt's prefix-wildcard summary of the unquantized layers (sorted).

    Each unquantized name gets the shortest dotted-prefix wildcard (``prefix*``, else
    ``prefix.*`` where neither ``prefix`` nor ``prefix.*`` is a quantized layer's, else the name
    itself) that no quantized layer matches.
    """
    blocked = set(quantized) | {q[:i] + "*" for q in quantized for i in range(len(q) + 1)}
    found: set[str] = set()
    for name in unquantized:
        for wildcards in _candidates(name):
            if any(w in blocked for w in wildcards):
                continue
            found.add(wildcards[-1])  # of the pair, ModelOpt 0.47 writes ``prefix.*`` only
            break
    return sorted(found)


def unquantized_modules(model: nn.Module, layers: dict[str, LayerExport]) -> list[str]:
    """Logical names of the modules ModelOpt would list as unquantized (module order)."""
    return [
        logical
        for _, logical, module in logical_named_modules(model)
        if not isinstance(module, ModuleWrapper)
        and logical not in layers
        and isinstance(module, _MODELOPT_MODULES)
        and isinstance(getattr(module, "weight", None), torch.Tensor)
    ]


def _configs(algo: str, exclude: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(hf_quant_config.json, config.json's quantization_config)``."""
    from .. import __version__  # the package's root imports this module

    producer = {"name": "qpeft", "version": __version__}
    quantization: dict[str, Any] = {"quant_algo": algo, "kv_cache_quant_algo": None}
    bits = 8 if algo == "FP8" else 4
    weights: dict[str, Any] = {"dynamic": False, "num_bits": bits, "type": "float"}
    if algo != "FP8":
        quantization["group_size"] = 16
        weights["group_size"] = 16
    quantization["exclude_modules"] = exclude
    group: dict[str, Any] = {} if algo == "W4A16_NVFP4" else {"input_activations": dict(weights)}
    group.update(weights=weights, targets=["Linear"])
    config = {
        "config_groups": {"group_0": group},
        "ignore": exclude,
        "quant_algo": algo,
        "producer": producer,
        "quant_method": "modelopt",
    }
    return {"producer": producer, "quantization": quantization}, config


def modelopt_collect(
    model: nn.Module, layers: dict[str, LayerExport]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """``(hf_quant_config, quantization_config, tensors)``; raises before anything is written.

    Raises:
        ValueError: a layer in another format (names it and points to compressed-tensors), or
            layers with different algorithms.
    """
    algos = {name: _algo(export) for name, export in layers.items()}
    if len(set(algos.values())) > 1:
        first = next(iter(algos))
        other = next(n for n, a in algos.items() if a != algos[first])
        raise ValueError(
            f"export_hf_checkpoint: layers {first!r} ({algos[first]}) and {other!r} "
            f"({algos[other]}) are quantized differently; a ModelOpt checkpoint written here "
            "holds one algorithm (use format='compressed-tensors' or one preset)"
        )
    tensors, _ = model_tensors(
        model, layers, lambda export: modelopt_tensors(export, algos[export.name])
    )
    exclude = exclude_modules(unquantized_modules(model, layers), list(layers))
    hf_quant, config = _configs(next(iter(algos.values())), exclude)
    return hf_quant, config, tensors
