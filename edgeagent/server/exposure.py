"""Who may call over TCP, whatever the protocol: the rules both listeners (gRPC and OpenAI
HTTP) and preflight apply, and the TLS files they read. No gRPC here (`auth.py` holds the
bearer-token interceptor and gRPC's credentials)."""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from edgeagent.errors import ConfigError
from edgeagent.settings import ServerSettings


def check_tcp_callers(settings: ServerSettings, api_token: str | None) -> None:
    """Every TCP caller must prove who it is: with the bearer token, or a client certificate
    from our CA (mutual TLS). TLS alone only hides the traffic; without TLS the token crosses
    the network in clear, which only loopback may allow."""
    check_tcp_address(settings, api_token, settings.tcp_address, "server.tcp_address")


def check_tcp_address(
    settings: ServerSettings, api_token: str | None, address: str | None, name: str
) -> None:
    """The rules of `check_tcp_callers` for the TCP listener `address` (setting `name`)."""
    if address is None:
        return
    if api_token is None and settings.tls_client_ca_file is None:
        raise ConfigError(
            f"{name} {address} lets anyone call: set an api_token "
            f"credential (bearer token) or mutual TLS (server.tls_client_ca_file with "
            f"server.tls_cert_file and tls_key_file)"
        )
    if settings.tls_cert_file is None and not _is_loopback(address):
        raise ConfigError(
            f"{name} {address} is reachable from the network without TLS: anyone "
            f"on it could read the bearer token; set server.tls_cert_file and tls_key_file, "
            f"or listen on 127.0.0.1"
        )


def _is_loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name (or "" for every address): not known to stay on this box
        return False


@dataclass(frozen=True)
class TlsFiles:
    """The TCP listeners' PEM files, read and checked: the key matches the certificate, and
    the client CA (mutual TLS) is a certificate."""

    key: bytes
    cert: bytes
    client_ca: bytes | None


def tls_files(settings: ServerSettings) -> TlsFiles | None:
    """The TLS files when a certificate is configured, checked so a bad pair fails at start;
    None for plaintext."""
    if settings.tls_cert_file is None:
        if settings.tls_client_ca_file is not None:
            raise ConfigError("server.tls_client_ca_file needs server.tls_cert_file/tls_key_file")
        return None
    if settings.tls_key_file is None:
        raise ConfigError("server.tls_cert_file needs server.tls_key_file")
    _check_pair(settings.tls_cert_file, settings.tls_key_file)
    if settings.tls_client_ca_file is not None:
        _check_ca(settings.tls_client_ca_file)
    return TlsFiles(
        key=_read(settings.tls_key_file),
        cert=_read(settings.tls_cert_file),
        client_ca=_read(settings.tls_client_ca_file) if settings.tls_client_ca_file else None,
    )


def _check_pair(cert: Path, key: Path) -> None:
    for path in (cert, key):
        _read(path)
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except ssl.SSLError as error:
        raise ConfigError(
            f"server.tls_cert_file {cert} and tls_key_file {key} are not a usable PEM pair: "
            f"{error.reason or error}"
        ) from None


def _check_ca(path: Path) -> None:
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_verify_locations(cafile=path)
    except ssl.SSLError as error:
        raise ConfigError(
            f"server.tls_client_ca_file {path} is not a PEM certificate: {error.reason or error}"
        ) from None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror}") from None
