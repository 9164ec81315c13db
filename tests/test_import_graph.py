"""The package's import graph has no cycle, and its arrows run the way DESIGN.md section 2 says.

Every `import` / `from ... import` statement counts, including those inside functions: a
function-level import defers the cost, not the dependency (that is how io.py and export/ once
imported each other unnoticed).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import bitnet_train

PACKAGE_DIR = Path(bitnet_train.__file__).resolve().parent
PACKAGE = "bitnet_train"


def module_names() -> dict[str, Path]:
    out = {}
    for file in PACKAGE_DIR.rglob("*.py"):
        parts = [PACKAGE, *file.relative_to(PACKAGE_DIR).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = file
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports (explicit statements anywhere in the file)."""
    modules = module_names()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, file in modules.items():
        is_package = file.name == "__init__.py"
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    anchor = name.split(".")
                    anchor = anchor if is_package else anchor[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, *([base] if base else [])])
                # `from pkg import mod` imports the module pkg.mod; `from mod import f`, mod
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                           for a in node.names]
            for target in targets:
                while target and target not in modules:  # `import a.b.c` of a non-module c
                    target = target.rpartition(".")[0]
                if target.startswith(PACKAGE) and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    for root in sorted(graph):
        if root in state:
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_cycle_finder_finds_a_planted_cycle():
    """The checker itself: a cycle through a function-level import is found; a DAG passes."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_graph_sees_function_level_and_relative_imports(tmp_path, monkeypatch):
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import b\n")
    (pkg / "a.py").write_text("def f():\n    from bitnet_train.sub.b import g\n")
    (pkg / "sub" / "b.py").write_text("from ..a import f\nimport bitnet_train.sub\n")
    monkeypatch.setattr(f"{__name__}.PACKAGE_DIR", pkg)
    graph = import_graph()
    assert graph["bitnet_train.a"] == {"bitnet_train.sub.b"}
    assert graph["bitnet_train.sub.b"] == {"bitnet_train.a", "bitnet_train.sub"}
    assert graph["bitnet_train.sub"] == {"bitnet_train.sub.b"}
    assert find_cycle(graph) is not None


def test_the_package_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 40 and graph["bitnet_train.io"]  # the walk found the package
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def _imports_of(prefix: str) -> dict[str, set[str]]:
    return {m: deps for m, deps in import_graph().items()
            if m == prefix or m.startswith(prefix + ".")}


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("package, forbidden", [
    # DESIGN.md section 2: model imports no data, train or export; loading has one home (io),
    # which export never imports back; data knows nothing of the model; the CLIs are on top.
    ("bitnet_train.model", ("bitnet_train.data", "bitnet_train.train", "bitnet_train.export",
                            "bitnet_train.io")),
    ("bitnet_train.export", ("bitnet_train.io", "bitnet_train.train", "bitnet_train.export_cli",
                             "bitnet_train.cli")),
    ("bitnet_train.data", ("bitnet_train.model", "bitnet_train.train", "bitnet_train.export",
                           "bitnet_train.io")),
    ("bitnet_train.train", ("bitnet_train.export", "bitnet_train.export_cli", "bitnet_train.cli")),
])
def test_arrows_run_one_way(package, forbidden):
    wrong = sorted((m, d) for m, deps in _imports_of(package).items() for d in deps
                   if _within(d, forbidden))
    assert not wrong, wrong
