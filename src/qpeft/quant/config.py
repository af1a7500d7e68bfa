"""Quantizer attribute config (ModelOpt 0.47 quantizer dict schema) and preset pattern maps.

``QuantizerAttributeConfig`` accepts the per-quantizer dicts found in ModelOpt's
``mtq.*_CFG`` presets, e.g. ``{"num_bits": 8, "axis": 0}`` (int8 per output row),
``{"num_bits": 4, "block_sizes": {-1: 128, "type": "static"}}`` (int4 block),
``{"num_bits": (4, 3), "axis": None}`` (fp8 e4m3),
``{"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}}``
(nvfp4) and ``{..., "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": (8, 0)}}``
(mxfp4). Unknown keys and unsupported combinations are rejected with a message that
starts with the offending field's name.

``PRESETS`` maps a preset name to an ordered ``{quantizer-name pattern: attribute dict}``
map; later patterns override earlier ones, as in ModelOpt's ``quant_cfg`` lists. ModelOpt
also disables quantizers whose parent module is one of ``DISABLED_PARENT_CLASSES``;
those entries match on module class, not name, so they are kept separately.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

Format = Literal["int", "fp8", "nvfp4", "mxfp4"]
_FP8, _E2M1 = (4, 3), (2, 1)
_SCALE_BITS_TO_FORMAT = {(4, 3): "nvfp4", (8, 0): "mxfp4"}


class QuantizerAttributeConfig(BaseModel):
    """One quantizer's attributes, in ModelOpt's dict layout (subset qpeft supports)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enable: bool = True
    num_bits: int | tuple[int, int] = 8
    axis: int | None = None
    block_sizes: dict[int | str, Any] | None = None
    effective_bits: float | None = None  # informational only, as in ModelOpt
    narrow_range: bool = False
    pass_through_bwd: bool = True
    fake_quant: Literal[True] = True
    unsigned: Literal[False] = False
    calibrator: Literal["max"] = "max"

    @field_validator("num_bits")
    @classmethod
    def _check_num_bits(cls, v: int | tuple[int, int]) -> int | tuple[int, int]:
        if isinstance(v, int) and not 2 <= v <= 8:
            raise ValueError(f"num_bits: integer formats need 2..8 bits, got {v}")
        if isinstance(v, tuple) and v not in (_FP8, _E2M1):
            raise ValueError(f"num_bits: only (4, 3) fp8 e4m3 and (2, 1) e2m1, got {v}")
        return v

    @field_validator("block_sizes", mode="before")
    @classmethod
    def _check_block_sizes(cls, v: Any) -> Any:
        if v is None:
            return None
        if not isinstance(v, dict):
            raise ValueError(f"block_sizes: expected a dict, got {type(v).__name__}")
        out: dict[int | str, Any] = {}
        for key, val in v.items():
            if key in ("type", "scale_bits"):
                out[key] = tuple(val) if isinstance(val, list) else val
            elif str(key).lstrip("-").isdigit():
                out[int(key)] = val
            else:
                raise ValueError(f"block_sizes: unsupported key {key!r}")
        axes = [k for k in out if isinstance(k, int)]
        if axes != [-1] or not isinstance(out[-1], int) or out[-1] < 1:
            raise ValueError("block_sizes: only a positive block size on the last axis (-1)")
        if out.get("type", "static") not in ("static", "dynamic"):
            raise ValueError(
                f"block_sizes: type must be 'static' or 'dynamic', got {out['type']!r}"
            )
        return out

    @model_validator(mode="after")
    def _check_combination(self) -> QuantizerAttributeConfig:
        if self.enable:
            self.resolve()  # raises ValueError on unsupported combinations
        return self

    def resolve(self) -> tuple[Format, int | None]:
        """Return ``(format, block_size)``; raises ValueError naming the offending field."""
        bs = self.block_sizes
        if bs is not None and self.axis is not None:
            raise ValueError("axis: cannot be combined with block_sizes")
        if isinstance(self.num_bits, int):
            if bs is not None and bs.get("type", "static") != "static":
                raise ValueError("block_sizes: integer block quantization must be 'static'")
            return "int", None if bs is None else bs[-1]
        if self.num_bits == _FP8:
            if bs is not None:
                raise ValueError("block_sizes: fp8 (4, 3) supports per-tensor/axis only")
            return "fp8", None
        if bs is None or bs.get("type") != "dynamic":
            raise ValueError("block_sizes: (2, 1) needs {-1: n, 'type': 'dynamic', ...}")
        if self.axis is not None:
            raise ValueError("axis: not supported for (2, 1) formats")
        fmt = _SCALE_BITS_TO_FORMAT.get(bs.get("scale_bits"))
        if fmt is None:
            raise ValueError("block_sizes: scale_bits must be (4, 3) nvfp4 or (8, 0) mxfp4")
        return fmt, bs[-1]  # type: ignore[return-value]


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
}
