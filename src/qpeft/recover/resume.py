"""``qpeft recover --resume``: save a run's training state while it trains, continue it later.

Where: the state of a run writing ``--output DIR`` lives beside it, in
``.<name of DIR>.qpeft-resume/`` (``runs/recover`` -> ``runs/.recover.qpeft-resume``), written by
:mod:`.state_files` (atomic: a kill during a save leaves the previous state whole). A run saves a
state when each phase (``blockwise``, ``end-to-end``) starts and every ``--save-every`` steps of
it; the state is removed once the output folder is written. A run without ``--resume`` replaces
an existing state at its first save (until then the old one stays).

What: ``state.json`` holds the phase and the position in it (block and step, or step), the loop's
counters (block report so far, losses, early-stopping best / waited count / validation losses),
the optimizer's and scheduler's ``state_dict`` (tensors by reference), the metrics, times and
reports of the stages already done, Python's RNG state, the run's options and fingerprints of its
model folder, data file and library versions. ``tensors.safetensors`` holds the trainable
parameters only (the adapters: the frozen base is rebuilt), the optimizer tensors, the best
snapshot, the batch-order generator and torch's RNG state.

Resume: the student is rebuilt as before (load, quantize, attach: deterministic for a seed), the
stages done are taken from the state (not evaluated again), the saved parameters and RNG states
are loaded when the saved phase starts again, and its loop continues after the saved step with
the same batch order; a resumed run ends with the same adapters and report as an uninterrupted
one. Under ``torch.distributed`` a save would gather the full parameters and optimizer state and
rank 0 would write them (:meth:`RunState.save` is the only writer).
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .resume_check import (
    FORMAT,
    PHASES,
    VERSION,
    check_same_run,
    fingerprints,
    run_options,
    state_folder,
)
from .state_files import (
    join_state,
    read_state,
    remove_state,
    split_state,
    unexpected_in_state,
    write_state,
)

__all__ = ["PHASES", "PhaseState", "RunState", "Saved", "open_state", "start_phase", "state_folder"]

#: RecoverRun fields a state carries (the report of the stages already done).
RUN_FIELDS = (
    "stages",
    "seconds",
    "layer_error",
    "block_error",
    "block_losses",
    "train_losses",
    "valid_losses",
    "early_stopping",
)


def open_state(output: str | Path, opts: Any, resume: bool, every: int) -> RunState:
    """The state of the run writing ``output`` with options ``opts`` (a ``RecoverOptions``).

    Args:
        resume: continue the state saved in :func:`state_folder` of ``output`` (else start afresh;
            an existing state is replaced at the first save).
        every: save every ``every`` steps of a phase (0: only when a phase starts).

    Raises:
        ValueError: ``resume`` without a saved state (names the folder), a saved state of other
            options (names the first option that differs), of a changed model folder or data
            file, of other library versions, or one that cannot be read.
        FileExistsError: the state folder holds files that no state save wrote.
    """
    folder = state_folder(output)
    options, prints = run_options(opts), fingerprints(opts)
    state = RunState(folder, every, options, prints)
    if folder.is_dir() and not folder.is_symlink():
        foreign = unexpected_in_state(folder)
        if foreign:
            raise FileExistsError(
                f"{folder} holds {', '.join(foreign[:5])}, which no qpeft recover state holds; "
                "move them away"
            )
    if not resume:
        return state
    found = read_state(folder)
    if found is None:
        raise ValueError(
            f"--resume: no saved state in {folder} (the run finished or never saved one); run "
            "without --resume"
        )
    check_same_run(folder, found[0], options, prints)
    state.doc, state.tensors = found
    return state


@contextlib.contextmanager
def _checked(folder: Path) -> Iterator[None]:
    """Turn what reading a damaged state raises into one ValueError naming the folder."""
    try:
        yield
    except (KeyError, TypeError, IndexError, ValueError, RuntimeError) as err:
        raise ValueError(
            f"the state in {folder} is damaged ({type(err).__name__}: {err}); rerun without "
            "--resume to start afresh"
        ) from None


class Saved:
    """A phase's saved position, loop state (``extra``, tensors included) and trainer state."""

    def __init__(self, folder: Path, doc: dict[str, Any], tensors: dict[str, torch.Tensor]):
        self.folder = folder
        with self.checked():
            self.position: dict[str, int] = dict(doc["position"])
            self.extra: dict[str, Any] = join_state(doc["extra"], tensors)
            self._trainer = join_state(doc["trainer"], tensors)

    def checked(self) -> contextlib.AbstractContextManager[None]:
        """A block in which a damaged state's KeyError, TypeError... become one ValueError."""
        return _checked(self.folder)

    def load(self, opt: torch.optim.Optimizer, sched: Any) -> int:
        """Load the optimizer and scheduler state; return the steps of the loop already done."""
        with self.checked():
            opt.load_state_dict(self._trainer["optimizer"])
            sched.load_state_dict(self._trainer["scheduler"])
            return int(self.position["step"])


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


