"""Generate the gRPC stubs from proto/ at build time; they are never committed or edited by hand."""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PROTO_ROOT = Path(__file__).parent / "proto"


def generate_stubs(out_dir: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {protos}")


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        # In editable mode the package is imported from the source tree, so the stubs go there.
        target = Path(__file__).parent if self.editable_mode else Path(self.build_lib)
        generate_stubs(target)
        super().run()


setup(cmdclass={"build_py": BuildPyWithStubs})
