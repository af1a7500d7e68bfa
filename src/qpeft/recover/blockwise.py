"""Block-by-block reconstruction: fit each transformer block's adapters to the teacher's block
output.

Blocks are the entries of the ``nn.ModuleList`` holding the most LoRA layers (``encoder.layer``,
``model.layers``...). One teacher pass records every block's output ``T_i: [b, s, h]`` and the
inputs of block 0. Then, block by block, the student's block ``i`` is fed the output of its own
already-reconstructed blocks ``X_i`` (so it learns to correct the error that reaches it) and its
adapters minimise the relative error ``sum mask ||f_i(X_i) - T_i||^2 / sum mask ||T_i||^2`` with
AdamW under a one-cycle (warm-up then cosine) schedule. ``X_{i+1} = f_i(X_i)`` once it is trained.

On several ranks (``collective``, :class:`qpeft.recover.distributed.Parallel`) each rank holds its
share of every batch; the denominators are summed over ranks, so that the rank-averaged gradient
and the logged losses and errors are the one-process ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..lora.layer import LoRAModule
from .metrics import check_finite, loss_mask, masked_relative_mse, masked_squared_error

__all__ = ["find_blocks", "reconstruct_blocks", "BlockReport"]

Batch = dict[str, torch.Tensor]


@dataclass
class BlockReport:
    """Relative output error ``||f(X) - T|| / ||T||`` of each block before and after its fit."""

    before: list[float] = field(default_factory=list)
    after: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # every training step, all blocks in order


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The name and ``nn.ModuleList`` of the model's transformer blocks (the list with most LoRA
    layers).

    Raises:
        ValueError: when no module list holds a LoRA layer.
    """
    best, count = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            n = sum(isinstance(m, LoRAModule) for m in module.modules())
            if n > count:
                best, count = (name, module), n
    if best is None:
        raise ValueError("found no list of transformer blocks holding LoRA layers")
    return best


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def _teacher_trace(
    teacher: nn.Module, blocks: nn.ModuleList, forward: Callable, batches: list[Batch]
):
    """Inputs ``(hidden, (other args, kwargs))`` of block 0 and every block's output, per batch."""
    inputs: list[tuple[torch.Tensor, tuple]] = []
    outputs: list[list[torch.Tensor]] = [[] for _ in blocks]

    def grab_input(_m, args, kwargs):
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        inputs.append(
            (args[0], (args[1:], rest)) if args else (kwargs["hidden_states"], ((), rest))
        )

    hooks = [blocks[0].register_forward_pre_hook(grab_input, with_kwargs=True)]
    for i, block in enumerate(blocks):
        hooks.append(
            block.register_forward_hook(lambda _m, _a, out, i=i: outputs[i].append(_first(out)))
        )
    try:
        for batch in batches:
            forward(teacher, batch)
    finally:
        for hook in hooks:
            hook.remove()
    return inputs, outputs


def _block_error(block: nn.Module, xs, kwargs, targets, masks, collective=None) -> float:
    if collective is not None:
        with torch.no_grad():
            parts = [
                torch.stack(masked_squared_error(_first(block(x, *kw[0], **kw[1])), t, m))
                for x, kw, t, m in zip(xs, kwargs, targets, masks, strict=True)
            ]
            num, den = collective.sum(torch.stack(parts).double().sum(0)).tolist()
        return (num / max(den, 1e-30)) ** 0.5
    with torch.no_grad():
        num = den = 0.0
        for x, kw, t, m in zip(xs, kwargs, targets, masks, strict=True):
            err = masked_relative_mse(_first(block(x, *kw[0], **kw[1])), t, m)
            w = float((t.pow(2) * m.unsqueeze(-1)).sum())
            num, den = num + float(err) * w, den + w
    return (num / max(den, 1e-30)) ** 0.5


def _norms(targets, masks, collective) -> list[torch.Tensor] | None:
    """Per batch: the global ``sum mask ||T||^2`` over the ranks' number (None in one process)."""
    if collective is None:
        return None
    with torch.no_grad():
        energy = torch.stack(
            [masked_squared_error(t, t, m)[1] for t, m in zip(targets, masks, strict=True)]
        )
    total = collective.sum(energy).clamp(min=1e-12) / collective.world
    return list(total.unbind())


def _block_loss(out, target, mask, norm, collective):
    """(the loss to differentiate, the loss to log): the one-process relative error, or this
    rank's share of it over the global norm (logged: the ranks' mean)."""
    if norm is None:
        loss = masked_relative_mse(out, target, mask)
        return loss, loss
    loss = masked_squared_error(out, target, mask)[0] / norm
    return loss, collective.mean(loss)


