"""The import graph of clipkit, read from the source (every import statement, at module level or inside a
function): no circle among clipkit's modules, and the benchmarks never import the command line."""
import ast
from pathlib import Path

import clipkit

ROOT = Path(clipkit.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(name: str, modules: set[str]) -> str | None:
    """The clipkit module an imported dotted name lives in (a name inside a module: that module)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    modules = set(files)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import name`: the submodule pkg.name where there is one, else pkg itself
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in targets:
                resolved = _resolve(target, modules) if target.startswith("clipkit") else None
                if resolved and resolved != module:
                    graph[module].add(resolved)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def _without_package_reexports(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph with each package's __init__ seen as what it is, a list of re-exports: an import of the
    package by one of its own modules counts as an import of what the package re-exports, not a circle."""
    packages = {m for m in graph if (ROOT.parent / m.replace(".", "/") / "__init__.py").is_file()}
    out: dict[str, set[str]] = {}
    for module, targets in graph.items():
        out[module] = set()
        for t in targets:
            if t in packages and module.startswith(t + "."):
                out[module] |= {x for x in graph[t] if x != module}
            else:
                out[module].add(t)
    return out


def test_no_import_circle_among_clipkit_modules():
    graph = _without_package_reexports(import_graph())
    assert "clipkit.bench.loss_curve" in graph["clipkit.bench.loss"]  # the walk sees imports inside functions too
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_a_circle_is_found_where_there_is_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_benchmarks_never_import_the_command_line():
    graph = import_graph()
    upward = {m: sorted(t for t in targets if t == "clipkit.cli" or t == "clipkit.__main__")
              for m, targets in graph.items() if m.startswith("clipkit.bench")}
    assert {m: t for m, t in upward.items() if t} == {}


def test_config_imports_nothing_else_of_clipkit():
    """Config is the schema every layer reads: models, losses, data and export import it, so it imports none of
    them (a registry's checks live in the registry's package, composed at the top)."""
    graph = import_graph()
    outside = {m: sorted(t for t in targets if not (t == "clipkit.config" or t.startswith("clipkit.config.")))
               for m, targets in graph.items() if m == "clipkit.config" or m.startswith("clipkit.config.")}
    assert {m: t for m, t in outside.items() if t} == {}
    assert "clipkit.config" in graph["clipkit.models.validate"]  # the walk sees the owners' imports of config
