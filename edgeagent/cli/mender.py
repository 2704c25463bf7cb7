"""Mender's update module for model versions (`edgeagent-model`, update-module protocol v3), and
the command that writes its artifacts (docs/mender.md).

The Mender client runs `/usr/share/mender/modules/v3/edgeagent-model STATE DIR` as root, which
runs `edgeagent mender-module STATE DIR`. The states, in the order Mender calls them:
- Download: the artifact's files, streamed, are imported into the store as a new version,
  hashed and signature-checked like any import (refused: nothing reaches the store);
- ArtifactInstall: the daemon hot-swaps to it (its admin API's Update: gate, smoke test);
- ArtifactCommit: held until the daemon serves it out of probation;
- ArtifactRollback, ArtifactFailure: the version served before is served again;
- Cleanup: the staging directory goes.
What a state learns for the next ones is kept in DIR/tmp, which Mender keeps until Cleanup.
"""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from edgeagent.client import Client, default_admin_target, describe_rpc_error
from edgeagent.errors import ConfigError, EdgeAgentError
from edgeagent.v1 import admin_pb2 as pb

if TYPE_CHECKING:
    from edgeagent.settings import Settings

logger = logging.getLogger(__name__)

MODULE = "edgeagent-model"
SYSLOG = "/dev/log"
STATES_WITH_ANSWERS = {"SupportsRollback": "Yes", "NeedsArtifactReboot": "No"}
POLL_S = 0.5
# After a daemon dies, systemd restarts it (RestartSec=5) and it starts its engine again.
DAEMON_BACK_S = 600.0


class ModuleError(EdgeAgentError):
    """A state failed: Mender is told so by the exit code, and logs our stderr."""

    exit_code = 1


def add_commands(commands: Any) -> None:
    module = commands.add_parser(
        "mender-module", help=f"Mender's update module `{MODULE}` (run by the Mender client)"
    )
    module.add_argument("state", help="the update module state (Download, ArtifactInstall, ...)")
    module.add_argument("files", type=Path, help="the payload's file tree Mender made")
    module.set_defaults(handler=_run_module)

    artifact = commands.add_parser(
        "mender-artifact", help=f"write a Mender artifact ({MODULE}) of a version or directory"
    )
    artifact.add_argument("source", help="a stored version (id, prefix, current) or a directory")
    artifact.add_argument("--output", "-o", type=Path, required=True, help="the .mender file")
    artifact.add_argument("--device-type", "-t", action="append", required=True,
                          help="a device type it is for (repeatable)")  # fmt: skip
    artifact.add_argument("--name", "-n", help="artifact name; default edgeagent-model-VERSION")
    artifact.add_argument("--key", "-k", type=Path, help="sign the artifact with this key")
    artifact.set_defaults(handler=_write_artifact)


# -- the module -------------------------------------------------------------------------------


def _run_module(args: argparse.Namespace) -> int:
    answer = STATES_WITH_ANSWERS.get(args.state)
    if answer is not None:
        print(answer)
        return 0
    state = MODULE_STATES.get(args.state)
    if state is None:  # the protocol's other calls and states: nothing to do
        return 0
    _log_to_the_journal()
    logger.info("%s %s", args.state, args.files)
    try:
        state(Payload(args.files), _the_units_settings())
    except EdgeAgentError as error:
        logger.error("%s failed: %s", args.state, error)
        raise
    except grpc.RpcError as error:
        logger.error("%s failed: %s", args.state, describe_rpc_error(error))
        raise
    return 0


