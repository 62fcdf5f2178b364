"""Dependencies flow one way: routing -> dispatch -> experts -> layer -> models. Read from the
source (every ``import`` statement, including ones inside functions), so a lazy import cannot
hide an upward dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import moesaic

ROOT = Path(moesaic.__file__).parent

# package -> packages it must never import
FORBIDDEN = {
    "routing": ("moesaic.dispatch", "moesaic.experts", "moesaic.kernels", "moesaic.layer"),
    "dispatch": ("moesaic.experts", "moesaic.kernels", "moesaic.layer"),
    "experts": ("moesaic.kernels", "moesaic.layer", "moesaic.models"),
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_module_imports_upward(package):
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in _imports(path):
            if name.startswith(FORBIDDEN[package]):
                bad.append(f"{path.relative_to(ROOT.parent)} imports {name}")
    assert not bad, "\n".join(bad)


def test_the_core_names_the_kernel_package_only_as_a_plugin_string():
    """Nothing outside moesaic/kernels/ imports it; the backend registry loads it by name."""
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        if "kernels" in path.relative_to(ROOT).parts:
            continue
        bad += [f"{path} imports {n}" for n in _imports(path) if n.startswith("moesaic.kernels")]
    assert not bad, "\n".join(bad)
