"""The layout's dependency rules, checked on the source with `ast` (no imports
run): the ML core (training/core/) imports neither `search` nor Django;
`search` imports nothing of training but the core and training.models; only
search/hnsw.py builds an index name; the job kernel imports no tasks module
and no feature module; tasks are one-line wrappers; and the import graph of
cbirsite/, search/ and training/ has no circle.

`python -m tests.test_layers` prints the graph's circles (none), the import
arrows between search/ and training/, the functions over 60 lines and the
lines per module."""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("cbirsite", "search", "training")

# The ML core: every module under training/core/ (networks, preprocessing, losses,
# samplers, the loop, objectives, the trainer, the plan, head training, distributed, inference).
ML_CORE = ("training.core",)
# What of training `search` may import: the core and the model rows.
SEARCH_MAY_IMPORT_FROM_TRAINING = ("training.core", "training.models")
KERNEL = ("search.jobs", "search.runner", "search.broker", "search.worker")
# What the kernel may import from the project: itself, its own rows and the Celery app.
KERNEL_MAY_IMPORT = {*KERNEL, "search.models", "cbirsite.celery"}
TASK_MODULES = ("search.tasks", "training.tasks")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "migrations" not in path.parts:
                found[module_name(path)] = path
    return found


def imports_of(path: Path, modules: dict[str, Path]) -> Iterator[tuple[str, int]]:
    """(imported project module, line) for every import in the file, those
    inside functions included. `from a import b` counts as a.b when that is a module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] not in PACKAGES:
                continue
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                yield (candidate if candidate in modules else base), node.lineno


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: {target for target, _ in imports_of(path, modules) if target in modules and target != name}
            for name, path in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10_000)

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
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
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _inside(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_the_import_graph_has_no_circle():
    assert circles(import_graph()) == []


def test_the_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def third_party_imports(path: Path) -> Iterator[tuple[str, int]]:
    """(top-level package, line) of every absolute import in the file, those inside functions included."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0], node.lineno
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            yield node.module.split(".")[0], node.lineno


def test_the_ml_core_covers_every_module_under_training_core():
    core = sorted(name for name in project_modules() if _inside(name, ML_CORE))
    assert "training.core.trainer" in core and "training.core.head_training" in core and len(core) > 20
    assert all(path.is_relative_to(ROOT / "training" / "core")
               for name, path in project_modules().items() if name in core)


def test_the_ml_core_imports_neither_search_nor_django():
    modules = project_modules()
    offending = [f"{name} imports {target} (line {line})"
                 for name, path in modules.items() if _inside(name, ML_CORE)
                 for target, line in imports_of(path, modules)
                 if not _inside(target, ML_CORE)]
    offending += [f"{name} imports {package} (line {line})"
                  for name, path in modules.items() if _inside(name, ML_CORE)
                  for package, line in third_party_imports(path) if package in ("django", "search", "cbirsite")]
    assert offending == []


def test_the_layer_check_sees_a_django_import_inside_a_function(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from django.conf import settings\n    return settings\n")
    assert ("django", 2) in list(third_party_imports(module))


def test_search_imports_only_the_core_and_the_model_rows_of_training():
    modules = project_modules()
    offending = [f"{name} imports {target} (line {line})"
                 for name, path in modules.items() if _inside(name, ("search",))
                 for target, line in imports_of(path, modules)
                 if _inside(target, ("training",)) and not _inside(target, SEARCH_MAY_IMPORT_FROM_TRAINING)]
    assert offending == []


def test_only_search_hnsw_builds_an_index_name():
    """The index name's text appears in no other module: every other one asks search.hnsw.index_name."""
    builders = sorted(name for name, path in project_modules().items()
                      if "search_embedding_hnsw" in path.read_text() and name != "search.hnsw")
    assert builders == []


@pytest.mark.parametrize("module", KERNEL)
def test_the_job_kernel_imports_no_tasks_and_no_feature_module(module):
    modules = project_modules()
    imported = {target for target, _ in imports_of(modules[module], modules)}
    assert imported <= KERNEL_MAY_IMPORT, imported - KERNEL_MAY_IMPORT


def test_nothing_imports_a_tasks_module_but_celery():
    """Jobs are sent by registered task name, so no module needs the task objects."""
    modules = project_modules()
    importers = [f"{name} (line {line})" for name, path in modules.items()
                 for target, line in imports_of(path, modules) if target in TASK_MODULES]
    assert importers == []


@pytest.mark.parametrize("module", TASK_MODULES)
def test_tasks_are_one_line_wrappers(module):
    tree = ast.parse(project_modules()[module].read_text())
    tasks = [node for node in tree.body if isinstance(node, ast.FunctionDef)]
    assert tasks
    for task in tasks:
        body = [stmt for stmt in task.body
                if not (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant))]  # docstring
        assert len(body) == 1 and isinstance(body[0], ast.Return), f"{module}.{task.name} is more than one line"


def _creates_model_version(node: ast.AST) -> bool:
    """ModelVersion(...), ModelVersion.objects.create(...) or .get_or_create(...)."""
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    if isinstance(func, ast.Name):
        return func.id == "ModelVersion"
    return (isinstance(func, ast.Attribute) and func.attr in ("create", "get_or_create", "bulk_create")
            and isinstance(func.value, ast.Attribute) and func.value.attr == "objects"
            and isinstance(func.value.value, ast.Name) and func.value.value.id == "ModelVersion")


def test_model_versions_are_created_only_in_training_versions():
    paths = [*project_modules().items(), *((f"bench.{p.stem}", p) for p in (ROOT / "bench").glob("*.py"))]
    creators = sorted({name for name, path in paths
                       for node in ast.walk(ast.parse(path.read_text())) if _creates_model_version(node)})
    assert creators == ["training.versions"]


def arrows(source: str, target: str) -> list[tuple[str, str]]:
    """Distinct (importing module, imported module) pairs from package `source` into package `target`."""
    graph = import_graph()
    return sorted((name, to) for name, targets in graph.items() if _inside(name, (source,))
                  for to in targets if _inside(to, (target,)))


def long_functions(limit: int = 60) -> list[tuple[int, str]]:
    """(lines, module.function) of every function longer than `limit` lines, longest first."""
    found = []
    for name, path in project_modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno:
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    found.append((lines, f"{name}.{node.name}"))
    return sorted(found, reverse=True)


if __name__ == "__main__":
    graph = import_graph()
    print("circles:", circles(graph) or "none")
    for source, target in (("search", "training"), ("training", "search")):
        found = arrows(source, target)
        print(f"import arrows {source}/ -> {target}/: {len(found)}")
        for name, to in found:
            print(f"    {name} -> {to}")
    print("functions over 60 lines:", ", ".join(f"{name} ({n})" for n, name in long_functions()) or "none")
    for name, path in sorted(project_modules().items(), key=lambda item: -len(item[1].read_text().splitlines())):
        print(f"{len(path.read_text().splitlines()):5d}  {name}")
