"""The package's layering, checked on the sources: who may import whom (docs/DESIGN.md).

    kernels  <- ops  <- models  <- train  <- cli
                 ^  <- data    <-'
A kernel module imports only torch and triton (so another codebase can copy it whole); ops
never import models, data or train; models and data never import each other or train.
Imports inside functions count too: a lazy import is still an edge.
"""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fastmim"

# Layer of each top-level part of the package -> the fastmim layers it may import.
ALLOWED = {
    "kernels": set(),
    "ops": {"ops", "kernels", "environment"},
    "models": {"models", "ops"},
    "data": {"data", "ops"},
    "train": {"train", "models", "data", "ops", "errors"},
    "patch": {"patch", "models", "ops"},
    "cli": {"cli", "errors", "train", "ops"},
    "errors": set(),
    "environment": set(),
    "testing": {"testing", "ops"},
    "__init__": {"ops", "models", "patch"},
    "__main__": {"cli"},
}
KERNEL_IMPORTS = {"torch", "triton"} | set(sys.stdlib_module_names)
MAX_MODULE_LINES = 600  # docs/DESIGN.md: past this, a module holds more than one responsibility


def _layer(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0].removesuffix(".py")


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names += [(node.lineno, node.module)]
            if node.module == "fastmim":  # from fastmim import ops, models, ...
                names += [(node.lineno, f"fastmim.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError(f"{path}:{node.lineno}: relative import (the package uses absolute ones)")
    return names


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_import_follows_the_layers(path):
    layer = _layer(path)
    assert layer in ALLOWED, f"{path.relative_to(PACKAGE)}: part {layer!r} has no place in the layer table"
    for line, name in _imports(path):
        parts = name.split(".")
        if layer == "kernels" and parts[0] != "fastmim":
            assert parts[0] in KERNEL_IMPORTS, f"{path.name}:{line}: a kernel module imports {name}"
        if parts[0] != "fastmim" or len(parts) < 2:
            continue
        target = parts[1]
        if target in ("__version__",):
            continue
        assert target in ALLOWED[layer], (f"{path.relative_to(PACKAGE)}:{line} imports {name}: "
                                          f"{layer} may import only {sorted(ALLOWED[layer])}")


def test_environment_variables_are_read_in_one_place_and_documented():
    from fastmim import environment

    readme = (PACKAGE.parent / "README.md").read_text()
    for name in environment.VARIABLES:
        assert f"`{name}" in readme, f"{name} is missing from the README's table"
    for path in SOURCES:
        if path.name == "environment.py":
            continue
        for line_number, line in enumerate(path.read_text().splitlines(), 1):
            assert not (("os.environ" in line or "getenv" in line) and "FASTMIM_" in line), (
                f"{path.relative_to(PACKAGE)}:{line_number} reads a FASTMIM_ variable: use fastmim.environment")


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_is_over_600_lines(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, (f"{path.relative_to(PACKAGE)} has {lines} lines (at most {MAX_MODULE_LINES}): "
                                       f"split it by responsibility")
