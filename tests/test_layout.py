"""The package map: dependencies between qpeft's packages point one way, and no module is too
long."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "qpeft"
ORDER = [
    "core",
    "quant",
    "lora",
    "parallel",
    "checkpoint",
    "recover",
]  # each may import earlier ones
MAX_LINES = 320  # "about 300"


def _package(path: Path) -> str:
    rel = path.relative_to(SRC).parts
    return rel[0] if len(rel) > 1 else "<root>"


def _imported_packages(path: Path) -> set[str]:
    """qpeft packages that ``path`` imports (relative or absolute imports)."""
    tree = ast.parse(path.read_text())
    here = list(path.relative_to(SRC).parent.parts)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = here[: len(here) - (node.level - 1)] + (
                    node.module.split(".") if node.module else []
                )
                if not parts and node.module is None:  # "from . import x" at the root
                    parts = [a.name for a in node.names]
            elif node.module and node.module.split(".")[0] == "qpeft":
                parts = node.module.split(".")[1:]
            else:
                continue
            if parts:
                found.add(parts[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                bits = alias.name.split(".")
                if bits[0] == "qpeft" and len(bits) > 1:
                    found.add(bits[1])
    return found


def test_packages_depend_in_one_direction():
    bad = []
    for path in SRC.rglob("*.py"):
        pkg = _package(path)
        if pkg not in ORDER:
            continue
        allowed = set(ORDER[: ORDER.index(pkg) + 1])
        for dep in _imported_packages(path) - allowed:
            if dep in ORDER:
                bad.append(f"{path.relative_to(SRC)} imports qpeft.{dep}")
    assert not bad, bad


def test_root_holds_only_the_public_api_and_the_command_line():
    assert sorted(p.name for p in SRC.glob("*.py")) == ["__init__.py", "__main__.py", "cli.py"]
    assert sorted(
        p.name for p in SRC.iterdir() if p.is_dir() and p.name != "__pycache__"
    ) == sorted(ORDER)


def test_modules_stay_short():
    long = [
        f"{p.relative_to(SRC)}: {n}"
        for p in SRC.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    ]
    assert not long, long
