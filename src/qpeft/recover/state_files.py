"""The folder of a ``qpeft recover`` resume state: ``state.json`` and ``tensors.safetensors``.

A state is one JSON document and named tensors. Nested training state (an optimizer's or a
scheduler's ``state_dict``, a loop's counters and tensors) is split by :func:`split_state` into
JSON, where every tensor becomes ``{"tensor": key}`` and every dict ``{"items": [[key, value],
...]}`` (integer keys stay integers), and the tensors stored under their keys; :func:`join_state`
puts it back together (tuples come back as lists).

The folder is written by :func:`qpeft.checkpoint.files.atomic_directory` (temporary folder, then
renames, under the folder's lock): a process killed during a save leaves the previous state whole,
and the next save or read repairs what the kill left. The folder is replaced only when it holds
nothing but these two files.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.files import _backup, atomic_directory, read_json, reading, write_json
from ..checkpoint.locks import locked
from ..checkpoint.tensor_files import read_tensors, write_tensors

__all__ = [
    "STATE_FILE",
    "TENSOR_FILE",
    "join_state",
    "read_state",
    "remove_state",
    "split_state",
    "unexpected_in_state",
    "write_state",
]

STATE_FILE = "state.json"
TENSOR_FILE = "tensors.safetensors"
_KIND = "a qpeft recover resume state"


def unexpected_in_state(folder: Path) -> list[str]:
    """Entries of ``folder`` that a state save does not write (symbolic links included)."""
    return sorted(
        name
        for name in os.listdir(folder)
        if name not in (STATE_FILE, TENSOR_FILE) or (folder / name).is_symlink()
    )


def split_state(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``obj`` as JSON, its tensors copied into ``tensors`` under keys starting with ``key``.

    Raises:
        TypeError: ``obj`` holds something that is not a tensor, dict, list, tuple, str, number,
            bool or None, or a dict key that is not a str or int.
    """
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().clone().contiguous()  # clone: no storage shared in the file
        return {"tensor": key}
    if isinstance(obj, dict):
        bad = [k for k in obj if not isinstance(k, (str, int)) or isinstance(k, bool)]
        if bad:
            raise TypeError(f"state key {bad[0]!r} under {key!r} is not a str or an int")
        return {"items": [[k, split_state(v, f"{key}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [split_state(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot save a {type(obj).__name__} under {key!r} in a resume state")


def join_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`split_state`.

    Raises:
        ValueError: a node is neither JSON nor one of the two wrappers, or names a missing tensor.
    """
    if isinstance(obj, dict):
        if set(obj) == {"tensor"} and obj["tensor"] in tensors:
            return tensors[obj["tensor"]]
        if set(obj) == {"items"} and isinstance(obj["items"], list):
            pairs = obj["items"]
            if all(isinstance(p, list) and len(p) == 2 for p in pairs):
                return {k: join_state(v, tensors) for k, v in pairs}
        raise ValueError(f"unreadable entry {str(obj)[:80]}")
    if isinstance(obj, list):
        return [join_state(v, tensors) for v in obj]
    return obj


def write_state(folder: Path, doc: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Replace the state in ``folder`` with ``doc`` and ``tensors``, all or nothing.

    Raises:
        FileExistsError: ``folder`` holds files a state save did not write.
        PermissionError: its parent cannot be written.
    """
    with atomic_directory(folder, _KIND, unexpected_in_state) as tmp:
        write_tensors(tmp / TENSOR_FILE, tensors)
        write_json(tmp / STATE_FILE, doc)


def read_state(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """The document and tensors of the state in ``folder``; None when there is none.

    Raises:
        ValueError: ``state.json`` is not a JSON object, or the tensor file is damaged (names it).
    """
    with reading(folder, unexpected_in_state) as path:
        if not (path / STATE_FILE).is_file():
            return None
        doc = read_json(path / STATE_FILE)
        if not isinstance(doc, dict):
            raise ValueError(f"{path / STATE_FILE} is not a qpeft recover state")
        return doc, read_tensors(path / TENSOR_FILE)


def remove_state(folder: Path) -> None:
    """Delete the state in ``folder`` (and a backup a killed save left), under its lock; a folder
    holding anything a save did not write is left alone."""
    if not folder.parent.is_dir():
        return
    with locked(folder, shared=False):
        for path in (folder, _backup(folder)):  # the backup name of atomic_directory's swap
            if path.is_dir() and not path.is_symlink() and not unexpected_in_state(path):
                shutil.rmtree(path)
