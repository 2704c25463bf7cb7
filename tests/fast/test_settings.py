"""Settings: source precedence, nested env, systemd credentials, redaction."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeagent.settings import Settings


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("CREDENTIALS_DIRECTORY", "STATE_DIRECTORY", "RUNTIME_DIRECTORY"):
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "edgeagent.toml"
    path.write_text(
        'log_level = "WARNING"\nruntime_dir = "/run/from-toml"\n'
        '[server]\ndrain_grace_s = 3.0\ntcp_address = "127.0.0.1:7000"\n'
        "[model]\nmax_num_seqs = 4\n"
    )
    monkeypatch.setenv("EDGEAGENT_CONFIG", str(path))
    return path


def test_toml_overrides_defaults(config_file: Path) -> None:
    settings = Settings()
    assert settings.log_level == "WARNING"
    assert settings.server.drain_grace_s == 3.0
    assert settings.model.max_num_seqs == 4
    assert settings.socket_path == Path("/run/from-toml/edgeagent.sock")


def test_env_overrides_toml(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEAGENT_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("EDGEAGENT_SERVER__DRAIN_GRACE_S", "7.5")
    settings = Settings()
    assert settings.log_level == "DEBUG"
    assert settings.server.drain_grace_s == 7.5
    assert settings.server.tcp_address == "127.0.0.1:7000"  # untouched keys keep the TOML value


def test_hub_token_from_systemd_credentials_is_redacted(
    config_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "hub_token").write_text("hf_secret_value")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    settings = Settings()
    assert settings.hub_token is not None
    assert settings.hub_token.get_secret_value() == "hf_secret_value"
    assert "hf_secret_value" not in repr(settings.redacted())
    assert settings.redacted()["hub_token"] == "**********"


def test_systemd_directories_are_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEAGENT_CONFIG", "/nonexistent.toml")
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/edgeagent")
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/edgeagent")
    settings = Settings()
    assert settings.state_dir == Path("/var/lib/edgeagent")
    assert settings.socket_path == Path("/run/edgeagent/edgeagent.sock")


def test_bad_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEAGENT_CONFIG", "/nonexistent.toml")
    monkeypatch.setenv("EDGEAGENT_MODEL__MAX_NUM_SEQS", "0")
    with pytest.raises(ValueError, match="max_num_seqs"):
        Settings()


def test_shipped_example_config_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    example = Path(__file__).resolve().parent.parent / "deploy" / "edgeagent.toml.example"
    monkeypatch.setenv("EDGEAGENT_CONFIG", str(example))
    settings = Settings()
    assert settings.server.socket_mode == 0o660
    assert settings.limits.default_max_tokens == 512
