"""The serving core is transport-neutral: only the gRPC side (and the CLI and client, which
speak gRPC) imports the generated protobuf modules, and the OpenAI API imports no grpc."""

from __future__ import annotations

import ast
from pathlib import Path

import edgeagent

PACKAGE = Path(edgeagent.__file__).parent
GRPC_SIDE = ("server/app.py", "server/admin.py", "server/auth.py", "server/health.py",
             "server/service.py", "server/replies.py", "server/grpc_mapping.py",
             "server/grpc_errors.py")  # fmt: skip


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def modules() -> dict[str, set[str]]:
    return {
        path.relative_to(PACKAGE).as_posix(): imported(path)
        for path in PACKAGE.rglob("*.py")
        if "v1" not in path.relative_to(PACKAGE).parts
    }


def test_only_the_grpc_side_imports_the_generated_modules() -> None:
    allowed = (*GRPC_SIDE, "client.py")
    importing = {
        name for name, imports in modules().items()
        if any(i.startswith("edgeagent.v1") for i in imports)
    }  # fmt: skip
    assert {name for name in importing if not name.startswith("cli/")} <= set(allowed)


def test_the_core_and_the_openai_api_import_no_grpc() -> None:
    server = {name: imports for name, imports in modules().items() if name.startswith("server/")}
    neutral = {name: imports for name, imports in server.items() if name not in GRPC_SIDE}
    assert "server/openai/serve.py" in neutral
    for name, imports in neutral.items():
        assert not {i for i in imports if i == "grpc" or i.startswith("grpc.")}, name
