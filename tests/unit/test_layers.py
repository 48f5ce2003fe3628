"""The tree shows the data flow: api -> jobs -> (data, training) -> registry -> inference, over
storage and the shared vocabulary. A module never imports, at load time, a layer above its
own (imports inside functions and under TYPE_CHECKING are not load-time edges)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "service" / "tuneserve"

# Each part, and the parts it must not import when it loads.
ABOVE = {
    "vocabulary": ["api", "jobs", "data", "training", "registry", "inference", "storage"],
    "storage": ["api", "jobs", "data", "training", "registry", "inference"],
    "data": ["api", "jobs", "training", "registry", "inference"],
    "training": ["api", "jobs", "registry", "inference"],
    "registry": ["api", "jobs", "training", "inference"],
    "inference": ["api", "jobs", "training"],
    "jobs": ["api", "inference"],
}


def _part(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0].removesuffix(".py")


def _load_time_imports(tree: ast.Module) -> list[str]:
    """Modules imported at module level, outside `if TYPE_CHECKING:`."""
    found: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for child in [node] if not isinstance(node, ast.If | ast.Try) else ast.walk(node):
            if isinstance(child, ast.ImportFrom) and child.module:
                found.append(child.module)
            elif isinstance(child, ast.Import):
                found.extend(alias.name for alias in child.names)
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if _part(p) in ABOVE)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_a_layer_above_its_own(path: Path) -> None:
    tree = ast.parse(path.read_text())
    upward = [
        name
        for name in _load_time_imports(tree)
        for above in ABOVE[_part(path)]
        if name == f"tuneserve.{above}" or name.startswith(f"tuneserve.{above}.")
    ]
    assert not upward, f"{path.relative_to(PACKAGE)} imports {upward}"


def test_every_part_is_checked() -> None:
    assert {_part(p) for p in MODULES} == set(ABOVE)
