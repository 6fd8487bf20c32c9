"""The core works where torchrl cannot be imported; the integration then says how to get it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.server

_SCRIPT = textwrap.dedent(
    """
    import importlib.abc
    import sys

    class BlockTorchRL(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torchrl" or name.startswith("torchrl."):
                raise ImportError(f"No module named {name!r} (blocked by the test)")
            return None

    sys.meta_path.insert(0, BlockTorchRL())

    import torch
    import redis_weights
    from redis_weights import RedisStore, RedisWeightReceiver, RedisWeightUpdater

    assert not any(m == "torchrl" or m.startswith("torchrl.") for m in sys.modules), "torchrl got imported"
    url, namespace = sys.argv[1], sys.argv[2]
    trainer = torch.nn.Linear(3, 2)
    worker = torch.nn.Linear(3, 2)
    with torch.no_grad():
        worker.weight.zero_()
    receiver = RedisWeightReceiver(RedisStore.from_url(url, namespace), 1, worker)
    updater = RedisWeightUpdater(RedisStore.from_url(url, namespace), trainer, num_workers=1, sync=False)
    updater.update_weights()
    assert receiver.poll() == updater.version
    updater.wait(10)
    assert torch.equal(worker.weight, trainer.weight) and torch.equal(worker.bias, trainer.bias)
    try:
        import redis_weights.integrations.torchrl
    except ImportError as exc:
        assert "redis_weights[torchrl]" in str(exc), exc
    else:
        raise AssertionError("the integration imported without torchrl")
    receiver.close()
    updater.close()
    print("ok")
    """
)


def test_core_pushes_and_receives_without_torchrl(redis_url: str, namespace: str, real_store) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT, redis_url, namespace],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
