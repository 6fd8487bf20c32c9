"""Fault suite, process side: worker and trainer processes SIGKILLed at the worst moment.

The fault matrix is in ``docs/faults.md``.
"""

from __future__ import annotations

import signal
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from redis_weights import PushError, RedisStore, RedisWeightReceiver, RedisWeightUpdater
from tests.faults_support import eventually, perturb
from tests.models import make_model, state_digest
from tests.procs import running, stop, wait_ready, workers

pytestmark = pytest.mark.server

FAST = ["--heartbeat-ttl", "1.0", "--poll-interval", "0.2"]


def test_a_worker_slower_to_apply_than_its_heartbeat_ttl_is_not_declared_dead(tmp_path, real_store, redis_url, namespace):
    model = make_model("mlp", seed=1)
    with workers(tmp_path, redis_url, namespace, [1], *FAST, "--apply-delay", "2.5") as procs:
        updater = RedisWeightUpdater(real_store, model, num_workers=1, sync=True, timeout=30)
        updater.update_weights()  # the apply lasts 2.5 heartbeat TTLs: the rank must stay alive
        assert procs[1].applied()[updater.version] == state_digest(model)


def test_a_worker_killed_while_applying_fails_the_push_early_and_catches_up(tmp_path, real_store, redis_url, namespace):
    model = make_model("mlp", seed=2)
    with workers(tmp_path, redis_url, namespace, [1, 2], *FAST, ready=False) as fast, workers(
        tmp_path, redis_url, namespace, [3], *FAST, "--apply-delay", "30", ready=False
    ) as slow:
        wait_ready(fast, slow)
        updater = RedisWeightUpdater(real_store, model, num_workers=3, sync=True, timeout=60)
        with ThreadPoolExecutor(1) as pool:
            push = pool.submit(updater.update_weights)
            eventually(lambda: any(r.get("applying") for r in slow[3].records()), what="rank 3 applying")
            slow[3].kill()
            killed = time.monotonic()
            with pytest.raises(PushError) as info:
                push.result(timeout=60)
        assert time.monotonic() - killed < 15, "the dead rank must end the push long before the 60 s timeout"
        assert info.value.dead == [3] and "rank 3 is dead (heartbeat expired" in str(info.value)
        expected = state_digest(model)
        for rank in (1, 2):
            assert fast[rank].wait_version(updater.version) == expected
        with workers(tmp_path, redis_url, namespace, [3], *FAST) as again:
            assert again[3].wait_version(updater.version) == expected
            perturb(model, 3)
            updater.update_weights()  # all three ranks alive again: the sync push succeeds
            assert again[3].applied()[updater.version] == state_digest(model)


TRAINER = textwrap.dedent(
    """
    import sys, time
    from redis_weights import RedisStore, RedisWeightUpdater
    from tests.models import make_model
    url, namespace, marker = sys.argv[1:4]
    updater = RedisWeightUpdater(RedisStore.from_url(url, namespace), make_model("mlp", seed=99), 1,
                                 sync=False, pending_ttl=2.0, chunk_size=4096)
    def commit_never(manifest, ranks=(), **kwargs):
        open(marker, "w").write(" ".join([str(manifest.version), *manifest.ids]))
        time.sleep(600)  # chunks written, commit not sent: SIGKILLed here
    updater.registry.commit = commit_never
    updater.update_weights()
    """
)


def test_a_trainer_killed_before_its_commit_leaves_orphans_that_the_next_gc_sweeps(
    tmp_path, real_store, redis_url, namespace
):
    model = make_model("mlp", seed=4)
    updater = RedisWeightUpdater(real_store, model, num_workers=1, sync=True, timeout=20)
    k, client = real_store.keyspace, real_store.client
    worker = RedisWeightReceiver(RedisStore.from_url(redis_url, namespace), 1, make_model("mlp"), poll_interval=0.2)
    with worker:
        updater.update_weights()
        committed, digest = updater.version, state_digest(model)
        marker = tmp_path / "orphan-version"
        with running([sys.executable, "-c", TRAINER, redis_url, namespace, str(marker)], signal.SIGKILL,
                     stderr=open(tmp_path / "trainer.log", "wb")) as trainer:  # fmt: skip
            eventually(marker.exists, timeout=60, what="the trainer wrote its chunks")
            stop(trainer, signal.SIGKILL)
        orphan, *ids = marker.read_text().split()
        orphan = int(orphan)
        chunks = [k.chunk(i) for i in set(ids) - set(updater.registry.read_manifest(committed).ids)]
        assert chunks and all(client.exists(c) for c in chunks), "the trainer should have written its chunks"
        (record,) = client.scan_iter(match=k.pending_pattern)  # GC spares them while the push may commit
        assert 0 < client.pttl(record) <= 2000, "a pending record must expire"
        assert not client.exists(k.manifest(orphan)) and updater.registry.latest() == committed
        assert updater.registry.list_versions() == [committed], "nothing may point at the orphans"
        time.sleep(0.5)
        assert worker.version == committed and state_digest(worker.policy) == digest
        eventually(lambda: not client.exists(record), timeout=10, what="the pending record expired")
        perturb(model, 5)
        updater.update_weights()  # the next push works, goes above the orphan's number, and its GC sweeps
        updater.flush()  # that GC runs on the collector's thread
        assert updater.version > orphan and state_digest(worker.policy) == state_digest(model)
        assert not any(client.exists(c) for c in chunks), "orphans left after the GC"


def test_a_worker_restarted_with_another_model_refuses_and_the_push_reports_it(
    tmp_path, real_store, redis_url, namespace
):
    model = make_model("mlp", seed=6)
    updater = RedisWeightUpdater(real_store, model, num_workers=1, sync=True, timeout=30)
    with workers(tmp_path, redis_url, namespace, [1], *FAST) as procs:
        updater.update_weights()
        good = procs[1].applied()[updater.version]
    with workers(tmp_path, redis_url, namespace, [1], *FAST, "--model", "mb:1") as procs:
        perturb(model, 7)
        started = time.monotonic()
        with pytest.raises(PushError) as info:
            updater.update_weights()
        assert time.monotonic() - started < 20, "the refusal must end the push, not the timeout"
        error = info.value.errors[1]
        assert error.startswith(f"error: version {updater.version}: ") and "key '" in error, error
        assert "rank 1 reported" in str(info.value)
        assert updater.version not in procs[1].applied() and good