def _log_to_the_journal() -> None:
    """Mender 3 drops a module's stderr: what each state did and why it failed goes to syslog
    (the journal, `journalctl -t edgeagent-mender`) as well."""
    if logger.handlers or not Path(SYSLOG).exists():
        return
    handler = logging.handlers.SysLogHandler(address=SYSLOG)
    handler.setFormatter(logging.Formatter("edgeagent-mender: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


@dataclass(frozen=True)
class Payload:
    """Mender's file tree for this payload; `tmp/` carries what a state learned."""

    root: Path

    def remember(self, name: str, value: str) -> None:
        (self.root / "tmp" / name).write_text(value)

    def recall(self, name: str) -> str:
        path = self.root / "tmp" / name
        return path.read_text() if path.exists() else ""

    @property
    def artifact_name(self) -> str:
        return (self.root / "header" / "artifact_name").read_text().strip()

    def streams(self) -> Iterator[tuple[str, Path]]:
        """Each file of the payload as it streams: its name and its pipe. `stream-next` names
        the next one each time it is read, and reads empty after the last."""
        while True:
            named = (self.root / "stream-next").read_text().strip()
            if not named:
                return
            yield Path(named).name, self.root / named


def _download(payload: Payload, settings: Settings) -> None:
    owner = _owner_of(settings.state_dir)
    with _staging(settings.cache_dir / "mender", owner) as staged:
        for name, stream in payload.streams():
            _receive(stream, staged / name, owner)
        version = _import_as(owner, staged, settings)
    payload.remember("version", version)
    _say(f"{payload.artifact_name}: stored as version {version}")


def _artifact_install(payload: Payload, settings: Settings) -> None:
    version = payload.recall("version")
    with _admin(settings) as client:
        serving = client.status().version
        payload.remember("before", serving)
        if serving == version:
            return
        outcome = client.update(version)
    if outcome.result != pb.UPDATE_RESULT_PROMOTED:
        raise ModuleError(f"{version} not served: {_outcome_text(outcome)}")


def _artifact_commit(payload: Payload, settings: Settings) -> None:
    """Held until the daemon serves the version out of probation: an engine death in probation
    puts the old version back, and then the commit fails and Mender rolls back too."""
    version = payload.recall("version")

    def settled(status: pb.Status) -> bool:
        if status.version != version:
            reason = status.bad_versions.get(version, f"the daemon serves {status.version}")
            raise ModuleError(f"{version} is no longer served: {reason}")
        return status.probation_left_s == 0 and status.state == "serving"

    started = time.monotonic()
    within_s = settings.updates.probation_s + DAEMON_BACK_S
    _wait_for_status(settings, settled, within_s, f"{version} out of probation")
    waited = time.monotonic() - started
    _say(f"{version} serves, its probation over (held {waited:.1f} s)")


def _serve_previous(payload: Payload, settings: Settings) -> None:
    """ArtifactRollback and ArtifactFailure: the version served before this artifact serves
    again (a daemon killed on the way comes back first: systemd restarts it)."""
    version, before = payload.recall("version"), payload.recall("before")
    status = _wait_for_status(
        settings, lambda s: s.state == "serving", DAEMON_BACK_S, "the daemon serving"
    )
    if not before or status.version == before or status.version != version:
        _say(f"serving {status.version or 'nothing'}")
        return
    with _admin(settings) as client:
        outcome = client.update(before)
    if outcome.result != pb.UPDATE_RESULT_PROMOTED:
        raise ModuleError(f"{before} not served again: {_outcome_text(outcome)}")
    _say(f"serving {before} again")


def _say(message: str) -> None:
    print(message, file=sys.stderr)
    logger.info("%s", message)


def _cleanup(payload: Payload, settings: Settings) -> None:
    shutil.rmtree(settings.cache_dir / "mender", ignore_errors=True)


MODULE_STATES: dict[str, Callable[[Payload, Settings], None]] = {
    "Download": _download,
    "ArtifactInstall": _artifact_install,
    "ArtifactCommit": _artifact_commit,
    "ArtifactRollback": _serve_previous,
    "ArtifactFailure": _serve_previous,
    "Cleanup": _cleanup,
}


# -- the store, as its owner ------------------------------------------------------------------


@dataclass(frozen=True)
class Owner:
    uid: int
    gid: int


def _owner_of(path: Path) -> Owner:
    """Who owns the state directory (the daemon's user under systemd): Mender runs us as root,
    and what we add to the store must be theirs. No state yet: whoever runs us."""
    if not path.is_dir():
        return Owner(os.geteuid(), os.getegid())
    stat = path.stat()
    return Owner(stat.st_uid, stat.st_gid)


@contextmanager
def _staging(parent: Path, owner: Owner) -> Iterator[Path]:
    parent.mkdir(parents=True, exist_ok=True)
    os.chown(parent, owner.uid, owner.gid)
    staged = Path(tempfile.mkdtemp(prefix="artifact-", dir=parent))
    try:
        os.chown(staged, owner.uid, owner.gid)
        yield staged
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def _receive(stream: Path, target: Path, owner: Owner) -> None:
    with stream.open("rb") as source, target.open("wb") as sink:
        shutil.copyfileobj(source, sink, length=1 << 20)
    os.chown(target, owner.uid, owner.gid)


def _import_as(owner: Owner, directory: Path, settings: Settings) -> str:
    """`edgeagent models import DIR` as the store's owner: hashed, signature-checked
    (`trust`), committed; prints the version id."""
    env = {**os.environ, "EDGEAGENT_STATE_DIR": str(settings.state_dir),
           "EDGEAGENT_CACHE_DIR": str(settings.cache_dir)}  # fmt: skip
    env.pop("CREDENTIALS_DIRECTORY", None)  # root's to read; an import needs no credential
    as_owner: dict[str, Any] = {}
    if os.geteuid() == 0 and owner.uid != 0:
        as_owner = {"user": owner.uid, "group": owner.gid, "extra_groups": []}
    done = subprocess.run(
        [sys.executable, "-m", "edgeagent", "models", "import", str(directory)],
        capture_output=True, text=True, env=env, cwd="/", check=False, **as_owner,
    )  # fmt: skip
    if done.returncode != 0:
        raise ModuleError(f"the artifact was not stored: {done.stderr.strip()}")
    version: str = done.stdout.strip().splitlines()[-1]
    return version


# -- the daemon -------------------------------------------------------------------------------


def _the_units_settings() -> Settings:
    """The settings the unit runs with, read once per state: its config file, and (root reads
    them) the credentials it loads, the admin token among them."""
    from edgeagent.settings import Settings

    credentials = Path("/etc/edgeagent/credentials")
    if "CREDENTIALS_DIRECTORY" not in os.environ and credentials.is_dir():
        os.environ["CREDENTIALS_DIRECTORY"] = str(credentials)
    return Settings()


@contextmanager
def _admin(settings: Settings) -> Iterator[Client]:
    with Client(default_admin_target(settings), token=settings.admin_token_value) as client:
        yield client


def _wait_for_status(
    settings: Settings, done: Callable[[pb.Status], bool], within_s: float, what: str
) -> pb.Status:
    """Poll the daemon's status until `done` says so; a daemon that does not answer (killed,
    restarting) is waited for, up to `within_s`. A channel per poll: one kept across a restart
    would retry on gRPC's growing backoff, long after the daemon is back."""
    deadline = time.monotonic() + within_s
    last = "no answer yet"
    while time.monotonic() < deadline:
        try:
            with _admin(settings) as client:
                status = client.status()
        except grpc.RpcError as error:
            last = f"the daemon does not answer ({error.code().name})"
        else:
            if done(status):
                return status
            last = f"serving {status.version or 'nothing'} ({status.state})"
        time.sleep(POLL_S)
    raise ModuleError(f"waited {within_s:g} s for {what}; last: {last}")


def _outcome_text(outcome: pb.UpdateOutcome) -> str:
    result = pb.UpdateResult.Name(outcome.result).removeprefix("UPDATE_RESULT_").lower()
    return f"{result}{': ' + outcome.reason if outcome.reason else ''}"


# -- writing an artifact ----------------------------------------------------------------------


def _write_artifact(args: argparse.Namespace) -> int:
    if shutil.which("mender-artifact") is None:
        raise ConfigError("mender-artifact is not installed (Debian: apt install mender-artifact)")
    with tempfile.TemporaryDirectory() as scratch:
        files, label = _model_files(args.source, Path(scratch))
        command = ["mender-artifact", "write", "module-image", "--type", MODULE,
                   "--artifact-name", args.name or f"{MODULE}-{label}",
                   "--output-path", str(args.output)]  # fmt: skip
        for device_type in args.device_type:
            command += ["--device-type", device_type]
        if args.key:
            command += ["--key", str(args.key)]
        for path in files:
            command += ["--file", str(path)]
        written = subprocess.run(command, capture_output=True, text=True, check=False)
    if written.returncode != 0:
        raise ModuleError(f"mender-artifact failed: {written.stderr.strip()}")
    print(args.output)
    return 0


def _model_files(source: str, scratch: Path) -> tuple[list[Path], str]:
    """The files the artifact carries (a Mender payload has no folders) and a label for its
    name: a directory's files; or a stored version's, with its signature as `model.sig`."""
    directory = Path(source)
    if directory.is_dir():
        return _flat_files(directory, sorted(p.name for p in directory.iterdir())), (
            directory.resolve().name
        )
    from edgeagent.settings import Settings
    from edgeagent.store.store import open_store
    from edgeagent.store.trust import SIGNATURE_FILE

    store = open_store(Settings())
    manifest = store.manifest(source)
    files = _flat_files(store.model_dir(manifest.version), [e.path for e in manifest.files])
    if manifest.signature is not None:
        signature = scratch / SIGNATURE_FILE
        signature.write_text(manifest.signature.bundle)
        files.append(signature)
    return files, manifest.version


def _flat_files(directory: Path, names: list[str]) -> list[Path]:
    nested = [name for name in names if "/" in name or not (directory / name).is_file()]
    if nested:
        raise ConfigError(
            f"{directory}: a Mender artifact carries files, not folders: {', '.join(nested)}"
        )
    return [directory / name for name in names]
