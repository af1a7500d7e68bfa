"""Starting a ``qpeft recover`` run on its ranks, and writing its outputs from rank 0 alone.

``--parallel`` defaults to ``fsdp2`` under torchrun with ``WORLD_SIZE`` > 1 and to ``none``
otherwise; ``ddp`` / ``fsdp2`` without torchrun (or with one rank) run as a one-rank group.
``none`` under a multi-rank torchrun is refused (every rank would write the same output). The
group uses gloo on the CPU, nccl on CUDA (rank ``r`` on ``cuda:LOCAL_RANK``), with a collective
timeout of ``--dist-timeout`` seconds; SIGTERM (torchrun stopping the ranks after one failed)
raises ``SystemExit`` so that rank 0's temporary output folder is removed.

Rank 0 alone opens the atomic output folder (:func:`qpeft.recover.outputs.output_directory`);
whether that worked is agreed over a collective, so a refused ``--output`` ends every rank with
the same error before any heavy work. Saving a sharded student is a collective: ``qpeft.save``
gathers it and rank 0 writes the checkpoint; the adapter factors are gathered for the HF PEFT
files. ``deploy/`` of a sharded student: every rank frees its shards, rank 0 restores the
checkpoint it has just written into a fresh one-process student read from ``--model`` and
exports that, as one process does; the others wait for it in a collective that also carries its
error, if any.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import gc
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint.full import restore, save
from ..checkpoint.hf_peft import PREFIX, peft_files, write_peft_files
from ..checkpoint.sharded import gather_tensors, is_sharded
from .distributed import MODES, Parallel
from .outputs import output_directory
from .saving import ADAPTER, hf_left_out, save_student, write_deploy
from .tasks import load_student

__all__ = ["resolve_mode", "start_parallel", "parallel_output", "save_run", "deploy_run"]


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise ValueError(
            f"environment variable {name}={os.environ[name]!r} is not an integer"
        ) from None


def resolve_mode(flag: str | None) -> str:
    """The ``--parallel`` mode of this launch: ``flag``, or its default (see above).

    Raises:
        ValueError: an unknown mode, ``none`` under a multi-rank torchrun, or a bad
            ``WORLD_SIZE``.
    """
    world = _env_int("WORLD_SIZE", 1)
    mode = flag or ("fsdp2" if world > 1 else "none")
    if mode not in MODES:
        raise ValueError(f"unknown --parallel {mode!r}; choose from {', '.join(MODES)}")
    if mode == "none" and world > 1:
        raise ValueError(
            f"--parallel none runs one process, but torchrun started {world} ranks; use "
            "--parallel ddp or fsdp2, or run without torchrun"
        )
    return mode


def start_parallel(mode: str, timeout: float) -> Parallel:
    """Join the process group ``mode`` needs (nothing for ``none``).

    Args:
        mode: ``none``, ``ddp`` or ``fsdp2`` (:func:`resolve_mode`).
        timeout: seconds a collective may wait for the other ranks.
    """
    if mode == "none":
        return Parallel()
    cuda = torch.cuda.is_available()
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", _env_int("LOCAL_RANK", 0))
        torch.cuda.set_device(device)
    limit = datetime.timedelta(seconds=timeout)
    backend = "nccl" if cuda else "gloo"
    if "MASTER_ADDR" in os.environ:  # torchrun (env://)
        dist.init_process_group(backend, timeout=limit)
    else:  # alone: a one-rank group
        dist.init_process_group(
            backend, store=dist.HashStore(), rank=0, world_size=1, timeout=limit
        )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    _release_freed_memory()
    return Parallel(mode, dist.get_rank(), dist.get_world_size(), device)


def _release_freed_memory() -> None:
    """glibc: serve every allocation above 1 MiB by its own mapping, returned when freed.

    FSDP2 gathers and frees whole blocks at every forward; with glibc's default (a threshold
    that grows up to 32 MiB) the freed buffers stay in the heap and in the resident set, which
    undoes what sharding saves (measured: a rank's peak RSS 2349 MiB by default, 1628 MiB so).
    Elsewhere nothing is changed.
    """
    with contextlib.suppress(OSError, AttributeError):  # not glibc: leave it
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD, 1 MiB


@contextlib.contextmanager
def parallel_output(par: Parallel, output: str, model: str) -> Iterator[Path | None]:
    """:func:`~qpeft.recover.outputs.output_directory` on rank 0, ``None`` on the other ranks.

    A collective under ``ddp`` / ``fsdp2``: a refused ``output`` raises on every rank.
    """
    with contextlib.ExitStack() as stack:
        tmp, error = None, None
        if par.rank == 0:
            try:
                tmp = stack.enter_context(output_directory(output, model))
            except (ValueError, OSError) as err:
                error = err
        try:
            par.agree(error)
            yield tmp
        except (ValueError, OSError):
            if par.active:
                _finish_own_exit()
            raise


def _finish_own_exit() -> None:
    """A rank ending with a reported error ignores torchrun's SIGTERM (sent when another rank
    exits first), so it removes its temporary files and exits with its own status."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def save_run(par: Parallel, student: nn.Module, tokenizer: Any, tmp: Path | None) -> dict:
    """Write the checkpoint, tokenizer and HF PEFT adapter of the student into ``tmp`` (rank 0).

    A collective for a sharded student; in one process :func:`~qpeft.recover.saving.save_student`.

    Returns:
        ``{what: path relative to the output folder}``.
    """
    if not is_sharded(student):
        return save_student(student, tokenizer, tmp) if tmp is not None else {}
    gc.collect()  # the sharded teacher is gone (FSDP modules hold reference cycles): room to gather
    save(student, (tmp or Path(".")) / "checkpoint")  # only rank 0 writes (its path)
    held = hf_left_out(student).get("written", True)  # False: every adapter is on experts
    config, local = peft_files(student, ADAPTER, skip_grouped=True) if held else ({}, {})
    factors = {}  # HF PEFT key -> the (sharded, on-device) factor it holds
    for key in local:
        name, factor, _ = key[len(PREFIX) :].rsplit(".", 2)  # <layer>.lora_A.weight
        factors[key] = getattr(student.get_submodule(name).adapters[ADAPTER], factor.lower())
    tensors = gather_tensors(factors)  # every rank, same order: whole CPU copies
    if tmp is None:
        return {}
    tokenizer.save_pretrained(str(tmp / "checkpoint" / "tokenizer"))
    files = {"checkpoint": "checkpoint", "tokenizer": "checkpoint/tokenizer"}
    if held:
        (tmp / "hf_adapter").mkdir()
        write_peft_files(tmp / "hf_adapter", config, tensors)
        files["hf_adapter"] = "hf_adapter"
    return files


