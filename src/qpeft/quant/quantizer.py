"""``TensorQuantizer``: a fake-quantization module with max calibration and STE gradients.

Formats (see ``numerics`` for the math):

* ``int`` (num_bits 8 or 4): static amax, per tensor (``axis=None``) or per index of
  ``axis`` (``axis=0``: one amax per output row of a weight ``[out, in]``); with
  ``block_size`` the amax is dynamic, one per block of the last dim from the tensor itself.
* ``fp8``: static amax, per tensor or per ``axis``.
* ``nvfp4``: block scales on the fly from a global per-tensor amax: the calibrated
  ``_amax`` if present, else the input's own max |x| (what ModelOpt does too).
* ``mxfp4``: fully dynamic.

A static format that has no amax raises ``RuntimeError`` at forward. A disabled quantizer
returns its input object unchanged; so does one that is calibrating (it only records).
Unlike ModelOpt, int/fp8 never fall back to a dynamic amax, and int block amax is always
recomputed from the tensor (ModelOpt calibrates it once; the same for frozen weights).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .config import Format, QuantizerAttributeConfig
from .numerics import (
    apply_ste,
    fake_quant_fp8,
    fake_quant_int,
    fake_quant_int_blockwise,
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
        axis: int | None = None,
        block_size: int | None = None,
        *,
        narrow_range: bool = False,
        pass_through_bwd: bool = True,
        enabled: bool = True,
        name: str | None = None,
    ) -> None:
        """Build a quantizer; raises ValueError for an unsupported format/axis/block mix."""
        super().__init__()
        if fmt not in ("int", "fp8", "nvfp4", "mxfp4"):
            raise ValueError(f"fmt: unknown format {fmt!r}")
        if fmt in _DEFAULT_BLOCK:
            block_size = block_size or _DEFAULT_BLOCK[fmt]
        if fmt == "fp8" and block_size is not None:
            raise ValueError("block_size: fp8 is per tensor or per axis")
        if block_size is not None and axis is not None:
            raise ValueError("axis: cannot be combined with block_size")
        self.fmt, self.num_bits, self.axis, self.block_size = fmt, num_bits, axis, block_size
        self.narrow_range, self.pass_through_bwd = narrow_range, pass_through_bwd
        self.name = name
        self._enabled, self._calibrating = enabled, False
        self.register_buffer("_amax", None)

    @classmethod
    def from_config(
        cls, cfg: QuantizerAttributeConfig | dict[str, Any], name: str | None = None
    ) -> TensorQuantizer:
        """Build from a ModelOpt-style attribute dict (validated by QuantizerAttributeConfig)."""
        if not isinstance(cfg, QuantizerAttributeConfig):
            cfg = QuantizerAttributeConfig(**cfg)
        if not cfg.enable:
            return cls(enabled=False, name=name)
        fmt, block_size = cfg.resolve()
        num_bits = cfg.num_bits if isinstance(cfg.num_bits, int) else 8
        return cls(
            fmt,
            num_bits,
            cfg.axis,
            block_size,
            narrow_range=cfg.narrow_range,
            pass_through_bwd=cfg.pass_through_bwd,
            name=name,
        )

    # ----------------------------------------------------------------- state
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
    def needs_amax(self) -> bool:
        """Whether this format needs a calibrated amax before it can quantize."""
        return self.fmt == "fp8" or (self.fmt == "int" and self.block_size is None)

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

    # ----------------------------------------------------------- calibration
    def enable_calib(self) -> None:
        """Start recording a running max of |x|; forward returns inputs unchanged meanwhile."""
        self._calibrating = True

    def load_calib_amax(self) -> None:
        """Stop recording; the recorded max stays in ``_amax``."""
        self._calibrating = False

    @contextmanager
    def calibrating(self) -> Iterator[TensorQuantizer]:
        """``with q.calibrating(): model(x)`` records amax over a forward loop."""
        self.enable_calib()
        try:
            yield self
        finally:
            self.load_calib_amax()

    def _collect(self, x: torch.Tensor) -> None:
        if self.fmt == "mxfp4" or (self.fmt == "int" and self.block_size is not None):
            return  # fully dynamic: nothing to calibrate
        amax = self._amax_of(x.detach().abs().float())
        self._amax = amax if self._amax is None else torch.maximum(self._amax, amax)

    def _amax_of(self, xa: torch.Tensor) -> torch.Tensor:
        """The static amax of ``xa = |x|`` (fp32): per tensor (nvfp4's global amax too) or per
        ``axis``."""
        if self.axis is None or self.fmt == "nvfp4":
            return xa.amax()
        axis = self.axis % xa.dim()
        dims = [d for d in range(xa.dim()) if d != axis]
        return xa.amax(dim=dims, keepdim=True) if dims else xa

    # --------------------------------------------------------------- forward
    def _label(self) -> str:
        return self.name or f"TensorQuantizer({self.extra_repr()})"

    def _static_amax(self, x: torch.Tensor) -> torch.Tensor:
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
            return x
        return self._fake_quantize(x)

    def _fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        clip = None
        if self.fmt == "int" and self.block_size is not None:
            return apply_ste(
                fake_quant_int_blockwise, x, self.num_bits, self.block_size, self.narrow_range
            )
        if self.fmt == "mxfp4":
            return apply_ste(fake_quant_mxfp4, x, self.block_size)
        if self.fmt == "nvfp4":
            amax = self._amax if self._amax is not None else self._amax_of(x.detach().abs().float())
            amax = amax.to(x.device)
            clip = None if self.pass_through_bwd else amax
            return apply_ste(fake_quant_nvfp4, x, amax, self.block_size, clip_amax=clip)
        amax = self._static_amax(x)
        clip = None if self.pass_through_bwd else amax
        if self.fmt == "fp8":
            return apply_ste(fake_quant_fp8, x, amax, clip_amax=clip)
        return apply_ste(fake_quant_int, x, amax, self.num_bits, self.narrow_range, clip_amax=clip)

    # ------------------------------------------------------------ plumbing
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        key = prefix + "_amax"
        if key in state_dict and self._amax is None:
            self._amax = torch.empty_like(state_dict[key], dtype=torch.float32)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _amax_summary(self) -> str:
        a = self._amax
        if a is None:
            return "dynamic" if not self.needs_amax else "uncalibrated"
        if a.numel() == 1:
            return f"{a.item():.4g}"
        return f"[{a.min().item():.4g}, {a.max().item():.4g}]({a.numel()})"

    def extra_repr(self) -> str:
        """E.g. ``int8 axis=0 amax=[0.01, 0.3](16)`` or ``nvfp4 block=16 amax=dynamic``."""
        if not self._enabled:
            return "disabled"
        s = f"int{self.num_bits}" if self.fmt == "int" else self.fmt
        s += f" axis={self.axis}" if self.axis is not None else ""
        s += f" block={self.block_size}" if self.block_size is not None else ""
        s += f" amax={self._amax_summary()}"
        s += " calibrating" if self._calibrating else ""
        return s
