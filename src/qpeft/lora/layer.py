"""LoRA layers: a wrapper by composition around a base layer plus a ``ModuleDict`` of adapters.

``forward(x) = base(x) + sum over active (enabled, not merged) adapters (insertion order) of scale *
B(A(x))``; each
adapter runs in its own dtype and its result is cast to the base output's dtype. The base stays the
same object (``layer.base``), its ``state_dict`` keys unchanged (see :mod:`qpeft.core.wrapping`).

Adapters whose dtype equals the input's and the base output's take the fused path
(:func:`qpeft.lora.fused.lora_addmm`: one autograd node, no casts, ``addmm``; with the base matmul
inside it, :func:`qpeft.lora.fused.linear_lora`, when the base is a registered linear base, see
:mod:`qpeft.lora.linear_bases`); the others, and
every adapter when :func:`reference_forward` is called, take the simple per-adapter path that the
tests use as the reference. Inside :func:`qpeft.adapter_routing` each sample of the batch gets the
adapter its name selects (:mod:`qpeft.lora.routing`).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ..core.wrapping import ModuleWrapper, innermost
from ..quant.compressed import compressed_error, is_compressed
from ..quant.layer import find_weight_quantizer
from .adapter import LoRAAdapter
from .fused import linear_lora, lora_addmm
from .init import init_factors, svdquant_factors
from .linear_bases import linear_operands

__all__ = [
    "LoRAModule",
    "LoRALinear",
    "reference_forward",
    "lora_layers",
    "is_peft_model",
    "require_lora_layers",
    "adapter_names_of",
    "check_adapter_names",
    "check_selection",
    "check_not_routing",
    "adapter_keys",
    "adapter_state",
]


def _fusable(adapter: LoRAAdapter, x: torch.Tensor) -> bool:
    # The fused autograd functions work on plain tensors of one dtype; DTensor (tensor-parallel)
    # factors take the simple path, whose ops DTensor dispatches itself.
    return adapter.lora_a.dtype == x.dtype and not isinstance(adapter.lora_a, DTensor)


def reference_forward(layer: LoRAModule, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The simple path: ``y + adapter(x in its dtype)`` cast back, one active adapter at a time."""
    cast: dict[torch.dtype, torch.Tensor] = {}
    for adapter in layer.adapters.values():
        if adapter.active:
            dtype = adapter.lora_a.dtype
            if dtype not in cast:
                cast[dtype] = x if x.dtype == dtype else x.to(dtype)
            y = y + adapter(cast[dtype]).to(y.dtype)
    return y


