"""docs/architecture.md's module map stays true: every fusion_core module is in it, each imports only from layers
above its own (so the import graph has no cycle), and none imports one of ours inside a function."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fusion_core"


def documented_layers() -> dict[str, int]:
    rows = re.findall(r"^\| (\d+) \| (\w+) \|", (ROOT / "docs" / "architecture.md").read_text(), re.MULTILINE)
    return {module: int(layer) for layer, module in rows}


def our_imports(module: str) -> tuple[set[str], list[str]]:
    """The fusion_core modules ``module`` imports, and those it imports inside a function."""
    found, inside = set(), []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom) and child.level == 1:
                names = [child.module.split(".")[0]] if child.module else [alias.name for alias in child.names]
                found.update(names)
                if in_function:
                    inside.extend(names)
            visit(child, nested)

    visit(ast.parse((PACKAGE / f"{module}.py").read_text()), False)
    return found, inside


def test_every_module_is_in_the_map_and_imports_only_from_the_layers_above_it():
    layers = documented_layers()
    modules = {path.stem for path in PACKAGE.glob("*.py") if path.stem not in ("__init__", "__main__")}
    assert set(layers) == modules, "docs/architecture.md lists other modules than fusion_core has"
    wrong = []
    for module in sorted(modules):
        found, inside = our_imports(module)
        wrong += [
            f"{module} ({layers[module]}) imports {other} ({layers[other]})"
            for other in found
            if other in layers and layers[other] >= layers[module]
        ]
        wrong += [f"{module} imports {other} inside a function" for other in inside]
    assert not wrong, wrong


def test_the_check_sees_an_import_that_goes_down_the_layers(tmp_path, monkeypatch):
    # the check itself: a module that imports one from a lower layer (here cli, the lowest) is reported
    fake = tmp_path / "fusion_core"
    fake.mkdir()
    (fake / "errors.py").write_text("from .cli import main\n\ndef f():\n    from .config import Settings\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    found, inside = our_imports("errors")
    layers = documented_layers()
    assert found == {"cli", "config"} and inside == ["config"]
    assert layers["cli"] > layers["errors"]
