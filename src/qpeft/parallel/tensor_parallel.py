"""DTensor tensor parallelism for LoRA layers: the sharding of the adapters follows the base's.

Notation: ``t`` ranks, base weight ``W: [out, in]``, adapter ``A: [r, in]``, ``B: [out, r]``.

Column-parallel base (``W`` sharded on ``out``): the input ``x: [..., in]`` is replicated and the
base yields its slice ``[..., out/t]``. ``A`` is replicated and ``B`` sharded on ``out``, so
``B_k (A x)`` is the same slice of the adapter output: it is added locally, no communication.

Row-parallel base (``W`` sharded on ``in``): the input arrives sharded ``[..., in/t]`` and the base
yields partial sums ``[..., out]`` that one all-reduce (or reduce-scatter) completes. ``A`` is
sharded on ``in`` and ``B`` replicated: ``A_k x_k : [..., r]`` is a partial sum, and since ``B`` is
linear ``B (sum_k A_k x_k) = sum_k B A_k x_k``, so the adapter's partial output is added to the
base's partial output *before* the reduction: the one all-reduce the base needs also completes the
adapter (DTensor keeps both ``Partial`` and adds a replicated bias exactly once).

:class:`LoRAColwiseParallel` and :class:`LoRARowwiseParallel` are drop-in replacements of torch's
``ColwiseParallel`` / ``RowwiseParallel`` (same arguments; plain ``nn.Linear``/``nn.Embedding`` are
handled exactly as torch does) that also accept qpeft LoRA layers. :func:`lora_tp_plan` rewrites a
user's ``parallelize_module`` plan with them; :func:`parallelize_lora` applies it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from fnmatch import fnmatch
from functools import partial

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    parallelize_module,
)

from ..core.wrapping import innermost
from ..lora.adapter import LoRAAdapter
from ..lora.layer import LoRAConv1D, LoRALinear, LoRAModule

__all__ = ["LoRAColwiseParallel", "LoRARowwiseParallel", "lora_tp_plan", "parallelize_lora"]

# LoRA layer class -> (out dim, in dim) of its base weight as stored.
_WEIGHT_DIMS: dict[type[LoRAModule], tuple[int, int]] = {LoRALinear: (0, 1), LoRAConv1D: (1, 0)}


def _weight_dims(layer: LoRAModule) -> tuple[int, int]:
    for cls in type(layer).__mro__:
        if cls in _WEIGHT_DIMS:
            return _WEIGHT_DIMS[cls]
    raise TypeError(f"tensor parallelism does not know the weight layout of {type(layer).__name__}")


def _shard_param(
    module: nn.Module, name: str, mesh: DeviceMesh, placement, src: int | None
) -> None:
    param = getattr(module, name, None)
    if param is None:
        return
    dist = distribute_tensor(param, mesh, [placement], src_data_rank=src)
    module.register_parameter(name, nn.Parameter(dist, requires_grad=param.requires_grad))


def _lora_partition_fn(layer: LoRAModule, column: bool, src: int | None) -> Callable:
    """``partition_fn`` for ``distribute_module``: shards the innermost base and every adapter.

    Other parameters and buffers under the layer (e.g. a quantizer's ``amax``) are replicated by
    ``distribute_module``; DTensor's global semantics keep them consistent with a sharded weight.
    """
    base = innermost(layer)
    out_dim, in_dim = _weight_dims(layer)

    def partition(_name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        if module is base:
            _shard_param(module, "weight", mesh, Shard(out_dim if column else in_dim), src)
            _shard_param(module, "bias", mesh, Shard(0) if column else Replicate(), src)
        elif isinstance(module, LoRAAdapter):
            _shard_param(module, "lora_a", mesh, Replicate() if column else Shard(1), src)
            _shard_param(module, "lora_b", mesh, Shard(0) if column else Replicate(), src)

    return partition


def _distribute_lora(style, layer: LoRAModule, mesh: DeviceMesh, column: bool) -> nn.Module:
    return distribute_module(
        layer,
        mesh,
        _lora_partition_fn(layer, column, style.src_data_rank),
        partial(style._prepare_input_fn, style.input_layouts, style.desired_input_layouts),
        partial(style._prepare_output_fn, style.output_layouts, style.use_local_output),
    )


class LoRAColwiseParallel(ColwiseParallel):
    """``ColwiseParallel`` that also shards LoRA layers: ``W`` and ``B`` on ``out``, ``A``
    replicated.

    Same keyword arguments as ``ColwiseParallel`` (``input_layouts``, ``output_layouts``,
    ``use_local_output``); any other module is handled by ``ColwiseParallel`` itself.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, LoRAModule):
            return super()._apply(module, device_mesh)
        return _distribute_lora(self, module, device_mesh, column=True)


