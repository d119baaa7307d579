"""TLS, mutual TLS and bearer tokens against real gRPC servers on 127.0.0.1.

Certificates are made at test time with the openssl CLI (a CA, a server certificate
for localhost / 127.0.0.1, a client certificate from that CA, and a second, unrelated
CA with its own client), so nothing secret or expiring is committed. Every call has a
deadline and every server is stopped by its fixture, so a broken handshake fails a
test instead of hanging it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from pydantic import SecretStr, ValidationError

from shared.security import (
    AuthSettings,
    BearerTokenInterceptor,
    ClientTlsSettings,
    SecurityConfigError,
    TlsSettings,
    add_server_port,
    call_credentials_metadata,
    channel_credentials,
    channel_options,
    open_channel,
    server_credentials,
    server_interceptors,
)
from tests.pki import Pki, make_pki, openssl

pytestmark = pytest.mark.timeout(60)

CALL_TIMEOUT_S = 5.0
TOKEN = "s3cret-token-0123456789abcdef"
SAY = "/test.Echo/Say"
OPEN = "/test.Echo/Open"
STREAM = "/test.Echo/Stream"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"


# --- certificates ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# --- servers -----------------------------------------------------------------------------


def _say(request: bytes, _context: grpc.ServicerContext) -> bytes:
    return b"echo:" + request


def _stream(request: bytes, _context: grpc.ServicerContext) -> Iterator[bytes]:
    yield b"first:" + request
    yield b"second:" + request


@dataclass
class TestServer:
    __test__ = False  # not a test class despite the name

    server: grpc.Server
    port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


ServerFactory = Callable[..., TestServer]


@pytest.fixture
def start_server() -> Iterator[ServerFactory]:
    """Start servers with the standard health service and a bytes-in/bytes-out test.Echo."""
    started: list[grpc.Server] = []

    def start(tls: TlsSettings | None = None, auth: AuthSettings | None = None) -> TestServer:
        interceptors = server_interceptors(auth) if auth is not None else []
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=interceptors)
        started.append(server)
        health_servicer = health.HealthServicer()
        health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        echo = grpc.method_handlers_generic_handler(
            "test.Echo",
            {
                "Say": grpc.unary_unary_rpc_method_handler(_say),
                "Open": grpc.unary_unary_rpc_method_handler(_say),
                "Stream": grpc.unary_stream_rpc_method_handler(_stream),
            },
        )
        server.add_generic_rpc_handlers((echo,))
        port = add_server_port(server, "127.0.0.1:0", tls or TlsSettings())
        assert port > 0
        server.start()
        return TestServer(server, port)

    yield start
    for server in started:
        server.stop(None).wait(CALL_TIMEOUT_S)


@pytest.fixture
def channels() -> Iterator[Callable[[grpc.Channel], grpc.Channel]]:
    """Register channels to be closed after the test."""
    opened: list[grpc.Channel] = []

    def track(channel: grpc.Channel) -> grpc.Channel:
        opened.append(channel)
        return channel

    yield track
    for channel in opened:
        channel.close()


def _call(
    channel: grpc.Channel, method: str = SAY, payload: bytes = b"hi", metadata: tuple[tuple[str, str], ...] = ()
) -> bytes:
    response: bytes = channel.unary_unary(method, None, None)(payload, timeout=CALL_TIMEOUT_S, metadata=metadata)
    return response


def _health(channel: grpc.Channel) -> Any:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S)


def _rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def _code(error: grpc.RpcError) -> grpc.StatusCode:
    return error.code()


def _details(error: grpc.RpcError) -> str:
    return error.details() or ""


def _server_tls(pki: Pki, *, mutual: bool = False) -> TlsSettings:
    return TlsSettings(cert_file=pki.server_cert, key_file=pki.server_key, client_ca_file=pki.ca if mutual else None)


# --- TLS ---------------------------------------------------------------------------------


def test_tls_server_and_tls_client(
    pki: Pki, start_server: ServerFactory, channels: Callable[[grpc.Channel], grpc.Channel]
) -> None:
    server = start_server(tls=_server_tls(pki))
    channel = channels(open_channel(server.target, ClientTlsSettings(ca_file=pki.ca)))
    assert _call(channel) == b"echo:hi"
    assert _health(channel).status == health_pb2.HealthCheckResponse.SERVING


def test_server_name_override_checks_the_certificate_against_that_name(
    pki: Pki, start_server: ServerFactory, channels: Callable[[grpc.Channel], grpc.Channel]
) -> None:
    server = start_server(tls=_server_tls(pki))
    right = ClientTlsSettings(ca_file=pki.ca, server_name_override="localhost")
    assert channel_options(right) == [("grpc.ssl_target_name_override", "localhost")]
    assert _call(channels(open_channel(server.target, right))) == b"echo:hi"
    wrong = ClientTlsSettings(ca_file=pki.ca, server_name_override="retrieval.example")
    error = _rpc_error(lambda: _call(channels(open_channel(server.target, wrong))))
    assert _code(error) == grpc.StatusCode.UNAVAILABLE


def test_plaintext_client_to_tls_server_fails_fast(
    pki: Pki, start_server: ServerFactory, channels: Callable[[grpc.Channel], grpc.Channel]
) -> None:
    server = start_server(tls=_server_tls(pki))
    channel = channels(open_channel(server.target, ClientTlsSettings()))
    error = _rpc_error(lambda: _call(channel))
    assert _code(error) == grpc.StatusCode.UNAVAILABLE


def test_tls_client_to_plaintext_server_fails_fast(
    pki: Pki, start_server: ServerFactory, channels: Callable[[grpc.Channel], grpc.Channel]
) -> None:
    server = start_server()
    channel = channels(open_channel(server.target, ClientTlsSettings(ca_file=pki.ca)))
    assert _code(_rpc_error(lambda: _call(channel))) == grpc.StatusCode.UNAVAILABLE


def test_client_rejects_a_server_certificate_from_another_ca(
    pki: Pki, start_server: ServerFactory, channels: Callable[[grpc.Channel], grpc.Channel]
) -> None:
    server = start_server(tls=_server_tls(pki))
    channel = channels(open_channel(server.target, ClientTlsSettings(ca_file=pki.other_ca)))
    assert _code(_rpc_error(lambda: _call(channel))) == grpc.StatusCode.UNAVAILABLE


# --- mutual TLS --------------------------------------------------------------------------


def test_mutual_tls_accepts_a_client_certificate_from_the_ca(
    pki: Pki, start_server: ServerFactory, channels: Callable[[grpc.Channel], grpc.Channel]
) -> None:
    server = start_server(tls=_server_tls(pki, mutual=True))
    client = ClientTlsSettings(ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.client_key)
    channel = channels(open_channel(server.target, client))
    assert _call(channel) == b"echo:hi"


def test_mutual_tls_rejects_a_client_without_certificate(
    pki: Pki, start_server: ServerFactory, channels: Callable[[grpc.Channel], grpc.Channel]
) -> None:
    server = start_server(tls=_server_tls(pki, mutual=True))
    channel = channels(open_channel(server.target, ClientTlsSettings(ca_file=pki.ca)))
    assert _code(_rpc_error(lambda: _call(channel))) == grpc.StatusCode.UNAVAILABLE
    # Probes without a certificate fail too: mutual TLS covers health as well.
    assert _code(_rpc_error(lambda: _health(channel))) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_rejects_a_client_certificate_from_another_ca(
    pki: Pki, start_server: ServerFactory, channels: Callable[[grpc.Channel], grpc.Channel]
) -> None:
    server = start_server(tls=_server_tls(pki, mutual=True))
    intruder = ClientTlsSettings(ca_file=pki.ca, cert_file=pki.other_client_cert, key_file=pki.other_client_key)
    channel = channels(open_channel(server.target, intruder))
    assert _code(_rpc_error(lambda: _call(channel))) == grpc.StatusCode.UNAVAILABLE


# --- bearer token ------------------------------------------------------------------------


@pytest.fixture
def token_server(start_server: ServerFactory) -> TestServer:
    return start_server(auth=AuthSettings(token=SecretStr(TOKEN), require_for_all=True))


def test_call_without_token_is_unauthenticated_and_says_what_to_send(
    token_server: TestServer, channels: Callable[[grpc.Channel], grpc.Channel]
) -> None:
    channel = channels(grpc.insecure_channel(token_server.target))
    error = _rpc_error(lambda: _call(channel))
    assert _code(error) == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer <token>" in _details(error)
    assert "missing" in _details(error)


def test_wrong_token_is_unauthenticated_and_does_not_reveal_the_token(
    token_server: TestServer, channels: Callable[[grpc.Channel], grpc.Channel], caplog: pytest.LogCaptureFixture
) -> None:
    channel = channels(grpc.insecure_channel(token_server.target))
    with caplog.at_level(logging.INFO, logger="shared.security"):
        error = _rpc_error(lambda: _call(channel, metadata=call_credentials_metadata("not-the-token-at-all-00")))
    assert _code(error) == grpc.StatusCode.UNAUTHENTICATED
    assert TOKEN not in _details(error)
    assert "not-the-token" not in _details(error)
    assert "invalid bearer token" in _details(error)
    rejections = [record for record in caplog.records if record.getMessage() == "request unauthenticated"]
    assert len(rejections) == 1
    fields = getattr(rejections[0], "fields", {})
    assert fields == {"method": SAY, "reason": "invalid bearer token"}
    assert rejections[0].levelno == logging.INFO
    assert TOKEN not in caplog.text


def test_non_bearer_authorization_is_unauthenticated(
    token_server: TestServer, channels: Callable[[grpc.Channel], grpc.Channel]
) -> None:
    channel = channels(grpc.insecure_channel(token_server.target))
    error = _rpc_error(lambda: _call(channel, metadata=(("authorization", f"Basic {TOKEN}"),)))
    assert _code(error) == grpc.StatusCode.UNAUTHENTICATED
    assert "not a bearer token" in _details(error)


def test_right_token_is_accepted(token_server: TestServer, channels: Callable[[grpc.Channel], grpc.Channel]) -> None:
    channel = channels(grpc.insecure_channel(token_server.target))
    assert _call(channel, metadata=call_credentials_metadata(SecretStr(TOKEN))) == b"echo:hi"
    # The scheme is case-insensitive (RFC 7235).
    assert _call(channel, metadata=(("authorization", f"bearer {TOKEN}"),)) == b"echo:hi"


def test_unary_stream_without_token_is_unauthenticated(
    token_server: TestServer, channels: Callable[[grpc.Channel], grpc.Channel]
) -> None:
    channel = channels(grpc.insecure_channel(token_server.target))
    stream = channel.unary_stream(STREAM, None, None)
    error = _rpc_error(lambda: list(stream(b"x", timeout=CALL_TIMEOUT_S)))
    assert _code(error) == grpc.StatusCode.UNAUTHENTICATED
    metadata = call_credentials_metadata(TOKEN)
    assert list(stream(b"x", timeout=CALL_TIMEOUT_S, metadata=metadata)) == [b"first:x", b"second:x"]


def test_health_check_needs_no_token(
    token_server: TestServer, channels: Callable[[grpc.Channel], grpc.Channel]
) -> None:
    channel = channels(grpc.insecure_channel(token_server.target))
    assert _health(channel).status == health_pb2.HealthCheckResponse.SERVING


def test_unknown_method_stays_unimplemented(
    token_server: TestServer, channels: Callable[[grpc.Channel], grpc.Channel]
) -> None:
    channel = channels(grpc.insecure_channel(token_server.target))
    assert _code(_rpc_error(lambda: _call(channel, "/test.Echo/Nope"))) == grpc.StatusCode.UNIMPLEMENTED


def test_protected_methods_only_leaves_other_methods_open(
    start_server: ServerFactory, channels: Callable[[grpc.Channel], grpc.Channel]
) -> None:
    server = start_server(auth=AuthSettings(token=SecretStr(TOKEN), protected_methods=(SAY,)))
    channel = channels(grpc.insecure_channel(server.target))
    assert _call(channel, OPEN) == b"echo:hi"
    assert _code(_rpc_error(lambda: _call(channel, SAY))) == grpc.StatusCode.UNAUTHENTICATED
    assert _call(channel, SAY, metadata=call_credentials_metadata(TOKEN)) == b"echo:hi"


def test_token_over_mutual_tls(
    pki: Pki, start_server: ServerFactory, channels: Callable[[grpc.Channel], grpc.Channel]
) -> None:
    server = start_server(
        tls=_server_tls(pki, mutual=True), auth=AuthSettings(token=SecretStr(TOKEN), require_for_all=True)
    )
    client = ClientTlsSettings(ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.client_key)
    channel = channels(open_channel(server.target, client))
    assert _code(_rpc_error(lambda: _call(channel))) == grpc.StatusCode.UNAUTHENTICATED
    assert _call(channel, metadata=call_credentials_metadata(TOKEN)) == b"echo:hi"


def test_interceptor_unit_rules() -> None:
    interceptor = BearerTokenInterceptor(TOKEN, protected_methods=(SAY,), require_for_all=False)
    assert interceptor.requires_token(SAY)
    assert not interceptor.requires_token(OPEN)
    everything = BearerTokenInterceptor(TOKEN)
    assert everything.requires_token(OPEN)
    assert not everything.requires_token(HEALTH_CHECK)
    assert not everything.requires_token("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
    assert not everything.requires_token("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo")
    assert TOKEN not in repr(everything)
    assert server_interceptors(AuthSettings()) == []
    (admin_only,) = server_interceptors(AuthSettings(token=TOKEN), always_protected=(SAY,))
    assert isinstance(admin_only, BearerTokenInterceptor)
    assert admin_only.requires_token(SAY)
    assert not admin_only.requires_token(OPEN)


# --- settings and files ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "fields"),
    [
        (TlsSettings, {"key_file": "server.key"}),
        (TlsSettings, {"cert_file": "server.pem"}),
        (ClientTlsSettings, {"ca_file": "ca.pem", "key_file": "client.key"}),
        (ClientTlsSettings, {"ca_file": "ca.pem", "cert_file": "client.pem"}),
    ],
)
def test_half_a_key_pair_names_both_fields(
    model: type[TlsSettings | ClientTlsSettings], fields: dict[str, str]
) -> None:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(fields)
    assert "cert_file" in str(caught.value)
    assert "key_file" in str(caught.value)


@pytest.mark.parametrize(
    ("model", "fields", "message"),
    [
        (TlsSettings, {"client_ca_file": "ca.pem"}, "client_ca_file"),
        (TlsSettings, {"cert_fle": "server.pem"}, "cert_fle"),
        (ClientTlsSettings, {"cert_file": "c.pem", "key_file": "c.key"}, "ca_file"),
        (ClientTlsSettings, {"server_name_override": "localhost"}, "ca_file"),
        (AuthSettings, {"token": "short"}, "shorter than 16"),
        (AuthSettings, {"token": "has spaces in it 0123456789"}, "may only contain"),
        (AuthSettings, {"require_for_all": True}, "token is not"),
        (AuthSettings, {"token": TOKEN, "protected_methods": ["Reload"]}, "full method name"),
        (AuthSettings, {"token": TOKEN, "protected_methods": [HEALTH_CHECK]}, "never token-protected"),
    ],
)
def test_inconsistent_settings_are_rejected(model: type[Any], fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        model.model_validate(fields)


def test_token_is_hidden_in_settings_repr() -> None:
    auth = AuthSettings.model_validate({"token": TOKEN, "require_for_all": True})
    assert TOKEN not in repr(auth)
    assert TOKEN not in str(auth.model_dump())


def test_plaintext_settings_build_no_credentials() -> None:
    assert server_credentials(TlsSettings()) is None
    assert channel_credentials(ClientTlsSettings()) is None
    assert channel_options(ClientTlsSettings()) == []


def test_missing_file_names_the_setting_and_the_file(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(SecurityConfigError, match=r"retrieval\.tls\.cert_file = .*nope\.pem: no such file"):
        server_credentials(TlsSettings(cert_file=missing, key_file=pki.server_key), setting="retrieval.tls")
    with pytest.raises(SecurityConfigError, match=r"tls\.client_ca_file = .*nope\.pem: no such file"):
        server_credentials(_server_tls(pki).model_copy(update={"client_ca_file": missing}))
    with pytest.raises(SecurityConfigError, match=r"tls\.ca_file = .*nope\.pem: no such file"):
        channel_credentials(ClientTlsSettings(ca_file=missing))


def test_files_that_are_not_pem_are_rejected(pki: Pki, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(SecurityConfigError, match=r"tls\.cert_file = .*garbage\.pem: not a PEM certificate"):
        server_credentials(TlsSettings(cert_file=garbage, key_file=pki.server_key))
    with pytest.raises(SecurityConfigError, match=r"tls\.ca_file = .*garbage\.pem: not a PEM CA certificate"):
        channel_credentials(ClientTlsSettings(ca_file=garbage))
    # Certificate and key swapped.
    with pytest.raises(SecurityConfigError, match=r"tls\.key_file = .*localhost\.pem: not a PEM private key"):
        server_credentials(TlsSettings(cert_file=pki.server_cert, key_file=pki.server_cert))
    with pytest.raises(SecurityConfigError, match=r"tls\.cert_file"):
        server_credentials(TlsSettings(cert_file=tmp_path, key_file=pki.server_key))
    corrupt = tmp_path / "corrupt.pem"
    corrupt.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(SecurityConfigError, match=r"corrupt\.pem"):
        server_credentials(TlsSettings(cert_file=corrupt, key_file=pki.server_key))
    with pytest.raises(SecurityConfigError, match=r"tls\.ca_file = .*corrupt\.pem"):
        channel_credentials(ClientTlsSettings(ca_file=corrupt))


def test_key_of_another_certificate_is_rejected(pki: Pki) -> None:
    with pytest.raises(SecurityConfigError, match=r"is not the key of tls\.cert_file"):
        server_credentials(TlsSettings(cert_file=pki.server_cert, key_file=pki.client_key))
    mismatched = ClientTlsSettings(ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.server_key)
    with pytest.raises(SecurityConfigError, match=r"ranking\.retrieval_tls\.key_file"):
        channel_credentials(mismatched, setting="ranking.retrieval_tls")


def test_encrypted_key_is_rejected_without_prompting(pki: Pki, tmp_path: Path) -> None:
    encrypted = tmp_path / "encrypted.key"
    openssl(
        "pkey", "-in", pki.server_key, "-aes256", "-passout", "pass:secret", "-out", encrypted,
        cwd=tmp_path,
    )  # fmt: skip
    with pytest.raises(SecurityConfigError, match="passphrase-protected"):
        server_credentials(TlsSettings(cert_file=pki.server_cert, key_file=encrypted))
