"""``adapter_routing``: per-sample adapters for one batch (serving many adapters at once).

Inside ``with qpeft.adapter_routing(model, names):`` sample ``i`` of every batch that reaches a LoRA
layer gets exactly adapter ``names[i]`` (its own ``scale``), whatever the adapters' ``enable``
flags; ``None`` means no adapter at all for that sample (the base model's output). A layer that
lacks the named adapter adds nothing for that sample. The math is in :mod:`qpeft.lora.routing`.
Works for training, inference and ``generate`` (the batch size must stay ``len(names)``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from .lora.routing import plan_route
from .peft import lora_layers

__all__ = ["adapter_routing"]


def _check_names(model: nn.Module, names: Sequence[str | None]) -> list[str | None]:
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(f"adapter_routing: expected a list of adapter names (or None), got {names!r}")
    names = list(names)
    if not names:
        raise ValueError("adapter_routing: the list of adapter names is empty")
    for i, name in enumerate(names):
        if name is not None and not isinstance(name, str):
            raise TypeError(f"adapter_routing: names[{i}] = {name!r} is neither a str nor None")
    layers = lora_layers(model)
    if not layers:
        raise ValueError("adapter_routing: model has no LoRA layers; call qpeft.update_model first")
    known = {a for layer in layers.values() for a in layer.adapters}
    unknown = sorted({n for n in names if n is not None} - known)
    if unknown:
        raise ValueError(f"adapter_routing: unknown adapter(s) {unknown}; the model has {sorted(known)}")
    merged = sorted({(ln, a) for ln, layer in layers.items() for a, ad in layer.adapters.items() if ad.merged})
    if merged:
        raise ValueError(
            f"adapter_routing: adapter {merged[0][1]!r} is merged into layer {merged[0][0]!r}; "
            "call qpeft.unmerge_adapters first (a merged adapter would reach every sample)"
        )
    return names


@contextmanager
def adapter_routing(model: nn.Module, adapter_names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Route sample ``i`` of each batch through adapter ``adapter_names[i]`` inside the block.

    Args:
        model: a model converted by :func:`qpeft.update_model`.
        adapter_names: one adapter name per sample, or None for "no adapter" for that sample.

    Raises:
        TypeError: ``adapter_names`` is not a list of str/None.
        ValueError: empty list, a name no layer has, a merged adapter, or a model without LoRA layers (checked on
            entry, nothing changed); inside the block, a forward whose batch size differs from
            ``len(adapter_names)`` (names the layer).

    Nothing is recorded in the mode log: the model leaves the block as it entered it.
    """
    names = _check_names(model, adapter_names)
    layers = lora_layers(model)
    # layers with their own forward (grouped experts, Megatron) would ignore the routing silently
    fixed = [n for n, layer in layers.items() if not getattr(layer, "supports_adapter_routing", True)]
    if fixed:
        raise ValueError(
            f"adapter_routing: layer {fixed[0]!r} ({type(layers[fixed[0]]).__name__}) does not support "
            "per-sample adapters"
        )
    routes = {n: plan_route(n, layer.adapters, names) for n, layer in layers.items()}
    saved = {n: layer._routing for n, layer in layers.items()}
    try:
        for n, layer in layers.items():
            layer._routing = routes[n]
        yield model
    finally:
        for n, layer in layers.items():
            layer._routing = saved[n]
