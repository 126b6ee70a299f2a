"""The import chain of ARCHITECTURE.md holds: no module imports from a layer below its own."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "cps"


def layers() -> dict[str, int]:
    """Module prefix (e.g. 'stages.prune', 'data') -> its layer, from ARCHITECTURE.md's chain."""
    text = (REPO / "ARCHITECTURE.md").read_text(encoding="utf-8")
    block = re.search(r"```layers\n(.*?)```", text, re.S)
    assert block, "ARCHITECTURE.md has no ```layers block"
    return {name: index for index, line in enumerate(block[1].splitlines()) for name in line.split()}


def layer_of(module: str, table: dict[str, int]) -> int:
    """The layer of 'cps.stages.prune' etc.: its longest prefix in the table."""
    parts = module.removeprefix("cps.").split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in table:
            return table[".".join(parts[:end])]
    raise AssertionError(f"{module} is in no layer of ARCHITECTURE.md")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every cps import, in functions too, but not under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for statement in block.body
        for node in ast.walk(statement)
    }
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "cps":
            if node.module == "cps":  # from cps import tracking
                found += [(node.lineno, f"cps.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("cps.")]
    return found


def test_every_import_points_down_the_chain():
    table = layers()
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module, found = module_name(path), imports(path)
        if module == "cps" or not found:  # the root, or a package's empty __init__
            continue
        here = layer_of(module, table)
        for line, imported in found:
            if layer_of(imported, table) > here:
                upward.append(f"{path.relative_to(REPO)}:{line} {module} imports {imported}")
    assert not upward, "imports up the chain of ARCHITECTURE.md:\n" + "\n".join(upward)


def test_the_checker_sees_an_upward_import(tmp_path):
    table = layers()
    source = tmp_path / "fake.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "from cps.stages.sweep import run_sweep\n"
        "if TYPE_CHECKING:\n    from cps.cli import app\n"
        "def f():\n    from cps import report\n"
    )
    found = dict(imports(source))
    assert found == {2: "cps.stages.sweep", 6: "cps.report"}  # typing-only imports do not count
    assert layer_of("cps.stages.sweep", table) > layer_of("cps.runs", table) > layer_of("cps.data", table)
    assert layer_of("cps.evaluation.hidden", table) == layer_of("cps.evaluation", table)
