"""TLS, mutual TLS and bearer tokens for Vitrine's gRPC servers and channels.

Certificates are PEM files named in settings; every setting left unset means
"plaintext" / "no token", so a development setup needs nothing. Settings are checked
for consistency when they are validated (a key without its certificate is a typo, not
a choice) and the files are read, parsed and matched when credentials are built, so a
bad mount fails at start with the setting and the file named, never at the first
handshake.

The bearer-token check is a server interceptor. Health and reflection are always left
open so probes and grpcurl keep working whatever the token settings say.
"""

from __future__ import annotations

import hmac
import logging
import re
import ssl
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
from pydantic import BaseModel, ConfigDict, SecretStr, field_validator, model_validator

from shared.logs import event

log = logging.getLogger(__name__)

AUTHORIZATION_KEY = "authorization"  # gRPC metadata keys are lower-case on the wire
BEARER_SCHEME = b"bearer"
# Never behind the token: orchestrator probes and grpcurl carry no credentials.
ALWAYS_OPEN_PREFIXES: tuple[str, ...] = ("/grpc.health.v1.Health/", "/grpc.reflection.")
MIN_TOKEN_LENGTH = 16
_CERT_MARKER = b"-----BEGIN CERTIFICATE-----"
# Matches PKCS#8 ("BEGIN PRIVATE KEY") and the traditional RSA / EC forms.
_KEY_MARKER = b"PRIVATE KEY-----"
_METHOD_NAME = re.compile(r"^/[A-Za-z_][\w.]*/\w+$")
# RFC 6750 b64token: what may follow "Bearer " in a header (and is valid gRPC metadata).
_TOKEN_CHARS = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")


class SecurityConfigError(ValueError):
    """A certificate or key named in settings cannot be used; the message says which and why."""


# Security settings forbid unknown fields: a misspelt ``cert_fle`` must fail, not
# silently leave the server in plaintext. Frozen: nothing should flip them at run time.
_STRICT = ConfigDict(extra="forbid", frozen=True)


class TlsSettings(BaseModel):
    """Server side. No certificate: plaintext; with ``client_ca_file``: mutual TLS."""

    model_config = _STRICT

    # PEM certificate chain, leaf first, then intermediates.
    cert_file: Path | None = None
    # PEM private key of the leaf certificate, unencrypted (gRPC cannot prompt for a passphrase).
    key_file: Path | None = None
    # Set: clients must present a certificate signed by this CA (mutual TLS).
    client_ca_file: Path | None = None

    @model_validator(mode="after")
    def _consistent(self) -> TlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            given, missing = ("cert_file", "key_file") if self.key_file is None else ("key_file", "cert_file")
            raise ValueError(
                f"{given} is set but {missing} is not: TLS needs both cert_file and key_file "
                "(leave both unset for plaintext)"
            )
        if self.client_ca_file is not None and self.cert_file is None:
            raise ValueError("client_ca_file (mutual TLS) needs TLS: set cert_file and key_file too")
        return self

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None

    @property
    def mutual(self) -> bool:
        return self.client_ca_file is not None


class ClientTlsSettings(BaseModel):
    """An outgoing channel (ranking -> retrieval). No ``ca_file``: plaintext."""

    model_config = _STRICT

    # CA that signed the server's certificate; the system roots are deliberately not used,
    # so an internal channel only trusts the internal CA.
    ca_file: Path | None = None
    # Client certificate and key, for servers that require mutual TLS.
    cert_file: Path | None = None
    key_file: Path | None = None
    # Check the server certificate against this name instead of the target's host
    # (tests, IP targets, names that differ between the network and the certificate).
    server_name_override: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ClientTlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            given, missing = ("cert_file", "key_file") if self.key_file is None else ("key_file", "cert_file")
            raise ValueError(
                f"{given} is set but {missing} is not: a client certificate needs both cert_file and key_file"
            )
        if self.ca_file is None and self.cert_file is not None:
            raise ValueError("cert_file/key_file (client certificate) need TLS: set ca_file too")
        if self.ca_file is None and self.server_name_override is not None:
            raise ValueError("server_name_override only applies to TLS: set ca_file too")
        if self.server_name_override is not None and not self.server_name_override.strip():
            raise ValueError("server_name_override must not be empty")
        return self

    @property
    def enabled(self) -> bool:
        return self.ca_file is not None


