"""Redis Cluster: URLs, the deployment, push and receive, spread, replica reads, GC, the CLI and doctor.

Against the session's 3-master cluster (a replica each, ``redis_cluster``): every test uses its
own namespace and puts back any setting it changes. Failovers are in ``test_cluster_faults.py``.
"""

from __future__ import annotations

import contextlib
import io
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis
import torch
from redis.cluster import RedisCluster

from redis_weights import RedisStore, RedisWeightReceiver, RedisWeightUpdater
from redis_weights.backend.deployment import ClusterDeployment, Deployment, client_from_url, deployment_from_url
from redis_weights.errors import ConfigurationError, PushError
from redis_weights.observe.health import UNSAFE, UnsafeServerError, check_deployment, ensure_server
from redis_weights.tools.server import LocalRedisCluster
from tests.conftest import REPO_ROOT
from tests.faults_support import stored_objects
from tests.models import make_model, state_digest
from tests.procs import running, wait_ready, workers

pytestmark = pytest.mark.server

CHUNK = 64 << 10  # small chunks: a small model still spreads over every master


def _node_url(cluster: LocalRedisCluster, i: int) -> str:
    return f"redis://{cluster.host}:{cluster.nodes[i].port}"


def _chunks_per_master(store: RedisStore) -> dict[str, int]:
    """How many chunks of the store's namespace each master holds (SCAN on each; not the WAIT markers)."""
    k = store.keyspace
    return {name: sum(1 for n in client.scan_iter(match=k.chunk_pattern, count=1000) if k.chunk_id_of(n))
            for name, client in store.deployment.masters()}  # fmt: skip


def _stat(client: redis.Redis, field: str) -> int:
    return int(client.info("stats")[field])


@contextmanager
def _config(client: redis.Redis, **settings: str) -> Iterator[None]:
    """Set ``settings`` on one node for the block, then put the old values back."""
    names = {k.replace("_", "-"): v for k, v in settings.items()}
    old = {k: client.config_get(k)[k] for k in names}
    try:
        for name, value in names.items():
            client.config_set(name, value)
        yield
    finally:
        for name, value in old.items():
            client.config_set(name, value)


# ---------------------------------------------------------------------------------------
# URLs and the deployment
# ---------------------------------------------------------------------------------------
def test_a_url_to_any_node_is_the_whole_cluster_and_the_cluster_option_forces_either_way(redis_cluster):
    replica = len(redis_cluster.nodes) - 1  # a replica's URL works too
    deployments = [deployment_from_url(_node_url(redis_cluster, i)) for i in (0, 1, replica)]
    try:
        assert all(isinstance(d, ClusterDeployment) and isinstance(d.client, RedisCluster) for d in deployments)
        assert len({d.describe() for d in deployments}) == 1 and deployments[0].describe().startswith("cluster:")
        assert len({d.scope() for d in deployments}) == 1, "every host names the cluster alike: one host cache"
        masters = deployments[0].masters()
        assert [name for name, _ in masters] == sorted(f"127.0.0.1:{n.port}" for n in redis_cluster.masters())
        assert all(type(client) is redis.Redis and client.ping() for _, client in masters)
        assert len(deployments[0].nodes()) == len(redis_cluster.nodes)
    finally:
        for d in deployments:
            d.close()
    plain = client_from_url(redis_cluster.url + "?cluster=no")  # forced standalone: no probe, a plain client
    assert type(plain) is redis.Redis
    plain.close()
    forced = client_from_url(redis_cluster.url, cluster=True)
    assert isinstance(forced, RedisCluster)
    forced.close()
    with pytest.raises(ConfigurationError, match="only database 0"):
        client_from_url(redis_cluster.url + "/2?cluster=yes")
    with pytest.raises(ConfigurationError, match="cluster='maybe'"):
        client_from_url(redis_cluster.url + "?cluster=maybe")


def test_a_hash_tag_per_master_names_keys_that_master_serves(cluster_store):
    """For per-master work such as a WAIT marker: a key with the tag lives on that master."""
    deployment = cluster_store.deployment
    for name, client in deployment.masters():
        key = f"{{{deployment.hash_tag_on(name)}}}:probe"
        assert client.set(key, b"1", px=1000)  # a plain client to that master: no MOVED
        assert client.delete(key) == 1
    with pytest.raises(ConfigurationError, match="is not a master"):
        deployment.hash_tag_on("127.0.0.1:1")


