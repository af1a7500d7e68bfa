"""Loading an adapter file into a sharded (FSDP2 / tensor-parallel) model.

Sharding fixes a model's parameters: FSDP2 and tensor parallelism shard the parameters present
when ``fully_shard`` / ``parallelize_lora`` ran, and a parameter added afterwards would be neither
sharded nor synchronised. So on a sharded model ``qpeft.load_adapters`` does not add adapters: each
saved adapter must already be on exactly the saved layers, with the saved configuration (created
before sharding, by ``update_model`` or by ``load_adapters`` on the plain model). The saved scale,
enable and trainable flags are applied (recorded as on a plain model), then every rank passes the
whole factors and keeps its own shard.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from ..adapters import disable_selection
from ..checkpoint_load import Header, check_tensors
from ..peft import lora_layers, update_model
from ..transaction import apply_atomically

__all__ = ["load_adapters_sharded"]


def _check_present(model: nn.Module, configs: list[dict[str, Any]], where: Path) -> set[str]:
    """The model's state-dict keys of the saved adapters; each must sit on exactly the saved layers."""
    layers = lora_layers(model)
    keys: set[str] = set()
    for cfg in configs:
        name = cfg["adapter_name"]
        have = {ln for ln, layer in layers.items() if name in layer.adapters}
        if not have:
            raise ValueError(
                f"{where}: the model is sharded and has no adapter {name!r}; adapters cannot be added "
                "after fully_shard / parallelize_lora: call qpeft.load_adapters (or update_model) on "
                "the model before sharding it"
            )
        saved = {ln for ln, attrs in cfg["adapter_cfg"].items() if attrs != {"enable": False}}  # not L.<projection>
        for layer_name in sorted(have ^ saved):
            side = "has" if layer_name in have else "lacks"
            raise ValueError(f"{where}: the sharded model {side} adapter {name!r} on layer {layer_name!r}, "
                             "unlike the file; create it on the saved layers before sharding")
        keys |= {f"{ln}.adapters.{name}.{k}" for ln in have for k in layers[ln].adapters[name].state_dict()}
    return keys


def load_adapters_sharded(
    model: nn.Module,
    configs: list[dict[str, Any]],
    disabled: dict[str, list[str]],
    header: Header,
    tensors: dict[str, torch.Tensor],
    where: Path,
) -> nn.Module:
    """Fill a sharded model's existing adapters from a checked adapter file; a collective.

    Args:
        model: an FSDP2 / tensor-parallel model that already has the saved adapters.
        configs: one ``update_model`` config per saved adapter (all layers enabled).
        disabled: ``{layer: [adapter names]}`` saved as disabled.
        header, tensors: the file's header and tensors (whole, on every rank).
        where: the file, for messages.

    Returns:
        ``model``.

    Raises:
        ValueError: a saved adapter missing from the model, or on other layers, or with another
            rank, initializer or dtype (names adapter, layer or key). Raised identically on every
            rank before any collective; ``model`` is then left untouched.
    """
    keys = _check_present(model, configs, where)
    check_tensors(model, header, {}, where, only=keys, cast=True)
    state = model.state_dict()
    values = {k: tensors[k].to(state[k].dtype) for k in sorted(keys)}

    def change(target: nn.Module, dry_run: bool) -> nn.Module:
        for cfg in configs:
            update_model(target, cfg)  # existing adapters: sets scale / enable, checks the rest
        if disabled:
            disable_selection(target, disabled)
        set_model_state_dict(target, values, options=StateDictOptions(full_state_dict=True, strict=False))
        return target

    return apply_atomically(model, change, validate=False)