class LoRARowwiseParallel(RowwiseParallel):
    """``RowwiseParallel`` that also shards LoRA layers: ``W`` and ``A`` on ``in``, ``B``
    replicated.

    The adapter's partial output joins the base's partial sums before the one output reduction.
    Same keyword arguments as ``RowwiseParallel``; any other module is handled by it.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, LoRAModule):
            return super()._apply(module, device_mesh)
        self.desired_input_layouts = (Shard(-1),)  # as RowwiseParallel does for nn.Linear
        return _distribute_lora(self, module, device_mesh, column=False)


def _converted(style: ParallelStyle) -> ParallelStyle | None:
    """The LoRA-aware equivalent of a torch column/row style (same layouts), else None."""
    if isinstance(style, (LoRAColwiseParallel, LoRARowwiseParallel)):
        return style
    cls = {ColwiseParallel: LoRAColwiseParallel, RowwiseParallel: LoRARowwiseParallel}.get(
        type(style)
    )
    if cls is None:
        return None
    new = cls(
        input_layouts=style.input_layouts[0],
        output_layouts=style.output_layouts[0],
        use_local_output=style.use_local_output,
    )
    new.src_data_rank = style.src_data_rank
    return new


def _resolve(module: nn.Module, atoms: list[str], prefix: str = "") -> list[str]:
    """Module names a plan key selects: dot-separated atoms, each an fnmatch over child names.

    This is how ``parallelize_module`` reads its plan keys.
    """
    if not atoms:
        return [prefix]
    found: list[str] = []
    for child_name, child in module.named_children():
        if fnmatch(child_name, atoms[0]):
            found += _resolve(child, atoms[1:], f"{prefix}.{child_name}" if prefix else child_name)
    return found


def _check_key(model: nn.Module, key: str, style: ParallelStyle, new: ParallelStyle | None) -> None:
    names = _resolve(model, key.split("."))
    if not names:
        raise ValueError(f"tensor-parallel plan key {key!r} matches no submodule of the model")
    layers = {n for n, m in model.named_modules() if isinstance(m, LoRAModule)}
    for name in sorted(names):
        holder = next((p for p in sorted(layers) if name.startswith(p + ".")), None)
        if holder is not None:
            raise ValueError(
                f"tensor-parallel plan key {key!r} selects {name!r} inside LoRA layer {holder!r}: "
                f"key the LoRA layer itself so its adapters are sharded with its base"
            )
        if name in layers and new is None:
            raise ValueError(
                f"tensor-parallel plan key {key!r} applies {type(style).__name__} to LoRA layer "
                f"{name!r}; only ColwiseParallel and RowwiseParallel are supported on LoRA layers"
            )
        if name in layers:
            _weight_dims(model.get_submodule(name))


def lora_tp_plan(model: nn.Module, plan: Mapping[str, ParallelStyle]) -> dict[str, ParallelStyle]:
    """Extend a ``parallelize_module`` plan so LoRA layers are sharded with their adapters.

    Every ``ColwiseParallel`` / ``RowwiseParallel`` entry becomes its LoRA-aware equivalent with the
    same layouts (column: ``A`` replicated, ``B`` sharded on ``out``; row: ``A`` sharded on ``in``,
    ``B`` replicated); other styles are kept as they are. Call it after :func:`qpeft.update_model`.

    Args:
        model: the (LoRA) model the plan is for; keys are read as ``parallelize_module`` reads them
            (dot-separated, each part an fnmatch wildcard over child names).
        plan: module name (or wildcard) -> ``ParallelStyle``.

    Returns:
        A new plan dict; ``plan`` itself is not modified.

    Raises:
        ValueError: a key matches no submodule; a key selects something inside a LoRA layer (e.g.
            ``q_proj.base``); a style other than column/row-wise targets a LoRA layer.
        TypeError: a LoRA layer type whose weight layout tensor parallelism does not know.
    """
    out: dict[str, ParallelStyle] = {}
    for key, style in plan.items():
        new = _converted(style)
        _check_key(model, key, style, new)
        out[key] = new if new is not None else style
    return out


def parallelize_lora(
    model: nn.Module, device_mesh: DeviceMesh, plan: Mapping[str, ParallelStyle]
) -> nn.Module:
    """``parallelize_module(model, device_mesh, lora_tp_plan(model, plan))``: shard a LoRA model.

    Args:
        model: a model converted by :func:`qpeft.update_model` (adapters must exist before).
        device_mesh: a 1-D tensor-parallel mesh.
        plan: the plan for the base model, as for ``parallelize_module``.

    Returns:
        ``model``, parallelized in place.

    Raises:
        ValueError / TypeError: as :func:`lora_tp_plan`, before anything is sharded.
    """
    return parallelize_module(model, device_mesh, lora_tp_plan(model, plan))
