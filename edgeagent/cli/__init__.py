"""The `edgeagent` command.

Exit codes: 0 success; 1 failure; 2 bad usage or configuration; 3 an RPC failed; 4 not found;
5 failed verification; 6 not enough disk; 7 access denied by the hub; 8 hub unreachable (or
offline with nothing stored); 9 the quantizer failed; 10 nothing servable (corrupt, or does not
fit the device); 11 an update was not applied; 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from edgeagent.cli import admin, fit, models, serving
from edgeagent.errors import EdgeAgentError

EXIT_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except EdgeAgentError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeagent",
        description="Serve a 4-bit Phi-4 over gRPC on an edge box.",
        epilog=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    serving.add_commands(commands)
    models.add_commands(commands)
    fit.add_commands(commands)
    admin.add_commands(commands)
    return parser
