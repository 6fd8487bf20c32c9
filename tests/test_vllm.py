"""vLLM engines as workers: the ``"redis"`` weight-transfer backend on a tiny Llama, on the CPU.

Needs the vLLM venv (``scripts/install_vllm.sh``; run this file with
``.venv-vllm/bin/python -m pytest tests/test_vllm.py``): skipped elsewhere. One
in-process engine serves the whole module; vLLM's HTTP server starts late as a second
one. After every push the engines' greedy tokens equal transformers' on the version's
exact weights.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed here: scripts/install_vllm.sh, then .venv-vllm/bin/python")

from redis_weights import RedisStore, RedisWeightUpdater  # noqa: E402
from redis_weights.errors import ConfigurationError  # noqa: E402
from redis_weights.integrations.vllm import OfflineLLMClient, init_engines, push_to_engines  # noqa: E402
from redis_weights.integrations.vllm.engine import INIT_ENV  # noqa: E402
from redis_weights.integrations.vllm.options import split_receive_options  # noqa: E402
from redis_weights.integrations.vllm.receiver import tensor_digests  # noqa: E402
from redis_weights.tools.admin import Admin  # noqa: E402
from redis_weights.tools.server import free_port  # noqa: E402

from .vllm_support import api_server, engine_attr, hf_greedy, http_greedy, llm_greedy, start_llm, tiny_llama  # noqa: E402

pytestmark = pytest.mark.server


class Setup:
    """The trainer (a transformers Llama and its updater), one engine, a reference model."""

    def __init__(self, path: Path, url: str, namespace: str) -> None:
        from transformers import LlamaForCausalLM

        self.path, self.url, self.namespace = path, url, namespace
        self.model = tiny_llama(path)
        self.reference = LlamaForCausalLM(self.model.config).float().eval()
        self.optimizer = torch.optim.AdamW(self.model.parameters())
        self.store = RedisStore.from_url(url, namespace=namespace)
        self.updater = RedisWeightUpdater(self.store, dict(self.model.named_parameters()), 3, sync=False,
                                          wire_dtype=torch.bfloat16, delta=True, retention=10)  # fmt: skip
        self.admin = Admin(RedisStore(self.store.client, namespace, owns_client=False))
        self.llm = start_llm(path)
        self.client = OfflineLLMClient(self.llm)
        self.host_cache = str(path / "host-cache")  # the late server shares it: one fetch per host
        init_engines([self.client], url, namespace, first_rank=1, poll_interval=0.2, host_cache=self.host_cache)

    def push(self) -> int:
        """Push the trainer's weights and update the engine (rank 1; rank 2 is the late engine)."""
        return push_to_engines(self.updater, [self.client], worker_ids=[1])

    def step(self, lr: float = 1e-5) -> None:
        """One real AdamW step on random tokens (at 1e-5 a bf16 push is a delta; at 1e-2 the tokens change)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        ids = torch.randint(0, 256, (2, 16))
        self.model(ids, labels=ids).loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()

    def expected(self, version: int) -> list[list[int]]:
        """transformers' greedy tokens on the exact weights of ``version`` (read back from Redis)."""
        from safetensors.torch import load_file

        self.reference.load_state_dict({k: v.float() for k, v in load_file(str(self.export(version))).items()})
        return hf_greedy(self.reference)

    def export(self, version: int) -> Path:
        path = self.path / f"v{version}.safetensors"
        self.admin.export(version, path)
        return path

    def assert_serves(self, version: int) -> None:
        """The engine serves ``version``: its number, the digest of every tensor it loaded, its greedy tokens."""
        assert engine_attr(self.llm, "version") == [version]
        data, manifest = self.export(version).read_bytes(), self.admin.manifest(version)
        chunks = [data[i * manifest.chunk_size : (i + 1) * manifest.chunk_size] for i in range(manifest.num_chunks)]
        assert engine_attr(self.llm, "receiver")[0].loaded == tensor_digests(chunks, manifest)
        assert llm_greedy(self.llm) == self.expected(version)

    def status(self, rank: int = 1) -> Any:
        return self.updater.workers([rank])[0]

    def close(self) -> None:
        self.llm.shutdown_weight_transfer_engine()
        self.updater.close()
        self.admin.store.close()


