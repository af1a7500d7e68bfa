"""Composition wrappers that keep the wrapped module's ``state_dict`` keys.

A wrapper holds the original module as ``self.base``. Its state-dict hooks drop the ``base.`` level
on save and restore it on load, so ``q_proj.weight`` stays ``q_proj.weight`` whether ``q_proj`` is a
plain ``nn.Linear``, a LoRA layer, a quantized layer, or a LoRA layer over a quantized one. A plain
checkpoint of the base model therefore loads into a converted model, and back. Attribute reads that
the wrapper does not answer itself (``weight``, ``in_features``, ``weight_quantizer``...) fall
through to the base.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["ModuleWrapper", "innermost"]

_BASE = "base."


class ModuleWrapper(nn.Module):
    """Base class of every qpeft wrapper: ``self.base`` is the wrapped module, unchanged."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self._register_state_dict_hook(_drop_base_level)
        self.register_load_state_dict_pre_hook(_add_base_level)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base" or "base" not in self._modules:
                raise
            return getattr(self._modules["base"], name)

    def own_keys(self) -> set[str]:
        """First-level names of the wrapper's own (non-base) parameters, buffers and modules."""
        return {k for k in [*self._parameters, *self._buffers, *self._modules] if k != "base"}

    def _fqn_modifiers(self) -> dict[str, str]:
        # torch.distributed.checkpoint.state_dict's contract for modules whose state-dict hooks
        # rename keys: state-dict name -> the submodule it really lives in. Without it,
        # set_model_state_dict (FSDP2, tensor parallel, DCP) cannot load into a wrapped layer.
        return {name: "base" for name in _visible_names(self.base) - self.own_keys()}


def _drop_base_level(module: ModuleWrapper, state_dict: dict, prefix: str, _meta: Any) -> None:
    inner = prefix + _BASE
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner) :]] = state_dict.pop(key)


def _add_base_level(module: ModuleWrapper, state_dict: dict, prefix: str, *_args: Any) -> None:
    own = module.own_keys()
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix) :]
        if rest.split(".", 1)[0] not in own:
            state_dict[prefix + _BASE + rest] = state_dict.pop(key)


def _visible_names(module: nn.Module) -> set[str]:
    """First-level state-dict names of ``module`` as its ``state_dict`` shows them."""
    if isinstance(module, ModuleWrapper):
        return module.own_keys() | _visible_names(module.base)
    return {*module._parameters, *module._buffers, *module._modules}


def innermost(module: nn.Module) -> nn.Module:
    """The original module under any number of wrappers."""
    while isinstance(module, ModuleWrapper):
        module = module.base
    return module
