"""The ``qpeft recover`` recipe, stage by stage.

1. load the teacher and a student copy; tokenise train / validation / eval texts;
2. quantize the student (input formats calibrate on the training batches);
3. attach a rank-``r`` LoRA sidecar to every quantized layer (``svdquant`` by default);
4. block-by-block reconstruction of each transformer block's output (:mod:`.blockwise`);
5. end-to-end distillation with a warm-up + cosine schedule and held-out early stopping
   (:mod:`.distill`);

with ``compress`` the student's quantized layers are compressed right after step 3
(:func:`qpeft.compress`: packed codes and scales, bit-identical training, so the metrics equal the
uncompressed run's; the recovered per-layer error is then not measured, it needs the master
weights); the peak resident memory of the process is reported either way;
and the eval metrics after every stage, the per-layer weight error ``||W - Q(W) - sBA|| / ||W||``
before and after init and after recovery, the time of each stage.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..quant.compress import compress
from . import tasks
from .blockwise import find_blocks, reconstruct_blocks
from .data import load_texts
from .distill import distill
from .distributed import Parallel
from .gathered import evaluate as gathered_evaluate
from .layers import check_compressible, check_rank, layer_errors, quantized_names
from .quantizing import quantize_student, quantizes_inputs
from .resume import RunState, start_phase
from .sizes import model_sizes, peak_rss_mb
from .student import ADAPTER, attach

__all__ = ["RecoverOptions", "RecoverRun", "run_recipe", "check_rank", "peak_rss_mb", "ADAPTER"]


@dataclass
class RecoverOptions:
    """Every knob of ``qpeft recover`` (the CLI's flags; see ``qpeft recover --help``)."""

    model: str
    data: str | None = None
    format: str = "nvfp4_weight_only"
    rank: int = 32
    init: str = "svdquant"
    lora_dtype: str | None = None
    seed: int = 0
    train_texts: int = 2048
    eval_texts: int = 256
    valid_texts: int = 128
    batch_size: int = 32
    max_length: int = 128
    block_epochs: int = 5
    block_lr: float = 3e-3
    epochs: int = 3
    lr: float = 3e-4
    patience: int = 3
    compress: bool = False
    tie_fused_scales: bool = False
    progress: bool = True
    parallel: str = "none"  # none, ddp, fsdp2 (qpeft.recover.distributed)


@dataclass
class RecoverRun:
    """Everything a run measured; ``student`` is the recovered model."""

    options: dict[str, Any]
    kind: str
    headline: tuple[str, ...]
    stages: dict[str, dict[str, float]] = field(default_factory=dict)  # stage -> metrics
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> wall time
    layer_error: dict[str, dict[str, float]] = field(default_factory=dict)  # when -> layer -> error
    block_error: dict[str, list[float]] = field(default_factory=dict)
    block_losses: list[float] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list)
    valid_losses: list[tuple[int, float]] = field(default_factory=list)
    early_stopping: dict[str, Any] = field(default_factory=dict)  # best step, stopped early
    sizes: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    student: nn.Module | None = None
    tokenizer: Any = None

    def to_json(self) -> dict[str, Any]:
        """The run as plain JSON (without the model and tokenizer)."""
        plain = asdict(replace(self, student=None, tokenizer=None))  # no copy of the model
        return {k: v for k, v in plain.items() if k not in ("student", "tokenizer")}


def _seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _bar(opts: RecoverOptions, total: int, desc: str) -> tqdm:
    return tqdm(
        total=total,
        desc=desc,
        disable=not opts.progress or total == 0,
        leave=False,
        dynamic_ncols=True,
    )


def _stage(
    run: RecoverRun, name: str, started: float, evaluate: Callable[[], dict[str, float]]
) -> None:
    if name in run.stages:  # a resumed run: done before the interruption
        return
    run.seconds[name] = round(time.perf_counter() - started, 2)
    run.stages[name] = evaluate()
    bad = sorted(k for k, v in run.stages[name].items() if not math.isfinite(v))
    if bad:
        raise ValueError(
            f"after the {name} stage {', '.join(bad)} is not finite; the training diverged, try "
            "a smaller --lr or --block-lr"
        )


