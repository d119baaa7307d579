"""A real redis-server for the tests of the Redis-backed stores (online user state,
shared catalogue-update log), and a free loopback port."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True)
class RedisServer:
    url: str
    process: subprocess.Popen[bytes]


def start_redis(directory: Path, port: int) -> RedisServer:
    """A real redis-server on ``port``, append-only file fsynced on every write in
    ``directory``, no snapshots; returns once it answers PING. No redis-server on the
    machine is a failure, not a skip."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server; .ci/run does it)")
    directory.mkdir(parents=True, exist_ok=True)
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    durable = ["--appendonly", "yes", "--appendfsync", "always"]
    process = subprocess.Popen(
        [*command, *durable, "--dir", str(directory)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, socket_connect_timeout=0.2)
    deadline = time.monotonic() + 10
    try:
        while True:
            try:
                client.ping()
                return RedisServer(url, process)
            except redis.ConnectionError:
                if time.monotonic() > deadline or process.poll() is not None:
                    process.kill()
                    pytest.fail(f"redis-server on port {port} did not start")
                time.sleep(0.05)
    finally:
        client.close()


def stop_redis(server: RedisServer) -> None:
    server.process.terminate()  # SIGTERM: Redis writes its append-only file and exits
    server.process.wait(10)
