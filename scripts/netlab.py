"""Hosts and links simulated with Linux network namespaces (needs root, ``ip`` and ``tc``).

A ``Lab`` makes one network namespace per host and one more that holds a bridge; each
host's ``eth0`` is a veth pair whose other end is a port of that bridge. A host's link
(``Link``: rate, one-way delay, loss) is shaped with ``tc`` on both ends, so what the host
sends and what it receives cross the same limits: an htb class holds the rate, a classic-BPF
classifier drops the lost packets (or all of them: ``cut``) into a class that discards them,
and a delay, when asked, is a netem qdisc under the rate (the only part that needs
``sch_netem``; kernels without it, like this project's CI VM, run links without added delay).
Processes run inside a host with ``Lab.spawn`` (``ip netns exec``).

Only the namespaces this lab creates are ever addressed: their names start with the
lab's prefix, unique per run (``nl<pid><random>``), and the addresses live inside them.
``close()`` (a context manager's exit, ``atexit``, and SIGINT/SIGTERM/SIGHUP through
``install_signal_handlers``) stops every process in them and deletes them; a run killed
with SIGKILL leaves them behind: ``python scripts/netlab.py clean PREFIX`` removes them.

Commands:
  python scripts/netlab.py check            can this machine make a lab? (exit 0: yes)
  python scripts/netlab.py clean PREFIX     remove the namespaces of a run that was killed
  python scripts/netlab.py bench ...        the multi-host benchmark (scripts/netlab_bench.py)
"""

from __future__ import annotations

import atexit
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "10.213.0"  # host addresses; they exist only inside the lab's namespaces
BRIDGE = "br0"
NETEM_LIMIT = 100_000  # packets a link queues: a 10 Gbit link with 2 ms of delay has ~2,000 in flight
BLACK_HOLE = 0x00010002  # classid 1:2: a FIFO of length 0, every packet classified there is dropped
SKF_AD_RANDOM = 2**32 - 0x1000 + 56  # classic BPF ancillary load: a random u32 (SKF_AD_OFF + SKF_AD_RANDOM)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
SCRATCH_ROOT = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/tmp")


@dataclass(frozen=True)
class Link:
    """One host's link to the bridge, the same in both directions.

    ``rate``: a tc rate (``"1gbit"``, ``"100mbit"``); ``delay_ms``: one-way delay added on
    this host's side (host to host: the sum of both hosts' delays); ``loss``: percent of
    packets dropped, each direction."""

    rate: str = "1gbit"
    delay_ms: float = 0.0
    loss: float = 0.0


@dataclass
class Host:
    """A host of the lab: its namespace, its address and the bridge port of its link."""

    name: str
    ns: str
    ip: str
    port: str
    link: Link
    shaped: bool = False
    keeper: subprocess.Popen[bytes] | None = field(default=None, repr=False)


