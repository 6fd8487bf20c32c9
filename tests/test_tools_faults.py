"""The operator's tools under faults and hostile input, against a real server: export of damaged or
vanishing versions, empty namespaces and URLs, values from Redis or files shown on a terminal, the
exporter's exposure. Each failure is one line and exit code 1 (2 for bad usage), never a traceback."""

from __future__ import annotations

import base64
import io
import itertools
import json
import math
import re
import socket
import ssl
import unicodedata
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stdout
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from redis_weights import RedisStore, RedisWeightReceiver, RedisWeightUpdater
from redis_weights.errors import RedisWeightsError, VersionNotFoundError
from redis_weights.format.manifest import Manifest
from redis_weights.protocol.assemble import MissingObjectError
from redis_weights.tools import admin as admin_module
from redis_weights.tools.admin import Admin
from redis_weights.tools.cli import main
from redis_weights.tools.cli.guard import guarded
from redis_weights.tools.cli.render import print_table, printable
from redis_weights.tools.exporter import serve
from redis_weights.units import human_age, human_seconds, utc_time
from tests.test_admin_scripts import load
from tests.test_cli import assert_one_line_error, run_main, terminal  # noqa: F401 (a fixture)


def weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(64, 64, generator=g), "b.bias": torch.randn(64, generator=g)}


def push(store: RedisStore, seed: int, retention: int = 10) -> int:
    """Commit ``weights(seed)`` as a new version (its GC keeps ``retention``); the version."""
    updater = RedisWeightUpdater(RedisStore(store.client, store.namespace, owns_client=False), weights(seed), 1,
                                 sync=False, retention=retention, chunk_size=4096)  # fmt: skip
    updater.update_weights()
    updater.close()  # waits for the GC the push started (the store's client is the caller's)
    return updater.version


# -- export -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_export_of_a_damaged_version_is_one_line_naming_the_chunk(
    real_store: RedisStore, redis_url: str, namespace: str, tmp_path: Path, capsys, damage: str
) -> None:
    version = push(real_store, 1)
    admin = Admin(RedisStore(real_store.client, namespace, owns_client=False))
    chunk = admin.manifest(version).chunks[2].id
    key = real_store.keyspace.chunk(chunk)
    if damage == "missing":
        real_store.client.delete(key)
    else:
        real_store.client.setrange(key, 100, b"\xff\x00\xff")
    target = tmp_path / "v.safetensors"
    result = run_main(capsys, "--url", redis_url, "-n", namespace, "export", str(version), "-o", str(target))
    expected = "is missing from Redis" if damage == "missing" else "does not match its id"
    assert_one_line_error(result, f"version {version}", chunk, expected)
    assert "BufferError" not in result.stderr
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind
    if damage == "missing":  # a corrupt chunk is deleted once found: it is missing now too
        with pytest.raises(MissingObjectError, match="the version is damaged") as raised:
            admin.export("latest", target)
        assert not isinstance(raised.value.__context__, BufferError)


_SEEDS = itertools.count(100)
EMPTY = "is empty: give a value, or leave it out for the default"


def _racing_push(store: RedisStore, monkeypatch, times: int) -> dict[int, int]:
    """Make the next ``times`` exports lose their version: a retention=1 push (and its GC) runs just
    after the manifest was read, before the chunks are. The seed of each version pushed so."""
    real = admin_module.write_version
    pushed: dict[int, int] = {}

    def racing(chunks: Any, manifest: Any, target: Path) -> None:
        if len(pushed) < times:
            seed = next(_SEEDS)  # other bytes than any version before: its GC drops the version read
            pushed[push(store, seed, retention=1)] = seed
        real(chunks, manifest, target)

    monkeypatch.setattr(admin_module, "write_version", racing)
    return pushed


