"""Whether a saved ``qpeft recover`` state belongs to this run: its folder, options and
fingerprints.

A state records the run's options (every ``RecoverOptions`` field but ``progress``, paths made
absolute) and fingerprints: the model folder (its file names and sizes and ``config.json``), the
data file (its SHA-256; the default corpus: the Python version it is harvested from) and the
torch and transformers versions. ``--resume`` is refused, naming the first option or fingerprint
that differs, unless they are all equal.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.files import check_target

__all__ = [
    "FORMAT",
    "VERSION",
    "PHASES",
    "check_same_run",
    "fingerprints",
    "run_options",
    "state_folder",
]

PHASES = ("blockwise", "end-to-end")
FORMAT, VERSION = "qpeft-recover-state", 1

_NOT_COMPARED = ("progress",)  # options that do not change what a run computes


def state_folder(output: str | Path) -> Path:
    """The resume-state folder of a run writing ``output``: ``.<name>.qpeft-resume`` beside it.

    Raises:
        ValueError: ``output`` is refused as a save target (see ``check_target``).
    """
    path = check_target(output)
    return path.parent / f".{path.name}.qpeft-resume"


def fingerprints(opts: Any) -> dict[str, str]:
    """What the run reads besides its options (see the module docstring), of ``opts`` (a
    ``RecoverOptions`` whose model folder holds a ``config.json``)."""
    import transformers

    model = Path(opts.model)
    listing = sorted((p.name, p.stat().st_size) for p in model.iterdir() if p.is_file())
    digest = hashlib.sha256(repr(listing).encode())
    digest.update((model / "config.json").read_bytes())
    data = f"standard library docstrings of Python {sys.version.split()[0]}"
    if opts.data and Path(opts.data).is_file():
        text = hashlib.sha256()
        with open(opts.data, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                text.update(chunk)
        data = text.hexdigest()
    return {
        "model": digest.hexdigest(),
        "data": data,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def run_options(opts: Any) -> dict[str, Any]:
    """The options of ``opts`` (a ``RecoverOptions``) a state records and compares."""
    found = {k: v for k, v in asdict(opts).items() if k not in _NOT_COMPARED}
    found["model"] = str(Path(opts.model).resolve())
    found["data"] = str(Path(opts.data).resolve()) if opts.data else None
    return found


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_same_run(folder: Path, doc: dict[str, Any], options: dict, prints: dict) -> None:
    """Check that the state ``doc`` read from ``folder`` was saved by a run of these ``options``
    and fingerprints ``prints``.

    Raises:
        ValueError: one line naming the first option or fingerprint that differs, or saying that
            ``doc`` is no state of this format version.
    """
    if doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise ValueError(f"{folder} holds no qpeft recover state of format version {VERSION}")
    saved, saved_prints = doc.get("options") or {}, doc.get("fingerprints") or {}
    for name, value in options.items():
        if saved.get(name, object()) != value:
            raise ValueError(
                f"--resume: {_flag(name)} differs from the saved run's ({saved.get(name)!r} there, "
                f"{value!r} here); rerun with its options, or without --resume to start afresh"
            )
    for name in ("model", "data"):
        if saved_prints.get(name) != prints[name]:
            raise ValueError(
                f"--resume: {_flag(name)} {options[name]} changed since the state in {folder} was "
                "saved; rerun without --resume to start afresh"
            )
    for name in ("torch", "transformers"):
        if saved_prints.get(name) != prints[name]:
            raise ValueError(
                f"--resume: the state in {folder} was saved with {name} {saved_prints.get(name)}, "
                f"this is {name} {prints[name]}; resume with that version or start afresh"
            )
    if doc.get("phase") not in PHASES or not isinstance(doc.get("position"), (dict, type(None))):
        raise ValueError(f"{folder}: the saved phase or position is not readable")
