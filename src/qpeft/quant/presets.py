"""Preset pattern maps (ModelOpt 0.47 ``mtq.*_CFG``) and the name/class disable lists.

``PRESETS`` maps a preset name to an ordered ``{quantizer-name pattern: attribute dict}`` map;
later patterns override earlier ones, as in ModelOpt's ``quant_cfg`` lists. ModelOpt also disables
quantizers whose parent module is one of ``DISABLED_PARENT_CLASSES``; those entries match on module
class, not name, so they are kept separately.
"""

from __future__ import annotations

__all__ = ["PRESETS", "DISABLED_NAME_PATTERNS", "DISABLED_PARENT_CLASSES"]

_INT8 = {"num_bits": 8, "axis": 0}
_INT8_ACT = {"num_bits": 8, "axis": None}
_INT4_BLOCK = {"num_bits": 4, "block_sizes": {-1: 128, "type": "static"}}
_FP8_TENSOR = {"num_bits": (4, 3), "axis": None}
_NVFP4 = {
    "num_bits": (2, 1),
    "effective_bits": 4.5,
    "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)},
}
_MXFP4 = {"num_bits": (2, 1), "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": (8, 0)}}
_FP8_ROW = {"num_bits": (4, 3), "axis": 0}
_FP8_TOKEN = {"num_bits": (4, 3), "type": "dynamic", "block_sizes": {-1: None}}
_INT8_TOKEN = {"num_bits": 8, "type": "dynamic", "block_sizes": {-1: None}}
_FP8_BLOCK128 = {"num_bits": (4, 3), "block_sizes": {-1: 128, -2: 128}}
_OFF = {"enable": False}

# Name patterns ModelOpt 0.47 disables in every preset above (after the two main entries).
DISABLED_NAME_PATTERNS: tuple[str, ...] = (
    "*block_sparse_moe.gate*",
    "*linear_attn.conv1d*",
    "*self_attention.conv1d*",
    "*linear_attn.in_proj_a*",
    "*linear_attn.in_proj_b*",
    "*lm_head*",
    "*mixer.conv1d*",
    "*mlp.gate.*",
    "*mlp.shared_expert_gate.*",
    "*output_layer*",
    "*proj_out.*",
    "*router*",
    "mtp.*",
    "output.*",
    "*embed_vision*",
    "*vision_tower*",
    "*visual*",
    "*vision_model*",
    "*multi_modal_projector*",
)
DISABLED_PARENT_CLASSES: tuple[str, ...] = (
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "LeakyReLU",
    "Embedding",
)


def _preset(weight: dict | None, act: dict | None) -> dict[str, dict]:
    """Ordered pattern map: disable all, weight/input entries, then the disable list.

    Entries merge key by key (as ``adapter_cfg``), so the weight/input entries say
    ``enable: True`` explicitly to override the leading ``"*": {"enable": False}`` (in
    ModelOpt an entry without ``enable`` implies it).
    """
    out: dict[str, dict] = {"*": dict(_OFF)}
    out["*weight_quantizer"] = {"enable": True, **weight} if weight else dict(_OFF)
    out["*input_quantizer"] = {"enable": True, **act} if act else dict(_OFF)
    out.update({pattern: dict(_OFF) for pattern in DISABLED_NAME_PATTERNS})
    return out


PRESETS: dict[str, dict[str, dict]] = {
    "int8": _preset(_INT8, _INT8_ACT),  # mtq.INT8_DEFAULT_CFG
    "int8_weight_only": _preset(_INT8, None),  # mtq.INT8_WEIGHT_ONLY_CFG
    "int4": _preset(_INT4_BLOCK, None),  # mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG
    "fp8": _preset(_FP8_TENSOR, _FP8_TENSOR),  # mtq.FP8_DEFAULT_CFG
    "fp8_weight_only": _preset(_FP8_TENSOR, None),  # FP8_DEFAULT_CFG, inputs off
    "nvfp4": _preset(_NVFP4, _NVFP4),  # mtq.NVFP4_DEFAULT_CFG
    "nvfp4_weight_only": _preset(_NVFP4, None),  # mtq.W4A16_NVFP4_CFG
    "mxfp4": _preset(_MXFP4, _MXFP4),  # mtq.MXFP4_DEFAULT_CFG
    "fp8_dynamic": _preset(_FP8_ROW, _FP8_TOKEN),  # mtq.FP8_PER_CHANNEL_PER_TOKEN_CFG
    "int8_dynamic": _preset(_INT8, _INT8_TOKEN),  # W8A8: int8 per row, dynamic per-token int8
    "fp8_block128": _preset(_FP8_BLOCK128, None),  # mtq.FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG
}
