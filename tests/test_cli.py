"""The ``redis-weights`` command on a real server.

The main outputs and every error path the operator meets (no server, wrong
password, unknown version, bad file) go through the real entry point in a
subprocess (``python -m redis_weights``). A subprocess costs about 2 s of imports
here, so the remaining variations call the same ``main()`` in-process.
"""

from __future__ import annotations

import errno
import importlib
import io
import json
import os
import pkgutil
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from redis_weights import RedisStore, RedisWeightReceiver, RedisWeightUpdater
from redis_weights.tools.cli import build_parser, commands, main
from redis_weights.tools.cli.commands import COMMANDS
from redis_weights.tools.server import free_port
from tests.procs import spawn, stop


def _env(url: str | None, namespace: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "REDIS_WEIGHTS_NAMESPACE")}
    if url:
        env["REDIS_URL"] = url
    if namespace:
        env["REDIS_WEIGHTS_NAMESPACE"] = namespace
    return env


def _start(args: Sequence[str], url: str | None, namespace: str | None) -> subprocess.Popen[str]:
    return spawn([sys.executable, "-m", "redis_weights", *args], env=_env(url, namespace),
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def cli_many(
    calls: Sequence[Sequence[str]], url: str | None = None, namespace: str | None = None, timeout: float = 60
) -> list[subprocess.CompletedProcess[str]]:
    """Run several ``redis-weights`` calls at once (URL and namespace from the environment)."""
    procs = [_start(args, url, namespace) for args in calls]
    results = []
    try:
        for args, proc in zip(calls, procs, strict=True):
            out, err = proc.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(list(args), proc.returncode, out, err))
    finally:
        for proc in procs:
            stop(proc, signal.SIGKILL)
    return results


def cli(*args: str, url: str | None = None, namespace: str | None = None) -> subprocess.CompletedProcess[str]:
    return cli_many([args], url, namespace)[0]


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> subprocess.CompletedProcess[str]:
    """``redis_weights.tools.cli.main(args)`` in this process, with its exit code and output."""
    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out, err)


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("redis-weights: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"net.0.weight": torch.randn(32, 16, generator=g), "net.0.bias": torch.randn(32, generator=g),
            "net.2.weight": torch.randn(4, 32, generator=g).half()}  # fmt: skip


@pytest.fixture
def fleet(real_store: RedisStore) -> Iterator[dict[str, object]]:
    """Three committed versions; rank 1 alive on the latest, rank 2 alive on v2, rank 3 dead on v1."""
    store = RedisStore(real_store.client, real_store.namespace, owns_client=False)
    updater = RedisWeightUpdater(store, None, 3, sync=False, retention=10)
    receivers = {r: RedisWeightReceiver(store, r, {k: torch.zeros_like(v) for k, v in weights(0).items()},
                                        heartbeat_ttl=60 if r != 3 else 0.3) for r in (1, 2, 3)}  # fmt: skip
    versions = []
    for seed in (1, 2, 3):
        updater.update_weights(weights(seed))
        versions.append(updater.version)
        for rank, receiver in receivers.items():
            if seed == 1 or rank == 1 or (rank == 2 and seed == 2):
                receiver.poll()
    receivers[3].close()  # rank 3's process is gone: no more beats
    time.sleep(0.4)  # rank 3's heartbeat expires
    yield {"versions": versions, "receivers": receivers}