def run_recipe(
    opts: RecoverOptions,
    say: Callable[[str], None] = print,
    state: RunState | None = None,
    par: Parallel | None = None,
) -> RecoverRun:
    """Run the whole recipe (see the module docstring) and return what it measured.

    Args:
        opts: the options.
        say: prints a line of progress.
        state: saves the training state while it trains and resumes a saved one
            (:func:`qpeft.recover.resume.open_state`); None: no saving.
        par: the ranks of a ``ddp`` / ``fsdp2`` run (:mod:`qpeft.recover.distributed`; every
            rank calls this); None is one process.

    Raises:
        ValueError: bad input (model directory, data, format, rank), with a message naming it; a
            saved state that does not fit.
    """
    par = par or Parallel()
    _seed(opts.seed)
    t = time.perf_counter()
    splits = load_texts(opts.data)
    teacher, student, tokenizer, task = tasks.load_models(
        opts.model, par.prepare_teacher if par.active else None
    )
    student = student.to(par.device)
    batch = lambda texts: tasks.make_batches(tokenizer, texts, opts.batch_size, opts.max_length)  # noqa: E731
    every, valid, evals = (
        batch(splits.train[: opts.train_texts]),
        batch(splits.valid[: opts.valid_texts]),
        batch(splits.eval[: opts.eval_texts]),
    )
    train, valid, evals = (par.share(b, task.kind) for b in (every, valid, evals))
    run = RecoverRun(
        options=asdict(opts), kind=task.kind, headline=task.headline, tokenizer=tokenizer
    )
    run.counts = {
        "train": min(len(splits.train), opts.train_texts),
        "valid": min(len(splits.valid), opts.valid_texts),
        "eval": min(len(splits.eval), opts.eval_texts),
    }
    if state:
        state.restore_run(run)
    evaluate = lambda: gathered_evaluate(par, task, student, teacher, evals)  # noqa: E731
    _stage(run, "original", t, evaluate)

    t = time.perf_counter()
    with _bar(opts, len(every) if quantizes_inputs(opts.format) else 0, "calibrate") as bar:

        def forward_loop(model: nn.Module) -> None:  # every rank: all texts, same amaxes
            with torch.no_grad():
                for b in par.place(every):
                    task.forward(model, b)
                    bar.update(1)

        quantize_student(student, opts.format, forward_loop, opts.tie_fused_scales)
    par.quantized(student)
    names = quantized_names(student)
    if not names:
        raise ValueError(f"format {opts.format!r} quantized no layer of {opts.model!r}")
    check_rank(student, names, opts.rank)
    if opts.compress:
        check_compressible(student, names)
    run.layer_error["quantized"] = layer_errors(student, names)
    _stage(run, "quantized", t, evaluate)

    t = time.perf_counter()
    attrs = {"rank": opts.rank, "lora_init_method": opts.init, "lora_dtype": opts.lora_dtype}
    with _bar(opts, len(names), "init") as bar:
        attach(student, names, attrs, bar.update)
    run.layer_error["init"] = layer_errors(student, names)
    if opts.compress:
        student = compress(student, layer_patterns=names)
    student = par.shard_student(student)
    _stage(run, "init", t, evaluate)
    say(
        f"quantized {len(names)} layers to {opts.format}; LoRA rank {opts.rank} ({opts.init}) "
        "attached"
    )

    phase = start_phase(state, "blockwise", student)
    blocks = len(find_blocks(student)[1])
    with _bar(opts, 0 if phase.skip else opts.block_epochs * len(train) * blocks, "blockwise") as b:
        if not phase.skip:
            report = reconstruct_blocks(
                student,
                teacher,
                task.forward,
                train,
                opts.block_epochs,
                opts.block_lr,
                opts.seed,
                b.update,
                state=phase,
                collective=par.block_collective(),
            )
            run.block_error = {"before": report.before, "after": report.after}
            run.block_losses = report.losses
    _stage(run, "blockwise", phase.started, evaluate)

    phase = start_phase(state, "end-to-end", student)
    with _bar(opts, opts.epochs * len(train), "end-to-end") as bar:
        dreport = distill(
            par.for_training(student),
            teacher,
            task,
            train,
            valid,
            opts.epochs,
            opts.lr,
            opts.seed,
            patience=opts.patience,
            eval_every=max(1, len(train) // 2),
            progress=bar.update,
            state=phase,
            reduce=par.loss_mean(),
        )
    run.train_losses, run.valid_losses = dreport.losses, dreport.valid
    run.early_stopping = {"best_step": dreport.best_step, "stopped_early": dreport.stopped_early}
    if not opts.compress:
        run.layer_error["recovered"] = par.unsharded(layer_errors, student, names)
    _stage(run, "recovered", phase.started, evaluate)

    run.sizes = model_sizes(student, teacher)
    run.student = student
    return run
