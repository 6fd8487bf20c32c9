"""In-process metrics, push/apply reports and the lag bound's rules, on fakeredis.

The metrics land in prometheus-client's default registry; each test reads the
samples of its own namespace (a fresh one per test), before and after.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import prometheus_client
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

from redis_weights import ConfigurationError, PushTimeoutError, RedisStore, RedisWeightReceiver, RedisWeightUpdater
from redis_weights.observe import metrics
from redis_weights.observe.metrics import FAILURE_KINDS, TRAINER_METRICS, WORKER_METRICS, failure_kind
from redis_weights.observe.reports import PUSH_PHASES, ApplyReport, PushReport, call_hook, wants_report
from tests.conftest import REPO_ROOT
from tests.test_updater import hold_uploads

ALLOWED_LABELS = {"namespace", "phase", "kind", "le"}  # never a rank or a version


@pytest.fixture
def store(fake_redis, namespace: str) -> RedisStore:
    return RedisStore(fake_redis, namespace, owns_client=False)


def sample(name: str, namespace: str, **labels: str) -> float:
    value = prometheus_client.REGISTRY.get_sample_value(name, {"namespace": namespace, **labels})
    return 0.0 if value is None else value


def worker_policy() -> nn.Module:
    model = nn.Linear(8, 4)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


def test_a_namespace_series_leave_with_its_last_open_updater_or_receiver(store: RedisStore, namespace: str) -> None:
    def exposed(name: str, **labels: str) -> float | None:
        return prometheus_client.REGISTRY.get_sample_value(name, {"namespace": namespace, **labels})

    def settled(name: str, **labels: str) -> float | None:  # releases are dropped on the releaser thread
        deadline = time.monotonic() + 10
        while metrics._releases.qsize() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)  # the last one taken may still be being dropped
        return exposed(name, **labels)

    first = RedisWeightUpdater(store, nn.Linear(8, 4), 1, sync=False)
    second = RedisWeightUpdater(RedisStore(store.client, namespace, owns_client=False), nn.Linear(8, 4), 1)
    receiver = RedisWeightReceiver(store, 1, worker_policy())
    first.update_weights()
    first.close()
    first.close()  # idempotent: the second updater still holds the namespace's series
    assert settled("redis_weights_versions_committed_total") == 1
    second.close()
    assert settled("redis_weights_versions_committed_total") is None
    assert exposed("redis_weights_push_phase_duration_seconds_count", phase="encode") is None
    assert exposed("redis_weights_applied_version") == 0  # the receiver's own series stay while it is open
    receiver.close()
    assert settled("redis_weights_applied_version") is None


def test_a_release_from_a_finalizer_inside_prometheus_client_does_not_deadlock(namespace: str) -> None:
    """A garbage collection may run an object's ``__del__`` that closes an updater while this very
    thread holds a prometheus_client lock (seen: a TorchRL scheme collected while a histogram was
    being created): the release must not wait for any lock."""
    recorder = metrics.TrainerMetrics(namespace)
    family = prometheus_client.REGISTRY._names_to_collectors["redis_weights_push_duration_seconds"]
    done = threading.Event()

    def finalizer_while_holding_the_lock() -> None:
        with family._lock:  # what the thread holds when the collector runs the finalizer
            recorder.release()
        done.set()

    thread = threading.Thread(target=finalizer_while_holding_the_lock, daemon=True)
    thread.start()
    assert done.wait(10), "release() blocked on a lock its own thread holds"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and prometheus_client.REGISTRY.get_sample_value(
            "redis_weights_committed_version", {"namespace": namespace}) is not None:  # fmt: skip
        time.sleep(0.01)
    assert prometheus_client.REGISTRY.get_sample_value("redis_weights_committed_version",
                                                       {"namespace": namespace}) is None  # fmt: skip


def test_a_push_and_an_apply_are_counted_and_timed_by_phase(store: RedisStore, namespace: str) -> None:
    policy = nn.Linear(8, 4)
    updater = RedisWeightUpdater(store, policy, 1, sync=False)
    receiver = RedisWeightReceiver(store, 1, worker_policy())
    updater.update_weights()
    size = updater.registry.read_manifest(1).total_bytes
    assert sample("redis_weights_versions_committed_total", namespace) == 1
    assert sample("redis_weights_push_written_bytes_total", namespace) == size
    assert sample("redis_weights_committed_version", namespace) == 1
    assert sample("redis_weights_push_duration_seconds_count", namespace) == 1
    for phase in ("encode", "upload", "commit"):
        assert sample("redis_weights_push_phase_duration_seconds_count", namespace, phase=phase) == 1
    assert sample("redis_weights_push_phase_duration_seconds_count", namespace, phase="acks") == 0  # no bound
    assert sample("redis_weights_lag_versions", namespace) == 0
    assert receiver.poll() == 1
    assert sample("redis_weights_versions_applied_total", namespace) == 1
    assert sample("redis_weights_fetched_bytes_total", namespace) == size
    assert sample("redis_weights_applied_version", namespace) == 1
    assert sample("redis_weights_fetch_duration_seconds_count", namespace) == 1
    assert sample("redis_weights_apply_duration_seconds_count", namespace) == 1
    updater.update_weights()  # the same weights: Redis holds every chunk already, nothing is written
    assert sample("redis_weights_versions_committed_total", namespace) == 2
    assert sample("redis_weights_push_written_bytes_total", namespace) == size
    with torch.no_grad():
        policy.bias.add_(1.0)
    updater.update_weights()
    assert sample("redis_weights_versions_committed_total", namespace) == 3
    assert size < sample("redis_weights_push_written_bytes_total", namespace) <= 2 * size


def test_every_catalogued_metric_is_exposed_with_no_rank_or_version_label(store: RedisStore, namespace: str) -> None:
    updater = RedisWeightUpdater(store, nn.Linear(8, 4), 1, sync=True, timeout=0.2)
    receiver = RedisWeightReceiver(store, 1, worker_policy())
    with pytest.raises(PushTimeoutError):
        updater.update_weights()  # nobody acks in time: a failure of kind "timeout"
    receiver.poll()
    RedisWeightReceiver(store, 2, nn.Linear(3, 3)).poll()  # refuses the version: mismatched shapes
    text = prometheus_client.generate_latest().decode()
    families = {f.name: f for f in text_string_to_metric_families(text) if f.name.startswith("redis_weights_")}
    ours = {}
    for family in families.values():
        mine = [s for s in family.samples if s.labels.get("namespace") == namespace]
        if mine:
            ours[family.name] = family
        for s in family.samples:
            assert set(s.labels) <= ALLOWED_LABELS, (s.name, s.labels)
    for spec in TRAINER_METRICS + WORKER_METRICS:
        base = spec.name.removesuffix("_total")  # the parser names a counter's family without it
        assert base in ours, f"{spec.name} not exposed"
        assert ours[base].type == spec.kind, spec.name
        assert {k for s in ours[base].samples for k in s.labels} - {"le"} == set(spec.labels), spec.name
    assert sample("redis_weights_push_failures_total", namespace, kind="timeout") == 1
    assert sample("redis_weights_versions_refused_total", namespace) == 1


def test_failure_kinds() -> None:
    from redis_weights.errors import BackgroundUploadError, PushError

    cause = PushError("x", version=1)
    try:
        raise PushError("redis", version=1) from RuntimeError("reset")
    except PushError as exc:
        redis_error = exc
    cases = {
        "timeout": PushTimeoutError("t", version=1, lagging=[2]),
        "rank_error": PushError("e", version=1, errors={2: "error: bad"}),
        "dead_rank": PushError("d", version=1, dead=[2]),
        "redis": redis_error,
        "background_upload": BackgroundUploadError("b"),
        "other": cause,
    }
    for kind, error in cases.items():
        assert failure_kind(error) == kind
    assert set(cases) == set(FAILURE_KINDS)


def test_superseded_background_uploads_are_counted(store: RedisStore, namespace: str, monkeypatch) -> None:
    updater = RedisWeightUpdater(store, nn.Linear(8, 4), 1, sync=False, background=True)
    release = hold_uploads(updater, monkeypatch)
    updater.update_weights()  # uploading (held)
    while updater._uploader._inflight is None:  # the first upload has started
        release.wait(0.01)
    updater.update_weights()  # waiting
    updater.update_weights()  # replaces the waiting one
    assert sample("redis_weights_background_uploads_superseded_total", namespace) == 1
    assert updater.last_push is not None and updater.last_push.background
    assert set(updater.last_push.seconds) == {"encode"} and updater.last_push.written_bytes == 0
    release.set()
    updater.flush(10)
    assert sample("redis_weights_versions_committed_total", namespace) == 2  # the first and the third
    updater.close()


def test_post_hooks_get_a_report_when_they_ask_for_one(store: RedisStore) -> None:
    updater = RedisWeightUpdater(store, nn.Linear(8, 4), 1, sync=False, max_lag=5)
    receiver = RedisWeightReceiver(store, 1, worker_policy())
    calls: list[object] = []
    updater.register_post_hook(lambda: calls.append("plain"))  # TorchRL's zero-argument hook
    updater.register_post_hook(lambda report: calls.append(report))
    receiver.register_post_hook(lambda version: calls.append(("version", version)))
    receiver.register_post_hook(lambda version, report: calls.append(("apply", version, report)))
    updater.update_weights()
    push = calls[1]
    assert calls[0] == "plain" and isinstance(push, PushReport)
    size = updater.registry.read_manifest(1).total_bytes
    assert (push.version, push.ranks, push.total_bytes, push.written_bytes) == (1, (1,), size, size)
    assert set(push.seconds) == set(PUSH_PHASES) - {"gc"}, "a push within retention runs no GC"
    assert push.total_seconds == sum(push.seconds.values())
    assert push.max_lag == 5 and not push.sync and push is updater.last_push
    assert push.to_dict()["ranks"] == [1]
    calls.clear()
    receiver.poll()
    assert calls[0] == ("version", 1)
    _, version, apply = calls[1]
    assert version == 1 and isinstance(apply, ApplyReport) and apply is receiver.last_apply
    assert (apply.version, apply.previous, apply.total_bytes, apply.fetched_bytes, apply.lag) == (1, 0, size, size, 0)
    assert set(apply.seconds) == {"fetch", "apply"}


def test_wants_report() -> None:
    def plain() -> None: ...
    def positional(version) -> None: ...
    def keyword(version, *, report) -> None: ...
    def anything(*args, **kwargs) -> None: ...

    assert [wants_report(f) for f in (plain, positional, keyword, anything, print)] == [False, False, True, True, False]
    assert call_hook(keyword, 3, report="r") is None
    with pytest.raises(TypeError):
        keyword(3)  # the report really is passed above


def test_receiver_lag_is_the_distance_to_latest(store: RedisStore, namespace: str) -> None:
    updater = RedisWeightUpdater(store, nn.Linear(8, 4), 2, sync=False)
    receiver = RedisWeightReceiver(store, 1, worker_policy())
    updater.update_weights()
    receiver.poll()
    updater.update_weights(weights={"weight": torch.zeros(2, 2)})  # a version rank 1 refuses
    receiver.poll()
    assert receiver.version == 1 and receiver.latest_seen == 2 and receiver.lag == 1
    assert sample("redis_weights_lag_versions", namespace) == 1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"sync": True, "max_lag": 2}, "needs sync=False"),
        ({"sync": False, "max_lag": -1}, "non-negative"),
        ({"sync": False, "max_lag": 1.5}, "non-negative"),
        ({"sync": False, "max_lag": 1, "background": True}, "needs background=False"),
    ],
)
def test_max_lag_options_that_cannot_work_are_refused(store: RedisStore, options, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        RedisWeightUpdater(store, nn.Linear(8, 4), 1, **options)


def test_sync_is_max_lag_zero(store: RedisStore) -> None:
    assert RedisWeightUpdater(store, None, 1, sync=True, max_lag=0).lag_bound == 0
    assert RedisWeightUpdater(store, None, 1, sync=True).lag_bound == 0
    assert RedisWeightUpdater(store, None, 1, sync=False).lag_bound is None
    assert RedisWeightUpdater(store, None, 1, sync=False, max_lag=3).lag_bound == 3


def test_max_lag_waits_for_a_rank_too_far_behind(store: RedisStore) -> None:
    """max_lag=1: push 1 and 2 return (no rank can be more than 1 behind yet, then rank 1 holds 1);
    push 3 waits for rank 1 to run version 2 and names it when the time runs out."""
    updater = RedisWeightUpdater(store, nn.Linear(8, 4), 1, sync=False, max_lag=1, timeout=0.3)
    receiver = RedisWeightReceiver(store, 1, worker_policy())
    updater.update_weights()
    with pytest.raises(PushTimeoutError, match=r"version 2 .*max_lag=1.*rank 1 lags") as info:
        updater.update_weights()  # rank 1 still runs nothing: version 1 is too far behind
    assert info.value.lagging == [1]
    receiver.poll()  # runs 2 now
    updater.update_weights()  # version 3: rank 1 at 2 is within 1
    assert updater.version == 3


def test_the_core_works_without_prometheus_client() -> None:
    script = textwrap.dedent(
        """
        import sys
        sys.modules["prometheus_client"] = None  # as if it were not installed
        import fakeredis, torch
        from redis_weights import RedisStore, RedisWeightReceiver, RedisWeightUpdater
        from redis_weights.observe import metrics
        from redis_weights.errors import ConfigurationError
        assert not metrics.AVAILABLE
        store = RedisStore(fakeredis.FakeRedis(), "policy", owns_client=False)
        updater = RedisWeightUpdater(store, {"w": torch.ones(3)}, 1, sync=False, max_lag=1)
        receiver = RedisWeightReceiver(store, 1, {"w": torch.zeros(3)})
        updater.update_weights()
        assert receiver.poll() == 1 and updater.last_push.version == 1 and receiver.last_apply.version == 1
        try:
            metrics.serve(0)
        except ConfigurationError as exc:
            assert "redis_weights[metrics]" in str(exc)
        else:
            raise AssertionError("serve() without prometheus-client")
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