def deploy_run(par: Parallel, run: Any, tmp: Path | None) -> dict | None:
    """Write ``tmp/deploy/`` from rank 0 (:func:`~qpeft.recover.saving.write_deploy`) after
    :func:`save_run`; a collective for a sharded student.

    A whole student (one process, ddp) is exported as it is. A sharded (fsdp2) one is dropped on
    every rank (``run.student`` becomes None, its memory freed), then rank 0 restores
    ``tmp/checkpoint`` into a fresh student read from ``run.options["model"]`` and exports it.

    Args:
        par: how the run is spread.
        run: the :class:`~qpeft.recover.pipeline.RecoverRun` (``student``, ``tokenizer``,
            ``options``, ``sizes``).
        tmp: the output folder on rank 0, None on the other ranks.

    Returns:
        The deploy record on rank 0, None on the other ranks.

    Raises:
        ValueError, OSError: rank 0 could not read the model or the checkpoint back (on every
            rank: the others raise a ``ValueError`` quoting rank 0's error).
    """
    dense_mb = run.sizes["dense_mb"]
    if not is_sharded(run.student):
        return None if tmp is None else write_deploy(run.student, run.tokenizer, tmp, dense_mb)
    run.student = None
    gc.collect()  # FSDP modules hold reference cycles: free the shards before the whole copy
    record, error = None, None
    if tmp is not None:
        try:
            student = restore(load_student(run.options["model"]), tmp / "checkpoint")
            record = write_deploy(student, run.tokenizer, tmp, dense_mb)
        except (ValueError, OSError) as err:
            error = err
        student = None
        gc.collect()
    par.agree(error)  # the other ranks wait here for rank 0's export
    return record