@pytest.fixture(scope="module")
def setup(redis_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    s = Setup(tmp_path_factory.mktemp("tiny-llama"), redis_server.url, "vllm-test")
    yield s
    s.close()


def test_keyframe_delta_and_rollback_serve_exact_weights(setup: Setup) -> None:
    assert engine_attr(setup.llm, "version") == [0]
    checkpoint = llm_greedy(setup.llm)
    setup.step(1e-2)
    v1 = setup.push()
    assert setup.admin.manifest(v1).is_keyframe
    setup.assert_serves(v1)
    assert llm_greedy(setup.llm) != checkpoint and setup.llm.get_weight_version() == str(v1)
    state = setup.status()
    assert (state.status, state.version) == ("updated", v1)

    for _ in range(2):
        setup.step()
        v = setup.push()
        assert not setup.admin.manifest(v).is_keyframe  # a delta: the engine patched its copy
        setup.assert_serves(v)
    setup.step(1e-2)
    setup.push()
    assert llm_greedy(setup.llm) == setup.expected(setup.updater.version) != setup.expected(v1)

    rolled = setup.admin.rollback(v1).version
    setup.client.start_weight_update()
    setup.client.update_weights({"version": "latest"})
    setup.client.finish_weight_update()
    setup.assert_serves(rolled)
    assert setup.expected(rolled) == setup.expected(v1)


def test_only_changed_layers_are_loaded(setup: Setup) -> None:
    setup.push()  # the trainer's weights again (the engine may serve a rollback)
    with torch.no_grad():
        setup.model.model.layers[1].mlp.down_proj.weight.add_(0.5)
    setup.push()
    loaded = engine_attr(setup.llm, "receiver")[0].loaded_names
    assert loaded and all(name.startswith("model.layers.1.") for name in loaded)
    assert llm_greedy(setup.llm) == setup.expected(setup.updater.version)


def _stop_staging(worker: Any) -> None:
    worker.weight_transfer_engine.receiver.stop()  # the test corrupts a version before the engine reads it


def test_corrupt_chunk_keeps_the_old_version_whole(setup: Setup) -> None:
    (before,) = engine_attr(setup.llm, "version")
    tokens = llm_greedy(setup.llm)
    setup.llm.collective_rpc(_stop_staging)
    setup.step()
    setup.updater.update_weights()
    version = setup.updater.version
    new = setup.admin.manifest(version).objects() - setup.admin.manifest(before).objects()
    assert new
    client = setup.store.client
    for object_id in new:  # flip one byte in the middle of every object this version added
        key = setup.updater.keyspace.chunk(object_id)
        middle = client.strlen(key) // 2
        client.setrange(key, middle, bytes([client.getrange(key, middle, middle)[0] ^ 0xFF]))
    setup.client.start_weight_update()
    with pytest.raises(Exception, match=f"version {version}"):
        setup.client.update_weights({"version": version})  # vLLM ends the session on a failed update
    assert engine_attr(setup.llm, "version") == [before]
    assert llm_greedy(setup.llm) == tokens == setup.expected(before)
    assert setup.status().status.startswith(f"error: version {version}")


def _start_staging(worker: Any) -> None:
    worker.weight_transfer_engine.receiver.start_staging()


def _failing_loader(worker: Any) -> None:
    """Make the model's loader fail after it loaded some layers (once)."""
    model = worker.weight_transfer_engine.model
    original = model.load_weights

    def load_weights(weights: Any) -> Any:
        model.load_weights = original
        weights = list(weights)
        original(iter(weights[: len(weights) // 2]))
        raise RuntimeError("simulated loader failure")

    model.load_weights = load_weights


def test_loader_failure_restores_the_previous_version(setup: Setup) -> None:
    (before,) = engine_attr(setup.llm, "version")  # what the engine serves (it refused a corrupt version)
    tokens = llm_greedy(setup.llm)
    setup.step()
    setup.updater.update_weights()
    setup.llm.collective_rpc(_failing_loader)
    setup.client.start_weight_update()
    with pytest.raises(Exception, match="simulated loader failure"):
        setup.client.update_weights({"version": setup.updater.version})
    assert engine_attr(setup.llm, "version") == [before]
    assert llm_greedy(setup.llm) == tokens
    status = setup.status().status
    assert status.startswith(f"error: version {setup.updater.version}") and f"version {before} restored" in status
    setup.push()  # the next update loads every layer again
    assert llm_greedy(setup.llm) == setup.expected(setup.updater.version)


@pytest.mark.slow
def test_a_late_http_server_serves_the_latest_then_one_push_updates_both_engines(setup: Setup, tmp_path: Path) -> None:
    """vLLM's OpenAI server started after five pushes, with the init info in its environment and no trainer
    call, serves the latest version; its engine core is a process of its own (the plugin registered the
    backend there too). Then one push updates it and the offline engine, and waits for both acks."""
    from vllm.distributed.weight_transfer import HTTPVLLMWeightSyncClient

    for _ in range(5):
        setup.step(1e-2)
        setup.updater.update_weights(worker_ids=[1])
    latest = setup.updater.version
    init = json.dumps({"url": setup.url, "namespace": setup.namespace, "rank": 3, "host_cache": setup.host_cache})
    with api_server(setup.path, free_port("127.0.0.1"), tmp_path / "server.log", **{INIT_ENV: init}) as base:
        state = setup.status(3)
        assert (state.status, state.version) == ("updated", latest)
        assert http_greedy(base, setup.path) == setup.expected(latest)
        server = HTTPVLLMWeightSyncClient(base)
        setup.step(1e-2)
        version = push_to_engines(setup.updater, [setup.client, server], worker_ids=[1, 3])  # both acked
        assert [s.version for s in setup.updater.workers([1, 3])] == [version, version]
        assert http_greedy(base, setup.path) == llm_greedy(setup.llm) == setup.expected(version)


def test_options_and_misuse_are_refused(setup: Setup) -> None:
    fields, options = split_receive_options({"url": "redis://x", "rank": 3, "host_cache": True})
    assert fields == {"url": "redis://x", "rank": 3} and options == {"host_cache": True}
    with pytest.raises(ValueError, match="unknown option 'colour'"):
        split_receive_options({"url": "redis://x", "colour": "red"})
    sync = RedisWeightUpdater(RedisStore.from_url(setup.url, namespace=setup.namespace), dict(setup.model.named_parameters()), 1)  # noqa: E501
    with pytest.raises(ConfigurationError, match="sync=False"):
        push_to_engines(sync, [setup.client])
    sync.close()


def test_a_dead_redis_during_an_update_keeps_the_old_version_whole(setup: Setup, server_factory: Any) -> None:
    """On a private server (the engine moves there), killed between a push and the engine's update."""
    server = server_factory()
    store = RedisStore.from_url(server.url, namespace="dead")
    updater = RedisWeightUpdater(store, dict(setup.model.named_parameters()), 1, sync=False)
    try:
        init_engines([setup.client], server.url, "dead")
        setup.step(1e-2)
        served = push_to_engines(updater, [setup.client])
        tokens = llm_greedy(setup.llm)
        setup.llm.collective_rpc(_stop_staging)
        setup.step(1e-2)
        updater.update_weights()
        server.kill()
        setup.client.start_weight_update()
        with pytest.raises(Exception, match="Connection|connect"):
            setup.client.update_weights({"version": updater.version})
        assert engine_attr(setup.llm, "version") == [served]
        assert llm_greedy(setup.llm) == tokens
        server.start()  # back, empty: the staging thread sends the status Redis did not take
        setup.llm.collective_rpc(_start_staging)
        deadline = time.monotonic() + 30
        while not (updater.workers([1])[0].status or "").startswith(f"error: version {updater.version}: "):
            assert time.monotonic() < deadline, updater.workers([1])
            time.sleep(0.1)
    finally:
        updater.close()


def test_vllms_trainer_api_pushes_a_module_source(setup: Setup) -> None:
    """``WeightTransferTrainerFactory.trainer_init`` with backend "redis" (last: the engine moves namespace)."""
    from vllm.distributed.weight_transfer import ModuleSource, WeightTransferTrainerFactory

    from redis_weights.integrations.vllm.trainer import RedisTrainerInitInfo

    info = RedisTrainerInitInfo(rank=0, url=setup.url, namespace="vllm-trainer-api", updater={"wire_dtype": "bf16"})
    with pytest.raises(ConfigurationError):  # options are checked by the updater itself
        WeightTransferTrainerFactory.trainer_init(info, client=setup.client, source=ModuleSource(setup.model))
    info.updater = {"retention": 2}
    engine = WeightTransferTrainerFactory.trainer_init(info, client=setup.client, source=ModuleSource(setup.model))
    try:
        setup.step(1e-2)
        version = engine.send_weights()
        assert engine_attr(setup.llm, "version") == [version]
        reference = {k: v.detach() for k, v in setup.model.state_dict().items()}
        setup.reference.load_state_dict(reference)
        assert llm_greedy(setup.llm) == hf_greedy(setup.reference)
    finally:
        engine.shutdown()
