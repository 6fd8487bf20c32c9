"""Redis Cluster failover: a master SIGKILLed in the middle of a push, its replica taking over.

A cluster of its own for this module (``cluster-node-timeout`` 2 s; the session's cluster stays
whole): each test kills one master that still has a replica. The push in flight fails with one
``PushError`` naming its version; pushes succeed again once the replica has taken over; the
worker processes converge, bit-exact, on the last version; meanwhile ``doctor``'s checks name
the dead master.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest
import torch

import redis_weights.protocol.chunkstore as chunkstore
from redis_weights import PushError, RedisStore, RedisWeightUpdater
from redis_weights.observe.health import UNSAFE, check_deployment
from redis_weights.tools.server import LocalRedisCluster, LocalRedisServer
from tests.conftest import _need_server
from tests.models import make_model, state_digest
from tests.procs import wait_ready, workers

pytestmark = pytest.mark.server

RECOVERY_DEADLINE = 60.0  # seconds the test waits for a push to succeed again (a timeout, not the target)


@pytest.fixture(scope="module")
def failover_cluster() -> Iterator[LocalRedisCluster]:
    _need_server()
    with LocalRedisCluster(masters=3, replicas=1, node_timeout_ms=2000) as cluster:
        yield cluster


def _victim(cluster: LocalRedisCluster, store: RedisStore, which: str) -> LocalRedisServer:
    """The master to kill: the one holding the namespace's control keys, or another one; with a replica."""
    control = store.client.get_node_from_key(store.keyspace.latest).port
    for master in cluster.masters():
        if (master.port == control) == (which == "namespace") and cluster.replica_of(master) is not None:
            return master
    pytest.skip(f"no {which} master with a replica left in this cluster")


@pytest.mark.parametrize("which", ["namespace", "chunks"])
def test_a_master_killed_mid_push_fails_that_push_and_the_next_ones_succeed_after_the_failover(
    which, failover_cluster, namespace, tmp_path, monkeypatch
):
    cluster = failover_cluster
    url = f"redis://{cluster.host}:{cluster.masters()[0].port}"  # a live node (an earlier test may have killed one)
    store = RedisStore.from_url(url, namespace)
    model = make_model("mb:4", seed=1)
    fast = ["--model", "mb:4", "--poll-interval", "0.2"]
    replica_reads = url + "?replica_reads=yes"
    with workers(tmp_path, url, namespace, [1], *fast, ready=False) as plain, \
            workers(tmp_path, replica_reads, namespace, [2], *fast, ready=False) as from_replicas:  # fmt: skip
        wait_ready(plain, from_replicas)
        procs = {**plain, **from_replicas}
        updater = RedisWeightUpdater(store, model, num_workers=2, sync=True, timeout=60, chunk_size=64 << 10)
        updater.update_weights()
        victim = _victim(cluster, store, which)
        monkeypatch.setattr(chunkstore, "ROUND_BYTES", 256 << 10)  # many upload rounds: one to kill in
        rounds = [0]
        real_send = updater.registry.chunks._send_round

        def send_round(ids, batch):  # type: ignore[no-untyped-def]
            rounds[0] += 1
            if rounds[0] == 3:
                victim.kill()  # SIGKILL: a crash, as far as everyone can tell
                killed.append(time.monotonic())
            return real_send(ids, batch)

        killed: list[float] = []
        monkeypatch.setattr(updater.registry.chunks, "_send_round", send_round)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)  # every chunk changes: the push has many rounds to upload
        before = updater.version
        with pytest.raises(PushError) as failed:
            updater.update_weights()
        assert killed, "the push failed before the master was killed"
        match = re.search(r"push of version (\d+)", str(failed.value))
        assert match and int(match.group(1)) > before, str(failed.value)
        monkeypatch.undo()  # ROUND_BYTES and the hook: the next pushes are ordinary
        dead = f"{cluster.host}:{victim.port}"
        findings = check_deployment(store.deployment, store.keyspace)  # before the failover: the node is listed
        assert ("reachable", UNSAFE, dead) in [(f.check, f.level, f.node) for f in findings]
        errors = []
        while True:
            try:
                updater.update_weights()
                break
            except PushError as exc:  # the replica has not taken over yet
                errors.append(str(exc))
                assert time.monotonic() - killed[0] < RECOVERY_DEADLINE, errors[-3:]
                time.sleep(0.2)
        recovered = time.monotonic() - killed[0]
        print(f"{which} master killed: first successful push {recovered:.1f} s after the kill, "
              f"{len(errors)} failed pushes in between")  # fmt: skip
        expected = state_digest(model)
        for proc in procs.values():
            assert proc.wait_version(updater.version, timeout=RECOVERY_DEADLINE) == expected
        updater.close()
