"""The house's floors (issue 27): no import runs back up them, and no module imports itself
round a circle. cli → daemon → server → updates → engine and evaluation → fit → sources (hub
fetch, AutoRound build) and eval_set (the held-out exchanges) → demo (the tiny model, its data)
→ store → settings, errors and the other modules that import nothing of edgeagent's but errors."""

from __future__ import annotations

import ast
from pathlib import Path

import edgeagent

PACKAGE = Path(edgeagent.__file__).parent
FLOORS = {  # the first module-name prefix that matches places a module
    "cli": 9, "client": 9, "__main__": 9,
    "daemon": 8, "preflight": 8,
    "server": 7, "metrics": 7,
    "updates": 6,
    "engine": 5, "evaluation": 5,
    "fit": 4,
    "sources": 3, "eval_set": 3,
    "demo": 2,
    "store": 1,
}  # fmt: skip
# Floor 0: settings, errors, gpu, progress, failpoints, timeline, offloop, systemd, logs, tasks,
# children.
BASE = 0


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, known: set[str]) -> set[str]:
    """The edgeagent modules `path` imports (a `from package import module` names the module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        found |= {name.removeprefix("edgeagent.") for name in names} & known
    return found


def graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py") if "v1" not in p.parts}
    known = set(paths)
    return {name: imports(path, known) - {name} for name, path in paths.items()}


def floor(module: str) -> int:
    top = module.split(".")[0]
    return FLOORS.get(top, BASE)


def test_no_import_runs_up_a_floor() -> None:
    upward = sorted(
        f"{module} (floor {floor(module)}) imports {target} (floor {floor(target)})"
        for module, targets in graph().items()
        for target in targets
        if floor(target) > floor(module)
    )
    assert upward == []


def test_no_import_cycles() -> None:
    edges, cycles, done = graph(), list[list[str]](), set[str]()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycles.append([*path[path.index(module) :], module])
            return
        if module in done:
            return
        for target in sorted(edges[module]):
            visit(target, [*path, module])
        done.add(module)

    for module in sorted(edges):
        visit(module, [])
    assert cycles == []


def _imported_names(path: Path) -> set[str]:
    """Every module name `path` imports, edgeagent's or not."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return names


def _reached_from(start: set[str]) -> set[str]:
    edges, seen, todo = graph(), set[str](), list(start)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(edges[module])
    return seen


def test_only_the_transports_and_the_client_import_the_generated_stubs() -> None:
    allowed = ("server.", "cli.", "client")
    importers = sorted(
        name
        for name, path in ((module_name(p), p) for p in PACKAGE.rglob("*.py"))
        if "v1" not in path.parts and not name.startswith(allowed)
        and any(n.startswith("edgeagent.v1") for n in _imported_names(path))
    )  # fmt: skip
    assert importers == []


def test_the_openai_server_imports_no_grpc_even_through_others() -> None:
    """`server/openai/` and everything it imports, all the way down, speak no gRPC."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py") if "v1" not in p.parts}
    reached = _reached_from({name for name in paths if name.startswith("server.openai")})
    speaking = sorted(
        name for name in reached
        if any(n.split(".")[0] in {"grpc", "grpc_health"} for n in _imported_names(paths[name]))
    )  # fmt: skip
    assert speaking == []
