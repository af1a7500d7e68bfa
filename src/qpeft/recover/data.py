"""Text for recovery: stdlib docstrings harvested at run time, or a user's text / JSONL file.

Default corpus: the first paragraph (text up to the first blank line, whitespace collapsed) of the
docstrings (module, public classes, functions and methods) of every pure-Python standard-library
module and of the modules one level inside its packages. Sources are parsed with :mod:`ast`, never
imported, so harvesting runs no code.
The split is deterministic and seed-independent: a text goes to the eval set when the first byte of
its SHA-1 is below ``eval_fraction * 256``.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TextSplits", "stdlib_docstrings", "read_texts", "split_texts", "load_texts"]

# Packages whose docstrings are test fixtures, GUI demos or generated tables, not prose.
_SKIP = {
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "lib2to3",
    "pydoc_data",
    "ensurepip",
    "encodings",
}
MIN_WORDS = 4


@dataclass(frozen=True)
class TextSplits:
    """Deterministic train / validation / eval texts."""

    train: list[str]
    valid: list[str]
    eval: list[str]


def first_paragraph(doc: str) -> str:
    """The text of ``doc`` up to its first blank line, whitespace collapsed."""
    lines: list[str] = []
    for line in doc.strip().splitlines():
        if not line.strip():
            break
        lines.append(line.strip())
    return " ".join(" ".join(lines).split())


def _module_files() -> list[Path]:
    files: list[Path] = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in _SKIP:
            continue
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        origin = Path(spec.origin)
        files.append(origin)
        if origin.name == "__init__.py":
            files.extend(
                sorted(p for p in origin.parent.glob("*.py") if not p.name.startswith("_"))
            )
    return files


_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _docstrings(path: Path) -> list[str]:
    """Docstrings of the module and of its public classes, functions and methods."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return []
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, _DOCUMENTED) and not getattr(node, "name", "x").startswith("_"):
            doc = ast.get_docstring(node)
            if doc:
                docs.append(doc)
    return docs


def stdlib_docstrings() -> list[str]:
    """First paragraphs of stdlib docstrings (at least ``MIN_WORDS`` words), deduplicated,
    sorted."""
    texts = set()
    for path in _module_files():
        for doc in _docstrings(path):
            text = first_paragraph(doc)
            if len(text.split()) >= MIN_WORDS:
                texts.add(text)
    return sorted(texts)


def read_texts(path: str | Path) -> list[str]:
    """Texts from a file: ``.jsonl`` lines are objects with a ``"text"`` field (or JSON strings);
    any other file gives one text per non-empty line.

    Raises:
        ValueError: the file is missing or unreadable, a JSONL line is malformed (names the line),
            or the file holds no text.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read data file {str(path)!r}: {err}") from None
    texts = (
        [_jsonl_text(line, path, i) for i, line in enumerate(lines, 1) if line.strip()]
        if path.suffix == ".jsonl"
        else [line.strip() for line in lines if line.strip()]
    )
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"data file {str(path)!r} holds no text")
    return texts


def _jsonl_text(line: str, path: Path, number: int) -> str:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path.name} line {number}: not JSON ({err.msg})") from None
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and isinstance(item.get("text"), str):
        return item["text"]
    raise ValueError(
        f"{path.name} line {number}: expected a JSON string or an object with a 'text' string"
    )


def _bucket(text: str) -> float:
    return hashlib.sha1(text.encode("utf-8")).digest()[0] / 256.0


def split_texts(
    texts: list[str], eval_fraction: float = 0.25, valid_fraction: float = 0.1
) -> TextSplits:
    """Split ``texts`` by content hash into train / valid / eval (independent of order and seed).

    Raises:
        ValueError: fewer than 4 distinct texts, or a split comes out empty.
    """
    unique = sorted(set(texts))
    if len(unique) < 4:
        raise ValueError(f"need at least 4 distinct texts, got {len(unique)}")
    evals, valid, train = [], [], []
    for text in unique:
        b = _bucket(text)
        (
            evals if b < eval_fraction else valid if b < eval_fraction + valid_fraction else train
        ).append(text)
    if not train or not evals or not valid:
        # Tiny corpora: fall back to a positional split so every set gets something.
        evals, valid, train = (
            unique[0::4],
            unique[1::4],
            [t for i, t in enumerate(unique) if i % 4 > 1],
        )
    return TextSplits(train=train, valid=valid, eval=evals)


def load_texts(data: str | Path | None) -> TextSplits:
    """The splits of ``data`` (a file) or, when None, of the stdlib docstring corpus."""
    return split_texts(stdlib_docstrings() if data is None else read_texts(data))
