"""The package's import graph has no cycle (imports inside functions included, ``if TYPE_CHECKING:`` aside), and
``import loraswap`` changes nothing in the process: no environment variable, no optional package imported.

The graph is read from the source with ``ast``, so an import that only runs on some path (inside a function, a
lazy ``__getattr__``) counts as much as one at the top of a module.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import loraswap

PACKAGE = Path(loraswap.__file__).parent
OPTIONAL = (
    "accelerate", "diffusers", "fastapi", "httpx", "matplotlib", "optimum", "peft", "prometheus_client", "pydantic",
    "ray", "rich", "scipy", "starlette", "torchao", "transformers", "typer", "uvicorn", "huggingface_hub",
)  # fmt: skip


def _module_name(path: Path, package: Path) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(inner) for statement in node.body for inner in ast.walk(statement))
    return skipped


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (anywhere in its source).

    ``from X import n`` is an edge to ``X.n`` when that is a module, else to ``X`` (an attribute of its
    ``__init__``); ``X`` itself counts too unless it is a package that holds the importing module (already
    imported before it runs). ``import a.b`` is an edge to ``a.b`` and to the packages above it, the same way.
    """
    modules = {_module_name(path, package): path for path in package.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        skipped = _type_checking_nodes(tree)
        package_name = name if path.name == "__init__.py" else name.rpartition(".")[0]

        def holds_importer(module: str) -> bool:
            return name.startswith(module + ".")

        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            edges: set[str] = set()
            if isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    prefixes = [".".join(parts[:i]) for i in range(1, len(parts))]
                    edges.update(p for p in prefixes if not holds_importer(p))
                    edges.add(alias.name)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package_name.split(".")[: len(package_name.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                parts = source.split(".")
                edges.update(p for p in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if not holds_importer(p))
                for alias in node.names:
                    edges.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source)
            graph[name].update(edge for edge in edges if edge in modules and edge != name)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """The components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def test_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 40 and "loraswap.formats.locate" in graph["loraswap.adapter"]  # the parser sees the package
    assert strongly_connected(graph) == []


def test_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from . import b\n")
    (package / "b.py").write_text("def f():\n    from .a import g\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import x\n")
    (package / "d.py").write_text("from . import c\n")
    assert strongly_connected(import_graph(package)) == [["pkg.a", "pkg.b"]]


def test_import_loraswap_sets_no_environment_variable_and_imports_no_optional_package():
    script = (
        "import json, os, sys\n"
        "before = dict(os.environ)\n"
        "import torch\n"
        "after_torch = dict(os.environ)\n"
        "import loraswap\n"
        "changed = sorted(k for k in set(before) | set(os.environ) if os.environ.get(k) != after_torch.get(k))\n"
        "print(json.dumps({'env': changed, 'modules': sorted(sys.modules)}))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["env"] == []
    imported = {name.split(".")[0] for name in report["modules"]}
    assert sorted(imported & set(OPTIONAL)) == []
    assert "torch._dynamo" not in report["modules"]  # sets TORCHINDUCTOR_CACHE_DIR, and costs seconds
