"""Max calibration of input quantizers that are not in the model yet.

``forward_loop(model)`` runs on the model as it is, with every quantizer already in it switched
off (so the statistics are those of the unquantized model, as in ModelOpt's max calibration).
A forward pre-hook on each target layer's slot feeds the layer's input to its new input quantizer,
which is in calibration mode and records a running max of ``|x|``. Hooks and flags are restored
whatever happens, so a failing loop leaves the model as it was.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from torch import nn

from .layer import QuantModule
from .quantizer import TensorQuantizer
from .targets import Target

__all__ = ["calibrate_inputs", "quantizers_off", "run_forward_loop"]


def _takes_no_argument(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: pass the model
        return False
    positional = ("POSITIONAL_ONLY", "POSITIONAL_OR_KEYWORD", "VAR_POSITIONAL")
    return not any(p.kind.name in positional for p in params)


def run_forward_loop(forward_loop: Callable[..., Any], model: nn.Module) -> None:
    """Call ``forward_loop(model)``, or ``forward_loop()`` when it takes no positional argument
    (ModelOpt allows both)."""
    if _takes_no_argument(forward_loop):
        forward_loop()
    else:
        forward_loop(model)


@contextmanager
def quantizers_off(model: nn.Module) -> Iterator[None]:
    """Every ``TensorQuantizer`` of ``model`` disabled inside, its own flag restored on exit."""
    quantizers = [m for m in model.modules() if isinstance(m, TensorQuantizer)]
    saved = [q.is_enabled for q in quantizers]
    try:
        for q in quantizers:
            q.disable()
        yield
    finally:
        for q, flag in zip(quantizers, saved, strict=True):
            if flag:
                q.enable()


def _feed(quantizer: TensorQuantizer) -> Callable[..., None]:
    def hook(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        x = args[0] if args else next(iter(kwargs.values()))
        quantizer(x)

    return hook


def calibrate_inputs(
    model: nn.Module,
    wrappers: dict[str, QuantModule],
    targets: dict[str, Target],
    forward_loop: Callable[..., Any],
) -> None:
    """Record the input amax of every enabled input quantizer of ``wrappers`` over
    ``forward_loop``."""
    todo = [
        (name, q)
        for name, w in wrappers.items()
        for q in w.input_quantizers().values()
        if q.is_enabled
    ]
    with ExitStack() as stack:
        stack.enter_context(quantizers_off(model))
        for name, quantizer in todo:
            stack.enter_context(quantizer.calibrating())
            slot = model.get_submodule(targets[name].slot)
            handle = slot.register_forward_pre_hook(_feed(quantizer), with_kwargs=True)
            stack.callback(handle.remove)
        run_forward_loop(forward_loop, model)
