"""Commands that manage the running daemon's model: status, update, rollback."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

from edgeagent.client import Client, default_admin_target
from edgeagent.release import installed_release
from edgeagent.timeline import SUBSTEP_INDENT
from edgeagent.v1 import admin_pb2 as pb

EXIT_NOT_PROMOTED = 11


def add_commands(commands: Any) -> None:
    status = commands.add_parser("status", help="the serving version and the update history")
    status.add_argument("--target")
    status.set_defaults(handler=_status)

    update = commands.add_parser("update", help="hot-swap the daemon to a stored version")
    update.add_argument("version", help="a version id or prefix (`edgeagent models list`)")
    update.add_argument("--target")
    update.set_defaults(handler=_update)

    rollback = commands.add_parser("rollback", help="hot-swap the daemon back to previous")
    rollback.add_argument("--target")
    rollback.set_defaults(handler=_rollback)


def _status(args: argparse.Namespace) -> int:
    with Client(args.target or default_admin_target()) as client:
        status = client.status()
    if status.version:
        print(f"serving   {status.model_id} {status.version} ({status.state})")
    else:
        print(f"serving   nothing ({status.state}: {status.problem})")
    print(f"previous  {status.previous_version or '-'}")
    release = installed_release()  # this command's installation: /opt/edgeagent/current's
    print(f"release   {f'{release.version} ({release.flavor})' if release else '-'}")
    if status.candidate_version:
        print(f"updating  to {status.candidate_version}")
    if status.probation_left_s > 0:
        print(f"probation {status.probation_left_s:.0f} s left (engine death rolls back)")
    if status.next_swap:
        print(f"next swap {status.next_swap}")
    for version, reason in sorted(status.bad_versions.items()):
        print(f"bad       {version}: {reason}")
    for outcome in status.history:
        _print_outcome(outcome)
    if status.start_timeline:
        _print_timeline(status.start_timeline)
    return 0


def _print_timeline(rows: Sequence[pb.StartPhase]) -> None:
    """The start's phases, each followed by its sub-steps (indented in the name, and already
    counted in their phase)."""
    total = sum(row.seconds for row in rows if not row.name.startswith(SUBSTEP_INDENT))
    print(f"started in {total:.1f} s:")
    for row in rows:
        step = row.name.startswith(SUBSTEP_INDENT)
        print(f"  {'  ' if step else ''}{row.seconds:7.2f} s  {row.name.strip()}")


def _update(args: argparse.Namespace) -> int:
    with Client(args.target or default_admin_target()) as client:
        return _report(client.update(args.version))


def _rollback(args: argparse.Namespace) -> int:
    with Client(args.target or default_admin_target()) as client:
        return _report(client.rollback())


def _report(outcome: pb.UpdateOutcome) -> int:
    _print_outcome(outcome)
    return 0 if outcome.result == pb.UPDATE_RESULT_PROMOTED else EXIT_NOT_PROMOTED


def _print_outcome(outcome: pb.UpdateOutcome) -> None:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(outcome.finished_unix_ms / 1000))
    result = pb.UpdateResult.Name(outcome.result).removeprefix("UPDATE_RESULT_").lower()
    print(
        f"{when}  {outcome.kind} {outcome.from_version} -> {outcome.version}: {result}"
        f"{' (' + outcome.reason + ')' if outcome.reason else ''}; verify {outcome.verify_s:.2f} s,"
        f" pause {outcome.pause_s:.2f} s ({outcome.method or 'load'} {outcome.reload_s:.2f} s,"
        f" smoke test {outcome.smoke_s:.2f} s"
        f"{f', quality gate {outcome.gate_s:.2f} s' if outcome.gate_s else ''})"
    )