def test_reports_as_tables_and_json(fleet, redis_url: str, namespace: str, capsys) -> None:
    v1, v2, v3 = fleet["versions"]
    versions, versions_json, show_json, workers_json = cli_many(
        [["versions"], ["versions", "--json"], ["show", str(v1), "--json"], ["workers", "--json"]],
        url=redis_url, namespace=namespace,
    )  # fmt: skip
    for r in (versions, versions_json, show_json, workers_json):
        assert r.returncode == 0 and r.stderr == "", r
    # Piped: plain aligned text, no box drawing, no colour codes.
    assert "\x1b[" not in versions.stdout and "┃" not in versions.stdout
    lines = versions.stdout.splitlines()
    assert lines[0] == f"namespace {namespace!r}"
    assert lines[1].split() == ["version", "created", "(UTC)", "size", "tensors", "stored", "new", "producer", "ranks"]
    assert "keyframe" in lines[2].split()
    assert lines[2].startswith(f"{v3} (latest)") and lines[2].split()[-1] == "1"
    assert lines[3].startswith(str(v2)) and lines[3].split()[-1] == "2"
    assert lines[4].startswith(str(v1)) and lines[4].split()[-1] == "3"

    doc = json.loads(versions_json.stdout)
    assert doc["namespace"] == namespace and doc["latest"] == v3
    assert [(v["version"], v["latest"], v["ranks"]) for v in doc["versions"]] == [
        (v1, False, [3]), (v2, False, [2]), (v3, True, [1]),
    ]  # fmt: skip
    assert all(v["tensors"] == 3 and v["total_bytes"] > 2000 for v in doc["versions"])

    manifest = json.loads(show_json.stdout)
    assert manifest["version"] == v1
    tensors = {t["name"]: t for t in manifest["tensors"]}
    assert tensors["net.0.weight"]["shape"] == [32, 16] and tensors["net.0.weight"]["bytes"] == 32 * 16 * 4
    assert tensors["net.2.weight"]["dtype"] == "F16"
    assert sum(c["bytes"] for c in manifest["chunks"]) == manifest["total_bytes"]

    ranks = {w["rank"]: w for w in json.loads(workers_json.stdout)["workers"]}
    assert (ranks[1]["version"], ranks[1]["lag"], ranks[1]["alive"]) == (v3, 0, True)
    assert (ranks[2]["version"], ranks[2]["lag"], ranks[2]["alive"]) == (v2, v3 - v2, True)
    assert (ranks[3]["version"], ranks[3]["alive"], ranks[3]["heartbeat_age"]) == (v1, False, None)
    assert all(isinstance(r["ack_latency"], float) and r["ack_latency"] >= 0 for r in ranks.values())

    show = run_main(capsys, "--url", redis_url, "-n", namespace, "show", "latest")
    assert show.returncode == 0 and f"version {v3}" in show.stdout
    for name in ("net.0.weight", "net.0.bias", "net.2.weight"):
        assert name in show.stdout
    assert "32x16" in show.stdout and "F16" in show.stdout and "chunk ids" in show.stdout and "full (keyframe)" in show.stdout
    workers = run_main(capsys, "workers", "--url", redis_url, "-n", namespace)
    assert workers.returncode == 0
    assert "DEAD" in workers.stdout and workers.stdout.count("alive") == 2


