"""The CUDA path: weights on the GPU pushed through a wire dtype with deltas, applied in place into
GPU parameters; and ``scripts/gpu_check.py``, the check ``scripts/gpu_check.sh`` runs on a GPU.

Tests marked ``cuda`` run only where torch sees a CUDA device (``pytest -m cuda``); the script's
CPU variants run everywhere, so the GPU check cannot rot unnoticed between GPU runs.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from redis_weights import RedisStore, RedisWeightReceiver, RedisWeightUpdater
from redis_weights.format.codec import Encoder
from scripts import gpu_check
from tests.conftest import REPO_ROOT

HAS_CUDA = torch.cuda.is_available()
cuda = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=[cuda, needs_cuda])]
CHUNK = 64 << 10  # the test model spans many chunks, so deltas patch some and keep others


def _model(device: str, dtype: torch.dtype, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 64)).to(device=device, dtype=dtype)


@cuda
@needs_cuda
def test_cuda_weights_are_staged_through_pinned_host_memory():
    encoder = Encoder(CHUNK, torch.bfloat16)
    encoded = encoder.encode(_model("cuda", torch.float32, 0))
    assert encoder._staging is not None and encoder._staging.is_pinned()  # async copies from the device
    assert encoded.wire_dtype == "BF16" and encoded.total_bytes > 0


@cuda
@needs_cuda
@pytest.mark.server
def test_a_bf16_delta_push_from_the_gpu_lands_in_place_and_bit_exact_in_gpu_parameters(real_store, redis_url):
    trainer = _model("cuda", torch.float32, 0)
    workers = {dtype: _model("cuda", dtype, 1) for dtype in (torch.float32, torch.bfloat16)}
    before = {dtype: {n: (p, p.data_ptr()) for n, p in m.state_dict(keep_vars=True).items()}
              for dtype, m in workers.items()}  # fmt: skip
    updater = RedisWeightUpdater(real_store, trainer, num_workers=2, sync=False, chunk_size=CHUNK,
                                 wire_dtype=torch.bfloat16, delta=True)  # fmt: skip
    receivers = [RedisWeightReceiver(RedisStore.from_url(redis_url, real_store.keyspace.namespace), rank, model)
                 for rank, model in enumerate(workers.values(), start=1)]  # fmt: skip
    generator = torch.Generator(device="cuda").manual_seed(2)
    try:
        for push in range(3):
            if push:
                gpu_check.step(trainer, generator)
            updater.update_weights()
            if push:  # a small step: the push stores patches, not the model
                assert updater.last_push.written_bytes < updater.last_push.total_bytes / 4
            for receiver in receivers:
                assert receiver.poll() == updater.version
            for dtype, model in workers.items():
                for name, p in model.state_dict(keep_vars=True).items():
                    assert p is before[dtype][name][0] and p.data_ptr() == before[dtype][name][1]
                    assert p.device.type == "cuda" and p.dtype == dtype
                    want = trainer.state_dict()[name].to(torch.bfloat16).to(dtype)
                    assert torch.equal(p.detach(), want), (dtype, name, push)
    finally:
        for receiver in receivers:
            receiver.close()
            receiver.store.close()
        updater.close()


@pytest.mark.server
@pytest.mark.parametrize("device", DEVICES)
def test_the_gpu_checks_push_passes_and_reports_what_it_checked(device, redis_url, tmp_path):
    out = tmp_path / "push.json"
    proc = subprocess.run(
        [sys.executable, "scripts/gpu_check.py", "push", "--device", device, "--size", "2MB", "--pushes", "2",
         "--url", redis_url, "--timeout", "60", "--json", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    assert doc["ok"] and not doc["failures"] and doc["device"] == device
    assert [p["version"] for p in doc["pushes"]] == [1, 2]
    assert doc["pushes"][1]["written_bytes"] < doc["wire_bytes"] / 2  # the second push was a delta
    for push in doc["pushes"]:
        assert sorted(push["workers"]) == ["1", "2"]
        for record in push["workers"].values():
            assert record["same_objects"] and record["same_data_ptr"] and record["same_device"]
            assert record["seconds"]["apply"] > 0 and record["peak_growth"] <= doc["worker_bound"]
        assert push["trainer_peak_growth"] <= doc["trainer_bound"]
    assert "in place, bit-exact, host memory within bounds: OK" in proc.stdout


@pytest.mark.server
def test_the_gpu_checks_push_fails_on_bytes_that_differ(monkeypatch, redis_url, tmp_path):
    """The bit-exact check can fail: a trainer that expects other bytes than it pushed is reported."""
    real = gpu_check.expected_digests
    monkeypatch.setattr(gpu_check, "expected_digests", lambda model: {k: "0" + v for k, v in real(model).items()})
    code = gpu_check.main(["push", "--device", "cpu", "--size", "1MB", "--pushes", "1", "--url", redis_url,
                           "--json", str(tmp_path / "push.json")])  # fmt: skip
    doc = json.loads((tmp_path / "push.json").read_text())
    assert code == 1 and not doc["ok"]
    assert any("bytes differ" in f for f in doc["failures"]) and len(doc["failures"]) == 2  # one per worker


def test_the_gpu_checks_timings_run_on_every_device_there_is(tmp_path, capsys):
    out = tmp_path / "timing.json"
    assert gpu_check.main(["time", "--devices", "cpu,cuda", "--size", "2MB", "--repeats", "2", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    devices = ["cpu", "cuda"] if HAS_CUDA else ["cpu"]
    assert list(doc["encode"]) == devices and list(doc["apply"]) == devices
    for device in devices:
        encode = doc["encode"][device]
        assert encode["total"] >= encode["cast"] + encode["hash"] + encode["diff"] > 0
        assert 0 < encode["patch_fraction"] < 0.5  # a small step: deltas
        assert doc["apply"][device]["float32"] > 0 and doc["apply"][device]["bfloat16"] > 0
    if not HAS_CUDA:
        assert "no CUDA device: the GPU timings are skipped" in capsys.readouterr().out
