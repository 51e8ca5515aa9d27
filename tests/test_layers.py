"""The layer order of app/ (docs/architecture.md, "Layers"), checked on the imports themselves (parsed with `ast`,
every import statement, those inside functions too): a module imports only from its own layer or the layers
below, and no modules import each other in a circle.

And no module reaches into another's internals: a name that starts with `_` is private to its module (never
imported, never read as `module._name`), and a package's modules are private to it except those it lists in
PUBLIC_MODULES, the package's interface to the rest of app/.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

APP = Path(__file__).resolve().parent.parent / "app"
ARCHITECTURE = APP.parent / "docs" / "architecture.md"

# The layers, lowest first; a module belongs to the layer of the longest prefix that names it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "base",
        (
            "app",  # the package itself (app/__init__.py); as a prefix it names no other module
            "app.errors", "app.settings", "app.profiles", "app.blas", "app.logging_setup", "app.models",
            "app.node_urls",
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

# The modules of each package that modules outside it may import, with what they are for. Every other module
# of a package is its own business (app/proxy/upstream.py is the relay's, app/adaptive/estimator.py the
# planner's). Modules directly in app/ are not a package's: the layers alone govern them.
PUBLIC_MODULES: dict[str, dict[str, str]] = {
    "app.backends": {
        "pool": "the backend pool and its slots (gateway wiring, the handler's admission, reload, status)",
        "process": "Backend, its states and timing (gateway wiring, metrics)",
        "connections": "BackendEndpoint, all the proxy uses of a backend; Heartbeat and connections (proxy)",
        "activity": "what the backends are doing now (status page)",
        "logs": "a backend's log lines (the logs API)",
        "nodes": "upstream nodes: health, load, the choice of a node (gateway wiring, the forwarder, metrics)",
        "node_keys": "API keys for upstream nodes from env/file (gateway wiring, start-up check)",
    },
    "app.proxy": {
        "handler": "CompletionHandler, the one entry of a completion request (edge, gateway)",
        "plan": "the planner contract: Planner, Plan, Load and what a planner reads (adaptive, gateway)",
        "record": "RequestRecord, what a finished request did (metrics, status)",
        "relay": "RelayTimeouts (gateway wiring)",
        "forward": "NodeForwarder, requests served by upstream nodes (gateway wiring)",
        "rewrite": "request kinds and field bounds (completion endpoint, OpenAPI schemas)",
        "backend_fields": "the fields a backend accepts, for the OpenAPI schemas",
    },
    "app.adaptive": {
        "planner": "SpeculationPlanner, the gateway's Planner",
        "collector": "the planner's /metrics collector",
    },
    "app.launcher": {
        "prefill": "the field name the gateway sends the launcher (a contract)",
        "blas_probe": "the BLAS probe (bench batch-variance)",
        "verify_attention": "the round-cost probe (bench roundcost)",
    },
    "app.models": {
        "sources": "describe and prepare a model source",
        "store_commands": "the `specgate models` commands (app/cli.py loads it by name)",
    },
    "app.bench": {"bench_command": "the `specgate bench` commands (app/cli.py loads it by name)"},
    "app.integrations": {"opencode": "the `specgate opencode` command (app/cli.py loads it by name)"},
    "app.testing": {"tiny_model": "tiny generated models (bench's local gateway)"},
    "app.status": {},
}

# Narrower than the layers: these modules know the packages named only by the contract modules named.
# The planner is given what it reads (app/proxy/plan.py), it does not read the proxy or the pool; the relay
# and the upstream client use a backend only as a BackendEndpoint (app/backends/connections.py).
CONTRACTS: dict[str, tuple[set[str], set[str]]] = {
    "app.adaptive": ({"app.proxy", "app.backends"}, {"app.proxy.plan"}),
    "app.proxy.relay": ({"app.backends"}, {"app.backends.connections"}),
    "app.proxy.upstream": ({"app.backends"}, {"app.backends.connections"}),
}


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


def package_of(module: str) -> str:
    """The innermost package below app/ that holds `module` (a package is its own); "app" for the rest."""
    parts = module.split(".")
    for end in range(len(parts), 1, -1):
        candidate = ".".join(parts[:end])
        if (APP.parent / candidate.replace(".", "/") / "__init__.py").exists():
            return candidate
    return "app"


def test_every_package_lists_its_public_modules_and_they_exist() -> None:
    known = module_names()
    packages = {package_of(module) for module in known} - {"app"}
    assert packages == set(PUBLIC_MODULES), "packages without an entry in PUBLIC_MODULES, or entries without one"
    missing = [f"{p}.{m}" for p, modules in PUBLIC_MODULES.items() for m in modules if f"{p}.{m}" not in known]
    assert not missing, f"PUBLIC_MODULES names modules that do not exist: {missing}"


def test_no_module_imports_another_packages_private_modules() -> None:
    reaching = []
    for module, targets in import_graph().items():
        for target in targets:
            package = package_of(target)
            if package == "app" or target == package or package_of(module) == package:
                continue
            if target.removeprefix(package + ".") not in PUBLIC_MODULES[package]:
                reaching.append(f"{module} imports {target}, private to {package}")
    assert not reaching, "imports of a package's private modules (or list them in PUBLIC_MODULES):\n" + "\n".join(
        sorted(reaching)
    )


def test_contracts_are_all_these_modules_know_of_those_packages() -> None:
    beyond = []
    for module, targets in import_graph().items():
        for prefix, (packages, allowed) in CONTRACTS.items():
            if module != prefix and not module.startswith(prefix + "."):
                continue
            for target in targets:
                if package_of(target) in packages and target not in allowed:
                    beyond.append(
                        f"{module} imports {target}; it may know {sorted(packages)} only by {sorted(allowed)}"
                    )
    assert not beyond, "imports past a contract:\n" + "\n".join(sorted(beyond))


def private_names_used(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """`_names` that `module` takes from another app module: `from m import _x`, or `m._x` on an imported module."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    used: set[str] = set()
    aliases: dict[str, str] = {}  # local name -> the app module it is bound to
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known and alias.asname:
                    aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            if base not in known or base == module:
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    used.add(f"{base}.{alias.name}")
                elif f"{base}.{alias.name}" in known:
                    aliases[alias.asname or alias.name] = f"{base}.{alias.name}"
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            used.add(f"{aliases[node.value.id]}.{node.attr}")
    return used


def test_no_module_uses_another_modules_private_names() -> None:
    known = module_names()
    private = [
        f"{module} uses {name}" for module, path in known.items() for name in private_names_used(module, path, known)
    ]
    assert not private, "names private to another module (make them public, or keep them home):\n" + "\n".join(
        sorted(private)
    )


def test_the_module_map_lists_every_module_and_no_other() -> None:
    """docs/architecture.md's module map: one row per module of app/, none missing, none that is gone."""
    text = ARCHITECTURE.read_text()
    section = text.split("\n## Module map\n", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\| `(app/[^`]+\.py)` \|", section, flags=re.MULTILINE)
    present = {str(path.relative_to(APP.parent)) for path in APP.rglob("*.py")}
    assert len(listed) == len(set(listed)), "modules listed twice in the module map"
    assert not present - set(listed), (
        f"modules missing from docs/architecture.md's module map: {sorted(present - set(listed))}"
    )
    assert not set(listed) - present, f"the module map lists modules that do not exist: {sorted(set(listed) - present)}"