def test_export_import_rollback_gc_delete(fleet, redis_url: str, namespace: str, tmp_path: Path, capsys) -> None:
    v1, v2, v3 = fleet["versions"]
    out = tmp_path / "v2.safetensors"
    ckpt = tmp_path / "ckpt.safetensors"
    save_file(weights(9), str(ckpt), metadata={"step": "900"})
    exported, imported = cli_many(
        [["export", str(v2), "-o", str(out)], ["import", str(ckpt), "--metadata", "by=test"]],
        url=redis_url, namespace=namespace,
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    assert f"exported version {v2}" in exported.stdout
    loaded = load_file(str(out))
    for name, tensor in weights(2).items():
        assert torch.equal(loaded[name], tensor)
    assert imported.returncode == 0, imported.stderr
    v4 = v3 + 1
    assert f"as version {v4}" in imported.stdout
    receiver = fleet["receivers"][1]
    assert receiver.poll() == v4
    assert torch.equal(receiver.policy["net.0.weight"], weights(9)["net.0.weight"])

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return run_main(capsys, "--url", redis_url, "--namespace", namespace, *args)

    show = json.loads(run("show", "latest", "--json").stdout)
    assert show["metadata"] == {"step": "900", "by": "test"}

    rollback = run("rollback", str(v1))
    assert rollback.returncode == 0, rollback.stderr
    v5 = v4 + 1
    assert f"version {v1} again as version {v5}" in rollback.stdout
    assert receiver.poll() == v5
    assert torch.equal(receiver.policy["net.0.weight"], weights(1)["net.0.weight"])

    assert_one_line_error(run("delete", "latest"), f"version {v5} is the latest", "--force")
    gc = run("gc", "--keep", "2")
    assert gc.returncode == 0 and f"deleted 3 version(s): {v1}, {v2}, {v3}" in gc.stdout
    deleted = run("delete", str(v4))
    assert deleted.returncode == 0 and f"deleted version {v4}" in deleted.stdout
    assert run("delete", str(v5), "--force").returncode == 0
    assert json.loads(run("versions", "--json").stdout)["versions"] == []
    assert "no committed version" in run("versions").stdout


def test_export_checks_the_path_and_writes_an_ordinary_file(
    fleet, redis_url: str, namespace: str, tmp_path: Path, capsys, monkeypatch
) -> None:
    nowhere = cli("export", "latest", "-o", "/nonexistent/x.safetensors", url=redis_url, namespace=namespace)
    assert_one_line_error(nowhere, "cannot write /nonexistent/x.safetensors: directory /nonexistent does not exist")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return run_main(capsys, "--url", redis_url, "-n", namespace, *args)

    a_file = tmp_path / "file"
    a_file.write_text("")
    assert_one_line_error(run("export", "latest", "-o", str(tmp_path)), f"{tmp_path} is a directory: give a file name")
    assert_one_line_error(run("export", "latest", "-o", str(a_file / "x.safetensors")),
                          f"directory {a_file} is not a directory")  # fmt: skip
    target = tmp_path / "v.safetensors"

    def disk_full(*_: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/somewhere/.v.safetensors.1234.tmp")

    with monkeypatch.context() as m:
        m.setattr(os, "replace", disk_full)
        full = run("export", "latest", "-o", str(target))
    assert full.returncode == 1 and full.stderr == f"redis-weights: error: {target}: No space left on device\n"
    assert list(tmp_path.iterdir()) == [a_file]  # no temporary file left behind
    umask = os.umask(0o027)
    try:
        exported = run("export", "latest", "-o", str(target))
    finally:
        os.umask(umask)
    assert exported.returncode == 0 and f"to {target}" in exported.stdout, exported
    assert stat.S_IMODE(target.stat().st_mode) == 0o640  # 0666 less the umask, like any new file (not 0600)
    assert all(torch.equal(load_file(str(target))[k], v) for k, v in weights(3).items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "v.safetensors"]


def test_watch_prints_pushes_and_acks(real_store: RedisStore, redis_url: str, namespace: str) -> None:
    watcher = _start(["--url", redis_url, "--namespace", namespace, "watch", "--json", "--count", "2",
                      "--timeout", "60"], None, None)  # fmt: skip
    try:
        store = RedisStore(real_store.client, namespace, owns_client=False)
        receiver = RedisWeightReceiver(store, 1, {k: torch.zeros_like(v) for k, v in weights(0).items()})
        updater = RedisWeightUpdater(store, weights(1), 1, sync=False)
        # Push once the watcher (still importing) has subscribed.
        deadline = time.monotonic() + 60
        while watcher.poll() is None and time.monotonic() < deadline:
            if real_store.client.pubsub_numsub(store.keyspace.updates_channel)[0][1] > 0:
                updater.update_weights()
                receiver.poll()
                break
            time.sleep(0.05)
        out, err = watcher.communicate(timeout=30)
    finally:
        stop(watcher, signal.SIGKILL)
    assert watcher.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert [(e["kind"], e["version"]) for e in events] == [("push", 1), ("ack", 1)]
    assert events[0]["tensors"] == 3 and events[1]["rank"] == 1 and events[1]["status"] == "updated"
    assert events[1]["lag"] == 0 and events[1]["ack_latency"] >= 0


class _Terminal(io.StringIO):
    """A stdout that says it is a terminal: the CLI draws rich tables on it."""

    def isatty(self) -> bool:
        return True


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture
def terminal(monkeypatch) -> _Terminal:
    """A 120-column terminal for ``redirect_stdout`` (set in the test: capture resets ``sys.stdout`` after setup)."""
    for name in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.setenv("COLUMNS", "120")
    return _Terminal()


def _boxed_rows(text: str, title: str) -> list[list[str]]:
    """The cells of the one boxed table in ``text`` under ``title``, after checking the box's shape."""
    lines = [line.rstrip() for line in _ANSI.sub("", text).splitlines() if line.strip()]
    assert lines[0] == title, lines
    top, header, rule, *rows, bottom = lines[1:]
    assert top[0] + top[-1] == "┏┓" and rule[0] + rule[-1] == "┡┩" and bottom[0] + bottom[-1] == "└┘", lines
    assert len({len(line) for line in lines[1:]}) == 1, lines  # one width: columns line up
    assert header[0] == header[-1] == "┃" and all(r[0] == r[-1] == "│" for r in rows), lines
    return [[c.strip() for c in header.strip("┃").split("┃")]] + [[c.strip() for c in r.strip("│").split("│")]
                                                                   for r in rows]  # fmt: skip


def test_tables_on_a_terminal_are_boxed(fleet, redis_url: str, namespace: str, terminal: _Terminal) -> None:
    v1, v2, v3 = fleet["versions"]
    with redirect_stdout(terminal):
        assert main(["--url", redis_url, "-n", namespace, "versions"]) == 0
    versions = _boxed_rows(terminal.getvalue(), f"namespace {namespace!r}")
    assert versions[0] == ["version", "created (UTC)", "size", "tensors", "stored", "new", "producer", "ranks"]
    assert [(r[0], r[3], r[4], r[7]) for r in versions[1:]] == [
        (f"{v3} (latest)", "3", "keyframe", "1"), (str(v2), "3", "keyframe", "2"), (str(v1), "3", "keyframe", "3")
    ]  # fmt: skip
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", r[1]) and r[2].endswith("KiB") for r in versions[1:])
    terminal.seek(0)
    terminal.truncate()
    with redirect_stdout(terminal):
        assert main(["--url", redis_url, "-n", namespace, "workers"]) == 0
    workers = _boxed_rows(terminal.getvalue(), f"namespace {namespace!r}, latest version {v3}")
    assert workers[0] == ["rank", "status", "applied", "lag", "ack latency", "heartbeat", "state"]
    assert [(r[0], r[1], r[2], r[3], r[6]) for r in workers[1:]] == [
        ("1", "updated", str(v3), "0", "alive"), ("2", "pending", str(v2), str(v3 - v2), "alive"),
        ("3", "pending", str(v1), str(v3 - v1), "DEAD"),
    ]  # fmt: skip
    assert re.fullmatch(r"[\d.]+s ago", workers[1][5]) and workers[3][5] == "-"
    assert all(re.fullmatch(r"[\d.]+ m?s", r[4]) for r in workers[1:])  # every rank acked the version it runs


def _push_once_watched(real_store: RedisStore, namespace: str, watcher: threading.Thread) -> None:
    """Once ``watcher`` has subscribed: push version 1, rank 1 applies it; then wait for the watcher to end."""
    try:
        store = RedisStore(real_store.client, namespace, owns_client=False)
        receiver = RedisWeightReceiver(store, 1, {k: torch.zeros_like(v) for k, v in weights(0).items()})
        updater = RedisWeightUpdater(store, weights(1), 1, sync=False)
        deadline = time.monotonic() + 30
        while real_store.client.pubsub_numsub(store.keyspace.acks_channel)[0][1] == 0:
            assert time.monotonic() < deadline and watcher.is_alive()
            time.sleep(0.02)
        updater.update_weights()
        assert receiver.poll() == 1
    finally:
        watcher.join(40)


def test_watch_text_lines(real_store: RedisStore, redis_url: str, namespace: str, terminal: _Terminal) -> None:
    codes: list[int] = []
    watcher = threading.Thread(target=lambda: codes.append(main(
        ["--url", redis_url, "-n", namespace, "watch", "--count", "2", "--timeout", "30"])))  # fmt: skip
    with redirect_stdout(terminal):  # process-wide: the watcher thread prints there too
        watcher.start()
        _push_once_watched(real_store, namespace, watcher)
    assert codes == [0]
    lines = terminal.getvalue().splitlines()
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
    assert lines[0] == f"watching namespace {namespace!r} (Ctrl-C to stop)"
    assert re.fullmatch(rf"{stamp}  push  v1  [\d.]+ KiB, 3 tensors  by \S+", lines[1]), lines
    assert re.fullmatch(rf"{stamp}  ack   v1  rank 1: updated  lag 0  ack latency [\d.]+ m?s", lines[2]), lines
    assert len(lines) == 3


def test_doctor(server_factory, redis_url: str, namespace: str, capsys) -> None:
    unsafe = server_factory("--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru")
    bad = cli("--url", unsafe.url, "doctor", namespace=namespace)
    assert bad.returncode == 3
    assert "[UNSAFE] maxmemory-policy" in bad.stdout and "fix: CONFIG SET maxmemory-policy noeviction" in bad.stdout
    assert "verdict: unsafe" in bad.stdout
    good = run_main(capsys, "--url", redis_url, "-n", namespace, "doctor")
    assert good.returncode == 0, good
    assert "maxmemory-policy: policy noeviction" in good.stdout and "verdict: warn" in good.stdout
    # advice on an ok finding is printed as a tip, and never raises the verdict
    assert "[  OK  ] io-threads: io-threads 1" in good.stdout and "         tip: on a" in good.stdout
    doc = json.loads(run_main(capsys, "--url", redis_url, "-n", namespace, "doctor", "--json").stdout)
    assert doc["verdict"] == "warn" and {f["check"] for f in doc["findings"]} >= {"acl", "version", "persistence"}


def test_error_paths_through_the_entry_point(redis_url: str, namespace: str, tmp_path: Path, server_factory) -> None:
    protected = server_factory("--requirepass", "s3cret")
    bad_file = tmp_path / "bad.safetensors"
    bad_file.write_bytes(b"this is not a safetensors file")
    calls = [
        ["--url", f"redis://127.0.0.1:{free_port()}/0", "versions"],
        ["--url", f"redis://:nope@127.0.0.1:{protected.port}/0", "workers"],
        ["--url", redis_url, "--namespace", namespace, "show", "42"],
        ["--url", redis_url, "--namespace", namespace, "import", str(bad_file)],
    ]
    expected = [
        ("cannot reach Redis", "Connection refused"),
        ("authentication failed", "redis://:***@127.0.0.1"),
        ("version 42 not found", "no version is committed"),
        ("bad.safetensors: not a valid .safetensors file",),
    ]
    for result, needles in zip(cli_many(calls), expected, strict=True):
        assert_one_line_error(result, *needles)
        assert "nope" not in result.stderr  # never echo a password


def test_more_error_paths(redis_url: str, namespace: str, tmp_path: Path, server_factory, capsys) -> None:
    protected = server_factory("--requirepass", "s3cret")
    calls = [
        (["--url", f"redis://127.0.0.1:{protected.port}/0", "versions"], ("requires a password",)),
        (["--url", redis_url, "-n", namespace, "export", "latest", "-o", str(tmp_path / "x.safetensors")],
         ("no committed version",)),
        (["--url", redis_url, "-n", namespace, "rollback", "7"], ("version 7 not found",)),
        (["--url", redis_url, "-n", namespace, "delete", "3"], ("version 3 not found",)),
        (["--url", redis_url, "-n", namespace, "import", str(tmp_path / "missing.safetensors")],
         ("missing.safetensors: no such file",)),
        (["--url", redis_url, "-n", namespace, "show", "banana"], ("version must be a number or 'latest'",)),
        (["--url", redis_url, "-n", "bad{name}", "versions"], ("invalid namespace",)),
        (["--url", "http://example.com", "versions"], ("unsupported Redis URL",)),
        (["--url", redis_url, "-n", namespace, "import", str(tmp_path), "--metadata", "novalue"],
         ("KEY=VALUE",)),
    ]  # fmt: skip
    for args, needles in calls:
        assert_one_line_error(run_main(capsys, *args), *needles)
    assert not (tmp_path / "x.safetensors").exists()
    usage = run_main(capsys, "--url", redis_url, "gc", "--keep", "0")
    assert usage.returncode == 2 and "must be at least 1" in usage.stderr


def test_url_and_namespace_from_the_environment(
    redis_url: str, namespace: str, real_store: RedisStore, capsys, monkeypatch
) -> None:
    RedisWeightUpdater(RedisStore(real_store.client, namespace, owns_client=False), weights(1), 1,
                       sync=False).update_weights()  # fmt: skip
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("REDIS_WEIGHTS_NAMESPACE", namespace)
    assert json.loads(run_main(capsys, "versions", "--json").stdout)["latest"] == 1
    monkeypatch.setenv("REDIS_WEIGHTS_NAMESPACE", namespace + "-other")
    assert json.loads(run_main(capsys, "versions", "--json").stdout)["latest"] == 0
    assert json.loads(run_main(capsys, "-n", namespace, "versions", "--json").stdout)["latest"] == 1


def test_every_command_module_is_registered_once_and_listed_by_help_in_registry_order(capsys) -> None:
    """A module in ``tools/cli/commands/`` is a command only through its line in ``COMMANDS``."""
    names = [name for _, name, _ in pkgutil.iter_modules(commands.__path__) if name != "base"]
    modules = [importlib.import_module(f"{commands.__name__}.{name}") for name in names]
    assert set(COMMANDS) == {m.COMMAND for m in modules}
    assert len({c.name for c in COMMANDS}) == len(COMMANDS) == len(modules)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    listing = re.findall(r"^    (\S+)", capsys.readouterr().out, flags=re.MULTILINE)  # not the wrapped help lines
    assert listing == [c.name for c in COMMANDS]
