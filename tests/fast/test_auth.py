"""The local API's locks, with real sockets and real certificates made here.

- Unix socket: mode 0660 and the client apps' group; a process of another user is refused by
  the kernel. The admin socket is 0600.
- TCP: refused unless callers prove who they are (a bearer token or mutual TLS); bearer token
  (missing or wrong: UNAUTHENTICATED, health exempt, the admin API only with its own token);
  TLS with a token; mutual TLS; a bad certificate pair refused at start.
"""

from __future__ import annotations

import asyncio
import datetime
import grp
import ipaddress
import logging
import os
import shutil
import socket
import ssl
import stat
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgeagent.client import Client, Parameters, Tls
from edgeagent.errors import ConfigError
from edgeagent.metrics import Metrics
from edgeagent.server.admin import SERVICE_NAME as ADMIN_SERVICE_NAME
from edgeagent.server.admin import AdminService
from edgeagent.server.app import SERVICE_NAME, ApiServer, Tokens
from edgeagent.server.auth import server_credentials
from edgeagent.server.exposure import check_tcp_callers
from edgeagent.server.generation import GenerationCore
from edgeagent.server.health import SlotHealth
from edgeagent.server.openai.listen import HttpApi
from edgeagent.server.service import GenerationService
from edgeagent.settings import LimitSettings, ServerSettings
from edgeagent.v1 import admin_pb2 as admin_pb
from edgeagent.v1 import admin_pb2_grpc as admin_grpc
from fast.runner import Box, slot_and_updater

API_TOKEN = "api-4f1d2c9e-not-a-real-token"
ADMIN_TOKEN = "admin-77aa01-not-a-real-token"


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # self-signed: not from our CA
    stranger_key: Path