def test_cluster_yes_against_a_standalone_server_is_a_configuration_error(redis_url):
    with pytest.raises(ConfigurationError, match="Redis Cluster at"):
        client_from_url(redis_url, cluster=True)
    detected = deployment_from_url(redis_url)
    assert type(detected) is Deployment and detected.masters() == [(detected.describe(), detected.client)]
    detected.close()
    with pytest.raises(ConfigurationError, match="replica reads need a Redis Cluster"):
        deployment_from_url(redis_url + "?replica_reads=yes")


def test_a_redis_cluster_handed_in_is_used_and_never_closed(redis_cluster, namespace):
    client = RedisCluster.from_url(redis_cluster.url)
    store = RedisStore(client, namespace)
    assert isinstance(store.deployment, ClusterDeployment) and not store.deployment.owns_client
    store["k"] = "v"
    store.close()
    assert client.get(store.keyspace.full("k")) == b"v", "the caller's client still works"
    client.delete(store.keyspace.full("k"))
    client.close()


# ---------------------------------------------------------------------------------------
# Push and receive
# ---------------------------------------------------------------------------------------
def test_push_to_worker_processes_bit_exact_with_chunks_on_every_master(tmp_path, cluster_store, redis_cluster,
                                                                       namespace):  # fmt: skip
    model = make_model("mb:2", seed=1)
    url = redis_cluster.url
    model_flag = ("--model", "mb:2")
    replica_reads = url + "?replica_reads=yes"
    with workers(tmp_path, url, namespace, [1], *model_flag, ready=False) as plain, \
            workers(tmp_path, replica_reads, namespace, [2], *model_flag, ready=False) as from_replicas:  # fmt: skip
        wait_ready(plain, from_replicas)
        procs = {**plain, **from_replicas}
        updater = RedisWeightUpdater(cluster_store, model, num_workers=2, sync=True, timeout=60, chunk_size=CHUNK)
        for step in range(2):
            with torch.no_grad():
                next(model.parameters()).add_(1.0 + step)  # a changed tensor: new chunks, the rest reused
            updater.update_weights()
            for proc in procs.values():
                assert proc.applied()[updater.version] == state_digest(model)
        assert [(s.status, s.version) for s in updater.workers()] == [("updated", updater.version)] * 2
    manifest = updater.registry.read_manifest(updater.version)
    spread = _chunks_per_master(cluster_store)
    assert len(spread) == 3 and all(n > 0 for n in spread.values()), spread
    assert sum(spread.values()) >= len(set(c.id for c in manifest.chunks))
    control = [n for n, c in cluster_store.deployment.masters()
               if any(True for _ in c.scan_iter(match=cluster_store.keyspace.pattern))]  # fmt: skip
    assert control == [cluster_store.deployment.client.get_node_from_key(cluster_store.keyspace.latest).name]
    updater.close()


def test_replica_reads_take_the_chunks_off_the_primaries_and_what_a_replica_lacks_comes_from_its_primary(
    cluster_store, redis_cluster, namespace
):
    trainer = make_model("mb:1", seed=5)
    updater = RedisWeightUpdater(cluster_store, trainer, 1, sync=False, chunk_size=CHUNK)
    updater.push_weights()
    redis_cluster.wait_replicated()  # every replica holds the first version
    deployment = cluster_store.deployment
    masters = dict(deployment.masters())
    replicas = [c for name, c in deployment.nodes() if name not in masters]
    for replica in replicas:  # replication lag, for real: the replicas stop applying their masters' writes
        replica.execute_command("CLIENT", "PAUSE", 30_000, "WRITE")
    try:
        with torch.no_grad():
            trainer[0].bias.add_(1.0)  # the second version has a new chunk the replicas lack
        updater.push_weights()
        old = {c.id for c in updater.registry.read_manifest(updater.version - 1).chunks}
        manifest = updater.registry.read_manifest(updater.version)
        new = [c for c in manifest.chunks if c.id not in old]
        assert 0 < len(new) < len(manifest.chunks)
        store = RedisStore.from_url(redis_cluster.url + "?replica_reads=yes", namespace)
        receiver = RedisWeightReceiver(store, 1, make_model("mb:1"))
        try:
            before = [_stat(c, "total_net_output_bytes") for c in replicas]
            hits = sum(_stat(c, "keyspace_hits") for c in masters.values())
            assert receiver.poll() == updater.version
            assert state_digest(receiver.policy) == state_digest(trainer), "bit-exact, the lagging chunks included"
            served = sum(_stat(c, "total_net_output_bytes") for c in replicas) - sum(before)
            assert served >= (len(manifest.chunks) - len(new)) * CHUNK - CHUNK, "the replicas served what they hold"
            assert sum(_stat(c, "keyspace_hits") for c in masters.values()) - hits >= len(new), \
                "each chunk a replica lacked was read from its primary"  # fmt: skip
        finally:
            receiver.close()
            store.close()
    finally:
        for replica in replicas:
            replica.execute_command("CLIENT", "UNPAUSE")
        updater.close()


