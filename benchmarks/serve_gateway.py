"""Bench entry point: the gateway of ``--config`` on one server, with a chosen upstream client.

``tenantware serve`` runs the same app (``Gateway(...).asgi_app()``) on uvicorn; this script
only adds the knobs the benchmark compares (``--client default|aiohttp|httpx``, ``--server
uvicorn|granian``). ``default`` is the client the gateway builds itself (the HTTP/1.1 fast path
for ``http://`` upstreams unless ``gateway.upstream_fast_path`` is off).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

# Run from a checkout without installing: the package is the parent of benchmarks/.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def build_app() -> Any:
    """App factory (also used by granian, which imports its target in the worker)."""
    from benchconfig import configure_logging

    from tenantware import Gateway, load_config
    from tenantware.cli import process_tuning
    from tenantware.proxy.upstream import AiohttpUpstreamClient, HttpxUpstreamClient

    configure_logging()
    path = os.environ["TW_BENCH_CONFIG"]
    client_name = os.environ.get("TW_BENCH_CLIENT", "default")
    client: Any = None
    if client_name == "httpx":
        client = HttpxUpstreamClient()
    elif client_name == "aiohttp":
        client = AiohttpUpstreamClient()
    gateway = Gateway(load_config(path), upstream_client=client)
    gateway.add_service(process_tuning)  # as `tenantware serve` does
    return gateway.asgi_app()


def _report_gc_pauses() -> None:
    """``TW_BENCH_GC_STATS=<skip seconds>``: print the collector's pauses at exit."""
    import atexit
    import gc
    import signal
    import time

    pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
    started = [0.0]

    # Pauses in the first TW_BENCH_GC_STATS seconds (imports, startup) are not counted.
    skip_until = time.perf_counter() + float(os.environ.get("TW_BENCH_GC_STATS") or 0)

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        elif started[0] > skip_until:
            pauses[info["generation"]].append(time.perf_counter() - started[0])

    gc.callbacks.append(callback)

    def report() -> None:
        for generation, values in pauses.items():
            if values:
                print(
                    f"gc gen{generation}: {len(values)} pauses, max {max(values) * 1000:.2f} ms, "
                    f"total {sum(values) * 1000:.1f} ms",
                    file=sys.stderr,
                )

    atexit.register(report)

    def on_term(signum: int, frame: object) -> None:
        # uvicorn re-raises SIGTERM after its graceful shutdown: exit through atexit then.
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_term)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--client", choices=["default", "aiohttp", "httpx"], default="default")
    parser.add_argument("--server", choices=["uvicorn", "granian"], default="uvicorn")
    parser.add_argument(
        "--gc-freeze", action="store_true", help="gc.freeze() after building the app"
    )
    args = parser.parse_args()
    if os.environ.get("TW_BENCH_GC_STATS"):
        _report_gc_pauses()
    os.environ["TW_BENCH_CONFIG"] = os.path.abspath(args.config)
    os.environ["TW_BENCH_CLIENT"] = args.client
    if args.gc_freeze:
        # Everything imported so far is immortal in practice: keep it out of every collection.
        import gc

        app = build_app()
        gc.collect()
        gc.freeze()
    if args.server == "granian":
        from granian import Granian  # type: ignore[import-not-found, unused-ignore]

        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        Granian(
            "serve_gateway:build_app",
            address="127.0.0.1",
            port=args.port,
            interface="asgi",
            factory=True,
            workers=1,
            loop="uvloop",
            log_enabled=False,
        ).serve()
        return
    import uvicorn

    from tenantware.server_limits import PROTOCOL_PATH, ServeLimits

    ServeLimits().export()  # the connection limits of `tenantware serve`, at their defaults
    uvicorn.run(
        app if args.gc_freeze else build_app(),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http=PROTOCOL_PATH,  # httptools with the connection limits, as `tenantware serve`
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
