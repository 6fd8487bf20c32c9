"""Security: nothing read from Redis is ever unpickled or ``torch.load``-ed; TLS and ACL users work."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest
import torch

from redis_weights import RedisStore, RedisWeightReceiver, RedisWeightUpdater
from tests.models import make_model, state_digest

PACKAGE = Path(__file__).resolve().parent.parent / "redis_weights"
# Modules and calls that deserialize code or objects.
FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib", "jsonpickle"}
FORBIDDEN_CALLS = {"torch.load", "load", "eval", "exec", "loads"}
ALLOWED_LOADS = {"json.loads", "load_json"}  # JSON only


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def _violations(source: str, filename: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in FORBIDDEN_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in FORBIDDEN_MODULES:
            found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization"):
            found += [f"from {node.module} import {a.name}" for a in node.names if a.name == "load"]
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name in ALLOWED_LOADS:
                continue
            if name in FORBIDDEN_CALLS or name.endswith((".load", ".loads")) or "allow_pickle" in ast.dump(node):
                found.append(f"call {name}() at line {node.lineno}")
    return [f"{filename}: {v}" for v in found]


def test_the_scanner_catches_what_it_must():
    """The scan below must be able to fail: each of these lines is a violation."""
    for line in (
        "import pickle",
        "from pickle import loads",
        "import cloudpickle as cp",
        "torch.load(buf)",
        "from torch import load",
        "np.load(f, allow_pickle=True)",
        "x = pickle.loads(data)",
        "eval(text)",
    ):
        assert _violations(line, "<probe>"), line
    assert not _violations("json.loads(raw)\nload_json(raw, 'manifest')", "<probe>")


def test_no_module_of_the_package_unpickles_or_torch_loads():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) >= 10
    problems = [v for f in files for v in _violations(f.read_text(), str(f.relative_to(PACKAGE.parent)))]
    assert not problems, "deserialization of code/objects in the package:\n" + "\n".join(problems)


def test_a_push_and_receive_never_call_a_deserializer(real_store, redis_url, namespace, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a deserializer was called on data read from Redis")

    for module, name in ((pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(module, name, forbidden)
    model = make_model("mlp", seed=4)
    updater = RedisWeightUpdater(real_store, model, num_workers=1, sync=False)
    updater.update_weights()
    worker = make_model("mlp")
    receiver = RedisWeightReceiver(RedisStore.from_url(redis_url, namespace), 1, worker)
    try:
        assert receiver.poll() == updater.version
    finally:
        receiver.close()
    assert state_digest(worker) == state_digest(model)


@pytest.mark.parametrize("payload", [pickle.dumps({"w": 1}), b"PK\x03\x04" + b"\x00" * 64])
def test_a_pickle_or_zip_in_place_of_a_manifest_is_refused_as_not_json(real_store, redis_url, namespace, payload):
    updater = RedisWeightUpdater(real_store, make_model("mlp", seed=5), num_workers=1, sync=False)
    updater.update_weights()
    real_store.client.set(real_store.keyspace.manifest(updater.version), payload)
    receiver = RedisWeightReceiver(RedisStore.from_url(redis_url, namespace), 1, make_model("mlp"))
    try:
        assert receiver.poll() is None
        assert "manifest is not JSON" in receiver.last_error
    finally:
        receiver.close()