def test_wait_before_the_commit_puts_every_chunk_on_the_replicas_of_every_master(cluster_store, redis_cluster):
    trainer = make_model("mb:1", seed=9)
    deployment = cluster_store.deployment
    masters = dict(deployment.masters())
    with RedisWeightUpdater(cluster_store, trainer, 1, sync=False, chunk_size=CHUNK, min_replicas=1) as updater:
        updater.push_weights()  # a requirement: fails unless one replica of every master acknowledged
        manifest = updater.registry.read_manifest(updater.version)
        k = cluster_store.keyspace
        for name, client in masters.items():  # each master's marker lives in that master's own slots
            assert client.pttl(k.cluster_replication_marker(deployment.hash_tag_on(name))) > 0
        for node in redis_cluster.masters():  # no wait_replicated(): the WAIT is what put them there
            replica = redis_cluster.replica_of(node)
            assert replica is not None
            with redis.Redis(host=replica.host, port=replica.port) as client:
                client.execute_command("READONLY")
                mine = [c.id for c in manifest.chunks
                        if deployment.group_by_node([k.chunk(c.id)]).get(f"{node.host}:{node.port}")]  # fmt: skip
                assert mine and all(client.exists(k.chunk(i)) for i in mine), f"{replica.port} lacks chunks"

        replicas = [c for name, c in deployment.nodes() if name not in masters]
        for replica in replicas:  # the replicas stop applying writes: nobody can acknowledge
            replica.execute_command("CLIENT", "PAUSE", 10_000, "WRITE")
        try:
            updater.replica_timeout = 0.3
            with torch.no_grad():
                trainer[0].bias.add_(1.0)
            with pytest.raises(PushError, match=r"fewer replicas than min_replicas=1 .*not committed"):
                updater.push_weights()
            assert updater.registry.latest() == manifest.version, "nothing was committed"
        finally:
            for replica in replicas:
                replica.execute_command("CLIENT", "UNPAUSE")


def test_host_cache_is_one_per_cluster_whichever_node_a_worker_names(cluster_store, redis_cluster, namespace,
                                                                     tmp_path):  # fmt: skip
    trainer = make_model("mlp", seed=3)
    updater = RedisWeightUpdater(cluster_store, trainer, 2, sync=False, chunk_size=CHUNK)
    updater.push_weights()
    stores = [RedisStore.from_url(_node_url(redis_cluster, i), namespace) for i in (0, 2)]
    receivers = [RedisWeightReceiver(s, r, make_model("mlp"), host_cache=tmp_path) for r, s in enumerate(stores, 1)]
    try:
        assert [r.poll() for r in receivers] == [updater.version] * 2
        assert [r.host_cache.fetched for r in receivers] == [1, 0]
        assert [r.host_cache.shared for r in receivers] == [0, 1]
        assert all(state_digest(r.policy) == state_digest(trainer) for r in receivers)
    finally:
        for r, s in zip(receivers, stores, strict=True):
            r.close()
            s.close()
        updater.close()


def test_gc_sweeps_the_chunks_of_old_versions_on_every_master(cluster_store):
    model = make_model("mb:1", seed=7)
    updater = RedisWeightUpdater(cluster_store, model, 1, sync=False, chunk_size=CHUNK, retention=1)
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(step + 1.0)  # every chunk changes
        updater.push_weights()
    updater.flush()  # the last push's GC
    kept = {c.id for c in updater.registry.read_manifest(updater.version).chunks}
    assert updater.registry.list_versions() == [updater.version]
    assert sum(_chunks_per_master(cluster_store).values()) == len(kept)
    assert _stored_objects(cluster_store) == kept
    updater.close()