def test_export_of_latest_follows_a_retention_1_trainer(
    real_store: RedisStore, namespace: str, tmp_path: Path, monkeypatch
) -> None:
    first = push(real_store, 1, retention=1)
    admin = Admin(RedisStore(real_store.client, namespace, owns_client=False))
    pushed = _racing_push(real_store, monkeypatch, 2)
    manifest = admin.export("latest", tmp_path / "latest.safetensors")
    assert list(pushed) == [first + 1, first + 2] and manifest.version == first + 2
    loaded = load_file(str(tmp_path / "latest.safetensors"))
    seed = pushed[manifest.version]
    assert all(torch.equal(loaded[k], v) for k, v in weights(seed).items())
    # A numbered version garbage-collected mid-export: said so, as a RedisWeightsError.
    _racing_push(real_store, monkeypatch, 1)
    with pytest.raises(VersionNotFoundError, match=f"version {first + 2} was garbage-collected while it was exported"):
        admin.export(first + 2, tmp_path / "numbered.safetensors")
    # A trainer faster than every attempt: one clear error, not a loop.
    _racing_push(real_store, monkeypatch, admin_module.EXPORT_ATTEMPTS)
    with pytest.raises(RedisWeightsError, match="raise its retention"):
        admin.export("latest", tmp_path / "never.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.safetensors"]


