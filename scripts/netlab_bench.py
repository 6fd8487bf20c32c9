"""The multi-host benchmark: a trainer, a Redis host and worker hosts as network namespaces.

``python scripts/netlab.py bench --configs 1gbit:4x2,10gbit:4x1 --report docs/bench/netlab.json``

Per configuration (every host's link at one rate; ``HOSTSxWORKERS`` worker hosts with that
many workers each) a fresh lab: hosts ``redis``, ``trainer``, ``w1``..``wN``. Each system
runs the training workload of ``scripts/bench_train.py`` (``finetune``: a decoder-only
transformer, fp32 master weights, AdamW at ``--lr``, one real step before every push; the
processes are ``scripts/bench_procs.py``'s, started inside their hosts):

  rw-dense  this project, sync push, ``wire_dtype=torch.bfloat16``, ``delta=False``
  rw-delta  this project, sync push, ``wire_dtype=torch.bfloat16, delta=True``
  torchrl   TorchRL's ``DistributedWeightUpdater`` over gloo pushing the trainer's bf16 copy

With ``--host-cache`` (the default) the workers of one host share each version through a
host-cache directory of their own (``host_cache=DIR``). A fresh Redis per row. Bytes per
push are read from the veth counters of each host's ``eth0`` (sampled every 10 ms,
between the sample before the push started and the first one after it ended).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.bench import machine, stop, summarize_workload, wait_files  # noqa: E402
from scripts.bench_train import RW_TRAIN_SYSTEMS, TRAIN_SYSTEMS, add_arguments, model_flags  # noqa: E402
from scripts.netlab import Lab, Link, start_cluster, start_redis  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PROCS = REPO / "scripts" / "bench_procs.py"
REDIS_PORT = 6379
TCP_PORT = 29500
WORKLOAD = "finetune"
REDIS_HOSTS = {"standalone": ("redis",), "cluster": ("r1", "r2", "r3")}  # a cluster: one master per host


class Sampler:
    """Every host's (rx, tx) bytes, sampled every ``interval`` seconds on a thread."""

    def __init__(self, lab: Lab, interval: float = 0.01) -> None:
        self.lab = lab
        self.interval = interval
        self.samples: list[tuple[float, dict[str, tuple[int, int]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), {name: self.lab.counters(name) for name in self.lab.hosts}))
            self._stop.wait(self.interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def between(self, t0: float, t1: float) -> dict[str, tuple[int, int]]:
        """(rx, tx) bytes of every host from the last sample at or before ``t0`` to the first at or after ``t1``."""
        before = [s for t, s in self.samples if t <= t0]
        after = [s for t, s in self.samples if t >= t1]
        if not before or not after:
            raise RuntimeError("no counter samples around a push")
        a, b = before[-1], after[0]
        return {name: (b[name][0] - a[name][0], b[name][1] - a[name][1]) for name in a}


def host_of(rank: int, per_host: int) -> str:
    return f"w{(rank - 1) // per_host + 1}"


def run_row(
    lab: Lab, sampler: Sampler, args: argparse.Namespace, system: str, deployment: str, hosts: int, per_host: int
) -> dict:
    """One system in this lab (``deployment``: its Redis, ``-`` for torchrl): a trainer and
    ``hosts x per_host`` workers; its summary and the bytes per push through every host's link."""
    workers = hosts * per_host
    redis_hosts = REDIS_HOSTS.get(deployment, ())
    ident = {"workload": WORKLOAD, "lr": args.lr, "system": system, "workers": workers, "hosts": hosts,
             "per_host": per_host, "rate": lab.hosts["trainer"].link.rate, "redis": deployment,
             "redis_hosts": list(redis_hosts)}  # fmt: skip
    url = f"redis://{lab.hosts[redis_hosts[0]].ip}:{REDIS_PORT}/0" if redis_hosts else "redis://unused"
    run_dir = lab.scratch / f"{system}-{deployment}"
    run_dir.mkdir()
    env = {"PYTHONPATH": str(REPO)}
    common = ["--system", system, "--workload", WORKLOAD, "--lr", repr(args.lr), *model_flags(args),
              "--url", url, "--workers", str(workers),
              "--tcp-port", str(TCP_PORT), "--tcp-host", lab.hosts["trainer"].ip, "--namespace", "bench",
              "--signals", str(run_dir)]  # fmt: skip
    procs = []
    try:
        if deployment == "standalone":
            procs.append(start_redis(lab, "redis", REDIS_PORT, run_dir / "redis.log"))
        elif deployment == "cluster":
            procs += start_cluster(lab, redis_hosts, REDIS_PORT, run_dir / "cluster")
        for rank in range(1, workers + 1):
            host = host_of(rank, per_host)
            extra = ["--rank", str(rank), "--out", str(run_dir / f"w{rank}.json")]
            if args.host_cache and system in RW_TRAIN_SYSTEMS:
                extra += ["--host-cache", "--cache-dir", str(run_dir / f"cache-{host}")]
            procs.append(lab.spawn(host, [sys.executable, str(PROCS), "worker", *common, *extra],
                                   run_dir / f"w{rank}.log", env))  # fmt: skip
        trainer_args = ["--repeats", str(args.repeats), "--out", str(run_dir / "t.json"), "--go", str(run_dir / "go")]
        trainer = lab.spawn("trainer", [sys.executable, str(PROCS), "trainer", *common, *trainer_args],
                            run_dir / "t.log", env)  # fmt: skip
        procs.append(trainer)
        wait_files([run_dir / f"w{r}.json.ready" for r in range(1, workers + 1)], procs, args.timeout)
        (run_dir / "go").write_text("1")
        trainer.wait(args.timeout)
    except Exception as exc:
        logs = "".join(p.read_text(errors="replace")[-600:] for p in run_dir.glob("*.log"))
        return {**ident, "error": f"{exc}; logs: {logs[-1500:]}"}
    finally:
        for proc in reversed(procs):  # workers and the trainer first, Redis last
            stop(proc)
    if not (run_dir / "t.json").exists():
        return {**ident, "error": "trainer wrote nothing: " + (run_dir / "t.log").read_text(errors="replace")[-1500:]}
    trainer_doc = json.loads((run_dir / "t.json").read_text())
    worker_docs = [json.loads(p.read_text()) for p in sorted(run_dir.glob("w*.json"))]
    row = {**ident, **summarize_workload(ident, trainer_doc, worker_docs)}
    per_push = [sampler.between(p["t0"], p["t0"] + p["push_s"]) for p in trainer_doc["pushes"][1:]]
    row["link_bytes"] = per_push  # per timed push: every host's (in, out) bytes
    row.update(link_medians(per_push, redis_hosts))
    return row


def link_medians(per_push: list[dict[str, tuple[int, int]]], redis_hosts: Sequence[str]) -> dict[str, float | None]:
    """Medians over the pushes of: the trainer's bytes out, the Redis hosts' bytes in and out
    (summed per push: a Cluster's masters share each push differently), the busiest worker host's in."""

    def med(per: Callable[[dict[str, tuple[int, int]]], float]) -> float | None:
        return statistics.median(per(p) for p in per_push) if per_push else None

    has_redis = bool(redis_hosts)
    return {
        "trainer_out": med(lambda p: p["trainer"][1]),
        "redis_in": med(lambda p: sum(p[h][0] for h in redis_hosts)) if has_redis else None,
        "redis_out": med(lambda p: sum(p[h][1] for h in redis_hosts)) if has_redis else None,
        "worker_host_in": med(lambda p: max(v[0] for k, v in p.items() if k.startswith("w"))),
    }


def parse_config(text: str) -> tuple[str, int, int]:
    """``"1gbit:4x2"`` -> (rate, worker hosts, workers per host)."""
    rate, _, shape = text.partition(":")
    hosts, _, per_host = shape.partition("x")
    return rate, int(hosts), int(per_host)


def run_config(args: argparse.Namespace, rate: str, hosts: int, per_host: int) -> list[dict]:
    link = Link(rate, delay_ms=args.delay_ms, loss=args.loss)
    deployments = args.deployments.split(",")
    runs = [(system, deployment) for system in args.systems.split(",")
            for deployment in (deployments if system in RW_TRAIN_SYSTEMS else ["-"])]  # fmt: skip
    rows = []
    with Lab() as lab:
        lab.install_signal_handlers()
        print(f"lab {lab.prefix}: {rate}, {hosts} worker hosts x {per_host}", file=sys.stderr, flush=True)
        redis_hosts = [h for d in deployments for h in REDIS_HOSTS[d]]
        for name in [*redis_hosts, "trainer", *(f"w{i}" for i in range(1, hosts + 1))]:
            lab.add_host(name, link)
        with Sampler(lab) as sampler:
            for system, deployment in runs:
                started = time.monotonic()
                row = run_row(lab, sampler, args, system, deployment, hosts, per_host)
                row["delay_ms"], row["loss"] = args.delay_ms, args.loss
                print(f"  {system} ({deployment}): push {row.get('push_s')} s, error {row.get('error')} "
                      f"({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)  # fmt: skip
                rows.append(row)
    return rows


def mb(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e6:.4g}"


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.3g}x"


def find(rows: list[dict], row: dict, system: str) -> dict | None:
    for r in rows:
        if r["system"] == system and (r["rate"], r["hosts"], r["per_host"]) == (row["rate"], row["hosts"],
                                                                               row["per_host"]):  # fmt: skip
            return r
    return None


def table(rows: list[dict]) -> str:
    """One line per row: push time and its ratio to TorchRL's, bytes through the links per push."""
    head = (
        "| links | worker hosts x workers | system | Redis | changed % | push s (median) | / torchrl | encode s | "
        "slowest apply s | trainer link out MB (x model) | Redis link in / out MB | busiest worker host in MB | "
        "bit-exact |"
    )
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        lead = f"| {r['rate']} | {r['hosts']} x {r['per_host']} | {r['system']} | {r.get('redis', '-')} |"
        if r.get("error"):
            lines.append(f"{lead} error: {str(r['error'])[:120]} |||||||||")
            continue
        trainer_out, redis_in, redis_out, worker_in = (r.get(k) for k in ("trainer_out", "redis_in", "redis_out",
                                                                           "worker_host_in"))  # fmt: skip
        torchrl = find(rows, r, "torchrl")
        changed = f"{100 * r['changed']:.3g}" if r.get("changed") is not None else "-"
        lines.append(
            f"{lead} {changed} | {r['push_s']:.3g} | "
            f"{ratio(r['push_s'], torchrl and torchrl.get('push_s'))} | {seconds(r.get('encode_s'))} | "
            f"{seconds(r.get('apply_s'))} | {mb(trainer_out)} "
            f"({ratio(trainer_out, r['wire_bytes'])}) | {mb(redis_in)} / {mb(redis_out)} | {mb(worker_in)} | "
            f"{'yes' if r.get('verified') else 'NO'} |"
        )
    return "\n".join(lines)


# (rate, worker hosts, workers per host, system, Redis, limit on push s / torchrl's): the targets
PUSH_TARGETS = (
    ("1gbit", 4, 2, "rw-delta", "standalone", 0.05),
    ("1gbit", 4, 2, "rw-dense", "standalone", 0.5),
    ("10gbit", 4, 1, "rw-delta", "standalone", 0.35),
    ("1gbit", 4, 2, "rw-dense", "cluster", 0.4),
)
LINK_TARGETS = {"rw-dense": 1.05, "rw-delta": 0.05}  # trainer link bytes per push / model bytes


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets that these rows measure, each with its value and met / NOT met."""
    lines = []
    for rate, hosts, per_host, system, redis, limit in PUSH_TARGETS:
        for r in rows:
            if (r["rate"], r["hosts"], r["per_host"], r["system"], r["redis"]) != (
                rate,
                hosts,
                per_host,
                system,
                redis,
            ):
                continue
            torchrl = find(rows, r, "torchrl")
            if r.get("push_s") and torchrl and torchrl.get("push_s"):
                value = r["push_s"] / torchrl["push_s"]
                lines.append(f"{rate} {hosts}x{per_host} {system} ({redis}) push / torchrl's: {value:.3g} "
                             f"(limit {limit}: {'met' if value <= limit else 'NOT met'})")  # fmt: skip
    for r in rows:
        limit = LINK_TARGETS.get(r["system"])
        if limit is not None and r.get("trainer_out") is not None:
            value = r["trainer_out"] / r["wire_bytes"]
            lines.append(f"{r['rate']} {r['hosts']}x{r['per_host']} {r['system']} ({r['redis']}) trainer link bytes "
                         f"/ model: {value:.3g} (limit {limit}: {'met' if value <= limit else 'NOT met'})")  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="netlab.py bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--configs", default="1gbit:4x2", help="RATE:HOSTSxWORKERS, comma-separated")
    parser.add_argument("--systems", default=",".join(TRAIN_SYSTEMS))
    parser.add_argument("--deployments", default="standalone", help="standalone, cluster (3 masters on 3 hosts)")
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay per link (needs sch_netem)")
    parser.add_argument("--loss", type=float, default=0.0, help="percent of packets lost per link and direction")
    parser.add_argument("--no-host-cache", dest="host_cache", action="store_false")
    parser.add_argument("--repeats", type=int, default=3, help="timed pushes (after a warm-up push)")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--report", help="write the rows and the machine as JSON here")
    parser.add_argument("--show", metavar="FILE", help="print the table of an earlier --report; run nothing")
    add_arguments(parser)
    parser.set_defaults(host_cache=True, layers=3)  # ~46M parameters, ~92 MB in bf16: 8 workers fit here
    args = parser.parse_args(argv)
    if args.show:
        doc = json.loads(Path(args.show).read_text())
        print(json.dumps(doc["machine"]))
        print(table(doc["rows"]))
        print("\n".join(targets(doc["rows"])))
        return 0
    rows: list[dict] = []
    for config in args.configs.split(","):
        rows += run_config(args, *parse_config(config))
    print(table(rows))
    print("\n".join(targets(rows)))
    if args.report:
        Path(args.report).write_text(json.dumps({"machine": machine(), "args": vars(args), "rows": rows}, indent=1))
    return 0 if all(not r.get("error") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
