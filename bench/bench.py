"""Measure Conveyor end to end over HTTP, as a client sees it.

Starts a gateway and runtimes on the given backends (the machine's RabbitMQ
and Redis by default) and prints:

- async throughput: N no-op invocations submitted through the batch endpoint
  by several client threads, timed until every one is recorded terminal;
- sync round trip: p50/p99 of sequential ``Prefer: wait`` invocations;
- cold start: the first invocation of a freshly registered function.

    python bench/bench.py                    # RabbitMQ and Redis on localhost
    python bench/bench.py --embedded         # the embedded twins
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from functions import source  # noqa: E402
from tests.harness import ApiClient, platform  # noqa: E402

WARM_UP_CALLS = 50

#: Servers whose CPU time counts too, by process name.
SERVERS = ("beam.smp", "redis-server")
LABELS = {"beam.smp": "RabbitMQ", "redis-server": "Redis"}


def wake_round_trip_us(rounds: int = 2000) -> float:
    """Two threads waking each other in turn: the machine's latency floor.

    Every hop of an invocation pays such wake-ups, and on a shared virtual
    machine they drift, so the figure is printed beside the results.
    """
    ping, pong = threading.Event(), threading.Event()

    def answer() -> None:
        for _ in range(rounds):
            ping.wait()
            ping.clear()
            pong.set()

    peer = threading.Thread(target=answer)
    peer.start()
    started = time.perf_counter()
    for _ in range(rounds):
        ping.set()
        pong.wait()
        pong.clear()
    elapsed_s = time.perf_counter() - started
    peer.join()
    return elapsed_s / rounds * 1e6


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def cold_start(client: ApiClient, name: str) -> float:
    client.deploy(name, source("noop").replace("def noop", f"def {name}"))
    started = time.perf_counter()
    answer = client.invoke(name, wait_s=30)
    elapsed_ms = (time.perf_counter() - started) * 1000
    assert answer.status_code == 200 and answer.json()["status"] == "succeeded"
    return elapsed_ms


def sync_round_trips(url: str, key: str, count: int) -> list[float]:
    """Sequential ``Prefer: wait`` calls on one kept-alive connection.

    The standard library's client is used because its own cost per call is a
    fraction of requests', which would otherwise be counted as the
    platform's.
    """
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port)
    headers = {
        "Authorization": f"Bearer {key}",
        "Content-Type": "application/json",
        "Prefer": "wait=10",
    }
    timings_ms = []
    try:
        for _ in range(count):
            started = time.perf_counter()
            connection.request("POST", "/v1/functions/noop/invocations", b"{}", headers)
            answer = connection.getresponse()
            body = answer.read()
            timings_ms.append((time.perf_counter() - started) * 1000)
            if answer.status != 200 or json.loads(body)["status"] != "succeeded":
                raise RuntimeError(f"sync invocation failed: {body!r}")
    finally:
        connection.close()
    return timings_ms


def async_throughput(
    url: str, key: str, total: int, batch: int, threads: int
) -> tuple[float, float]:
    """Seconds to submit, and to have every invocation terminal."""
    per_thread = total // threads
    errors: list[str] = []

    def submit() -> None:
        client = ApiClient(url, key)
        items = [{"args": [], "kwargs": {}}] * batch
        sent = 0
        while sent < per_thread:
            size = min(batch, per_thread - sent)
            answer = client.request(
                "POST",
                "/v1/functions/noop/invocations/batch",
                json={"items": items[:size]},
            )
            if answer.status_code != 202:
                errors.append(answer.text)
                return
            sent += size

    client = ApiClient(url, key)
    started = time.perf_counter()
    workers = [threading.Thread(target=submit) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    submitted_s = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"submission failed: {errors[0]}")

    while True:
        pending = 0
        for state in ("queued", "running"):
            answer = client.request(
                "GET",
                "/v1/invocations",
                params={"function": "noop", "status": state, "limit": 1},
            )
            pending += len(answer.json()["invocations"])
        if not pending:
            break
        time.sleep(0.01)
    return submitted_s, time.perf_counter() - started


def cpu_seconds(roots: set[int], servers: tuple[str, ...]) -> dict[str, float]:
    """CPU time used so far by the processes under ``roots``, and by servers.

    Read from /proc, so it counts live processes only (warm executors and
    gateway workers stay alive through a run); empty where there is no /proc.
    """
    if not os.path.isdir("/proc"):
        return {}
    tick_s = 1 / os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    usage: dict[int, float] = {}
    names: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        pid = int(entry)
        names[pid] = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        parents[pid] = int(fields[1])
        usage[pid] = (int(fields[11]) + int(fields[12])) * tick_s

    totals = dict.fromkeys(("platform", *servers), 0.0)
    for pid, used_s in usage.items():
        ancestor = pid
        while ancestor > 1 and ancestor not in roots:
            ancestor = parents.get(ancestor, 0)
        if ancestor in roots:
            totals["platform"] += used_s
        elif names[pid] in servers:
            totals[names[pid]] += used_s
    return totals


def executor_timings(sandbox: str, rounds: int = 1000) -> tuple[float, float]:
    """Median cold start and warm invocation of a no-op in the executor alone,
    in ms, with the given sandbox: what the sandbox adds, without HTTP."""
    from conveyor_core.records import FunctionVersion
    from conveyor_core.settings import Settings
    from runtime.executors.process import ProcessExecutor, make_launcher

    def noop(version: int) -> FunctionVersion:
        return FunctionVersion(
            tenant="bench",
            name="noop",
            version=version,
            source=source("noop"),
            entrypoint="noop",
            timeout_s=10,
            memory_mb=128,
            env={},
            created_at=0.0,
        )

    payload = b'{"args": [], "kwargs": {}}'
    settings = Settings.from_env({**os.environ, "CONVEYOR_SANDBOX": sandbox})
    launcher = make_launcher(settings)
    with ProcessExecutor(max_processes=8, launcher=launcher) as executor:
        cold = []
        for version in range(1, 6):
            started = time.perf_counter()
            executor.run(noop(version), payload, "cold")
            cold.append((time.perf_counter() - started) * 1000)
        warm = []
        function = noop(1)
        for _ in range(rounds):
            started = time.perf_counter()
            executor.run(function, payload, "warm")
            warm.append((time.perf_counter() - started) * 1000)
    return statistics.median(cold), statistics.median(warm)


def count_succeeded(client: ApiClient) -> int:
    count, cursor = 0, None
    while True:
        params = {"function": "noop", "status": "succeeded", "limit": 200}
        if cursor:
            params["before"] = cursor
        page = client.request("GET", "/v1/invocations", params=params).json()
        count += len(page["invocations"])
        cursor = page["next"]
        if not cursor:
            return count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embedded", action="store_true", help="use the twins")
    parser.add_argument("--broker-url", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    parser.add_argument("--cache-url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--total", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--sync", type=int, default=500)
    parser.add_argument("--runtimes", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--bundle-size", type=int, default=8)
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument(
        "--sandbox", default="none", help="CONVEYOR_SANDBOX: none, process or docker"
    )
    args = parser.parse_args()

    backends = (
        {}
        if args.embedded
        else {
            "CONVEYOR_BROKER_URL": args.broker_url,
            "CONVEYOR_CACHE_URL": args.cache_url,
        }
    )
    backends.update(
        CONVEYOR_LOG_LEVEL=args.log_level,
        CONVEYOR_CONCURRENCY=str(args.concurrency),
        CONVEYOR_BUNDLE_SIZE=str(args.bundle_size),
        CONVEYOR_SANDBOX=args.sandbox,
    )
    for name in ("CONVEYOR_DOCKER_IMAGE", "CONVEYOR_DOCKER_RUNTIME"):
        if os.environ.get(name):
            backends[name] = os.environ[name]
    with (
        tempfile.TemporaryDirectory() as folder,
        platform(Path(folder), backends) as running,
    ):
        running.start("gateway")
        for number in range(args.runtimes):
            running.start(f"runtime-{number}", "runtime")
        running.wait_ready()
        client = running.client()

        cold_ms = [cold_start(client, f"cold{number}") for number in range(5)]
        client.deploy("noop", source("noop"))
        key = client.session.headers["Authorization"][7:]
        sync_round_trips(running.url, key, WARM_UP_CALLS)
        timings_ms = sync_round_trips(running.url, key, args.sync)
        roots = {process.pid for process in running.processes.values()}
        cpu_before = cpu_seconds(roots, SERVERS)
        submitted_s, finished_s = async_throughput(
            running.url, key, args.total, args.batch, args.threads
        )
        cpu_after = cpu_seconds(roots, SERVERS)
        succeeded = count_succeeded(client)

    expected = args.total + args.sync + WARM_UP_CALLS
    if succeeded != expected:
        print(f"bench: expected {expected} succeeded invocations, found {succeeded}")
        return 1
    kind = "embedded twins" if args.embedded else "RabbitMQ + Redis"
    print(f"machine: a thread wake-up round trip takes {wake_round_trip_us():.0f} µs")
    print(
        f"backends: {kind}, store SQLite, {args.runtimes} runtime(s), "
        f"bundles of {args.bundle_size}, sandbox {args.sandbox}"
    )
    print(
        f"async: {args.total} no-op invocations in {finished_s:.2f} s = "
        f"{args.total / finished_s:,.0f}/s end to end "
        f"(submitted in {submitted_s:.2f} s = {args.total / submitted_s:,.0f}/s); "
        "every one recorded succeeded"
    )
    print(
        f"sync round trip over {args.sync} calls: "
        f"p50 {percentile(timings_ms, 0.5):.2f} ms, "
        f"p99 {percentile(timings_ms, 0.99):.2f} ms, "
        f"mean {statistics.fmean(timings_ms):.2f} ms"
    )
    if cpu_after:
        used_ms = {
            name: (cpu_after[name] - cpu_before[name]) * 1000 / args.total
            for name in cpu_after
        }
        servers = ", ".join(
            f"{LABELS[name]} {used_ms[name]:.2f} ms" for name in SERVERS
        )
        print(
            f"CPU per async invocation: Conveyor's processes "
            f"{used_ms['platform']:.2f} ms, {servers}"
        )
    print(
        f"cold start (first call of a new function, end to end): "
        f"median {statistics.median(cold_ms):.1f} ms, max {max(cold_ms):.1f} ms"
    )
    for sandbox in dict.fromkeys(("none", args.sandbox)):
        cold_ms, warm_ms = executor_timings(sandbox)
        print(
            f"executor alone, sandbox {sandbox}: cold start {cold_ms:.1f} ms, "
            f"warm invocation {warm_ms:.3f} ms (medians)"
        )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except requests.ConnectionError as exc:
        sys.exit(f"bench: cannot reach the platform: {exc}")