# ---------------------------------------------------------------------------------------
# Operators
# ---------------------------------------------------------------------------------------
def _cli(url: str, namespace: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "redis_weights", "--url", url, "-n", namespace, *args],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip


def test_the_redis_weights_commands_work_on_a_cluster(cluster_store, redis_cluster, namespace, tmp_path):
    model = make_model("mb:1", seed=11)
    updater = RedisWeightUpdater(cluster_store, model, 1, sync=False, chunk_size=CHUNK, retention=5)
    updater.push_weights()
    first = updater.version
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    updater.push_weights()
    url = _node_url(redis_cluster, 1)
    versions = _cli(url, namespace, "versions", "--json")
    assert versions.returncode == 0, versions.stderr
    assert [row["version"] for row in json.loads(versions.stdout)["versions"]] == [first, updater.version]
    exported = tmp_path / "w.safetensors"
    assert _cli(url, namespace, "export", str(first), "-o", str(exported)).returncode == 0
    from safetensors.torch import load_file

    assert set(load_file(str(exported))) == set(model.state_dict())
    rollback = _cli(url, namespace, "rollback", str(first))
    assert rollback.returncode == 0, rollback.stderr
    rolled = updater.registry.latest()
    assert updater.registry.read_manifest(rolled).chunks == updater.registry.read_manifest(first).chunks
    gc = _cli(url, namespace, "gc", "--keep", "1")
    assert gc.returncode == 0, gc.stderr
    assert updater.registry.list_versions() == [rolled]
    assert _stored_objects(cluster_store) == {c.id for c in updater.registry.read_manifest(rolled).chunks}
    assert _cli(url, namespace, "workers").returncode == 0
    with running([sys.executable, "-m", "redis_weights", "--url", url, "-n", namespace, "watch", "--json",
                  "--count", "1", "--timeout", "60"], signal.SIGKILL, stdout=subprocess.PIPE, text=True) as watch:
        pushed = []
        while watch.poll() is None and len(pushed) < 100:  # until the watcher has subscribed and heard one
            updater.push_weights()  # published on the namespace's master, heard on whichever node watch is on
            pushed.append(updater.version)
            with contextlib.suppress(subprocess.TimeoutExpired):
                watch.wait(0.5)
        out, _ = watch.communicate(timeout=60)
    event = json.loads(out.splitlines()[0])
    assert watch.returncode == 0 and event["kind"] == "push" and event["version"] in pushed
    updater.close()


def test_doctor_checks_every_node_and_names_the_one_that_is_unsafe(cluster_store, redis_cluster, namespace):
    result = _cli(redis_cluster.url, namespace, "doctor", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    nodes = {f["node"] for f in report["findings"] if "node" in f}
    assert nodes == {f"127.0.0.1:{port}" for port in redis_cluster.ports}
    assert report["findings"][0]["check"] == "cluster" and report["findings"][0]["level"] == "ok"
    masters = dict(cluster_store.deployment.masters())
    name, replica = next((n, c) for n, c in cluster_store.deployment.nodes() if n not in masters)
    with _config(replica, maxmemory="1gb", maxmemory_policy="allkeys-lru"):
        findings = check_deployment(cluster_store.deployment, cluster_store.keyspace)
        unsafe = [(f.check, f.node) for f in findings if f.level == UNSAFE]
        assert unsafe == [("maxmemory-policy", name)]
        with pytest.raises(UnsafeServerError, match="allkeys-lru"):
            ensure_server(cluster_store.deployment, cluster_store.keyspace)
        text = _cli(redis_cluster.url, namespace, "doctor")
        assert text.returncode == 3 and f"maxmemory-policy ({name})" in text.stdout, text.stdout


def test_the_demo_runs_against_a_cluster_url_and_cleans_up_on_every_master(redis_cluster):
    from redis_weights.tools.demo import DemoOptions, run_demo

    out = io.StringIO()
    assert run_demo(DemoOptions(workers=1, size_mb=0.5, versions=2, interval=0, url=redis_cluster.url), out) == 0
    assert "verified: every worker holds the trainer's weights" in out.getvalue(), out.getvalue()
    with RedisStore.from_url(redis_cluster.url) as store:
        for _, client in store.deployment.masters():
            assert list(client.scan_iter(match="rw:*demo-*", count=1000)) == []


def _stored_objects(store: RedisStore) -> set[str]:
    return stored_objects(store.client, store.keyspace)  # every master's
