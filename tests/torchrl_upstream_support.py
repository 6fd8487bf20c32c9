"""Helpers for ``tests/test_torchrl_upstream.py``: TorchRL 0.14's own test bodies, importable by spawned processes.

The trainer functions below are TorchRL's ``DistributedCollectorBase._test_*``
bodies (pytorch/rl ``test/test_distributed.py``, v0.14.0) with one change: the
collector gets ``weight_sync_schemes={"policy": RedisWeightSyncScheme(url, ...)}``
instead of TorchRL's default ``DistributedWeightSyncScheme``. Their assertions are
TorchRL's, unchanged; the trainer's TCPStore gets a longer timeout (see
``patience_on_a_busy_machine``) and the trainer process freezes what it imported
(``gc.freeze``: its exit then skips the last collection over torch's objects). They run
in a spawned process (as upstream) and report through a queue.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import signal
import socket
import traceback
from collections.abc import Iterator
from typing import Any

import psutil
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModuleBase
from torch import nn
from torchrl.collectors import MultiAsyncCollector
from torchrl.collectors.distributed import DistributedCollector
from torchrl.testing.mocking_classes import CountingEnv

from redis_weights.integrations.torchrl import RedisWeightSyncScheme

_PR_SET_CHILD_SUBREAPER = 36


class CountingPolicy(TensorDictModuleBase):
    """TorchRL's ``CountingPolicy`` (test/test_distributed.py): action = its one weight, 1.0 at first."""

    def __init__(self) -> None:
        weight = 1.0
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(weight))
        self.in_keys = []
        self.out_keys = ["action"]

    def forward(self, tensordict):
        tensordict.set("action", self.weight.expand(tensordict.shape).clone())
        return tensordict


def free_port_pair() -> int:
    """A loopback port p with p + 1 also free (DistributedCollector uses tcp_port and tcp_port + 1)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 65534:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no pair of free loopback ports")


STORE_TIMEOUT = 120.0  # seconds; TorchRL hard-codes 10


def patience_on_a_busy_machine() -> None:
    """Give ``DistributedCollector``'s TCPStore a 120 s timeout instead of TorchRL's hard-coded 10 s.

    The trainer waits on that store for each node to start a batch; on this 2-core
    machine, shared with other test runs, a node that spawns its own workers can take
    longer than 10 s to start (TorchRL's own scheme then fails the same way). Test
    environment only: no assertion changes.
    """
    import torchrl.collectors.distributed.generic as generic

    create = generic._create_tcpstore_with_retry
    if getattr(create, "_patient", False):
        return

    def patient(*args: Any, **kwargs: Any) -> Any:
        kwargs["timeout"] = max(kwargs.get("timeout", 10.0), STORE_TIMEOUT)
        return create(*args, **kwargs)

    patient._patient = True  # type: ignore[attr-defined]
    generic._create_tcpstore_with_retry = patient


def distributed_kwargs(url: str, namespace: str, **scheme_options: Any) -> dict[str, Any]:
    """TorchRL's ``TestDistributedCollector.distributed_kwargs`` plus the Redis scheme."""
    scheme = RedisWeightSyncScheme(url, namespace=namespace, timeout=60, **scheme_options)
    return {"launcher": "mp", "tcp_port": str(free_port_pair()), "weight_sync_schemes": {"policy": scheme}}


def run_distributed_collector_updatepolicy(queue, url, namespace, collector_class, sync, pfactory) -> None:
    """``DistributedCollectorBase._test_distributed_collector_updatepolicy``, Redis scheme swapped in."""
    patience_on_a_busy_machine()
    gc.freeze()  # everything imported lives until this process exits: its last collection skips it
    try:
        frames_per_batch = 50
        total_frames = 300
        env = CountingEnv
        if pfactory:
            policy_factory = CountingPolicy
            policy = None
        else:
            policy = CountingPolicy()
            policy_factory = None
        if collector_class is MultiAsyncCollector:
            # otherwise we may collect data from a collector that has not yet been
            # updated
            n_collectors = 1
        else:
            n_collectors = 2
        weights = None
        if policy is None and policy_factory is not None:
            policy_stateful = policy_factory()
            weights = TensorDict.from_module(policy_stateful).lock_()
        dcls = DistributedCollector
        collector = None
        collector = dcls(
            [env] * n_collectors,
            policy,
            policy_factory=policy_factory,
            collector_class=collector_class,
            total_frames=total_frames,
            frames_per_batch=frames_per_batch,
            sync=sync,
            **distributed_kwargs(url, namespace),
        )
        total = 0
        first_batch = None
        last_batch = None
        for i, data in enumerate(collector):
            total += data.numel()
            assert data.numel() == frames_per_batch
            if i == 0:
                first_batch = data
                if policy is not None:
                    # Avoid using `.data` (and avoid tracking in autograd).
                    policy.weight.data.add_(1)
                else:
                    assert weights is not None
                    weights.data += 1
                collector.update_policy_weights_(weights)
            elif total == total_frames - frames_per_batch:
                last_batch = data
        assert first_batch is not None
        assert last_batch is not None
        assert (first_batch["action"] == 1).all(), first_batch["action"]
        assert (last_batch["action"] == 2).all(), last_batch["action"]
        collector.shutdown()
        assert total == total_frames
        queue.put(("passed", None))
    except Exception as e:
        tb = traceback.format_exc()
        queue.put(("not passed", (repr(e), tb)))


# -- process hygiene: every process a test starts is stopped by the test -----------------
def become_subreaper() -> bool:
    """Adopt orphaned descendants (Linux), so processes a crashed trainer leaves behind can be found."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _descendants() -> dict[int, psutil.Process]:
    try:
        return {p.pid: p for p in psutil.Process(os.getpid()).children(recursive=True)}
    except psutil.Error:
        return {}


def _is_resource_tracker(process: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return "resource_tracker" in " ".join(process.cmdline())
    return False


@contextlib.contextmanager
def stop_new_processes() -> Iterator[None]:
    """On exit, stop every descendant process started inside the block (by pid), even on failure.

    multiprocessing's resource tracker, shared by the whole test session, is left alone.
    """
    become_subreaper()
    before = set(_descendants())
    try:
        yield
    finally:
        new = [p for pid, p in _descendants().items() if pid not in before and not _is_resource_tracker(p)]
        for process in new:
            with contextlib.suppress(psutil.Error):
                process.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(new, timeout=10)
        for process in alive:
            with contextlib.suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(alive, timeout=10)
