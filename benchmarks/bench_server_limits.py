"""Server CPU per request: uvicorn's httptools protocol vs ``tenantware serve``'s guarded one.

The guard (``tenantware.server_limits``) runs Python on every request (a header count, a byte
count, a header timer). This measures what that costs: a trivial ASGI app on uvicorn (uvloop)
with each protocol in turn, interleaved, driven by ``wrk`` over keep-alive connections, and the
server process's CPU time (``/proc/<pid>/stat``) divided by the requests it answered.

Usage: ``python benchmarks/bench_server_limits.py [--rounds 5] [--seconds 5] [--connections 16]``
(needs ``wrk``; results go in benchmarks/README.md by hand).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.servers import find_free_port  # noqa: E402

PROTOCOLS = {
    "httptools": "httptools",
    "guarded": "tenantware.server_limits:GuardedHttpToolsProtocol",
}

SERVER = """
import sys, uvicorn

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), http=sys.argv[2], loop="uvloop",
            log_level="warning", access_log=False)
"""


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _round(protocol: str, seconds: int, connections: int) -> float:
    """Server CPU microseconds per request for one run of wrk."""
    port = find_free_port()
    server = subprocess.Popen(
        ["taskset", "-c", "0", sys.executable, "-c", SERVER, str(port), PROTOCOLS[protocol]],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        deadline = time.monotonic() + 20
        while subprocess.run(
            ["curl", "-sf", f"http://127.0.0.1:{port}/"], capture_output=True, check=False
        ).returncode:
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.1)
        before = _cpu_seconds(server.pid)
        result = subprocess.run(
            [
                "taskset",
                "-c",
                "1",
                "wrk",
                "-t1",
                f"-c{connections}",
                f"-d{seconds}s",
                "-H",
                "authorization: Bearer sk-bench-0123456789",
                "-H",
                "user-agent: bench",
                "-H",
                "accept: application/json",
                f"http://127.0.0.1:{port}/v1/models",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        cpu = _cpu_seconds(server.pid) - before
        match = re.search(r"(\d+) requests in", result.stdout)
        assert match is not None, result.stdout
        return cpu / int(match[1]) * 1e6
    finally:
        server.terminate()
        server.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    results: dict[str, list[float]] = {name: [] for name in PROTOCOLS}
    for _ in range(args.rounds):
        for name in PROTOCOLS:
            results[name].append(_round(name, args.seconds, args.connections))
            print(f"{name:>10}: {results[name][-1]:.1f} µs CPU per request", flush=True)
    for name, values in results.items():
        print(
            f"{name:>10}: median {statistics.median(values):.1f} µs "
            f"(runs: {', '.join(f'{v:.1f}' for v in values)})"
        )


if __name__ == "__main__":
    main()
