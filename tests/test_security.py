"""Security: nothing read from Redis is ever unpickled or ``torch.load``-ed; TLS and ACL users work."""

from __future__ import annotations

import ast
import pickle
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis
import torch

from redis_weights import ConfigurationError, RedisStore, RedisWeightReceiver, RedisWeightUpdater
from redis_weights.backend.keys import Keys
from redis_weights.tools.server import free_port
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


# ---------------------------------------------------------------------------------------
# ACL users and TLS
# ---------------------------------------------------------------------------------------
RIGHTS = ["+@read", "+@write", "+@scripting", "+@pubsub", "+@connection", "+info"]


def _acl_user(admin: redis.Redis, name: str, namespace: str, *, channels: bool = True) -> None:
    keys = [f"~{pattern}" for pattern in Keys(namespace).acl_key_patterns]
    rules = ["on", ">pw", "resetkeys", *keys, "resetchannels", "-@all", *RIGHTS]
    if channels:
        rules.append(f"&rw:{{{namespace}}}:*")
    admin.execute_command("ACL", "SETUSER", name, *rules)


def _push_and_receive(url: str, namespace: str, **options) -> None:
    model = make_model("mlp", seed=8)
    updater = RedisWeightUpdater(RedisStore.from_url(url, namespace, **options), model, 1, sync=True, timeout=20)
    worker = make_model("mlp")
    with RedisWeightReceiver(RedisStore.from_url(url, namespace, **options), 1, worker, poll_interval=0.2):
        updater.update_weights()
        assert state_digest(worker) == state_digest(model)
        updater.update_weights()  # a second version: GC and acks through the restricted user too
    assert updater.workers()[0].status == "updated"
    updater.close()


def test_an_acl_user_restricted_to_the_namespace_pushes_and_receives(server_factory, namespace):
    server = server_factory()
    admin = redis.Redis(port=server.port)
    _acl_user(admin, "alice", namespace)
    url = f"redis://alice:pw@127.0.0.1:{server.port}/0"
    _push_and_receive(url, namespace)
    alice = redis.Redis.from_url(url)
    with pytest.raises(redis.exceptions.NoPermissionError):
        alice.get("rw:{other}:latest")  # the restriction is real
    alice.close()
    admin.close()


def test_an_acl_user_without_channel_rights_is_one_clear_error_at_start(server_factory, namespace):
    server = server_factory()
    admin = redis.Redis(port=server.port)
    _acl_user(admin, "bob", namespace, channels=False)
    store = RedisStore.from_url(f"redis://bob:pw@127.0.0.1:{server.port}/0", namespace)
    started = time.monotonic()
    for build in (
        lambda: RedisWeightUpdater(store, make_model("mlp"), 1),
        lambda: RedisWeightReceiver(store, 1, make_model("mlp")),
    ):
        with pytest.raises(ConfigurationError, match="lacks rights: SUBSCRIBE: .*no permissions .*channels"):
            build()
    assert time.monotonic() - started < 10
    store.close()
    admin.close()


def _make_certs(directory: Path) -> dict[str, Path]:
    """A self-signed CA and a server certificate for 127.0.0.1, made with the openssl command."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to generate test certificates")
    ca_key, ca, key, csr, cert = (directory / n for n in ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt"))
    ext = directory / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for cmd in (
        ["req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "1", "-subj", "/CN=redis-weights test CA"],
        ["req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
         "-days", "1", "-extfile", ext],
    ):  # fmt: skip
        subprocess.run(["openssl", *map(str, cmd)], check=True, capture_output=True, timeout=60)
    return {"ca": ca, "cert": cert, "key": key}


def test_tls_with_a_self_signed_ca_and_an_acl_user(server_factory, tmp_path, namespace):
    certs = _make_certs(tmp_path)
    tls_port = free_port()
    try:
        server = server_factory(
            "--tls-port", str(tls_port), "--tls-cert-file", str(certs["cert"]), "--tls-key-file", str(certs["key"]),
            "--tls-ca-cert-file", str(certs["ca"]), "--tls-auth-clients", "no",
        )  # fmt: skip
    except ConfigurationError as exc:
        pytest.skip(f"this server binary has no TLS support: {exc}")
    admin = redis.Redis(port=server.port)
    _acl_user(admin, "carol", namespace)
    url = f"rediss://carol:pw@127.0.0.1:{tls_port}/0"
    _push_and_receive(url, namespace, ssl_ca_certs=str(certs["ca"]))
    # without the CA the certificate is refused: one clear error at start
    with pytest.raises(ConfigurationError, match="certificate verify failed"):
        RedisWeightUpdater(RedisStore.from_url(url, namespace), make_model("mlp"), 1)
    admin.close()
