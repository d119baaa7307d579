"""Connections to Redis, shared by the two services' Redis-backed stores (ranking's online
user state, retrieval's shared catalogue-update log): one way to open a client with the
configured timeouts and retries, and one way to name a server in messages."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from shared.config import RedisConnectionSettings


def redacted_url(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))


def redis_client(settings: RedisConnectionSettings, extra_socket_timeout_s: float = 0.0) -> redis.Redis:
    """A client (with its own connection pool) for ``settings.redis_url``.

    ``extra_socket_timeout_s``: added to the socket timeout, for a client whose commands
    block on purpose (XREAD BLOCK) and must not time out while they wait.
    """
    return redis.Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=settings.connect_timeout_s,
        socket_timeout=settings.socket_timeout_s + extra_socket_timeout_s,
        retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), settings.retries),
        decode_responses=False,
    )
