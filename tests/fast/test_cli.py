"""The command line as an operator meets it: a bad setting stops `serve` in a second with one
line and exit 2, before any fetch, build or engine start; a client command with no daemon says
so in one line with exit 3."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from edgeagent.cli import configuration_problems
from edgeagent.errors import ConfigError
from edgeagent.preflight import check_settings
from fast.runner import Box

# An empty store and a hub nobody listens on: a check that came after the fetch would exit 8.
UNREACHABLE_HUB = {"EDGEAGENT_HUB__ENDPOINT": "http://127.0.0.1:9"}


def _edgeagent(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeagent", *args], env={**os.environ, **env},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


BAD_SETTINGS = [
    pytest.param({"EDGEAGENT_SERVER__SOCKET_MODE": "rw"}, "server.socket_mode", id="not-a-number"),
    pytest.param(
        {"EDGEAGENT_SERVER__SOCKET_GROUP": "no-such-group-here"},
        "no group named 'no-such-group-here'",
        id="socket-group",
    ),
    pytest.param({"EDGEAGENT_SERVER__TCP_ADDRESS": "127.0.0.1:0"}, "lets anyone call", id="tcp"),
    pytest.param(
        {
            "EDGEAGENT_SERVER__TCP_ADDRESS": "127.0.0.1:0",
            "EDGEAGENT_API_TOKEN": "t",
            "EDGEAGENT_SERVER__TLS_CERT_FILE": "/nonexistent/cert.pem",
            "EDGEAGENT_SERVER__TLS_KEY_FILE": "/nonexistent/key.pem",
        },
        "cannot read /nonexistent/cert.pem",
        id="tls-unreadable",
    ),
    pytest.param({"EDGEAGENT_METRICS__ADDRESS": "0.0.0.0:9464"}, "loopback only", id="metrics"),
    pytest.param(
        {"EDGEAGENT_STATE_DIR": "/dev/null/state"},
        "state_dir /dev/null/state is not writable",
        id="state-dir",
    ),
    pytest.param({"EDGEAGENT_HUB__REVISION": "../../etc"}, "hub.revision", id="revision"),
    pytest.param({"EDGEAGENT_HUB__REPO": "org/na..me"}, "hub.repo", id="repo"),
    pytest.param(
        {"EDGEAGENT_SERVER__HTTP_SOCKET_PATH": "/tmp/" + "s" * 103 + ".sock"},
        "a Unix socket's path may have at most 107",
        id="socket-path-too-long",
    ),
    pytest.param(
        {"EDGEAGENT_TRUST__REQUIRE_SIGNATURE": "true"},
        "trust.require_signature is on but trust.public_keys lists no key",
        id="signature-without-keys",
    ),
    pytest.param(
        {"EDGEAGENT_TRUST__PUBLIC_KEYS": '["/nonexistent/publisher.pub"]'},
        "trust.public_keys: cannot read /nonexistent/publisher.pub",
        id="trust-key-unreadable",
    ),
]


@pytest.mark.parametrize(("setting", "named"), BAD_SETTINGS)
def test_every_bad_setting_is_refused_before_any_slow_work(
    box: Box, setting: dict[str, str], named: str
) -> None:
    """Each check, in this process: what `serve` runs first (pydantic's own, then preflight)."""
    empty = Box(box.root / "empty")
    with pytest.raises((ValidationError, ConfigError)) as refused:
        check_settings(empty.settings(**UNREACHABLE_HUB, **setting))
    message = (
        configuration_problems(refused.value)
        if isinstance(refused.value, ValidationError)
        else str(refused.value)
    )
    assert named in message
    assert "\n" not in message


@pytest.mark.parametrize(("setting", "named"), [BAD_SETTINGS[0], BAD_SETTINGS[2], BAD_SETTINGS[6]])
def test_serve_with_a_bad_setting_says_it_in_one_line_and_exits_2(
    box: Box, setting: dict[str, str], named: str
) -> None:
    """The command as an operator runs it: no traceback, no fetch, exit 2 (a check that came
    after the fetch would exit 8: the hub is unreachable)."""
    empty = Box(box.root / "empty")
    result = _edgeagent("serve", env={**empty.environment(), **UNREACHABLE_HUB, **setting})
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, result.stderr
    assert named in errors[0]
    assert "Traceback" not in result.stderr
    assert "fetching" not in result.stderr


def test_a_daemon_already_on_the_socket_is_refused_before_loading(box: Box) -> None:
    import socket

    socket_path = box.root / "run" / "edgeagent.sock"
    socket_path.parent.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(str(socket_path))
        other.listen()
        result = _edgeagent("serve", env=box.environment())
    assert result.returncode == 2
    assert "another server is listening on" in result.stderr
    assert "starting the engine" not in result.stderr


@pytest.mark.parametrize("command", [["status"], ["info"], ["generate", "hi"], ["update", "x"]])
def test_client_commands_without_a_daemon_say_so_with_exit_3(
    tmp_path: Path, command: list[str]
) -> None:
    target = f"unix:{tmp_path / 'nothing.sock'}"
    result = _edgeagent(*command, "--target", target, env={})
    assert result.returncode == 3, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: no edgeagent daemon answers")
    assert "is it running?" in result.stderr


@pytest.mark.parametrize(
    ("config_text", "env", "named"),
    [
        pytest.param('log_level = "INFO\n', {}, "edgeagent.toml", id="toml-syntax"),
        pytest.param("", {"EDGEAGENT_SERVER": "not json"}, 'field "server"', id="env-not-json"),
    ],
)
def test_an_unreadable_configuration_is_one_line_and_exit_2(
    box: Box, capsys: pytest.CaptureFixture[str], config_text: str, env: dict[str, str],
    named: str, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from edgeagent.cli import main

    config = box.root / "edgeagent.toml"
    config.write_text(config_text)
    for name, value in {**box.environment(), "EDGEAGENT_CONFIG": str(config), **env}.items():
        monkeypatch.setenv(name, value)
    assert main(["serve"]) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: bad configuration: ")
    assert stderr.count("\n") == 1, stderr
