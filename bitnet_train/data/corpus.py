"""A small real-English corpus that ships with Python: its documentation, as jsonl shards.

For demos and tests that must run offline: about 1.7 M characters of English prose and code
examples, from
- `pydoc_data.topics.topics`: the language reference and library topics `help()` shows;
- the docstrings of the standard library's pure-Python modules: one document per module
  (module docstring, then its public functions' docstrings under their signatures) and one
  per public class (class docstring, then its public methods').

Docstrings are read from the source with `ast`, never by importing: importing the whole
standard library would run side effects (`antigravity` opens a browser, `this` prints, GUI
toolkits load, atexit hooks register) and take far longer. Modules are enumerated with
`pkgutil.iter_modules` per directory, in sorted order, so the corpus is the same on every run
of the same Python. GUI, test, packaging-internal and site-packages trees are skipped.
"""

from __future__ import annotations

import ast
import json
import pkgutil
import sysconfig
from collections.abc import Iterator
from pathlib import Path

SKIPPED_PACKAGES = frozenset({
    "test", "tests", "idlelib", "tkinter", "turtledemo", "turtle", "lib2to3", "ensurepip",
    "site-packages", "dist-packages", "pydoc_data", "antigravity", "this", "__phello__",
    "__main__", "__hello__", "venv",
})
"""Module or package names never read: GUI, tests, easter eggs, bundled wheels, and
pydoc_data (read separately, as topics)."""


def stdlib_sources() -> list[tuple[str, Path]]:
    """(dotted module name, source file) of the pure-Python standard library, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found: list[tuple[str, Path]] = []

    def walk(directory: Path, prefix: str) -> None:
        for info in sorted(pkgutil.iter_modules([str(directory)]), key=lambda m: m.name):
            if info.name in SKIPPED_PACKAGES or info.name.startswith("_"):
                continue  # private modules mostly repeat their public façade's docs
            dotted = prefix + info.name
            if info.ispkg:
                init = directory / info.name / "__init__.py"
                if init.is_file():
                    found.append((dotted, init))
                walk(directory / info.name, dotted + ".")
            else:
                path = directory / f"{info.name}.py"
                if path.is_file():  # skips compiled extension modules
                    found.append((dotted, path))

    walk(root, "")
    return found


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    return f"{node.name}({ast.unparse(node.args)})"


def _is_public(name: str) -> bool:
    return not name.startswith("_") or name == "__init__"


def _function_docs(body: list[ast.stmt]) -> list[str]:
    out = []
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _is_public(node.name):
            doc = ast.get_docstring(node)
            if doc:
                out.append(f"{_signature(node)}\n{doc}")
    return out


def module_documents(module: str, source: bytes) -> Iterator[tuple[str, str]]:
    """(id, text) documents of one module's source: the module, then each public class."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # a file for another Python version; not documentation
        return
    parts = [p for p in [ast.get_docstring(tree), *_function_docs(tree.body)] if p]
    if parts:
        yield f"module:{module}", f"Module {module}\n\n" + "\n\n".join(parts)
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and _is_public(node.name):
            parts = [p for p in [ast.get_docstring(node), *_function_docs(node.body)] if p]
            if parts:
                yield f"class:{module}.{node.name}", (
                    f"class {module}.{node.name}\n\n" + "\n\n".join(parts))


def python_docs_documents() -> Iterator[tuple[str, str]]:
    """Every (id, text) document of the corpus, in a fixed order."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield f"topic:{key}", topics[key].strip()
    for module, path in stdlib_sources():
        yield from module_documents(module, path.read_bytes())


def write_python_docs_corpus(out_dir: str | Path, num_shards: int = 4) -> list[Path]:
    """Write the corpus as `num_shards` jsonl files of {"id", "text"} records; return their paths.

    Documents go round-robin to shards, so shards have similar sizes. Takes a few seconds
    (parsing ~550 source files).
    """
    if num_shards <= 0:
        raise ValueError(f"num_shards={num_shards} must be positive")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"python-docs-{i:05d}-of-{num_shards:05d}.jsonl" for i in range(num_shards)]
    files = [p.open("w", encoding="utf-8") for p in paths]
    try:
        for i, (doc_id, text) in enumerate(python_docs_documents()):
            record = json.dumps({"id": doc_id, "text": text}, ensure_ascii=False)
            files[i % num_shards].write(record + "\n")
    finally:
        for f in files:
            f.close()
    return paths
