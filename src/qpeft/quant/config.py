"""Quantizer attribute config: ModelOpt's ``QuantizerAttributeConfig`` dict schema (the subset
qpeft supports).

Examples, as in ModelOpt's ``mtq.*_CFG`` presets:

* ``{"num_bits": 8, "axis": 0}``: int8, static amax per output row of a weight ``[out, in]``;
  ``"axis": (0, 1)`` keeps the amax over several axes (one per index pair).
* ``{"num_bits": 4, "block_sizes": {-1: 128, "type": "static"}}``: int4, one static (calibrated)
  amax per block of 128 along the last axis; ``{-1: 128, -2: 128}`` gives 2-D 128 x 128 blocks.
* ``{"num_bits": (4, 3), "axis": None}``: fp8 e4m3 per tensor (static); with ``block_sizes``
  per block (``{-1: 128, -2: 128}``: DeepSeek-V3 / vLLM FP8 block weights).
* ``{"num_bits": 8, "type": "dynamic", "block_sizes": {-1: None}}``: dynamic per-token int8 (amax
  from the input at every call over the last dim; ``{-1: None}`` is a block spanning the axis).
  ``"type": "dynamic"`` without ``block_sizes`` is dynamic per tensor (or per ``axis``).
* ``{"num_bits": 8, "unsigned": True}``: unsigned int8, range ``[0, 255]``, non-negative inputs.
* ``{"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}}``:
  nvfp4; ``"scale_bits": (8, 0)`` with ``-1: 32``: mxfp4.

Unknown keys and unsupported combinations are rejected with a message that starts with the
offending field's name. A disabled quantizer keeps its other attributes (enabling it later gives
the quantizer they describe).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    StrictBool,
    field_validator,
    model_validator,
)

Format = Literal["int", "fp8", "nvfp4", "mxfp4"]
_FP8, _E2M1 = (4, 3), (2, 1)
_SCALE_BITS_TO_FORMAT = {(4, 3): "nvfp4", (8, 0): "mxfp4"}
MAX_INT_BITS = 32

__all__ = ["Format", "QuantizerAttributeConfig"]


def _ints(_field: str) -> Any:
    """A validator accepting an int or a list/tuple of ints (JSON gives lists), nothing looser:
    no bools, strings or floats (``num_bits="8"`` is an error naming the field)."""

    def check(value: Any) -> Any:
        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if value is None or is_int(value):
            return value
        if isinstance(value, list | tuple) and all(is_int(v) for v in value):
            return tuple(value)
        raise ValueError(f"expected an integer or a tuple of integers, got {value!r}")

    return check


class QuantizerAttributeConfig(BaseModel):
    """One quantizer's attributes, in ModelOpt's dict layout (subset qpeft supports)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enable: StrictBool = True
    num_bits: Annotated[int | tuple[int, int], BeforeValidator(_ints("num_bits"))] = 8
    axis: Annotated[int | tuple[int, ...] | None, BeforeValidator(_ints("axis"))] = None
    type: Literal["static", "dynamic"] = "static"
    block_sizes: dict[int | str, Any] | None = None
    effective_bits: float | None = None  # informational only, as in ModelOpt
    narrow_range: StrictBool = False
    unsigned: StrictBool = False
    pass_through_bwd: StrictBool = True
    fake_quant: Literal[True] = True
    calibrator: Literal["max"] = "max"

    @field_validator("num_bits")
    @classmethod
    def _check_num_bits(cls, v: int | tuple[int, int]) -> int | tuple[int, int]:
        if isinstance(v, int) and not 1 <= v <= MAX_INT_BITS:
            raise ValueError(f"num_bits: integer formats need 1..{MAX_INT_BITS} bits, got {v}")
        if isinstance(v, tuple) and v not in (_FP8, _E2M1):
            raise ValueError(f"num_bits: only (4, 3) fp8 e4m3 and (2, 1) e2m1, got {v}")
        return v

    @field_validator("axis")
    @classmethod
    def _check_axis(cls, v: int | tuple[int, ...] | None) -> int | tuple[int, ...] | None:
        if isinstance(v, tuple) and (not v or len(set(v)) != len(v)):
            raise ValueError(f"axis: a tuple of axes must be non-empty and distinct, got {v}")
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
                if val is not None and (
                    not isinstance(val, int) or isinstance(val, bool) or val < 1
                ):
                    raise ValueError(f"block_sizes: block size of axis {key} must be >= 1 or None")
                out[int(key)] = val
            else:
                raise ValueError(f"block_sizes: unsupported key {key!r}")
        if not any(isinstance(k, int) for k in out):
            raise ValueError("block_sizes: needs at least one axis")
        if out.get("type", "static") not in ("static", "dynamic"):
            raise ValueError(
                f"block_sizes: type must be 'static' or 'dynamic', got {out['type']!r}"
            )
        return out

    @model_validator(mode="after")
    def _check_combination(self) -> QuantizerAttributeConfig:
        if self.enable:  # a disabled entry may be partial; TensorQuantizer.from_config checks it
            self.quantizer_kwargs()
        return self

    @property
    def dynamic(self) -> bool:
        """Whether the amax comes from the input at every call (``type`` or block ``type``)."""
        block_type = (self.block_sizes or {}).get("type", "static")
        return self.type == "dynamic" or block_type == "dynamic"

    def resolve(self) -> tuple[Format, int | None]:
        """``(format, last-axis block size)``: the block size is None unless the only blocked axis
        is -1 with an integer size. Raises ValueError naming the offending field."""
        kw = self.quantizer_kwargs()
        sizes = kw["block_sizes"]
        block = sizes[-1] if sizes is not None and list(sizes) == [-1] else None
        return kw["fmt"], block

    def quantizer_kwargs(self) -> dict[str, Any]:
        """The :class:`TensorQuantizer` arguments these attributes describe.

        Raises:
            ValueError: for an unsupported combination, naming the field.
        """
        bs = self.block_sizes
        sizes = None if bs is None else {k: v for k, v in bs.items() if isinstance(k, int)}
        if bs is not None and self.axis is not None:
            raise ValueError("axis: cannot be combined with block_sizes")
        if self.type == "dynamic" and bs is not None and bs.get("type") == "static":
            raise ValueError("type: 'dynamic' contradicts block_sizes type 'static'")
        if self.dynamic and sizes is not None and len(sizes) != 1:
            raise ValueError("block_sizes: dynamic block quantization blocks one axis only")
        if self.unsigned and not isinstance(self.num_bits, int):
            raise ValueError("unsigned: only integer formats can be unsigned")
        if isinstance(self.num_bits, int) or self.num_bits == _FP8:
            fmt: Format = "int" if isinstance(self.num_bits, int) else "fp8"
            if bs is not None and "scale_bits" in bs:
                raise ValueError(f"block_sizes: scale_bits (MX scales) not supported for {fmt}")
            if fmt == "int" and self.num_bits == 1 and not self.unsigned:
                raise ValueError("num_bits: signed integers need at least 2 bits")
            return self._kwargs(fmt, sizes, self.dynamic)
        if bs is None or bs.get("type") != "dynamic":
            raise ValueError("block_sizes: (2, 1) needs {-1: n, 'type': 'dynamic', ...}")
        if self.axis is not None:
            raise ValueError("axis: not supported for (2, 1) formats")
        if list(sizes) != [-1] or sizes[-1] is None:
            raise ValueError("block_sizes: (2, 1) formats block the last axis (-1) with a size")
        fmt = _SCALE_BITS_TO_FORMAT.get(bs.get("scale_bits"))
        if fmt is None:
            raise ValueError("block_sizes: scale_bits must be (4, 3) nvfp4 or (8, 0) mxfp4")
        return self._kwargs(fmt, sizes, False)

    def _kwargs(self, fmt: Format, sizes: dict | None, dynamic: bool) -> dict[str, Any]:
        return {
            "fmt": fmt,
            "num_bits": self.num_bits if isinstance(self.num_bits, int) else 8,
            "axis": self.axis,
            "block_sizes": sizes,
            "dynamic": dynamic,
            "unsigned": self.unsigned,
            "narrow_range": self.narrow_range,
            "pass_through_bwd": self.pass_through_bwd,
        }
