#!/usr/bin/env python
"""Gateway CPU per request next to the featureless relay, measured at the same moments.

    python benchmarks/bench_floor.py --rounds 9 --mode json base=/tmp/base bare=.:bare new=.

Each ``NAME=TREE[:KIND]`` starts one server on core 0 from that checkout: the gateway
(``serve_gateway.py``, the benchmark configuration, SQLite ledger), with ``:aiohttp`` the
gateway with ``gateway.upstream_fast_path = false`` (every upstream call through aiohttp), or,
with ``:bare``, ``bare_relay.py``. One fake upstream serves them all from core 1. Every round
runs wrk (c=16, 2 s, core 1) against each server in turn, the order rotated each round so that
none always follows the same neighbour, and reads the server's CPU time from ``/proc``. On a
shared host the figures of one run move by tens of percent: compare the servers' minimum and
median over the rounds, which saw the same host conditions. CPU is divided by the 2xx answers
only, and non-2xx answers are reported: a fast but failing server must not look cheap.
``--chunk-delay-ms`` paces the fake upstream's stream events (default 1 ms: each event is its
own read, as an LLM's tokens 10-50 ms apart are; 0 writes them back to back, so a gateway
that lags behind reads several at once).
``load.py --bare`` gives the whole table (c=1/16/64) for the relay alone.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from benchconfig import BENCH_KEY, CHAT_BODY, STREAM_BODY, bench_config  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = [==[%s]==]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_healthy(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"server on port {port} exited")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                if sock.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    sys.exit(f"server on port {port} did not become healthy")


def _cpu_s(pid: int) -> float:
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _wrk(script: Path, port: int, seconds: float) -> tuple[int, int]:
    """Requests answered, and how many of them were not 2xx/3xx."""
    argv = ["taskset", "-c", "1", "wrk", "-t1", "-c16", f"-d{seconds:g}s", "-s", str(script)]
    argv.append(f"http://127.0.0.1:{port}/v1/chat/completions")
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=seconds + 30)
    lines = out.stdout.splitlines()
    line = next(line for line in lines if "requests in" in line)
    failed = next((line for line in lines if "Non-2xx or 3xx responses" in line), None)
    return int(line.split()[0]), int(failed.split(":")[1]) if failed else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("servers", nargs="+", help="NAME=TREE or NAME=TREE:bare")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--mode", choices=["json", "stream"], default="json")
    parser.add_argument(
        "--chunk-delay-ms",
        type=float,
        default=1.0,
        help="the fake upstream's pause before each stream event (0: all events back to back)",
    )
    args = parser.parse_args()
    python = sys.executable
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-floor-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    upstream = _free_port()
    argv = [python, "-W", "ignore::RuntimeWarning", "-m", "tenantware.testing.upstream"]
    argv += ["--port", str(upstream), "--latency-ms", "0", "--chunks", "20"]
    argv += ["--chunk-delay-ms", f"{args.chunk_delay_ms:g}"]
    processes = [
        subprocess.Popen(["taskset", "-c", "1", *argv], cwd=HERE.parent, stdout=subprocess.DEVNULL)
    ]
    servers: dict[str, tuple[int, int]] = {}
    try:
        _wait_healthy(upstream, processes[0])
        for spec in args.servers:
            name, _, where = spec.partition("=")
            tree, _, kind = where.partition(":")
            root = Path(tree).resolve()
            port = _free_port()
            if kind not in ("", "bare", "aiohttp"):
                sys.exit(f"unknown server kind {kind!r} in {spec!r}")
            if kind == "bare":
                argv = [str(root / "benchmarks" / "bare_relay.py"), "--port", str(port)]
                argv += ["--upstream", f"http://127.0.0.1:{upstream}"]
            else:
                config = bench_config(f"http://127.0.0.1:{upstream}/v1", workdir=str(work / name))
                if kind == "aiohttp":
                    config["gateway"]["upstream_fast_path"] = False
                (work / name).mkdir(exist_ok=True)
                path = work / f"{name}.json"
                path.write_text(json.dumps(config))
                argv = [str(root / "benchmarks" / "serve_gateway.py"), "--config", str(path)]
                argv += ["--port", str(port)]
            process = subprocess.Popen(
                ["taskset", "-c", "0", python, *argv],
                cwd=root,
                env={**os.environ, "PYTHONPATH": str(root)},
                stdout=subprocess.DEVNULL,
            )
            processes.append(process)
            _wait_healthy(port, process)
            servers[name] = (process.pid, port)
        body = STREAM_BODY if args.mode == "stream" else CHAT_BODY
        script = work / f"{args.mode}.lua"
        script.write_text(WRK_SCRIPT % (body.decode(), BENCH_KEY))
        for _, port in servers.values():
            _wrk(script, port, 1)  # warm
        results: dict[str, list[float]] = {name: [] for name in servers}
        failures: dict[str, int] = dict.fromkeys(servers, 0)
        names = list(servers)
        for round_ in range(args.rounds):
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                pid, port = servers[name]
                time.sleep(0.3)
                before = _cpu_s(pid)
                done, failed = _wrk(script, port, args.seconds)
                failures[name] += failed
                results[name].append(1000 * (_cpu_s(pid) - before) / max(1, done - failed))
            print(
                f"{time.strftime('%H:%M:%S')} round {round_} load {os.getloadavg()[0]:.1f} "
                + " ".join(f"{n} {v[-1]:.3f}" for n, v in results.items()),
                flush=True,
            )
        for name, values in results.items():
            print(
                f"{name}: CPU per {args.mode} request min {min(values):.3f} ms, "
                f"median {statistics.median(values):.3f} ms ({len(values)} rounds, "
                f"{failures[name]} non-2xx answers)"
            )
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(10)


if __name__ == "__main__":
    main()