class LoRAModule(ModuleWrapper):
    """Base class of every LoRA layer. Subclasses say how to read the base's shape and weight.

    What differs by layer kind is a method here, overridden by the kinds that differ (grouped
    experts, Megatron's tensor-parallel layers): :meth:`new_adapter`, :meth:`init_adapter`,
    :meth:`fold_adapter` (merge, unmerge, export), :meth:`probe_inputs` (export's measurement) and
    :attr:`supports_adapter_routing`.
    """

    supports_adapter_routing = True  # qpeft.adapter_routing: per-sample adapters in forward

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        self.adapters = nn.ModuleDict()
        self._routing = None  # set only inside qpeft.adapter_routing (per-sample adapters)

    # -- what a subclass provides -------------------------------------------------------------
    @staticmethod
    def features(base: nn.Module) -> tuple[int, int]:
        """``(in_features, out_features)`` of the (innermost) base layer."""
        raise NotImplementedError

    @staticmethod
    def to_out_in(weight: torch.Tensor) -> torch.Tensor:
        """View of a base weight in ``[out, in]`` layout (identity for ``nn.Linear``)."""
        return weight

    # -- common behaviour ---------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        """Names of this layer's adapters, in insertion order."""
        return list(self.adapters.keys())

    @property
    def base_weight(self) -> nn.Parameter:
        """The original (master) weight of the innermost base layer."""
        return innermost(self).weight

    def _split_active(self, x: torch.Tensor) -> tuple[list[LoRAAdapter], list[LoRAAdapter]]:
        """Active adapters as ``(fused path, simple path)`` for input ``x``."""
        fused, rest = [], []
        for adapter in self.adapters.values():
            if adapter.active:
                (fused if _fusable(adapter, x) else rest).append(adapter)
        return fused, rest

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.base
        if self._routing is not None:
            return self._routing.apply(self, x, base(x, *args, **kwargs))
        fused, rest = self._split_active(x)
        operands = None
        if fused and not args and not kwargs:
            operands = linear_operands(base, x)
        if operands is not None:
            y = linear_lora(x, *operands, [(a.lora_a, a.lora_b, a.scale) for a in fused])
        else:
            y = base(x, *args, **kwargs)
            if fused and y.dtype == x.dtype:
                y = lora_addmm(x, y, [(a.lora_a, a.lora_b, a.scale) for a in fused])
            else:
                rest = fused + rest
        for adapter in rest:
            y = y + adapter(x.to(adapter.lora_a.dtype)).to(y.dtype)
        return y

    def new_adapter(self, config: Any, dtype: torch.dtype | None) -> LoRAAdapter:
        """A zero-filled adapter sized for this layer, on the base weight's device."""
        inner = innermost(self)
        in_f, out_f = self.features(inner)
        weight = inner if is_compressed(inner) else self.base_weight  # no dequantizing for this
        return LoRAAdapter(in_f, out_f, config, dtype or weight.dtype, weight.device)

    @torch.no_grad()
    def init_adapter(self, adapter: LoRAAdapter, layer_name: str) -> None:
        """Fill a new adapter: ``kaiming_zeros`` (its initializers) or ``svdquant`` (the rank-r SVD
        of :meth:`quantization_residual`; zeros and a warning without a weight quantizer).

        Raises:
            ValueError: for ``svdquant`` on non-finite weights (names the layer).
        """
        config = adapter.config
        if config.lora_init_method != "svdquant":
            init_factors(adapter.lora_a, adapter.lora_b, config)
            return
        if is_compressed(self):
            raise compressed_error("svdquant init", layer_name, "run update_model before compress")
        found = svdquant_factors(
            self.quantization_residual(), adapter.rank, adapter.scale, layer_name
        )
        if found is not None:  # else the factors stay zero
            adapter.lora_a.copy_(found[0])
            adapter.lora_b.copy_(found[1])

    def quantization_residual(self) -> torch.Tensor | None:
        """``W - Q(W)`` in fp32, ``[out, in]`` layout; None without an enabled weight quantizer."""
        quantizer = find_weight_quantizer(self.base)
        if quantizer is None:
            return None
        weight = self.base_weight.detach()
        return self.to_out_in(weight.float() - quantizer(weight).float())

    @torch.no_grad()
    def fold_adapter(self, adapter: LoRAAdapter, sign: float) -> None:
        """``W <- cast(W + sign * scale * B @ A)`` in place (merge: +1, unmerge: -1, export)."""
        weight = self.base_weight
        # [out, in] view of the master weight, written in place; detach() (unlike .data) shares
        # the version counter, so caches keyed on it (a frozen weight's Q(W)) see the change
        view = self.to_out_in(weight.detach())
        view.copy_((view.float() + sign * adapter.delta_weight()).to(weight.dtype))

    def folded_parameters(self) -> list[nn.Parameter]:
        """The parameters :meth:`fold_adapter` writes into (merge refuses them when tied)."""
        return [self.base_weight]

    def probe_inputs(self, rows: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """Fixed random inputs ``(x [rows, in],)`` for measuring what a fold changes."""
        in_features, _ = self.features(innermost(self))
        weight = self.base_weight
        x = torch.randn(rows, in_features, generator=generator)
        return (x.to(weight.device, weight.dtype),)


class LoRALinear(LoRAModule):
    """LoRA around ``nn.Linear`` (``weight: [out, in]``)."""

    @staticmethod
    def features(base: nn.Module) -> tuple[int, int]:
        return base.in_features, base.out_features


class LoRAConv1D(LoRAModule):
    """LoRA around transformers' ``Conv1D`` (GPT-2), whose ``weight`` is stored ``[in, out]``."""

    @staticmethod
    def features(base: nn.Module) -> tuple[int, int]:
        shape = getattr(base, "weight_shape", None) or base.weight.shape  # packed: no dequant
        return shape[0], shape[1]

    @staticmethod
    def to_out_in(weight: torch.Tensor) -> torch.Tensor:
        return weight.t()


def lora_layers(model: nn.Module) -> dict[str, LoRAModule]:
    """Every LoRA layer of ``model``, by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRAModule)}


def adapter_state(
    model: nn.Module, names: Collection[str] | None = None
) -> dict[str, torch.Tensor]:
    """Every adapter factor of ``model`` under its ``model.state_dict()`` key, from the adapters.

    For LoRA layer ``ln`` and adapter ``name`` the keys are ``f"{ln}.adapters.{name}.{k}"`` for
    each ``k`` of the adapter's own ``state_dict()`` (``lora_a`` / ``lora_b``; grouped experts
    ``<projection>.lora_a`` / ``.lora_b``), without ``ln.`` for a model that is itself a LoRA layer.
    Names are ``model.named_modules()``'s: a caller holding a wrapped model (DDP, FSDP1) maps them
    (:func:`qpeft.parallel.state_dict.model_adapter_keys`).

    Args:
        model: any module.
        names: only these adapter names (None: all).
    """
    return {
        (f"{ln}.adapters.{name}.{key}" if ln else f"adapters.{name}.{key}"): tensor
        for ln, layer in lora_layers(model).items()
        for name, adapter in layer.adapters.items()
        if names is None or name in names
        for key, tensor in adapter.state_dict().items()
    }


def adapter_keys(model: nn.Module, names: Collection[str] | None = None) -> set[str]:
    """The keys of :func:`adapter_state`: every adapter factor's ``model.state_dict()`` key."""
    return set(adapter_state(model, names))


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` has at least one LoRA layer."""
    return any(isinstance(m, LoRAModule) for m in model.modules())


def require_lora_layers(model: nn.Module, what: str = "") -> dict[str, LoRAModule]:
    """:func:`lora_layers`, or a ValueError (prefixed ``what: ``) when the model has none."""
    layers = lora_layers(model)
    if not layers:
        prefix = f"{what}: " if what else ""
        raise ValueError(f"{prefix}model has no LoRA layers; call qpeft.update_model first")
    return layers


def adapter_names_of(layers: dict[str, LoRAModule]) -> list[str]:
    """Every adapter name of ``layers``, sorted."""
    return sorted({name for layer in layers.values() for name in layer.adapters})


def check_adapter_names(layers: dict[str, LoRAModule], names: Any, what: str = "") -> None:
    """Raise a ValueError naming the first of ``names`` no layer has, and the known adapters."""
    known = adapter_names_of(layers)
    for name in names:
        if name not in known:
            prefix = f"{what}: " if what else ""
            raise ValueError(f"{prefix}no adapter named {name!r}; the model has {known}")


def check_selection(
    layers: dict[str, LoRAModule], selection: dict[str, list[str]], what: str
) -> None:
    """Raise a ValueError naming the first ``{layer: [adapter names]}`` pair the model lacks."""
    for layer_name, names in selection.items():
        for name in names:
            if layer_name not in layers or name not in layers[layer_name].adapters:
                raise ValueError(f"{what}: layer {layer_name!r} has no adapter {name!r}")


def check_not_routing(layers: dict[str, LoRAModule], what: str) -> None:
    """Raise a ValueError when called inside :func:`qpeft.adapter_routing` (its plan is fixed)."""
    routed = next((name for name, layer in layers.items() if layer._routing is not None), None)
    if routed is not None:
        raise ValueError(
            f"{what} is not allowed inside qpeft.adapter_routing (layer {routed!r} routes "
            "per-sample adapters from a plan made on entry); leave the block first"
        )
