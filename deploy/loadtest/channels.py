"""Channels and call metadata to the services under test, as the settings describe them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from pydantic import SecretStr

from shared.security import ClientTlsSettings, call_credentials_metadata, channel_options, open_channel


def open_target_channel(
    target: str, tls: ClientTlsSettings, system_roots: bool, options: Sequence[tuple[str, Any]] = ()
) -> grpc.Channel:
    """Plaintext, TLS with the configured CA (optionally mutual), or TLS trusting the system CAs."""
    if system_roots and tls.ca_file is None:
        return grpc.secure_channel(target, grpc.ssl_channel_credentials(), options=[*options, *channel_options(tls)])
    return open_channel(target, tls, options, setting="loadtest.tls")


def token_metadata(token: SecretStr | None) -> tuple[tuple[str, str], ...]:
    return call_credentials_metadata(token) if token is not None else ()