class AuthSettings(BaseModel):
    """Bearer token checked by :class:`BearerTokenInterceptor`. No token: no check."""

    model_config = _STRICT

    token: SecretStr | None = None
    # Methods that need the token even when ``require_for_all`` is False (e.g. admin RPCs),
    # as full method names: "/vitrine.v1.Admin/Reload".
    protected_methods: tuple[str, ...] = ()
    require_for_all: bool = False

    @field_validator("token")
    @classmethod
    def _usable_token(cls, token: SecretStr | None) -> SecretStr | None:
        if token is None:
            return None
        # Never echo the value: the message ends up in logs.
        value = token.get_secret_value()
        if len(value) < MIN_TOKEN_LENGTH:
            raise ValueError(f"token is shorter than {MIN_TOKEN_LENGTH} characters; use a long random value")
        if not _TOKEN_CHARS.match(value):
            raise ValueError("token may only contain letters, digits and -._~+/ (RFC 6750), e.g. base64url")
        return token

    @field_validator("protected_methods")
    @classmethod
    def _full_method_names(cls, methods: tuple[str, ...]) -> tuple[str, ...]:
        for method in methods:
            if not _METHOD_NAME.match(method):
                raise ValueError(
                    f"protected method {method!r} is not a full method name like '/vitrine.v1.Admin/Reload'"
                )
            if method.startswith(ALWAYS_OPEN_PREFIXES):
                raise ValueError(f"protected method {method!r}: health and reflection are never token-protected")
        return methods

    @model_validator(mode="after")
    def _meaningful(self) -> AuthSettings:
        # Either half alone looks protected but is not: fail rather than run open.
        # A token alone is meaningful: the servers always protect their Admin RPCs with it.
        if self.token is None and (self.require_for_all or self.protected_methods):
            raise ValueError("require_for_all/protected_methods are set but token is not: nothing could be checked")
        return self

    @property
    def enabled(self) -> bool:
        return self.token is not None


# --- credentials -------------------------------------------------------------------------


def server_credentials(tls: TlsSettings, *, setting: str = "tls") -> grpc.ServerCredentials | None:
    """Credentials for ``server.add_secure_port``; None when ``tls`` means plaintext.

    ``setting`` is where ``tls`` lives in the settings ("retrieval.tls"); errors name it.
    """
    if tls.cert_file is None or tls.key_file is None:
        return None
    chain, key = _load_key_pair(tls.cert_file, tls.key_file, setting)
    client_ca = None
    if tls.client_ca_file is not None:
        client_ca = _load_ca(tls.client_ca_file, f"{setting}.client_ca_file")
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def channel_credentials(tls: ClientTlsSettings, *, setting: str = "tls") -> grpc.ChannelCredentials | None:
    """Credentials for ``grpc.secure_channel``; None when ``tls`` means plaintext."""
    if tls.ca_file is None:
        return None
    ca = _load_ca(tls.ca_file, f"{setting}.ca_file")
    chain = key = None
    if tls.cert_file is not None and tls.key_file is not None:
        chain, key = _load_key_pair(tls.cert_file, tls.key_file, setting)
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=chain)


def channel_options(tls: ClientTlsSettings) -> list[tuple[str, str]]:
    """Channel options ``tls`` implies; add them to the channel's other options."""
    if tls.server_name_override is None:
        return []
    return [("grpc.ssl_target_name_override", tls.server_name_override)]


