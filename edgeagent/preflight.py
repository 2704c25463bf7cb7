"""Every check the settings allow before any slow work: run first at start, before a fetch, a
build or an engine start, so a mistake costs a second, not a model load. Each failure is one
ConfigError line (exit code 2) naming the setting and what to do.
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
from pathlib import Path

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils._validators import validate_repo_id

from edgeagent.errors import ConfigError
from edgeagent.eval_set import configured_file
from edgeagent.metrics import loopback_address
from edgeagent.server.exposure import check_tcp_callers, tls_files
from edgeagent.server.sockets import check_socket_path, group_id
from edgeagent.settings import Settings
from edgeagent.store.trust import load_public_key

_REVISION = re.compile(r"^[\w.\-/]+$")


def check_settings(settings: Settings) -> None:
    for name, directory in (
        ("state_dir", settings.state_dir),
        ("cache_dir", settings.cache_dir),
        ("runtime_dir", settings.runtime_dir),
    ):
        _check_writable(name, directory)
    server = settings.server
    if server.socket_group is not None:
        group_id(server.socket_group)
    sockets = [settings.socket_path, settings.admin_socket_path]
    if server.http_enabled:
        sockets.append(settings.http_socket_path)
    for path in sockets:
        check_socket_path(path)
    tls_files(server)
    check_tcp_callers(server, settings.api_token_value)
    if settings.metrics.address:
        _check_bindable(*loopback_address(settings.metrics.address), settings.metrics.address)
    _check_model_reference(settings)
    for key in settings.trust.public_keys:  # readable, and a public key model signing takes
        load_public_key(key)
    if settings.build.calibration is not None and not settings.build.calibration.is_file():
        raise ConfigError(f"build.calibration {settings.build.calibration}: no such file")
    if settings.updates.eval_set is not None:  # read and checked line by line
        configured_file(settings.updates.eval_set)


def _check_writable(name: str, directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-check-"):
            pass
    except OSError as error:
        raise ConfigError(
            f"{name} {directory} is not writable by this user (uid {os.geteuid()}): "
            f"{error.strerror}"
        ) from None


def _check_bindable(host: str, port: int, address: str) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise ConfigError(
                f"metrics.address {address}: cannot listen ({error.strerror})"
            ) from None


def _check_model_reference(settings: Settings) -> None:
    hub = settings.hub
    try:
        validate_repo_id(hub.repo)
    except HFValidationError as error:
        raise ConfigError(f"hub.repo {hub.repo!r} is not a repo id: {error}") from None
    if not _REVISION.match(hub.revision) or ".." in hub.revision:
        raise ConfigError(
            f"hub.revision {hub.revision!r}: expected a branch, tag or commit (letters, digits, "
            f"'.', '-', '_', '/')"
        )
    if hub.endpoint is not None and not hub.endpoint.startswith(("http://", "https://")):
        raise ConfigError(f"hub.endpoint {hub.endpoint!r}: expected an http:// or https:// URL")