def _pct_start(total: int) -> float:
    """10% warm-up; torch's OneCycleLR divides by zero when that is exactly one step (10 steps)."""
    return 0.1 if abs(0.1 * total - 1) > 1e-9 else 0.2


def _fit_block(block, data, epochs, lr, generator, report, tick, where, collective=None) -> None:
    """Train ``block``'s adapters on ``data = (xs, kwargs, targets, masks)``; ``where = (block
    index, PhaseState or None, Saved to continue or None)``; ``collective``: the ranks (None in
    one process)."""
    xs, kwargs, targets, masks = data
    norms = _norms(targets, masks, collective)
    params = [p for p in block.parameters() if p.requires_grad]
    if not params or epochs == 0:
        return
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * len(xs), pct_start=_pct_start(epochs * len(xs))
    )
    index, state, saved = where
    start = generator.get_state()  # a resumed block draws its batch order from here again
    order = [
        j for _ in range(epochs) for j in torch.randperm(len(xs), generator=generator).tolist()
    ]
    done = saved.load(opt, sched) if saved else 0
    for step, j in enumerate(order[done:], done + 1):
        out = _first(block(xs[j], *kwargs[j][0], **kwargs[j][1]))
        norm = None if norms is None else norms[j]
        loss, logged = _block_loss(out, targets[j], masks[j], norm, collective)
        check_finite(logged, "block-wise", len(report.losses) + 1, "--block-lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if collective is not None:
            collective.sync_grads(params)
        opt.step()
        sched.step()
        report.losses.append(float(logged.detach()))
        tick()
        if state and state.due(len(report.losses)):
            extra = {"report": asdict(report), "generator": start}
            state.save({"block": index, "step": step}, opt, sched, extra)


def reconstruct_blocks(
    student: nn.Module,
    teacher: nn.Module,
    forward: Callable[[nn.Module, Batch], torch.Tensor],
    batches: list[Batch],
    epochs: int,
    lr: float,
    seed: int,
    progress: Callable[[int], Any] | None = None,
    state: Any = None,
    collective: Any = None,
) -> BlockReport:
    """Fit the adapters of every student block, in order, to the teacher's block outputs.

    Args:
        student, teacher: models of the same architecture (student with trainable adapters).
        forward: ``forward(model, batch)`` running the whole model on a batch.
        batches: training batches (``input_ids``, ``attention_mask``).
        epochs: passes over ``batches`` per block (0: measure only).
        lr: peak learning rate of the one-cycle schedule.
        seed: seeds the batch order.
        progress: called with 1 after each step (e.g. a tqdm ``update``).
        state: a :class:`~qpeft.recover.resume.PhaseState`: continue its saved block and step,
            save every ``--save-every`` steps (None: no saving).
        collective: on several ranks, the run's :class:`~qpeft.recover.distributed.Parallel`
            (``batches`` are then this rank's shares); None in one process.

    Raises:
        ValueError: when the student has no block list (see :func:`find_blocks`); a damaged
            saved state.
    """
    name, blocks = find_blocks(student)
    teacher_blocks = teacher.get_submodule(name)
    inputs, targets = _teacher_trace(teacher, teacher_blocks, forward, batches)
    xs = [x for x, _ in inputs]
    kwargs = [kw for _, kw in inputs]
    masks = [loss_mask(b) for b in batches]
    generator = torch.Generator().manual_seed(seed)
    report = BlockReport()
    tick = progress or (lambda _n: None)
    saved = state.saved if state else None
    first = 0
    if saved:
        with saved.checked():
            report = BlockReport(**saved.extra["report"])
            first = int(saved.position["block"])
            generator.set_state(saved.extra["generator"])
        tick(len(report.losses))
    for i, block in enumerate(blocks):
        if i >= first:
            if len(report.before) == i:  # a resumed block measured it before the interruption
                report.before.append(_block_error(block, xs, kwargs, targets[i], masks, collective))
            where = (i, state, saved if i == first else None)
            data = (xs, kwargs, targets[i], masks)
            _fit_block(
                block, data, epochs, lr, generator, report, lambda: tick(1), where, collective
            )
            report.after.append(_block_error(block, xs, kwargs, targets[i], masks, collective))
        with torch.no_grad():
            xs = [_first(block(x, *kw[0], **kw[1])) for x, kw in zip(xs, kwargs, strict=True)]
    return report