def add_server_port(server: grpc.Server, address: str, tls: TlsSettings, *, setting: str = "tls") -> int:
    """Bind ``address`` with TLS when configured, plaintext otherwise; the bound port (0: failed)."""
    credentials = server_credentials(tls, setting=setting)
    if credentials is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, credentials)


def open_channel(
    target: str, tls: ClientTlsSettings, options: Sequence[tuple[str, Any]] = (), *, setting: str = "tls"
) -> grpc.Channel:
    """A channel to ``target``: TLS / mutual TLS when configured, plaintext otherwise."""
    credentials = channel_credentials(tls, setting=setting)
    all_options = [*options, *channel_options(tls)]
    if credentials is None:
        return grpc.insecure_channel(target, options=all_options)
    return grpc.secure_channel(target, credentials, options=all_options)


def call_credentials_metadata(token: str | SecretStr) -> tuple[tuple[str, str], ...]:
    """Metadata carrying ``token``; works on plaintext channels too, unlike
    ``grpc.access_token_call_credentials`` (which gRPC only sends over TLS)."""
    value = token.get_secret_value() if isinstance(token, SecretStr) else token
    return ((AUTHORIZATION_KEY, f"Bearer {value}"),)


def _read(path: Path, setting: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise SecurityConfigError(f"{setting} = {path}: no such file") from None
    except IsADirectoryError:
        raise SecurityConfigError(f"{setting} = {path}: is a directory, expected a PEM file") from None
    except PermissionError:
        raise SecurityConfigError(f"{setting} = {path}: not readable by this process (permissions)") from None
    except OSError as error:
        raise SecurityConfigError(f"{setting} = {path}: cannot read: {error.strerror or error}") from None


def _require_pem(data: bytes, path: Path, setting: str, what: str, marker: bytes) -> None:
    # Catches the common mix-ups (DER file, key and certificate swapped, empty file) with
    # a plain message before OpenSSL's terser one.
    if marker not in data:
        raise SecurityConfigError(f"{setting} = {path}: not a PEM {what} (no {marker.decode()!r} block)")


def _refuse_passphrase(*_: Any) -> NoReturn:
    # Without a callback OpenSSL would prompt on the terminal and hang a server start.
    raise SecurityConfigError("encrypted private key")


def _load_key_pair(cert_file: Path, key_file: Path, setting: str) -> tuple[bytes, bytes]:
    """Read a certificate chain and its key, and check that they parse and belong together.

    The check uses the standard library's OpenSSL so that a wrong, mismatched or
    encrypted file is reported here, by name, rather than as an opaque handshake failure.
    """
    chain = _read(cert_file, f"{setting}.cert_file")
    key = _read(key_file, f"{setting}.key_file")
    _require_pem(chain, cert_file, f"{setting}.cert_file", "certificate", _CERT_MARKER)
    _require_pem(key, key_file, f"{setting}.key_file", "private key", _KEY_MARKER)
    if b"ENCRYPTED" in key:
        raise SecurityConfigError(
            f"{setting}.key_file = {key_file}: the key is passphrase-protected; gRPC needs an unencrypted key"
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_cert_chain(cert_file, key_file, password=_refuse_passphrase)
    except SecurityConfigError:
        raise SecurityConfigError(
            f"{setting}.key_file = {key_file}: the key is passphrase-protected; gRPC needs an unencrypted key"
        ) from None
    except ssl.SSLError as error:
        if "KEY_VALUES_MISMATCH" in str(error) or "key values mismatch" in str(error):
            raise SecurityConfigError(
                f"{setting}.key_file = {key_file} is not the key of {setting}.cert_file = {cert_file}"
            ) from None
        raise SecurityConfigError(
            f"{setting}.cert_file = {cert_file} / {setting}.key_file = {key_file}: "
            f"not a usable PEM certificate and key ({error.reason or error})"
        ) from None
    return chain, key


def _load_ca(path: Path, setting: str) -> bytes:
    data = _read(path, setting)
    _require_pem(data, path, setting, "CA certificate", _CERT_MARKER)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cadata=data.decode("ascii", errors="replace"))
    except (ssl.SSLError, ValueError) as error:
        raise SecurityConfigError(f"{setting} = {path}: not a usable PEM CA certificate ({error})") from None
    return data


# --- bearer token ------------------------------------------------------------------------

# grpc-stubs make ServerInterceptor generic; at run time it is a plain ABC.
if TYPE_CHECKING:
    _ServerInterceptor = grpc.ServerInterceptor[Any, Any]
    _Handler = grpc.RpcMethodHandler[Any, Any]
else:
    _ServerInterceptor = grpc.ServerInterceptor
    _Handler = grpc.RpcMethodHandler

_HOW_TO = f"send metadata '{AUTHORIZATION_KEY}: Bearer <token>'"


class BearerTokenInterceptor(_ServerInterceptor):
    """Rejects calls without the configured bearer token with UNAUTHENTICATED.

    Checks ``require_for_all`` methods or only ``protected_methods``; health and
    reflection are never checked. Place it after interceptors that should see
    rejected calls too (metrics count them as UNAUTHENTICATED).
    """

    def __init__(
        self, token: str | SecretStr, protected_methods: Iterable[str] = (), require_for_all: bool = True
    ) -> None:
        value = token.get_secret_value() if isinstance(token, SecretStr) else token
        if not value:
            raise ValueError("BearerTokenInterceptor needs a non-empty token")
        # Compared as bytes: hmac.compare_digest rejects non-ASCII str.
        self._token = value.encode()
        self._protected = frozenset(protected_methods)
        self._require_for_all = require_for_all

    def __repr__(self) -> str:  # never the token
        return f"BearerTokenInterceptor(require_for_all={self._require_for_all}, protected={sorted(self._protected)})"

    def requires_token(self, method: str) -> bool:
        if method.startswith(ALWAYS_OPEN_PREFIXES):
            return False
        return self._require_for_all or method in self._protected

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], _Handler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        # No handler: let gRPC answer UNIMPLEMENTED as it would anyway.
        if handler is None or not self.requires_token(method):
            return handler
        reason = self._rejection(handler_call_details.invocation_metadata)
        if reason is None:
            return handler
        event(log, "request unauthenticated", method=method, reason=reason)
        return _rejecting_handler(handler, f"{reason}: {_HOW_TO}")

    def _rejection(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
        """None when the token is right, else why not (safe to show the caller)."""
        values = [value for key, value in (metadata or ()) if key.lower() == AUTHORIZATION_KEY]
        if not values:
            return "missing bearer token"
        saw_bearer = False
        for value in values:
            raw = value if isinstance(value, bytes) else value.encode()
            scheme, _, presented = raw.strip().partition(b" ")
            if scheme.lower() != BEARER_SCHEME:
                continue
            saw_bearer = True
            # Constant time, so response timing does not reveal how much of a guess was right.
            if hmac.compare_digest(presented.strip(), self._token):
                return None
        return "invalid bearer token" if saw_bearer else "authorization metadata is not a bearer token"


def _rejecting_handler(handler: _Handler, details: str) -> _Handler:
    """A handler of the same kind as ``handler`` that aborts with UNAUTHENTICATED.

    No request deserializer: an unauthenticated caller's payload is never parsed.
    """

    def abort(_request: Any, context: grpc.ServicerContext) -> NoReturn:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, details)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


def server_interceptors(auth: AuthSettings, always_protected: Sequence[str] = ()) -> list[_ServerInterceptor]:
    """Interceptors ``auth`` asks for (none without a token), to append to the server's list.

    ``always_protected`` methods (the Admin RPCs) need the token whenever one is set.
    """
    if auth.token is None:
        return []
    protected = (*auth.protected_methods, *always_protected)
    return [BearerTokenInterceptor(auth.token, protected, auth.require_for_all)]
