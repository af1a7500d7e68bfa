"""``TensorQuantizer``: a fake-quantization module with max calibration and STE gradients.

Formats (see ``numerics`` and ``blocks`` for the math):

* ``int`` (any ``num_bits`` 1..32, signed or ``unsigned``) and ``fp8``: the amax is per tensor
  (``axis=None``), per index of ``axis`` (``axis=0``: one amax per output row of a weight
  ``[out, in]``; a tuple keeps several axes) or per block (``block_sizes``, any axes). It is
  *static* (calibrated into the ``_amax`` buffer, saved and restored) unless ``dynamic``, in which
  case it comes from the input at every call and nothing is calibrated (``{-1: None}`` blocks with
  ``dynamic``: per token).
* ``nvfp4``: block scales on the fly from a global per-tensor amax: the calibrated ``_amax`` if
  present, else the input's own max |x| (what ModelOpt does too).
* ``mxfp4``: fully dynamic.

A static format that has no amax raises ``RuntimeError`` at forward (ModelOpt would fall back to
a dynamic amax). A disabled quantizer returns its input object unchanged. A calibrating quantizer
(:meth:`enable_calib`) first records the running max of ``|x|`` into ``_amax`` and then returns
``x`` quantized with that running amax (the amax including this very call), as ModelOpt's
quantizer does when both calibration and quantization are on.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from . import blocks as bl
from .config import Format, QuantizerAttributeConfig
from .numerics import (
    E4M3_MAX,
    apply_ste,
    fake_quant_fp8,
    fake_quant_int,
    fake_quant_mxfp4,
    fake_quant_nvfp4,
)

_DEFAULT_BLOCK = {"nvfp4": 16, "mxfp4": 32}


class TensorQuantizer(nn.Module):
    """Fake-quantizes a tensor in one format; holds the calibrated ``_amax`` buffer."""

    _amax: torch.Tensor | None

    def __init__(
        self,
        fmt: Format = "int",
        num_bits: int = 8,
        axis: int | tuple[int, ...] | None = None,
        block_size: int | None = None,
        *,
        block_sizes: dict[int, int | None] | None = None,
        dynamic: bool = False,
        unsigned: bool = False,
        narrow_range: bool = False,
        pass_through_bwd: bool = True,
        enabled: bool = True,
        name: str | None = None,
    ) -> None:
        """Build a quantizer; ``block_size`` is short for ``block_sizes={-1: block_size}``.

        Raises:
            ValueError: an unknown format, or an unsupported format/axis/block/unsigned mix
                (the message starts with the field).
        """
        super().__init__()
        if fmt not in ("int", "fp8", "nvfp4", "mxfp4"):
            raise ValueError(f"fmt: unknown format {fmt!r}")
        if block_size is not None:
            if block_sizes is not None:
                raise ValueError("block_size: give block_size or block_sizes, not both")
            block_sizes = {-1: block_size}
        if fmt in _DEFAULT_BLOCK:
            block_sizes = block_sizes or {-1: _DEFAULT_BLOCK[fmt]}
            if list(block_sizes) != [-1] or not isinstance(block_sizes[-1], int):
                raise ValueError(f"block_sizes: {fmt} blocks the last axis (-1) with a size")
        if block_sizes is not None and axis is not None:
            raise ValueError("axis: cannot be combined with block_size")
        if unsigned and fmt != "int":
            raise ValueError("unsigned: only integer formats can be unsigned")
        self.fmt, self.num_bits = fmt, num_bits
        self.axis = tuple(axis) if isinstance(axis, (list, tuple)) else axis
        self.block_sizes = None if block_sizes is None else dict(block_sizes)
        self.dynamic = bool(dynamic) and fmt in ("int", "fp8")
        self.unsigned, self.narrow_range = unsigned, narrow_range
        self.pass_through_bwd = pass_through_bwd
        self.name = name
        self._enabled, self._calibrating, self._collected = enabled, False, False
        self.register_buffer("_amax", None)

    @classmethod
    def from_config(
        cls, cfg: QuantizerAttributeConfig | dict[str, Any], name: str | None = None
    ) -> TensorQuantizer:
        """Build from a ModelOpt-style attribute dict (validated by QuantizerAttributeConfig).

        A disabled config gives a disabled quantizer with the configured attributes.
        """
        if not isinstance(cfg, QuantizerAttributeConfig):
            cfg = QuantizerAttributeConfig(**cfg)
        return cls(**cfg.quantizer_kwargs(), enabled=cfg.enable, name=name)

    # ----------------------------------------------------------------- state
    @property
    def block_size(self) -> int | None:
        """The block size when only the last axis is blocked, with a size; else None."""
        bs = self.block_sizes
        return bs[-1] if bs is not None and list(bs) == [-1] else None

    @property
    def is_enabled(self) -> bool:
        """Whether forward quantizes (or calibrates) at all."""
        return self._enabled

    def enable(self) -> None:
        """Turn quantization on."""
        self._enabled = True

    def disable(self) -> None:
        """Turn quantization off: forward returns its input unchanged."""
        self._enabled = False

    @property
    def collects_amax(self) -> bool:
        """Whether calibration records an amax (static int/fp8, and nvfp4's global amax)."""
        return self.fmt == "nvfp4" or (self.fmt in ("int", "fp8") and not self.dynamic)

    @property
    def needs_amax(self) -> bool:
        """Whether this format needs a calibrated amax before it can quantize."""
        return self.fmt in ("int", "fp8") and not self.dynamic

    @property
    def amax(self) -> torch.Tensor | None:
        """The calibrated amax (fp32), or None."""
        return self._amax

    @amax.setter
    def amax(self, value: torch.Tensor | float | None) -> None:
        self._amax = None if value is None else torch.as_tensor(value).detach().float().clone()

    def reset_amax(self) -> None:
        """Forget the calibrated amax."""
        self._amax = None

    @property
    def max_bound(self) -> float:
        """The largest quantized magnitude: ``2^(b-1) - 1`` (unsigned ``2^b - 1``), fp8 448.

        Raises:
            ValueError: for nvfp4/mxfp4 (two-level scales have no single bound).
        """
        if self.fmt == "int":
            return 2.0 ** (self.num_bits - 1 + int(self.unsigned)) - 1.0
        if self.fmt == "fp8":
            return E4M3_MAX
        raise ValueError(f"max_bound: {self.fmt} has block scales, no single bound")

    @property
    def step_size(self) -> torch.Tensor | None:
        """``amax / max_bound`` (ModelOpt's ``step_size``), or None without an amax.

        Raises:
            ValueError: for nvfp4/mxfp4.
        """
        bound = self.max_bound
        return None if self._amax is None else self._amax / bound

    # ----------------------------------------------------------- calibration
    def enable_calib(self) -> None:
        """Start recording a running max of |x| (forward still quantizes, with that max)."""
        self._calibrating, self._collected = True, False

    def disable_calib(self) -> None:
        """Stop recording; whatever was recorded stays in ``_amax``."""
        self._calibrating = False

    def load_calib_amax(self) -> None:
        """Stop recording and keep the recorded max as the amax.

        Raises:
            RuntimeError: if this quantizer records an amax and saw no tensor since
                :meth:`enable_calib` (as ModelOpt's calibrator that has seen nothing).
        """
        self.disable_calib()
        if self.collects_amax and not self._collected:
            raise RuntimeError(
                f"{self._label()}: load_calib_amax with nothing collected: no tensor went "
                "through the quantizer since enable_calib"
            )

    @contextmanager
    def calibrating(self) -> Iterator[TensorQuantizer]:
        """``with q.calibrating(): model(x)`` records amax over a forward loop (leaving without
        having seen a tensor is allowed here; the amax then stays as it was)."""
        self.enable_calib()
        try:
            yield self
        finally:
            self.disable_calib()

    def _collect(self, x: torch.Tensor) -> None:
        if not self.collects_amax:
            return
        amax = self._fresh_amax(x)
        if self._amax is not None and self._amax.shape != amax.shape:
            raise ValueError(
                f"{self._label()}: calibration amax shape {tuple(amax.shape)} differs from the "
                f"current amax {tuple(self._amax.shape)} (reset_amax first to start afresh)"
            )
        old = self._amax
        self._amax = amax if old is None else torch.maximum(old.to(amax.device), amax)
        self._collected = True

    def check_fits(self, shape: torch.Size | tuple[int, ...]) -> None:
        """Raise a ValueError (naming the quantizer) when ``axis`` or a blocked axis is not an axis
        of a tensor of ``shape``. (A block longer than its axis pads it, as the FP4 formats do.)"""
        dims = len(shape)
        axes = (
            () if self.axis is None else self.axis if isinstance(self.axis, tuple) else (self.axis,)
        )
        for axis in [*axes, *(self.block_sizes or {})]:
            if not -dims <= axis < dims:
                raise ValueError(
                    f"{self._label()}: axis {axis} is out of range for a {dims}-D tensor of shape "
                    f"{list(shape)}"
                )

    def _fresh_amax(self, x: torch.Tensor) -> torch.Tensor:
        """The amax of ``x`` itself in this quantizer's layout (fp32)."""
        self.check_fits(x.shape)
        if self.block_sizes is not None and self.fmt in ("int", "fp8"):
            return bl.block_amax(x, self.block_sizes)
        return self._amax_of(x.detach().abs().float())

    def _amax_of(self, xa: torch.Tensor) -> torch.Tensor:
        """The amax of ``xa = |x|`` (fp32): per tensor (nvfp4's global amax too) or over
        ``axis``."""
        if self.axis is None or self.fmt == "nvfp4":
            return xa.amax()
        axes = self.axis if isinstance(self.axis, tuple) else (self.axis,)
        kept = {a % xa.dim() for a in axes}
        dims = [d for d in range(xa.dim()) if d not in kept]
        return xa.amax(dim=dims, keepdim=True) if dims else xa

    # --------------------------------------------------------------- forward
    def _label(self) -> str:
        return self.name or f"TensorQuantizer({self.extra_repr()})"

    def _current_amax(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic:
            return self._fresh_amax(x)
        if self._amax is None:
            raise RuntimeError(
                f"{self._label()} has no amax: calibrate it (`with quantizer.calibrating():`"
                " run forward passes) or load a state_dict before quantizing."
            )
        return self._amax.to(x.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x`` (same dtype out); see the module docstring for the modes."""
        if not self._enabled or x.numel() == 0:
            return x
        if self._calibrating:
            self._collect(x)
        return self._fake_quantize(x)

    def _fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.fmt == "mxfp4":
            return apply_ste(fake_quant_mxfp4, x, self.block_size)
        if self.fmt == "nvfp4":
            amax = self._amax if self._amax is not None else self._amax_of(x.detach().abs().float())
            amax = amax.to(x.device)
            clip = None if self.pass_through_bwd else amax
            return apply_ste(fake_quant_nvfp4, x, amax, self.block_size, clip_amax=clip)
        amax = self._current_amax(x)
        if self.fmt == "fp8":
            fn, args = fake_quant_fp8, ()
        else:
            fn, args = fake_quant_int, (self.num_bits, self.narrow_range, self.unsigned)
        if self.block_sizes is None:
            clip = None if self.pass_through_bwd else amax
            return apply_ste(fn, x, amax, *args, clip_amax=clip)
        clip = None if self.pass_through_bwd else bl.spread(amax, x, self.block_sizes)
        return apply_ste(bl.fake_quant_blocks, x, self.block_sizes, fn, amax, *args, clip_amax=clip)

    # ------------------------------------------------------------ plumbing
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        key = prefix + "_amax"
        if key in state_dict and self._amax is None:
            self._amax = torch.empty_like(state_dict[key], dtype=torch.float32)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _amax_summary(self) -> str:
        a = self._amax
        if a is None:
            return "uncalibrated" if self.needs_amax else "dynamic"
        if a.numel() == 1:
            return f"{a.item():.4g}"
        return f"[{a.min().item():.4g}, {a.max().item():.4g}]({a.numel()})"

    def extra_repr(self) -> str:
        """E.g. ``int8 axis=0 amax=[0.01, 0.3](16)`` or ``nvfp4 block=16 amax=dynamic``."""
        if not self._enabled:
            return "disabled"
        s = f"{'u' if self.unsigned else ''}int{self.num_bits}" if self.fmt == "int" else self.fmt
        s += f" axis={self.axis}" if self.axis is not None else ""
        if self.block_size is not None:
            s += f" block={self.block_size}"
        elif self.block_sizes is not None:
            s += f" blocks={self.block_sizes}"
        s += " dynamic" if self.dynamic else f" amax={self._amax_summary()}"
        s += " calibrating" if self._calibrating else ""
        return s
