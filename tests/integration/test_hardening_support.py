"""Helpers for the hardening tests (no tests here): a Redis server of the test's own, which it can restart."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.integration.test_jobs_support import free_port


class PrivateRedis:
    """redis-server on a free port of 127.0.0.1, without persistence (a restart loses every message)."""

    def __init__(self, directory: Path, password: str | None = None) -> None:
        self.directory, self.password, self.port = directory, password, free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
                "--dir", str(self.directory)]
        if self.password:
            argv += ["--requirepass", self.password]
        log = (self.directory / "redis.log").open("ab")
        self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self) -> None:
        import redis

        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                redis.Redis.from_url(self.url, socket_timeout=1).ping()
                return
            except redis.RedisError:
                time.sleep(0.1)
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=15)
        self.process = None

    def restart(self) -> None:
        """Stop and start again on the same port: everything it held is gone."""
        self.stop()
        self.start()


@contextmanager
def private_redis(directory: Path, password: str | None = None) -> Iterator[PrivateRedis]:
    server = PrivateRedis(directory, password)
    server.start()
    try:
        yield server
    finally:
        server.stop()