class PhaseState:
    """What a training loop of one phase sees: ``saved`` (None: start afresh), ``due(step)`` and
    ``save(...)``; ``skip`` when the saved run had finished the phase; ``started`` its clock."""

    def __init__(self, run: RunState | None, name: str, saved: Saved | None, elapsed: float):
        self.run, self.name, self.saved = run, name, saved
        self.skip = False
        self.started = time.perf_counter() - elapsed

    def due(self, step: int) -> bool:
        """Whether the loop saves after its step ``step`` (1-based)."""
        return self.run is not None and self.run.every > 0 and step % self.run.every == 0

    def save(self, position: dict[str, int], opt: Any, sched: Any, extra: dict[str, Any]) -> None:
        """Save the run now, in this phase at ``position`` with the loop's ``extra`` state."""
        if self.run is not None:
            trainer = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
            self.run.save(self.name, position, trainer, extra, time.perf_counter() - self.started)


class RunState:
    """The saved state of one run (see the module docstring); made by :func:`open_state`."""

    def __init__(self, folder: Path, every: int, options: dict, fingerprints: dict) -> None:
        self.folder, self.every = folder, every
        self.options, self.fingerprints = options, fingerprints
        self.doc: dict[str, Any] | None = None  # the state to resume, until its phase starts
        self.tensors: dict[str, torch.Tensor] = {}
        self.run: Any = None
        self.student: nn.Module | None = None
        self.saves = 0

    def describe(self) -> str:
        """Where the saved run stopped, in words."""
        if self.doc is None:
            return f"nothing saved in {self.folder}"
        position = self.doc["position"]
        where = ", ".join(f"{k} {v}" for k, v in position.items()) if position else "its start"
        return f"the {self.doc['phase']} phase at {where} (state in {self.folder})"

    def restore_run(self, run: Any) -> None:
        """Give ``run`` the saved report of the stages already done; later saves include it."""
        self.run = run
        if self.doc is None:
            return
        with _checked(self.folder):
            report = self.doc["run"]
            for name in RUN_FIELDS:
                setattr(run, name, report[name])
            run.valid_losses = [tuple(v) for v in run.valid_losses]

    def phase(self, name: str, student: nn.Module) -> PhaseState:
        """Start phase ``name`` on ``student``: resume it from the saved state (its parameters
        and RNG states loaded), skip it (the saved run had finished it), or save a new state.

        Raises:
            ValueError: the saved parameters do not fit the student's trainable ones.
        """
        self.student = student
        doc = self.doc
        if doc is not None and PHASES.index(doc["phase"]) > PHASES.index(name):
            state = PhaseState(self, name, None, 0.0)
            state.skip = True
            return state
        if doc is None or doc["phase"] != name:
            state = PhaseState(self, name, None, 0.0)
            self.save(name, None, None, {}, 0.0)
            return state
        self.doc = None
        self._load_student(student)
        with _checked(self.folder):
            torch.set_rng_state(self.tensors["rng.torch"])
            version, values, gauss = doc["rng"]["python"]
            random.setstate((version, tuple(values), gauss))
        saved = None if doc["position"] is None else Saved(self.folder, doc, self.tensors)
        return PhaseState(self, name, saved, float(doc.get("elapsed", 0.0)))

    def _load_student(self, student: nn.Module) -> None:
        params = _trainable(student)
        saved = {k[len("param.") :]: t for k, t in self.tensors.items() if k.startswith("param.")}
        wrong = sorted(set(params) ^ set(saved)) or [
            n for n, p in params.items() if p.shape != saved[n].shape or p.dtype != saved[n].dtype
        ]
        if wrong:
            raise ValueError(
                f"the state in {self.folder} does not fit the student (parameter {wrong[0]!r}); "
                "rerun without --resume to start afresh"
            )
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])

    def save(
        self,
        phase: str,
        position: dict[str, int] | None,
        trainer: dict[str, Any] | None,
        extra: dict[str, Any],
        elapsed: float,
    ) -> None:
        """Write the state: phase, position, loop and trainer state, the student's trainable
        parameters, the run's report so far and the RNG states."""
        tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
        for name, p in _trainable(self.student).items():
            tensors[f"param.{name}"] = p.detach().clone()
        version, values, gauss = random.getstate()
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "options": self.options,
            "fingerprints": self.fingerprints,
            "phase": phase,
            "position": position,
            "elapsed": elapsed,
            "run": {name: getattr(self.run, name, None) for name in RUN_FIELDS},
            "rng": {"python": [version, list(values), gauss]},
            "extra": split_state(extra, "extra", tensors),
            "trainer": split_state(trainer, "trainer", tensors),
        }
        write_state(self.folder, doc, tensors)
        self.saves += 1

    def finish(self) -> None:
        """Remove the state folder (the run's output is written)."""
        remove_state(self.folder)


def start_phase(state: RunState | None, name: str, student: nn.Module) -> PhaseState:
    """``state.phase(name, student)``, or a phase that never saves when ``state`` is None."""
    return PhaseState(None, name, None, 0.0) if state is None else state.phase(name, student)
