"""Generate the gRPC stubs from proto/ at build time; they are never committed or edited by hand."""

from __future__ import annotations

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

sys.path.insert(0, str(Path(__file__).parent / "proto"))
from generate_stubs import generate_stubs


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        # In editable mode the package is imported from the source tree, so the stubs go there.
        target = Path(__file__).parent if self.editable_mode else Path(self.build_lib)
        generate_stubs(target)
        super().run()


setup(cmdclass={"build_py": BuildPyWithStubs})