def test_export_latest_script_follows_the_trainer_and_fails_in_one_line(
    real_store: RedisStore, redis_url: str, namespace: str, tmp_path: Path, monkeypatch, capsys
) -> None:
    script = load("export_latest")
    first = push(real_store, 1, retention=1)
    _racing_push(real_store, monkeypatch, 1)
    assert script.main(["--url", redis_url, "-n", namespace, "--dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith(str(tmp_path / f"{namespace}-v{first + 1}.safetensors"))
    assert [p.name for p in tmp_path.iterdir()] == [f"{namespace}-v{first + 1}.safetensors"]
    manifest = Admin(RedisStore(real_store.client, namespace, owns_client=False)).manifest("latest")
    real_store.client.delete(real_store.keyspace.chunk(manifest.chunks[0].id))
    (tmp_path / f"{namespace}-v{first + 1}.safetensors").unlink()
    code = script.main(["--url", redis_url, "-n", namespace, "--dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and err.startswith("export_latest: error: ")
    assert "is missing from Redis" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


# -- empty namespace and URL --------------------------------------------------------------------------
def test_an_empty_namespace_or_url_is_refused_never_the_default(server_factory, capsys, monkeypatch) -> None:
    server = server_factory()  # private: the default namespace is touched only here
    store = RedisStore.from_url(server.url, "policy")
    try:
        for seed in (1, 2, 3):
            push(store, seed)
        monkeypatch.delenv("REDIS_WEIGHTS_NAMESPACE", raising=False)
        monkeypatch.setenv("REDIS_URL", server.url)
        for args, needle in [
            (["-n", "", "gc", "--keep", "1"], "--namespace is empty"),
            (["gc", "--keep", "1", "--namespace", "  "], "--namespace is empty"),
            (["--url", "", "gc", "--keep", "1"], "--url is empty"),
        ]:
            assert_one_line_error(run_main(capsys, *args), needle)
        monkeypatch.setenv("REDIS_WEIGHTS_NAMESPACE", "")
        assert_one_line_error(run_main(capsys, "gc", "--keep", "1"), "$REDIS_WEIGHTS_NAMESPACE is empty")
        monkeypatch.delenv("REDIS_WEIGHTS_NAMESPACE")
        monkeypatch.setenv("REDIS_URL", "")
        assert_one_line_error(run_main(capsys, "gc", "--keep", "1"), "$REDIS_URL is empty")
        script = load("export_latest")
        monkeypatch.setenv("REDIS_URL", server.url)
        assert script.main(["-n", "", "--dir", "/nonexistent"]) == 1
        assert capsys.readouterr().err == f"export_latest: error: --namespace {EMPTY}\n"
        assert len(Admin(store).registry.list_versions()) == 3  # nothing was deleted
        # Given, the namespace is used as given; unset, the default one.
        assert json.loads(run_main(capsys, "versions", "--json").stdout)["namespace"] == "policy"
        assert json.loads(run_main(capsys, "-n", "other", "versions", "--json").stdout)["versions"] == []
    finally:
        store.close()


# -- values shown on a terminal -----------------------------------------------------------------------
_HOSTILE_NAMES = ["policy[/].bias", "head[value].weight", "[bold red]x[/]", "evil\x1b]0;pwned\x07.weight",
                  "rtl\u202etxt.weight", "line\nbreak.weight"]  # fmt: skip
_HOSTILE_METADATA = {"note": "\x1b[2J\x1b[31mcleared", "k\x1b[1m": "v\r\nforged line", "bidi": "\u202egnp.exe"}
_SGR = re.compile(r"\x1b\[[0-9;]*m")  # rich's own styles on a terminal


def _hostile_version(store: RedisStore, created: float | None = None) -> int:
    """A version whose tensor names, metadata (and ``created``, when given) someone hostile chose."""
    tensors = {name: torch.full((2,), float(i)) for i, name in enumerate(_HOSTILE_NAMES)}
    updater = RedisWeightUpdater(RedisStore(store.client, store.namespace, owns_client=False), tensors, 1,
                                 sync=False, metadata=_HOSTILE_METADATA)  # fmt: skip
    updater.update_weights()
    if created is not None:
        key = store.keyspace.manifest(updater.version)
        manifest = Manifest.from_bytes(store.client.get(key), updater.version)
        store.client.set(key, replace(manifest, created=created).to_bytes())  # NaN / Infinity as json writes them
    return updater.version


def _no_raw_controls(text: str) -> None:
    """Nothing a terminal would act on but rich's own colours and line ends."""
    bare = _SGR.sub("", text)
    bad = [ch for ch in bare if ch != "\n" and unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp")]
    assert not bad, (bad, text)


def _strict_json(text: str) -> Any:
    def refuse(constant: str) -> None:
        raise AssertionError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("created", [None, 1e300, float("inf"), float("-inf"), -1e300, float("nan")])
def test_show_and_versions_escape_names_metadata_and_range_check_created(
    real_store: RedisStore, redis_url: str, namespace: str, terminal, capsys, created: float | None
) -> None:
    version = _hostile_version(real_store, created)
    base = ["--url", redis_url, "-n", namespace]
    for command in (["show", "latest"], ["versions"]):
        with redirect_stdout(terminal):
            code = main([*base, *command])
        out = terminal.getvalue()
        terminal.seek(0)
        terminal.truncate()
        assert code == 0, out
        _no_raw_controls(out)
        if command[0] == "show":
            flat = out.replace("│", "").replace(" ", "").replace("\n", "")  # columns fold long names
            for name in _HOSTILE_NAMES:  # ASCII or escaped: what ``unicode_escape`` writes
                assert name.encode("unicode_escape").decode().replace(" ", "") in flat, (name, out)
            assert "metadata note = \\x1b[2J\\x1b[31mcleared" in out
            assert "metadata k\\x1b[1m = v\\r\\nforged line" in out
            assert ("created ? UTC" in out) == (created is not None)
        piped = run_main(capsys, *base, *command)
        assert piped.returncode == 0 and piped.stderr == "", piped
        _no_raw_controls(piped.stdout)
        doc = _strict_json(run_main(capsys, *base, *command, "--json").stdout)
        rows = [doc] if command[0] == "show" else doc["versions"]
        assert [r["version"] for r in rows] == [version]
        if created is not None:
            assert rows[0]["created"] == (created if math.isfinite(created) else None)


@given(st.lists(st.text(max_size=40), min_size=1, max_size=3))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_text_in_a_table_reaches_the_terminal_escaped(terminal, cells: list[str]) -> None:
    terminal.seek(0)
    terminal.truncate()
    print_table([f"h{i}" for i in range(len(cells))], [cells], title="t", out=terminal)
    plain = io.StringIO()
    print_table([f"h{i}" for i in range(len(cells))], [cells], title="t", out=plain)
    for text in (terminal.getvalue(), plain.getvalue()):
        _no_raw_controls(text)
    assert plain.getvalue().splitlines()[2].split() == " ".join(printable(c) for c in cells).split()


@given(st.floats(allow_nan=True, allow_infinity=True) | st.none())
def test_times_and_durations_of_any_number_are_text(value: float | None) -> None:
    for render in (human_age, human_seconds):
        assert isinstance(render(value), str)
    if value is not None:
        shown = utc_time(value)
        assert shown in ("-", "?") or re.fullmatch(r"-?\d{1,4}-\d\d-\d\d \d\d:\d\d:\d\d", shown), shown


@pytest.mark.parametrize(
    "args, needle",
    [
        (["exporter", "--port", "99999"], "a port is 0 to 65535"),
        (["exporter", "--port", "-1"], "must be at least 0"),
        (["watch", "--timeout", "nan"], "must be a finite number > 0"),
        (["watch", "--timeout", "inf"], "must be a finite number > 0"),
        (["watch", "--timeout", "-3"], "must be a finite number > 0"),
        (["demo", "--interval", "nan"], "must be a finite number >= 0"),
        (["demo", "--size-mb=-inf"], "must be a finite number > 0"),
        (["demo", "--role", "worker", "--metrics-port", "70000"], "a port is 0 to 65535"),
    ],
)
def test_numbers_out_of_range_are_usage_errors(capsys, args: list[str], needle: str) -> None:
    result = run_main(capsys, "--url", "redis://127.0.0.1:1/0", *args)
    assert result.returncode == 2 and needle in result.stderr and "Traceback" not in result.stderr, result


def test_an_error_message_reaches_the_terminal_escaped(capsys) -> None:
    """Messages quote what Redis or a file holds; the guard writes them escaped, on one line."""

    def fail() -> int:
        raise RedisWeightsError("rank 3 says \x1b]0;pwned\x07\nredis-weights: all good")

    assert guarded("redis://localhost:6379/0", fail) == 1
    assert capsys.readouterr().err == "redis-weights: error: rank 3 says \\x1b]0;pwned\\x07\\nredis-weights: all good\n"


# -- the exporter -------------------------------------------------------------------------------------
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy


def _get(url: str, *, method: str = "GET", auth: str | None = None, context: ssl.SSLContext | None = None,
         ) -> tuple[int, bytes]:  # fmt: skip
    request = urllib.request.Request(url, method=method)
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    opener = _HTTP if context is None else urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))  # fmt: skip
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture
def big_manifest_store(server_factory) -> Iterator[RedisStore]:
    """A private server (its byte counters are the test's alone) holding one version of 3000 chunks."""
    server = server_factory()
    store = RedisStore.from_url(server.url, "policy")
    updater = RedisWeightUpdater(store, {"w": torch.randn(3000 * 1024)}, 1, sync=False, chunk_size=4096)
    updater.update_weights()
    yield store
    store.close()


def _redis_output_bytes(store: RedisStore) -> int:
    return int(store.client.info("stats")["total_net_output_bytes"])


def test_the_exporter_reads_little_and_once_however_many_scrape(big_manifest_store: RedisStore) -> None:
    store = big_manifest_store
    manifest_bytes = store.client.strlen(store.keyspace.manifest(1))
    assert manifest_bytes > 50_000
    server = serve(Admin(RedisStore(store.client, "policy", owns_client=False)), 0, cache_seconds=60)
    try:
        assert server.server_address[0] == "127.0.0.1"  # loopback unless told otherwise
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        before = _redis_output_bytes(store)
        status, body = _get(url)
        one = _redis_output_bytes(store) - before
        assert status == 200 and b"redis_weights_fleet_stored_bytes" in body
        stored = [line for line in body.decode().splitlines() if line.startswith("redis_weights_fleet_stored_bytes")]
        assert float(stored[0].split()[-1]) == Admin(store).manifest(1).total_bytes
        assert one < 8192 < manifest_bytes, one  # two ends of the manifest, never all of it
        info = -_redis_output_bytes(store) + _redis_output_bytes(store)  # what one INFO reply costs
        before = _redis_output_bytes(store)
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: _get(url), range(8)))
        assert all(s == 200 for s, _ in answers)
        assert _redis_output_bytes(store) - before <= info + 16  # served from the one read: Redis sent nothing
    finally:
        server.shutdown()
        server.server_close()


def test_the_exporter_answers_metrics_only_with_auth_and_tls(real_store: RedisStore, tmp_path: Path) -> None:
    from tests.test_security import _make_certs

    admin = Admin(RedisStore(real_store.client, real_store.namespace, owns_client=False))
    server = serve(admin, 0, credentials=("prom", "s3cret"), cache_seconds=0)
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        assert _get(f"{base}/metrics", auth="prom:s3cret")[0] == 200
        assert _get(f"{base}/metrics")[0] == 401
        assert _get(f"{base}/metrics", auth="prom:wrong")[0] == 401
        assert _get(f"{base}/", auth="prom:s3cret")[0] == 404
        assert _get(f"{base}/metrics/../x", auth="prom:s3cret")[0] == 404
        assert _get(f"{base}/metrics", method="POST", auth="prom:s3cret")[0] == 405
    finally:
        server.shutdown()
        server.server_close()
    certs = _make_certs(tmp_path)
    server = serve(admin, 0, certfile=str(certs["cert"]), keyfile=str(certs["key"]), cache_seconds=0)
    try:
        context = ssl.create_default_context(cafile=str(certs["ca"]))
        status, body = _get(f"https://127.0.0.1:{server.server_port}/metrics", context=context)
        assert status == 200 and b"redis_weights_fleet_up" in body
    finally:
        server.shutdown()
        server.server_close()


def test_the_exporter_command_refuses_bad_settings_in_one_line(real_store: RedisStore, redis_url: str,
                                                                namespace: str, tmp_path: Path, capsys) -> None:  # fmt: skip
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    empty = tmp_path / "auth"
    empty.write_text("justauser\n")
    base = ["--url", redis_url, "-n", namespace, "exporter", "--port"]
    try:
        for args, needle in [
            ([str(taken.getsockname()[1])], "cannot listen on 127.0.0.1"),
            (["0", "--auth-file", str(empty)], "USER:PASSWORD"),
            (["0", "--auth-file", str(tmp_path / "absent")], "No such file"),
            (["0", "--tls-cert", str(empty)], "cannot load the TLS certificate"),
            (["0", "--tls-key", str(empty)], "needs its certificate"),
        ]:
            assert_one_line_error(run_main(capsys, *base, *args), needle)
    finally:
        taken.close()


# -- damaged weights ----------------------------------------------------------------------------------
def test_weights_damaged_in_place_are_restored_by_the_next_version_and_by_rollback(
    real_store: RedisStore, namespace: str
) -> None:
    store = RedisStore(real_store.client, namespace, owns_client=False)
    trained = {**weights(1), "m.weight": torch.randn(64, 64), "z.bias": torch.randn(64)}  # a's chunks: a's alone
    first_weights = {k: v.clone() for k, v in trained.items()}
    updater = RedisWeightUpdater(store, trained, 1, sync=False, chunk_size=4096)
    receiver = RedisWeightReceiver(store, 1, {k: torch.zeros_like(v) for k, v in trained.items()})
    try:
        updater.update_weights()
        first = receiver.poll()
        with torch.no_grad():
            receiver.policy["a.weight"].mul_(-1)  # damaged in place: an accident, a stray optimizer step
            trained["z.bias"].add_(1.0)  # the next version changes only chunks far from a.weight
        updater.update_weights()
        assert receiver.poll() == updater.version
        assert all(torch.equal(receiver.policy[k], v) for k, v in trained.items())
        with torch.no_grad():
            receiver.policy["a.weight"].zero_()
        rolled = Admin(store).rollback(first)
        assert receiver.poll() == rolled.version
        assert all(torch.equal(receiver.policy[k], v) for k, v in first_weights.items())
    finally:
        receiver.close()
