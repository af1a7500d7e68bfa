"""Cache of a frozen weight's fake-quantized value.

A frozen base weight ``W`` gives the same ``Q(W)`` at every forward, so it is computed once and
reused. The cache is valid while everything ``Q(W)`` depends on is unchanged:

* the weight: same ``Parameter`` object (for a view made afresh at each call, the same base
  ``Parameter`` at the same offset, shape and strides), storage (``data_ptr``), in-place version
  counter (``_version``: ``copy_``, ``load_state_dict``, optimizer steps bump it), dtype, device;
* its ``requires_grad`` (a trainable weight is never cached: it changes every step and needs
  the straight-through gradient);
* the quantizer: same module object, enable/calibration flags, format settings, and the same
  ``_amax`` tensor object at the same version.

Objects are compared by identity, and the cache keeps references to them, so a freed object's
``id`` can never be reused by a new one while the cache entry exists. The cache is a plain
attribute (never in ``state_dict``) and is dropped on pickling/deepcopy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .quantizer import TensorQuantizer

__all__ = ["WeightCache"]


def _settings(q: TensorQuantizer) -> tuple:
    return (
        q.is_enabled,
        q._calibrating,
        q.fmt,
        q.num_bits,
        q.axis,
        None if q.block_sizes is None else tuple(sorted(q.block_sizes.items())),
        q.dynamic,
        q.unsigned,
        q.narrow_range,
        q.pass_through_bwd,
    )


@dataclass
class _Entry:
    refs: tuple  # objects compared by identity (kept alive by this entry)
    values: tuple  # plain values compared by equality
    result: torch.Tensor


class WeightCache:
    """Holds at most one ``Q(W)`` and the state it was computed from."""

    def __init__(self) -> None:
        self._entry: _Entry | None = None

    @staticmethod
    def _key(weight: torch.Tensor, quantizer: TensorQuantizer) -> tuple[tuple, tuple]:
        amax = quantizer._amax
        # A view (GroupedMLP's [E, in, out] views of its 2-D weights) is a new object at every
        # call: it is the same weight when its base, storage offset, shape and strides are.
        root = weight if weight._base is None else weight._base
        refs = (root, quantizer, amax)
        values = (
            weight.data_ptr(),
            weight._version,
            weight.dtype,
            weight.device,
            tuple(weight.shape),
            weight.stride(),
            weight.requires_grad,
            _settings(quantizer),
            None if amax is None else amax._version,
        )
        return refs, values

    def get(self, weight: torch.Tensor, quantizer: TensorQuantizer) -> torch.Tensor:
        """``quantizer(weight)``, reused from the last call when nothing it depends on changed.

        A weight with ``requires_grad`` is quantized afresh (with its STE gradient) every call.
        """
        if weight.requires_grad:
            self._entry = None
            return quantizer(weight)
        refs, values = self._key(weight, quantizer)
        entry = self._entry
        if (
            entry is not None
            and entry.values == values
            and all(a is b for a, b in zip(entry.refs, refs, strict=True))
        ):
            return entry.result
        with torch.no_grad():
            result = quantizer(weight)
        self._entry = None if result is weight else _Entry(refs, values, result)
        return result

    def clear(self) -> None:
        """Forget the cached value."""
        self._entry = None

    @property
    def is_filled(self) -> bool:
        """Whether a value is cached (valid or not)."""
        return self._entry is not None
