"""The layers import one way: kernels <- platform <- actors <- pipelines (DESIGN.md, "Layout").

Every import statement of every module is read (not executed), function-local imports included, so a
reversed dependency anywhere fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("kernels", "platform", "actors", "pipelines")  # each may import only those before it
THIRD_PARTY_FORBIDDEN = {"platform": ("ray",), "kernels": ("ray",)}  # platform/ and kernels/ never import Ray


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, relative imports resolved to raymoe.<layer>..."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside its own package
                out.append((node.lineno, f"raymoe.{path.relative_to(ROOT).parts[0]}"))
            elif node.module:
                out.append((node.lineno, node.module))
    return out


def _violations(layer: str) -> list[str]:
    allowed = set(LAYERS[: LAYERS.index(layer) + 1])
    bad = []
    for path in sorted((ROOT / layer).rglob("*.py")):
        for line, module in _imports(path):
            parts = module.split(".")
            if parts[0] == "raymoe" and len(parts) > 1 and parts[1] in LAYERS and parts[1] not in allowed:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
            if parts[0] in THIRD_PARTY_FORBIDDEN.get(layer, ()):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return bad


@pytest.mark.parametrize("layer", LAYERS)
def test_imports_run_one_way(layer: str) -> None:
    assert _violations(layer) == []


def test_the_check_sees_a_reversed_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reader finds imports inside functions too (where a reversed one would hide)."""
    module = tmp_path / "platform" / "x.py"
    module.parent.mkdir()
    module.write_text("def f():\n    from raymoe.actors.driver import GraphTrainer\n    import ray\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path, raising=False)
    globals()["ROOT"] = tmp_path
    try:
        assert _violations("platform") == [
            "platform/x.py:2 imports raymoe.actors.driver", "platform/x.py:3 imports ray",
        ]  # fmt: skip
    finally:
        globals()["ROOT"] = Path(__file__).resolve().parents[1]
