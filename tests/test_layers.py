"""Every import inside the package points down the layer order of docs/architecture.md (or within one layer),
and no two modules import each other, even through function-level imports.

The table below is the one the architecture document draws; the test also checks that the document lists the
same layers in the same order, so the picture and the code cannot drift apart.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lowbit"

# Layers from the bottom up. A module belongs to the first entry whose prefix it starts with (longest wins).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("errors", "registry", "_version", "config", "protocol", "fileio", "memory", "report", "shards",
              "device", "threads")),
    ("formats", ("formats", "qtensor", "qmixed")),
    ("kernels", ("kernels",)),
    ("nn", ("nn",)),
    ("models", ("models", "architectures", "hub", "sharded_source", "summary", "state", "random_models",
                "native")),
    ("data", ("data", "hessian", "calibration", "sampling", "sensitivity", "adapters", "train", "eval")),
    ("steps", ("steps", "quantizers", "transforms", "compensate")),
    ("recipe", ("presets", "recipe", "targets")),
    ("checkpoints", ("manifest", "io", "streamed", "hf_integration", "export", "export_ct", "export_gguf")),
    ("api", ("api", "bench", "bench_report")),
    ("cli", ("cli", "__main__", "")),  # "" = the package root, lowbit/__init__.py, which re-exports the API
]


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def qualified(module: str) -> str:
    return f"lowbit.{module}" if module else "lowbit"


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".") or prefix == "") and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best is not None, f"lowbit.{module} is in no layer of tests/test_layers.py"
    return best


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """Package-relative names of the lowbit modules an ``import`` statement reads."""
    if node.level == 0:
        if not (node.module or "").startswith("lowbit"):
            return []
        base = node.module.split(".")[1:]
    else:
        here = module.split(".") if module else []
        package = here if is_package else here[:-1]
        base = package[: len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
    base_name = ".".join(base)
    # `from .. import kernels` runs the package's __init__ first: it imports the package as well as the submodule
    out = [base_name] if node.module is None else []
    for alias in node.names:  # `from . import adapters` imports a module; `from .x import name` reads x
        candidate = ".".join([*base, alias.name])
        out.append(candidate if (PACKAGE / Path(*candidate.split("."))).with_suffix(".py").exists()
                   or (PACKAGE / Path(*candidate.split("."))).is_dir() else base_name)
    return out


def imports() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):  # top level and inside functions
            if isinstance(node, ast.ImportFrom):
                targets.update(resolve(module, path.name == "__init__.py", node))
            elif isinstance(node, ast.Import):
                targets.update(a.name.split(".", 1)[1] if "." in a.name else "" for a in node.names
                               if a.name.split(".")[0] == "lowbit")
        graph[module] = {t for t in targets if t != module}
    return graph


def test_every_import_points_down():
    upward = []
    for module, targets in imports().items():
        for target in sorted(targets):
            if layer_of(target) > layer_of(module):
                upward.append(f"{qualified(module)} ({LAYERS[layer_of(module)][0]}) imports {qualified(target)} "
                              f"({LAYERS[layer_of(target)][0]})")
    assert not upward, "imports pointing up the layers:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = imports()
    state: dict[str, int] = {}
    cycles: list[str] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt):], nxt]) if nxt in stack else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_architecture_document_lists_the_same_layers():
    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    headings = re.findall(r"^### \d+\. (\w+)", doc, flags=re.M)
    assert headings == [name for name, _ in LAYERS], "docs/architecture.md and tests/test_layers.py disagree"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_module_size(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= 400, f"{path.relative_to(ROOT)} has {lines} lines; split it (one job per module)"
