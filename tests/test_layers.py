"""The package's layers import only downward, and the LeRobot plugin stands on LeRobot alone.

Every import in every module counts, at module level or inside a function: a lazy import is still a
dependency. Order, lowest first: core, io, families, models, pipelines, studies, cli.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "src" / "vlaprune"
PLUGIN = ROOT / "plugins" / "lerobot_policy_vlaprune" / "lerobot_policy_vlaprune"
LAYERS = ("core", "io", "families", "models", "pipelines", "studies", "cli")


def module_name(path: Path, top: Path) -> str:
    parts = list(path.relative_to(top.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, top: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``, relative imports resolved."""
    tree = ast.parse(path.read_text())
    package = module_name(path, top).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            # ``from vlaprune.models import shipped`` imports the module vlaprune.models.shipped
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "vlaprune" or len(parts) < 2 or parts[1] not in LAYERS:
        return None
    return LAYERS.index(parts[1])


def violations() -> list[str]:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = layer_of(module_name(path, PACKAGE))
        if own is None:  # the package root re-exports lazily; it is above every layer
            continue
        for line, module in imported_modules(path, PACKAGE):
            target = layer_of(module)
            if target is not None and target > own:
                bad.append(f"{path.relative_to(ROOT)}:{line} ({LAYERS[own]}) imports {module} ({LAYERS[target]})")
    return bad


def test_every_module_is_in_a_layer():
    loose = [p.name for p in PACKAGE.glob("*.py") if p.stem not in (*LAYERS, "__init__")]
    folders = [p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()]
    assert not loose, f"modules outside the layers: {loose}"
    assert sorted(folders) == sorted(layer for layer in LAYERS if layer != "cli")


def test_layers_import_only_downward():
    assert violations() == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: a core module importing a pipeline is reported."""
    fake = tmp_path / "vlaprune"
    (fake / "core").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "core" / "__init__.py").write_text("")
    (fake / "core" / "x.py").write_text("def f():\n    from vlaprune.pipelines import prune\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert violations() == ["vlaprune/core/x.py:2 (core) imports vlaprune.pipelines (pipelines)",
                            "vlaprune/core/x.py:2 (core) imports vlaprune.pipelines.prune (pipelines)"]


@pytest.mark.parametrize("path", sorted(PLUGIN.glob("*.py")), ids=lambda p: p.name)
def test_plugin_depends_on_lerobot_only(path):
    imports = [m for _, m in imported_modules(path, PLUGIN)]
    assert not [m for m in imports if m.split(".")[0] == "vlaprune"], f"{path.name} imports vlaprune"