def rate_bits(rate: str) -> float:
    """Bits per second of a tc rate string (``"1gbit"``, ``"250mbit"``, ``"10kbit"``, ``"1000bit"``)."""
    match = re.fullmatch(r"([0-9.]+)\s*([kmg]?)bit", rate.strip().lower())
    if match is None:
        raise ValueError(f"not a tc rate: {rate!r} (e.g. 1gbit, 100mbit)")
    return float(match.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[match.group(2)]


def drop_program(loss: float, cut: bool) -> str | None:
    """A classic BPF classifier (``tc ... bpf bytecode``) that sends a packet to the black-hole
    class 1:2 with probability ``loss`` percent (every packet when ``cut``); None: no drops.
    Neither netem nor gact is needed: a random draw (``ld rand``) and a compare."""
    if cut:
        return f"1,6 0 0 {BLACK_HOLE}"
    if loss <= 0:
        return None
    threshold = min(2**32 - 1, round(loss / 100 * 2**32))
    # A = random u32; if A >= threshold: return 0 (unclassified: the default class), else the black hole
    return f"4,32 0 0 {SKF_AD_RANDOM},53 1 0 {threshold},6 0 0 {BLACK_HOLE},6 0 0 0"


def htb_class_args(link: Link) -> list[str]:
    """The link's rate as an htb class: a bucket of 4 ms of traffic (at least 128 KiB, so a 64 KiB
    GSO packet fits) and the largest quantum htb takes (no warning at 10 Gbit)."""
    burst = max(128 << 10, int(rate_bits(link.rate) / 8 * 0.004))
    return ["htb", "rate", link.rate, "ceil", link.rate, "burst", str(burst), "cburst", str(burst),
            "quantum", "200000"]  # fmt: skip


def leaf_args(link: Link) -> list[str]:
    """What holds the packets the link's rate lets through: netem when a delay is asked, else a FIFO."""
    if link.delay_ms:
        return ["netem", "limit", str(NETEM_LIMIT), "delay", f"{link.delay_ms}ms"]
    return ["pfifo", "limit", str(NETEM_LIMIT)]


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one ip/tc command; a failure raises with its stderr."""
    done = subprocess.run(argv, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")
    return done


def own_namespaces(prefix: str) -> list[str]:
    """The namespaces whose names start with ``prefix-``: this prefix's, nobody else's."""
    names = [line.split()[0] for line in run("ip", "netns", "list").stdout.splitlines() if line.strip()]
    return [n for n in names if n.startswith(prefix + "-")]


def remove_namespace(ns: str) -> None:
    """SIGKILL every process in ``ns`` (by pid, as ``ip netns pids`` lists them), then delete it."""
    for _ in range(50):
        pids = [int(p) for p in run("ip", "netns", "pids", ns, check=False).stdout.split()]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    run("ip", "netns", "del", ns, check=False)


def clean(prefix: str) -> list[str]:
    """Remove the namespaces (and their processes) and the scratch folder of a lab's prefix."""
    if not re.fullmatch(r"nl[0-9a-f]+", prefix):
        raise ValueError(f"not a lab prefix: {prefix!r} (nl<hex>)")
    removed = own_namespaces(prefix)
    for ns in removed:
        remove_namespace(ns)
    shutil.rmtree(SCRATCH_ROOT / prefix, ignore_errors=True)
    return removed


class Lab:
    """Hosts on one bridge, each behind its own shaped link. Use as a context manager."""

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix or f"nl{os.getpid():x}{secrets.token_hex(2)}"
        self.bridge_ns = f"{self.prefix}-br"
        self.hosts: dict[str, Host] = {}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.scratch = SCRATCH_ROOT / self.prefix  # host caches, logs: removed with the lab
        self._bridge_keeper: subprocess.Popen[bytes] | None = None
        self._closed = False
        self._lock = threading.Lock()

    # -- life cycle ---------------------------------------------------------------------
    def __enter__(self) -> Lab:
        atexit.register(self.close)
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def start(self) -> None:
        self.scratch.mkdir(parents=True, exist_ok=True)
        run("ip", "netns", "add", self.bridge_ns)
        self._bridge_keeper = self._keeper(self.bridge_ns)
        run("ip", "-n", self.bridge_ns, "link", "set", "lo", "up")
        run("ip", "-n", self.bridge_ns, "link", "add", BRIDGE, "type", "bridge")
        run("ip", "-n", self.bridge_ns, "link", "set", BRIDGE, "up")

    def close(self) -> None:
        """Stop every process this lab started and every process left in its namespaces,
        delete the namespaces and the scratch folder. Idempotent; safe from atexit."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # a second Ctrl-C does not cut it short
        try:
            self._remove()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def _remove(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 5.0
        for proc in self.procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for ns in [h.ns for h in self.hosts.values()] + [self.bridge_ns]:
            remove_namespace(ns)
        for keeper in [h.keeper for h in self.hosts.values()] + [self._bridge_keeper]:
            if keeper is not None:
                keeper.wait()
        shutil.rmtree(self.scratch, ignore_errors=True)
        atexit.unregister(self.close)

    def install_signal_handlers(self) -> None:
        """SIGINT, SIGTERM and SIGHUP end the run with ``SystemExit``: the ``with`` block (or any
        ``finally``) closes the lab on the way out."""

        def stop(signum: int, _frame: object) -> None:
            raise SystemExit(128 + signum)

        for sig in STOP_SIGNALS:
            signal.signal(sig, stop)

    # -- hosts and links ----------------------------------------------------------------
    def add_host(self, name: str, link: Link = Link()) -> Host:
        """A new namespace ``<prefix>-<name>`` with ``eth0`` on the bridge, shaped as ``link``."""
        if not re.fullmatch(r"[a-z][a-z0-9]{0,11}", name) or name == "br" or name in self.hosts:
            raise ValueError(f"bad or repeated host name {name!r}")
        index = len(self.hosts) + 1
        host = Host(name, f"{self.prefix}-{name}", f"{SUBNET}.{index}", f"p{index}", link)
        self.hosts[name] = host
        run("ip", "netns", "add", host.ns)
        host.keeper = self._keeper(host.ns)
        run("ip", "link", "add", "eth0", "netns", host.ns, "type", "veth", "peer", "name", host.port,
            "netns", self.bridge_ns)  # fmt: skip
        run("ip", "-n", self.bridge_ns, "link", "set", host.port, "master", BRIDGE)
        run("ip", "-n", self.bridge_ns, "link", "set", host.port, "up")
        run("ip", "-n", host.ns, "link", "set", "lo", "up")
        run("ip", "-n", host.ns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
        run("ip", "-n", host.ns, "link", "set", "eth0", "up")
        self.shape(name, link)
        return host

    def _ends(self, host: Host) -> list[tuple[str, str]]:
        return [(host.ns, "eth0"), (self.bridge_ns, host.port)]

    def shape(self, name: str, link: Link, cut: bool = False) -> None:
        """(Re)shape a host's link on both ends: an htb class at the link's rate (its leaf a netem
        delay, or a FIFO), and a BPF classifier that drops the link's loss (or everything: ``cut``)."""
        host = self.hosts[name]
        host.link = link
        program = drop_program(link.loss, cut)
        for ns, dev in self._ends(host):
            tc = ("tc", "-n", ns)
            if not host.shaped:
                run(*tc, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "1")
                run(*tc, "class", "add", "dev", dev, "parent", "1:", "classid", "1:2", *htb_class_args(link))
                run(*tc, "qdisc", "add", "dev", dev, "parent", "1:2", "handle", "20:", "pfifo", "limit", "0")
            verb = "change" if host.shaped else "add"
            run(*tc, "class", verb, "dev", dev, "parent", "1:", "classid", "1:1", *htb_class_args(link))
            run(*tc, "qdisc", "replace", "dev", dev, "parent", "1:1", "handle", "10:", *leaf_args(link))
            run(*tc, "filter", "del", "dev", dev, "parent", "1:", check=False)
            if program is not None:
                run(*tc, "filter", "add", "dev", dev, "parent", "1:", "protocol", "all", "prio", "1", "bpf",
                    "bytecode", program)  # fmt: skip
        host.shaped = True

    def cut(self, name: str) -> None:
        """Partition a host: every packet on its link dropped both ways (connections hang, as
        when a cable or a switch port goes; nothing is refused)."""
        self.shape(name, self.hosts[name].link, cut=True)

    def heal(self, name: str) -> None:
        """Give a cut host its link back, as it was."""
        self.shape(name, self.hosts[name].link)

    def drops(self, name: str) -> int:
        """Packets the link's loss (or a cut) has dropped so far, both directions."""
        total = 0
        for ns, dev in self._ends(self.hosts[name]):
            shown = run("tc", "-n", ns, "-s", "class", "show", "dev", dev, "classid", "1:2").stdout
            total += sum(int(n) for n in re.findall(r"dropped (\d+)", shown))
        return total

    def counters(self, name: str) -> tuple[int, int]:
        """(bytes received, bytes sent) by the host's ``eth0`` so far (the veth counters)."""
        keeper = self.hosts[name].keeper
        assert keeper is not None
        with open(f"/proc/{keeper.pid}/net/dev") as f:
            for line in f:
                iface, _, data = line.partition(":")
                if iface.strip() == "eth0":
                    fields = data.split()
                    return int(fields[0]), int(fields[8])
        raise RuntimeError(f"no eth0 in host {name}")

    # -- processes ----------------------------------------------------------------------
    def _keeper(self, ns: str) -> subprocess.Popen[bytes]:
        """A process that lives in ``ns`` as long as the lab: its /proc/<pid>/net shows the namespace."""
        return subprocess.Popen(["ip", "netns", "exec", ns, "sleep", "infinity"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        log: Path | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside host ``name`` (``GLOO_SOCKET_IFNAME=eth0`` set); stopped by ``close()``."""
        full_env = {**os.environ, "GLOO_SOCKET_IFNAME": "eth0", **(env or {})}
        err = open(log, "wb") if log is not None else subprocess.DEVNULL
        try:
            proc = subprocess.Popen(["ip", "netns", "exec", self.hosts[name].ns, *argv], cwd=cwd, env=full_env,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip
        finally:
            if log is not None:
                err.close()  # type: ignore[union-attr]
        self.procs.append(proc)
        return proc

    def exec(self, name: str, *argv: str) -> subprocess.CompletedProcess[str]:
        """Run a short command inside host ``name`` and wait for it."""
        return subprocess.run(["ip", "netns", "exec", self.hosts[name].ns, *argv], capture_output=True, text=True,
                              timeout=60)  # fmt: skip


def start_redis(
    lab: Lab, name: str, port: int, log: Path, binary: str = "redis-server", extra: Sequence[str] = ()
) -> subprocess.Popen[bytes]:
    """A fresh Redis on host ``name`` (all addresses, no persistence, no eviction, its files in
    ``log``'s folder); returns once it answers PING."""
    proc = lab.spawn(name, [binary, "--bind", "0.0.0.0", "--port", str(port), "--save", "", "--appendonly", "no",
                            "--protected-mode", "no", "--maxmemory-policy", "noeviction", "--dir", str(log.parent),
                            *extra], log)  # fmt: skip
    probe = f"import socket; s = socket.create_connection(('127.0.0.1', {port}), 1); s.sendall(b'PING\\r\\n'); " \
            "print(s.recv(16).decode().strip())"  # fmt: skip
    deadline = time.monotonic() + 30
    while lab.exec(name, sys.executable, "-c", probe).stdout.strip() != "+PONG":
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{binary} did not start on {name}: {log.read_text(errors='replace')[-500:]}")
        time.sleep(0.1)
    return proc


def start_cluster(
    lab: Lab,
    names: Sequence[str],
    port: int,
    folder: Path,
    binary: str = "redis-server",
    cli: str = "redis-cli",
    *,
    replicas: Sequence[str] = (),
    node_timeout_ms: int = 15_000,
) -> list[subprocess.Popen[bytes]]:
    """A Redis Cluster with one master on each host of ``names`` (made with ``redis-cli --cluster
    create``) and, when ``replicas`` is given, one replica of ``names[i]`` on host ``replicas[i]``;
    ``node_timeout_ms``: ``cluster-node-timeout`` (Redis's default 15 s; a failover takes about that
    plus an election). Returns once every node knows every other, reports ``cluster_state:ok``, and
    every replica's link to its master is up."""
    if replicas and len(replicas) != len(names):
        raise ValueError("one replica host per master host, or none")
    args = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(node_timeout_ms),
            "--repl-diskless-sync-delay", "0",  # a replica syncs at once, not after 5 s
            "--repl-ping-replica-period", "1"]  # fmt: skip
    procs = []
    for name in [*names, *replicas]:
        (folder / name).mkdir(parents=True)
        procs.append(start_redis(lab, name, port, folder / name / "redis.log", binary, args))
    nodes = [f"{lab.hosts[n].ip}:{port}" for n in names]
    made = lab.exec(names[0], cli, "--cluster", "create", *nodes, "--cluster-yes")
    if made.returncode != 0:
        raise RuntimeError(f"redis-cli --cluster create: {made.stdout[-500:]} {made.stderr[-500:]}")
    deadline = time.monotonic() + 60
    for master, replica in zip(names, replicas):
        master_id = lab.exec(master, cli, "-p", str(port), "cluster", "myid").stdout.strip()
        lab.exec(replica, cli, "-p", str(port), "cluster", "meet", lab.hosts[master].ip, str(port))
        # refused until the replica has learnt of the master through the bus: try again
        while lab.exec(replica, cli, "-p", str(port), "cluster", "replicate", master_id).stdout.strip() != "OK":
            if time.monotonic() > deadline:
                raise RuntimeError(f"{replica} never became a replica of {master}")
            time.sleep(0.1)
    total = len(names) + len(replicas)

    def settled(name: str) -> bool:
        info = lab.exec(name, cli, "-p", str(port), "cluster", "info").stdout
        rows = lab.exec(name, cli, "-p", str(port), "cluster", "nodes").stdout.splitlines()
        replication = lab.exec(name, cli, "-p", str(port), "info", "replication").stdout
        return ("cluster_state:ok" in info and len(rows) == total
                and sum("slave" in r.split()[2].split(",") for r in rows) == len(replicas)
                and ("role:master" in replication or "master_link_status:up" in replication))  # fmt: skip

    for name in [*names, *replicas]:
        while not settled(name):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster on {', '.join([*names, *replicas])} never settled (seen from {name})")
            time.sleep(0.2)
    return procs


def start_sentinels(
    lab: Lab,
    primary: str,
    replicas: Sequence[str],
    sentinels: Sequence[str],
    port: int,
    folder: Path,
    binary: str = "redis-server",
    cli: str = "redis-cli",
    *,
    service: str = "rw-lab",
    sentinel_port: int = 26379,
    down_after_ms: int = 30_000,
    failover_timeout_ms: int = 180_000,
) -> tuple[str, list[subprocess.Popen[bytes]]]:
    """A Sentinel-managed service: a primary on host ``primary``, a replica on each host of
    ``replicas``, a sentinel on each host of ``sentinels`` (quorum: a majority of them);
    ``down_after_ms`` and ``failover_timeout_ms`` are Sentinel's (its defaults: 30 s, 180 s).
    Returns the service's ``redis+sentinel://`` URL and the processes, once every replica is in
    sync and acknowledges writes, and every sentinel sees the primary, every replica and every
    other sentinel."""
    procs = []
    (folder / primary).mkdir(parents=True)
    fast_sync = ["--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"]
    procs.append(start_redis(lab, primary, port, folder / primary / "redis.log", binary, fast_sync))
    primary_ip = lab.hosts[primary].ip
    for name in replicas:
        (folder / name).mkdir(parents=True)
        procs.append(start_redis(lab, name, port, folder / name / "redis.log", binary,
                                 [*fast_sync, "--replicaof", primary_ip, str(port)]))  # fmt: skip
    deadline = time.monotonic() + 60

    def until(ready: Callable[[], bool], what: str) -> None:
        while not ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}")
            time.sleep(0.1)

    def replicas_acked() -> bool:  # right after a full sync the first WAIT may not count a replica yet
        lab.exec(primary, cli, "-p", str(port), "set", "netlab:settled", "1")
        return lab.exec(primary, cli, "-p", str(port), "wait", str(len(replicas)), "100").stdout.strip() == str(
            len(replicas))

    until(lambda: all("master_link_status:up" in lab.exec(n, cli, "-p", str(port), "info", "replication").stdout
                      for n in replicas), "the replicas to sync")  # fmt: skip
    until(replicas_acked, "the replicas' first acknowledgement")
    for name in sentinels:
        (folder / name).mkdir(parents=True)
        config = folder / name / "sentinel.conf"  # sentinels rewrite their config: one file each
        config.write_text(
            f"port {sentinel_port}\nbind 0.0.0.0\nprotected-mode no\ndaemonize no\ndir {folder / name}\n"
            f"logfile {folder / name / 'sentinel.log'}\n"
            f"sentinel monitor {service} {primary_ip} {port} {len(sentinels) // 2 + 1}\n"
            f"sentinel down-after-milliseconds {service} {down_after_ms}\n"
            f"sentinel failover-timeout {service} {failover_timeout_ms}\n"
            f"sentinel parallel-syncs {service} 1\n"
        )
        procs.append(lab.spawn(name, [binary, str(config), "--sentinel"], folder / name / "sentinel.err"))

    def sentinel_agrees(name: str) -> bool:
        shown = lab.exec(name, cli, "-p", str(sentinel_port), "sentinel", "master", service).stdout.split()
        fields = dict(zip(shown[::2], shown[1::2]))
        return (fields.get("ip") == primary_ip and fields.get("num-slaves") == str(len(replicas))
                and fields.get("num-other-sentinels") == str(len(sentinels) - 1))  # fmt: skip

    until(lambda: all(sentinel_agrees(n) for n in sentinels), "the sentinels to see the primary, its replicas "
          "and each other")  # fmt: skip
    addresses = ",".join(f"{lab.hosts[n].ip}:{sentinel_port}" for n in sentinels)
    return f"redis+sentinel://{addresses}/{service}/0", procs


def unavailable() -> str | None:
    """Why this machine cannot make a lab (None: it can): root, ip, tc, namespaces, veth, htb, BPF drops."""
    if os.name != "posix" or not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"no {tool} on PATH (iproute2)"
    try:
        with Lab() as lab:
            lab.add_host("probe", Link("100mbit", loss=1.0))
            lab.counters("probe")
    except (OSError, RuntimeError) as exc:
        return f"cannot make a network lab here: {exc}"
    return None


def netem_available() -> bool:
    """Whether links can have a delay (the kernel has sch_netem)."""
    try:
        with Lab() as lab:
            lab.add_host("probe", Link("100mbit", delay_ms=0.1))
    except RuntimeError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    command, rest = args[0], args[1:]
    if command == "check":
        reason = unavailable()
        print(reason or "ok: network namespaces, veth, htb and BPF drops work here")
        print("delay (sch_netem):", "yes" if netem_available() else "no: links run without added delay")
        return 1 if reason else 0
    if command == "clean" and len(rest) == 1:
        removed = clean(rest[0])
        print(f"removed {len(removed)} namespaces: {' '.join(removed)}")
        return 0
    if command == "bench":
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from scripts import netlab_bench

        return netlab_bench.main(rest)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
