"""The `edgeagent` command.

Exit codes: 0 success; 1 failure (serve: the engine died, or nothing could be served after a
failed update); 2 bad usage or configuration; 3 an RPC failed or no daemon answers; 4 not
found; 5 failed verification (or a refused signature); 6 not enough disk; 7 access denied by
the hub; 8 hub unreachable (or offline with nothing stored); 9 the quantizer failed; 10 nothing
servable (corrupt, does not fit the device, or fails to load); 11 an update was not applied;
130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc
from pydantic import ValidationError
from pydantic_settings import SettingsError

from edgeagent.cli import admin, evaluation, fit, generation, mender, models, serving, signing
from edgeagent.client import describe_rpc_error
from edgeagent.errors import ConfigError, EdgeAgentError
from edgeagent.release import describe, installed_release

EXIT_RPC_FAILED, EXIT_INTERRUPTED = 3, 130


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except ValidationError as invalid:
        print(f"error: {configuration_problems(invalid)}", file=sys.stderr)
        return ConfigError.exit_code
    except SettingsError as unreadable:
        print(f"error: bad configuration: {unreadable}", file=sys.stderr)
        return ConfigError.exit_code
    except EdgeAgentError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except grpc.RpcError as failed:
        print(f"error: {describe_rpc_error(failed)}", file=sys.stderr)
        return EXIT_RPC_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return code


def configuration_problems(invalid: ValidationError) -> str:
    """A settings validation error as one line: each setting at fault and what is wrong."""
    problems = [
        f"{'.'.join(str(part) for part in problem['loc'])}: {problem['msg']}"
        f" (got {problem['input']!r})"
        if not isinstance(problem["input"], dict)
        else f"{'.'.join(str(part) for part in problem['loc'])}: {problem['msg']}"
        for problem in invalid.errors()
    ]
    return "bad configuration: " + "; ".join(problems)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeagent",
        description="Serve a 4-bit Phi-4 over gRPC on an edge box.",
        epilog=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=describe(installed_release()))
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    serving.add_commands(commands)
    generation.add_commands(commands)
    models.add_commands(commands)
    signing.add_commands(commands)
    mender.add_commands(commands)
    fit.add_commands(commands)
    admin.add_commands(commands)
    evaluation.add_commands(commands)
    return parser
