"""The layer order of app/ (docs/architecture.md, "Layers"), checked on the imports themselves (parsed with `ast`,
every import statement, those inside functions too): a module imports only from its own layer or the layers
below, and no modules import each other in a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

APP = Path(__file__).resolve().parent.parent / "app"

# The layers, lowest first; a module belongs to the layer of the longest prefix that names it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "base",
        (
            "app",  # the package itself (app/__init__.py); as a prefix it names no other module
            "app.errors", "app.settings", "app.profiles", "app.blas", "app.logging_setup", "app.models",
            # The one field name the gateway sends its launcher (a contract, importing nothing).
            "app.launcher.prefill",
        ),
    ),
    ("launcher", ("app.launcher",)),  # the backend program, a process of its own
    ("backends", ("app.backends", "app.scheduler")),
    ("proxy", ("app.proxy",)),
    ("planner", ("app.adaptive",)),  # implements the proxy's Planner protocol (app/proxy/plan.py)
    ("gateway", ("app.gateway", "app.reload")),
    (
        "edge",
        (
            "app.server", "app.edge", "app.completion_endpoint", "app.auth", "app.request_id",
            "app.error_response", "app.browser_guard", "app.http_limits", "app.routes", "app.logs_api",
            "app.metrics", "app.status", "app.openapi_schemas",
        ),
    ),
    (
        "commands",
        (
            "app.cli", "app.prepare", "app.bench", "app.integrations", "app.models.store_commands", "app.testing",
        ),
    ),
]  # fmt: skip

# Imports that break the order today, each with its reason; the test fails on any other.
KNOWN_UPWARD: dict[tuple[str, str], str] = {}


def module_names() -> dict[str, Path]:
    names = {}
    for path in APP.rglob("*.py"):
        parts = list(path.relative_to(APP.parent).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts.pop()
        names[".".join(parts)] = path
    return names


def layer_of(module: str) -> int:
    best, rank = -1, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            inside = module == prefix or (prefix != "app" and module.startswith(prefix + "."))
            if inside and len(prefix) > best:
                best, rank = len(prefix), index
    assert rank >= 0, f"{module} is in no layer: add it to LAYERS"
    return rank


def imports_of(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The app modules `module` imports (a package's __init__ for `from app import x` when x is no module)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            wanted = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            wanted = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in wanted:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name.startswith("app") and name != module:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    known = module_names()
    graph = {module: imports_of(module, path, known) for module, path in known.items()}
    # `from app.proxy import upstream` names both the package and the module: keep the module only.
    return {
        module: {target for target in targets if not _is_package_of(target, targets)}
        for module, targets in graph.items()
    }


def _is_package_of(target: str, targets: set[str]) -> bool:
    return (APP.parent / target.replace(".", "/") / "__init__.py").exists() and any(
        other.startswith(target + ".") for other in targets
    )


def test_every_module_has_a_layer() -> None:
    for module in module_names():
        layer_of(module)


def test_no_import_goes_up_the_layers() -> None:
    upward = []
    for module, targets in import_graph().items():
        for target in targets:
            if layer_of(target) > layer_of(module) and (module, target) not in KNOWN_UPWARD:
                upward.append(
                    f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
                )
    assert not upward, "imports up the layer order:\n" + "\n".join(sorted(upward))


def test_known_exceptions_are_still_real() -> None:
    graph = import_graph()
    stale = [pair for pair in KNOWN_UPWARD if pair[1] not in graph.get(pair[0], set())]
    assert not stale, f"remove these from KNOWN_UPWARD, they no longer import: {stale}"


def test_no_circular_imports() -> None:
    graph = import_graph()
    cycles = []
    for component in _strongly_connected(graph):
        if len(component) > 1:
            cycles.append(" <-> ".join(sorted(component)))
    assert not cycles, "modules that import each other in a circle:\n" + "\n".join(cycles)


def _strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative (the graph is small, but recursion limits are not worth the thought)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    for root in graph:
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
                    work.append((child, iter(sorted(graph.get(child, set())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                components.append(component)
    return components
