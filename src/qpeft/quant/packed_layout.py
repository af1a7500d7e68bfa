"""Packed-weight layouts: :class:`PackSpec` (format attributes and shape), the tensors a format
stores (:func:`packed_layout`), and the nibble packing they share. The math that fills them is
:mod:`qpeft.quant.packing`, whose docstring describes every layout."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from . import blocks as bl

__all__ = [
    "E2M1_GRID",
    "PackSpec",
    "check_packable",
    "packed_layout",
    "packed_bytes",
    "bytes_per_weight",
    "groups_shape",
    "pack_nibbles",
    "unpack_nibbles",
]

E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_FORMATS = ("int", "fp8", "nvfp4", "mxfp4")


@dataclass(frozen=True)
class PackSpec:
    """How a weight is packed: the quantizer's format attributes and the weight's shape."""

    fmt: str
    shape: tuple[int, ...]
    num_bits: int = 8
    axis: int | tuple[int, ...] | None = None
    block_sizes: tuple[tuple[int, int | None], ...] | None = None  # sorted (axis, size) pairs
    narrow_range: bool = False
    neg_zero: bool = True  # int: code -(M + 1) stands for -0.0

    @property
    def sizes(self) -> dict[int, int | None] | None:
        """``block_sizes`` as the dict :mod:`qpeft.quant.blocks` takes."""
        return None if self.block_sizes is None else dict(self.block_sizes)

    @property
    def nibbles(self) -> bool:
        """Whether codes are 4 bits (two per byte)."""
        return self.fmt in ("nvfp4", "mxfp4") or (self.fmt == "int" and self.num_bits <= 4)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON (for the mode log)."""
        return json_ready(asdict(self))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PackSpec:
        """Inverse of :meth:`to_json`, as strict as the API (no coercion).

        Raises:
            ValueError: a field of another type or out of range (names the field).
        """

        def is_int(v: Any, low: int = 0) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= low

        def ints(v: Any) -> bool:
            return isinstance(v, list) and all(is_int(d, -64) for d in v)

        axis, blocks = data.get("axis"), data.get("block_sizes")
        checks = {
            "fmt": data.get("fmt") in _FORMATS,
            "shape": isinstance(data.get("shape"), list) and all(is_int(d) for d in data["shape"]),
            "num_bits": is_int(data.get("num_bits", 8), 1) and data.get("num_bits", 8) <= 32,
            "axis": axis is None or is_int(axis, -64) or (ints(axis) and len(axis) > 0),
            "block_sizes": blocks is None
            or (
                isinstance(blocks, list)
                and all(
                    isinstance(b, list)
                    and len(b) == 2
                    and is_int(b[0], -64)
                    and (b[1] is None or is_int(b[1], 1))
                    for b in blocks
                )
            ),
            "narrow_range": isinstance(data.get("narrow_range", False), bool),
            "neg_zero": isinstance(data.get("neg_zero", True), bool),
        }
        bad = [field for field, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"packing spec: invalid {bad[0]} {data.get(bad[0])!r}")
        return cls(
            fmt=data["fmt"],
            shape=tuple(data["shape"]),
            num_bits=data.get("num_bits", 8),
            axis=tuple(axis) if isinstance(axis, list) else axis,
            block_sizes=None if blocks is None else tuple((a, s) for a, s in blocks),
            narrow_range=data.get("narrow_range", False),
            neg_zero=data.get("neg_zero", True),
        )


def json_ready(value: Any) -> Any:
    """Tuples as lists, recursively."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def check_packable(quantizer: Any) -> str | None:
    """Why a quantizer's format cannot be packed (a sentence), or None if it can."""
    fmt = quantizer.fmt
    if fmt not in _FORMATS:
        return f"format {fmt!r} has no packed layout"
    if fmt == "int" and (quantizer.unsigned or not 2 <= quantizer.num_bits <= 8):
        return "only signed integer formats of 2 to 8 bits are packed"
    if fmt in ("nvfp4", "mxfp4") and quantizer.block_size % 2:
        return f"{fmt} needs an even block size"
    return None


def groups_shape(spec: PackSpec) -> tuple[int, ...]:
    """Shape of one-value-per-amax-group tensors (int/fp8 scales)."""
    shape = spec.shape
    if spec.block_sizes is not None:
        layout = bl.block_layout(shape, spec.sizes)
        return tuple(-(-n // layout[d]) if d in layout else n for d, n in enumerate(shape))
    if spec.axis is None:
        return ()
    axes = spec.axis if isinstance(spec.axis, tuple) else (spec.axis,)
    kept = {a % len(shape) for a in axes}
    return tuple(n if d in kept else 1 for d, n in enumerate(shape))


def fp4_block(spec: PackSpec) -> int:
    return spec.sizes[-1]


def packed_layout(spec: PackSpec) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``{tensor name: (shape, dtype)}`` that :func:`pack` returns for ``spec``."""
    *lead, last = spec.shape
    if spec.fmt in ("nvfp4", "mxfp4"):
        b = fp4_block(spec)
        blocks = -(-last // b)
        out = {
            "packed": ((*lead, blocks * b // 2), torch.uint8),
            "scale": ((*lead, blocks), torch.float8_e4m3fn if spec.fmt == "nvfp4" else torch.uint8),
        }
        if spec.fmt == "nvfp4":
            out["scale_2"] = ((*lead[:-1], 1, 1) if lead[:-1] else (), torch.float32)
        return out
    if spec.fmt == "fp8":
        codes = (tuple(spec.shape), torch.float8_e4m3fn)
    elif spec.nibbles:
        codes = ((*lead, -(-last // 2)), torch.uint8)
    else:
        codes = (tuple(spec.shape), torch.int8)
    return {"packed": codes, "scale": (groups_shape(spec), torch.float32)}


def packed_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Total bytes of a packed weight's tensors."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


# ------------------------------------------------------------------------------- nibbles
def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes < 16 ``[..., n]`` -> ``[..., ceil(n / 2)]``, element 2i in the low nibble."""
    codes = torch.nn.functional.pad(codes, (0, codes.shape[-1] % 2))
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: uint8 codes ``[..., n]``."""
    both = torch.stack((packed & 0xF, packed >> 4), dim=-1)
    return both.reshape(*packed.shape[:-1], -1)[..., :n]


def bytes_per_weight(tensors: dict[str, torch.Tensor], spec: PackSpec) -> float:
    """Packed bytes divided by the number of weights."""
    return packed_bytes(tensors) / math.prod(spec.shape)