def _key_and_cert(
    out: Path, name: str, issuer: tuple[x509.Name, Any] | None, *, ca: bool = False
) -> tuple[x509.Name, Any]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = issuer if issuer else (subject, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    cert = builder.sign(issuer_key, hashes.SHA256())
    (out / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return subject, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    out = tmp_path_factory.mktemp("pki")
    ca = _key_and_cert(out, "ca", None, ca=True)
    _key_and_cert(out, "server", ca)
    _key_and_cert(out, "client", ca)
    _key_and_cert(out, "stranger", None)
    return Pki(*(out / name for name in (
        "ca.pem", "server.pem", "server.key", "client.pem", "client.key", "stranger.pem",
        "stranger.key",
    )))  # fmt: skip


ServerStarter = Callable[..., Awaitable[ApiServer]]


@pytest.fixture
async def start_server(box: Box, tmp_path: Path) -> AsyncIterator[ServerStarter]:
    """Start an ApiServer (app socket, admin socket, TCP as configured) as the daemon assembles
    it, over a fake engine; stopped at the end of the test."""
    servers: list[ApiServer] = []
    slot, updater = await slot_and_updater(box)

    async def start(
        settings: ServerSettings, tokens: Tokens | None = None, where: Path = tmp_path
    ) -> ApiServer:
        server = ApiServer(
            GenerationService(slot, LimitSettings()),
            SlotHealth(slot, [SERVICE_NAME, ADMIN_SERVICE_NAME]), settings, where / "app.sock",
            AdminService(slot, updater), where / "admin.sock", tokens or Tokens(),
        )  # fmt: skip
        servers.append(server)
        await server.start()
        return server

    yield start
    for server in servers:
        await server.stop(grace=None)


def _tcp(**options: Any) -> ServerSettings:
    return ServerSettings(tcp_address="127.0.0.1:0", **options)


def _call(target: str, **client: Any) -> grpc.StatusCode:
    """One short generation; OK or the status code it failed with."""
    try:
        with Client(target, timeout=30, **client) as api:
            api.generate("Hello", Parameters(max_tokens=2, temperature=0))
    except grpc.RpcError as error:
        return error.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def _admin_status(target: str, token: str | None) -> grpc.StatusCode:
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    with grpc.insecure_channel(target) as channel:
        stub = admin_grpc.AdminServiceStub(channel)  # type: ignore[no-untyped-call]
        try:
            stub.GetStatus(admin_pb.GetStatusRequest(), timeout=30, metadata=metadata)
        except grpc.RpcError as error:
            return error.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def _health(target: str, credentials: grpc.ChannelCredentials | None = None) -> int:
    channel = (
        grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    )
    with channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=30
        )
        return int(reply.status)


async def test_tcp_where_anyone_could_call_is_refused(
    start_server: ServerStarter, pki: Pki
) -> None:
    """Plaintext without a token, and TLS without a token or client certificates: TLS hides
    the traffic but says nothing of who calls."""
    with pytest.raises(ConfigError, match="lets anyone call"):
        await start_server(_tcp())
    with pytest.raises(ConfigError, match="lets anyone call"):
        await start_server(_tcp(tls_cert_file=pki.server_cert, tls_key_file=pki.server_key))


@pytest.mark.parametrize("host", ["0.0.0.0", "[::]", "192.168.1.20", "edge-box.lan"])
def test_a_bearer_token_in_clear_off_loopback_is_refused(host: str, pki: Pki) -> None:
    plaintext = ServerSettings(tcp_address=f"{host}:50051")
    with pytest.raises(ConfigError, match="reachable from the network without TLS"):
        check_tcp_callers(plaintext, API_TOKEN)
    with_tls = plaintext.model_copy(
        update={"tls_cert_file": pki.server_cert, "tls_key_file": pki.server_key}
    )
    check_tcp_callers(with_tls, API_TOKEN)
    for loopback in ("127.0.0.1", "[::1]", "localhost"):
        check_tcp_callers(ServerSettings(tcp_address=f"{loopback}:50051"), API_TOKEN)


def test_a_certificate_and_a_key_that_are_not_a_pair_are_refused(pki: Pki) -> None:
    mismatched = _tcp(tls_cert_file=pki.server_cert, tls_key_file=pki.client_key)
    with pytest.raises(ConfigError, match="not a usable PEM pair"):
        server_credentials(mismatched)
    not_a_ca = _tcp(tls_cert_file=pki.server_cert, tls_key_file=pki.server_key,
                    tls_client_ca_file=pki.server_key)  # fmt: skip
    with pytest.raises(ConfigError, match="not a PEM certificate"):
        server_credentials(not_a_ca)


async def test_bearer_token_over_tcp(
    start_server: ServerStarter, caplog: pytest.LogCaptureFixture
) -> None:
    """Missing or wrong token: UNAUTHENTICATED; right token: served; health needs none; the
    admin API is not on TCP without an admin token. No token appears in the logs."""
    caplog.set_level(logging.DEBUG)
    server = await start_server(_tcp(), Tokens(api=API_TOKEN))
    target = f"127.0.0.1:{server.tcp_port}"

    missing = await asyncio.to_thread(_call, target)
    wrong = await asyncio.to_thread(_call, target, token=API_TOKEN + "x")
    right = await asyncio.to_thread(_call, target, token=API_TOKEN)
    health = await asyncio.to_thread(_health, target)
    admin = await asyncio.to_thread(_admin_status, target, API_TOKEN)

    assert (missing, wrong, right) == (
        grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.OK,
    )  # fmt: skip
    assert health == health_pb2.HealthCheckResponse.SERVING
    assert admin == grpc.StatusCode.UNIMPLEMENTED
    assert "refused /edgeagent.v1.GenerationService/Generate" in caplog.text
    assert API_TOKEN not in caplog.text


async def test_the_admin_api_over_tcp_takes_only_its_own_token(
    start_server: ServerStarter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server = await start_server(_tcp(), Tokens(api=API_TOKEN, admin=ADMIN_TOKEN))
    target = f"127.0.0.1:{server.tcp_port}"
    with_api_token = await asyncio.to_thread(_admin_status, target, API_TOKEN)
    with_admin_token = await asyncio.to_thread(_admin_status, target, ADMIN_TOKEN)
    assert with_api_token == grpc.StatusCode.UNAUTHENTICATED
    assert with_admin_token == grpc.StatusCode.OK
    assert ADMIN_TOKEN not in caplog.text


async def test_tls_and_mutual_tls(start_server: ServerStarter, pki: Pki) -> None:
    """TLS (with a token): a client trusting our CA is served, a plaintext one is not. Mutual
    TLS: a client without a certificate, or with one our CA did not sign, is refused at the
    handshake."""
    tls = await start_server(
        _tcp(tls_cert_file=pki.server_cert, tls_key_file=pki.server_key), Tokens(api=API_TOKEN)
    )
    tls_target = f"localhost:{tls.tcp_port}"
    over_tls = await asyncio.to_thread(_call, tls_target, tls=Tls(pki.ca), token=API_TOKEN)
    plaintext = await asyncio.to_thread(_call, tls_target, token=API_TOKEN)
    await tls.stop(grace=None)

    mutual = await start_server(_tcp(
        tls_cert_file=pki.server_cert, tls_key_file=pki.server_key, tls_client_ca_file=pki.ca,
    ))  # fmt: skip
    target = f"localhost:{mutual.tcp_port}"
    no_cert = await asyncio.to_thread(_call, target, tls=Tls(pki.ca))
    stranger = await asyncio.to_thread(
        _call, target, tls=Tls(pki.ca, pki.stranger_cert, pki.stranger_key)
    )
    ours = await asyncio.to_thread(_call, target, tls=Tls(pki.ca, pki.client_cert, pki.client_key))

    assert over_tls == grpc.StatusCode.OK
    assert plaintext == grpc.StatusCode.UNAVAILABLE
    assert no_cert == grpc.StatusCode.UNAVAILABLE
    assert stranger == grpc.StatusCode.UNAVAILABLE
    assert ours == grpc.StatusCode.OK


async def test_tls_with_a_token_needs_both(start_server: ServerStarter, pki: Pki) -> None:
    server = await start_server(
        _tcp(tls_cert_file=pki.server_cert, tls_key_file=pki.server_key), Tokens(api=API_TOKEN)
    )
    target = f"localhost:{server.tcp_port}"
    no_token = await asyncio.to_thread(_call, target, tls=Tls(pki.ca))
    both = await asyncio.to_thread(_call, target, tls=Tls(pki.ca), token=API_TOKEN)
    assert (no_token, both) == (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.OK)


@pytest.mark.skipif(os.geteuid() != 0, reason="changing user and socket group needs root")
async def test_unix_sockets_let_in_only_owner_and_group(start_server: ServerStarter) -> None:
    """The app socket is 0660 and belongs to the apps' group; the admin socket is 0600. A
    process running as another user (nobody) is refused by the kernel: EACCES."""
    group = grp.getgrgid(os.getgid()).gr_name if os.getgid() else "nogroup"
    # Like /run/edgeagent: a directory anyone may traverse, so the sockets' modes decide.
    where = Path(tempfile.mkdtemp(prefix="edgeagent-auth-", dir="/tmp"))
    await asyncio.to_thread(where.chmod, 0o755)
    await start_server(ServerSettings(socket_group=group), where=where)
    app, admin = where / "app.sock", where / "admin.sock"
    app_stat, admin_stat = app.stat(), admin.stat()
    as_nobody = await asyncio.to_thread(_connect_as, 65534, 65533, app)  # not in the group
    as_group_member = await asyncio.to_thread(_connect_as, 65534, grp.getgrnam(group).gr_gid, app)
    admin_as_group_member = await asyncio.to_thread(
        _connect_as, 65534, grp.getgrnam(group).gr_gid, admin
    )
    assert stat.S_IMODE(app_stat.st_mode) == 0o660
    assert app_stat.st_gid == grp.getgrnam(group).gr_gid
    assert stat.S_IMODE(admin_stat.st_mode) == 0o600
    assert as_nobody == "EACCES"
    assert as_group_member == "connected"
    assert admin_as_group_member == "EACCES"
    await asyncio.to_thread(shutil.rmtree, where)


def _connect_as(uid: int, gid: int, path: Path) -> str:
    """Connect to `path` from a child process running as uid:gid; what the kernel said."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to uid/gid, try, report, exit without cleanup
        os.close(read)
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(str(path))
            answer = "connected"
        except PermissionError:
            answer = "EACCES"
        except OSError as error:
            answer = f"error {error.errno}"
        os.write(write, answer.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        answer = pipe.read()
    os.waitpid(pid, 0)
    return answer


async def test_http_api_follows_the_same_rules(box: Box, pki: Pki, tmp_path: Path) -> None:
    """The OpenAI-compatible API: its socket has the app socket's mode; on TCP, mutual TLS from
    the same files lets in only our CA's clients; plaintext off loopback is refused at start."""
    slot, _ = await slot_and_updater(box)
    core = GenerationCore(slot, LimitSettings(), Metrics())
    with pytest.raises(ConfigError, match="without TLS"):
        await HttpApi(core, ServerSettings(http_tcp_address="0.0.0.0:0"), tmp_path / "x.sock",
                      API_TOKEN).start()  # fmt: skip
    settings = ServerSettings(
        http_tcp_address="127.0.0.1:0", tls_cert_file=pki.server_cert,
        tls_key_file=pki.server_key, tls_client_ca_file=pki.ca,
    )  # fmt: skip
    api = HttpApi(core, settings, tmp_path / "openai.sock")
    await api.start()
    try:
        mode = stat.S_IMODE((tmp_path / "openai.sock").stat().st_mode)
        url = f"https://localhost:{api.tcp_port}/v1/models"
        ours = await _https_get(url, _tls_context(pki, pki.client_cert, pki.client_key))
        stranger = await _https_get(url, _tls_context(pki, pki.stranger_cert, pki.stranger_key))
        no_cert = await _https_get(url, _tls_context(pki))
    finally:
        await api.stop()
    assert mode == 0o660
    assert ours == 200
    assert stranger == no_cert == "refused"


def _tls_context(pki: Pki, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki.ca)
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


async def _https_get(url: str, context: ssl.SSLContext) -> int | str:
    async with httpx.AsyncClient(verify=context, timeout=10) as client:
        try:
            return (await client.get(url)).status_code
        except httpx.HTTPError:
            return "refused"
