"""The house rules of the source tree: every module imports on its own, imports point one way, no circles.

These guard the layout DESIGN.md fixes: ``pipeline -> fusion -> probe -> extract`` (a package imports only
itself and the packages after it), no import circle between our files, and no module past ~600 lines.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["pipeline", "fusion", "probe", "extract"]  # each may import only itself and those after it
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    """Every module of the four packages by dotted name (a package by its ``__init__``)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Our modules that ``name`` imports anywhere in its file (top level or inside functions)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets.add(module)
            targets.update(f"{module}.{alias.name}" for alias in node.names)
    return {target for target in targets if target in MODULES and target != name}


def test_every_module_imports_on_its_own_in_a_fresh_interpreter():
    """Each module is imported first, alone: a circle that only works in one import order fails here.

    One interpreter loads the third-party libraries once, then forks a child per module, so each child
    starts with none of our modules imported (as a fresh interpreter would) without paying torch's import.
    """
    script = textwrap.dedent("""
        import os, sys, traceback
        import numpy, torch, zarr, click, yaml  # third-party only: none of ours is imported before the fork
        failed = []
        for name in sys.argv[1:]:
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(read)
                try:
                    __import__(name)
                    code = 0
                except BaseException:
                    os.write(write, traceback.format_exc(limit=3).encode()[-2000:])
                    code = 1
                os._exit(code)
            os.close(write)
            with os.fdopen(read, "rb") as stream:
                message = stream.read().decode()
            _, status = os.waitpid(pid, 0)
            if status:
                failed.append(f"{name}: {message.strip().splitlines()[-1] if message else status}")
        print("\\n".join(failed))
        sys.exit(1 if failed else 0)
    """)
    result = subprocess.run([sys.executable, "-c", script, *MODULES], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"modules that fail to import on their own:\n{result.stdout}{result.stderr[-2000:]}"


def test_imports_point_one_way_pipeline_fusion_probe_extract():
    wrong = []
    for name, path in MODULES.items():
        rank = PACKAGES.index(name.split(".")[0])
        for target in _imports(name, path):
            if PACKAGES.index(target.split(".")[0]) < rank:
                wrong.append(f"{name} imports {target}")
    assert not wrong, "imports must point pipeline -> fusion -> probe -> extract:\n" + "\n".join(sorted(wrong))


def test_no_import_circle_between_our_files():
    graph = {name: _imports(name, path) for name, path in MODULES.items()}
    # A package's __init__ re-exporting its submodules is not a circle; a submodule importing its own package is.
    circles, index, low, stack, on_stack, counter = [], {}, {}, [], set(), [0]

    def visit(node):  # Tarjan's strongly connected components
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for node in graph:
        if node not in index:
            visit(node)
    assert not circles, "import circles: " + "; ".join(" <-> ".join(c) for c in circles)


@pytest.mark.parametrize("package", PACKAGES)
def test_no_module_is_past_the_size_a_reader_can_hold(package):
    long = {name: n for name, path in MODULES.items() if name.split(".")[0] == package
            and (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by concept): {long}"
