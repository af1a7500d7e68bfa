"""One LoRA adapter: the low-rank update ``scale * B @ A`` of one layer.

Shapes: ``x: [..., in]``, ``A: [rank, in]``, ``B: [out, rank]``; the adapter maps ``x`` to
``scale * (x @ A.T) @ B.T : [..., out]`` computed in the adapter's own dtype (``lora_dtype``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import PEFTAttributeConfig

__all__ = ["AdapterState", "LoRAAdapter"]


class AdapterState(nn.Module):
    """What every kind of adapter holds besides its factors: ``scale``, ``enable``, ``merged``.

    ``scale`` and ``enable`` are plain attributes (they change); the attributes fixed at creation
    (rank, initializers, init method, dtype) live in :attr:`config`. ``merged`` is True while the
    adapter's update is folded into the base weight (:func:`qpeft.merge_adapters`); the layer then
    skips it so the update is not counted twice.
    """

    def __init__(self, config: PEFTAttributeConfig) -> None:
        super().__init__()
        self.scale = float(config.scale)
        self.enable = bool(config.enable)
        self.merged = False
        self._fixed = config.model_dump(exclude={"scale", "enable"})

    @property
    def active(self) -> bool:
        """Whether the layer's forward adds this adapter: enabled and not merged into the weight."""
        return self.enable and not self.merged

    @property
    def config(self) -> PEFTAttributeConfig:
        """The adapter's current attributes as a :class:`PEFTAttributeConfig`."""
        return PEFTAttributeConfig(**self._fixed, scale=self.scale, enable=self.enable)


class LoRAAdapter(AdapterState):
    """Factors ``lora_a: [rank, in]`` and ``lora_b: [out, rank]`` plus the :class:`AdapterState`."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        config: PEFTAttributeConfig,
        dtype: torch.dtype,
        device: torch.device | None = None,
    ) -> None:
        super().__init__(config)
        rank = config.rank
        self.lora_a = nn.Parameter(torch.zeros(rank, in_features, dtype=dtype, device=device))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))

    @property
    def rank(self) -> int:
        """The adapter's rank ``r``."""
        return self.lora_a.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``scale * B(A(x))`` in the adapter dtype; ``x`` must already be in that dtype."""
        return F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """The dense update ``scale * B @ A : [out, in]``, computed in fp32."""
        return (self.lora_b.float() @ self.lora_a.float()) * self.scale

    def extra_repr(self) -> str:
        merged = ", merged=True" if self.merged else ""
        return (
            f"rank={self.rank}, scale={self.scale}, enable={self.enable}{merged}, "
            f"dtype={self.lora_a.dtype}"
        )
