"""The ``tenantware`` command line: ``serve`` the gateway, ``hash-key``/``new-key`` for config,
``usage`` reports, ``alerts export-rules`` for Prometheus, ``tenants``/``keys`` through a running
gateway's admin API."""

from __future__ import annotations

import argparse
import gc
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any

from tenantware.config import ConfigError, expanded_url, load_config
from tenantware.keys import KeyHasher, generate_key
from tenantware.types import ASGIApp, Scope

__all__ = ["build_app", "main", "process_tuning"]

_ENV_CONFIG = "TENANTWARE_CONFIG"
_ENV_DEMO_URL = "TENANTWARE_DEMO_URL"
_ENV_DEMO_LEDGER = "TENANTWARE_DEMO_LEDGER"
_ENV_LOG_FORMAT = "TENANTWARE_LOG_FORMAT"
#: ``--workers``, for every worker: the file registry refuses admin writes when it is > 1.
_ENV_WORKERS = "TENANTWARE_SERVE_WORKERS"
_ENV_DEMO_REGISTRY = "TENANTWARE_DEMO_REGISTRY"


#: How long a worker thread may keep the GIL while the event loop waits for it.
GIL_SWITCH_INTERVAL_S = 0.0005


@asynccontextmanager
async def process_tuning() -> AsyncIterator[None]:
    """Process-wide settings for a process that runs only the gateway (``tenantware serve``).

    A gateway service, entered last, so it runs once start-up has built everything. It is not
    part of ``Gateway.lifespan``: inside a user's app these settings are the app's to choose.

    - ``gc.freeze()`` after one collection: what is alive after start-up (modules, config,
      clients) lives as long as the process, so full collections stop walking it; start-up
      garbage is collected first, and objects created later are collected as usual.
    - A shorter GIL switch interval: worker threads (the ledger's database drivers) give the
      GIL back to the event loop sooner, so a ledger write delays a request less.

    The measurements behind both are in benchmarks/README.md.
    """
    gc.collect()
    gc.freeze()
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    try:
        yield
    finally:
        from tenantware.metrics import forget_this_process

        forget_this_process()


def _demo_secrets() -> tuple[str, str]:
    """The demo's upstream key and ledger URL: set once by ``serve --demo`` (inherited by
    every worker), else made here. The ledger goes to a new temporary directory, so a demo
    never writes into the directory it was started from."""
    from tenantware.demo import DEMO_UPSTREAM_KEY_ENV

    key = os.environ.get(DEMO_UPSTREAM_KEY_ENV)
    if not key:
        key = os.environ[DEMO_UPSTREAM_KEY_ENV] = secrets.token_urlsafe(24)
    ledger_url = os.environ.get(_ENV_DEMO_LEDGER)
    if not ledger_url:
        directory = tempfile.mkdtemp(prefix="tenantware-demo-")
        ledger_url = os.environ[_ENV_DEMO_LEDGER] = f"sqlite:///{directory}/ledger.db"
    return key, ledger_url


def build_app() -> ASGIApp:
    """App factory used by ``tenantware serve`` (also in every worker process)."""
    from tenantware.gateway import Gateway

    if os.environ.get(_ENV_LOG_FORMAT, "json") == "json":
        from tenantware.logs import configure_json_logging

        configure_json_logging()
    demo_url = os.environ.get(_ENV_DEMO_URL)
    if demo_url:
        from tenantware.demo import DEMO_UPSTREAM_PATH, demo_config
        from tenantware.testing.upstream import FakeUpstream, FakeUpstreamConfig

        upstream_key, ledger_url = _demo_secrets()
        fake = FakeUpstream(FakeUpstreamConfig(record_requests=False, require_api_key=upstream_key))
        prefix = DEMO_UPSTREAM_PATH + "/"

        def route_demo(scope: Scope) -> ASGIApp | None:
            return fake if scope.get("path", "").startswith(prefix) else None

        config = demo_config(f"{demo_url}{DEMO_UPSTREAM_PATH}/v1", ledger_url=ledger_url)
        registry_url = os.environ.get(_ENV_DEMO_REGISTRY)
        if registry_url:  # demo replicas sharing tenants and keys through Redis
            import msgspec

            settings = msgspec.structs.replace(
                config.gateway, registry_url=registry_url, redis_prefix="tenantware-demo:"
            )
            config = msgspec.structs.replace(config, gateway=settings)
        gateway = Gateway(config)
        extra: Callable[[Scope], ASGIApp | None] | None = route_demo
    else:
        path = os.environ[_ENV_CONFIG]
        gateway = Gateway(load_config(path), config_path=path)
        extra = None
    gateway.add_service(process_tuning)
    gateway.processes = int(os.environ.get(_ENV_WORKERS, "1"))
    return gateway.asgi_app(extra=extra)


def _serve(args: argparse.Namespace) -> int:
    from tenantware.server_limits import ServeLimits

    os.environ[_ENV_LOG_FORMAT] = args.log_format
    os.environ[_ENV_WORKERS] = str(args.workers)
    limits = ServeLimits(
        header_timeout_s=args.header_timeout,
        keep_alive_timeout_s=args.keep_alive_timeout,
        max_header_bytes=args.max_header_bytes,
        max_headers=args.max_headers,
        **({"max_connections": args.max_connections} if args.max_connections else {}),
    )
    limits.export()
    if args.demo:
        from tenantware.demo import DEMO_ADMIN_KEY, DEMO_KEYS

        shown_host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        url = f"http://{shown_host}:{args.port}"
        os.environ[_ENV_DEMO_URL] = url
        if args.ledger:
            os.environ[_ENV_DEMO_LEDGER] = args.ledger
        if args.registry:
            os.environ[_ENV_DEMO_REGISTRY] = args.registry
        _, ledger_url = _demo_secrets()
        redis_url = None  # the demo keeps its stores in memory
        print(f"tenantware demo gateway on {url}/v1", flush=True)
        for tenant, key in DEMO_KEYS.items():
            print(f"  tenant {tenant:<6} key: {key}", flush=True)
        print(f"  admin key: {DEMO_ADMIN_KEY} (/admin/tenants, /admin/usage, /metrics)", flush=True)
        print(f"  ledger: {ledger_url} (tenantware usage --ledger {ledger_url})", flush=True)
        print(
            f"  try: curl {url}/v1/chat/completions -H 'Authorization: Bearer {DEMO_KEYS['acme']}' "
            "-H 'content-type: application/json' "
            '-d \'{"model":"gpt-4.1","messages":[{"role":"user","content":"hi"}]}\'',
            flush=True,
        )
    elif args.ledger:
        print("tenantware serve: --ledger is for --demo; set metering.ledger_url", file=sys.stderr)
        return 2
    elif args.registry:
        print(
            "tenantware serve: --registry is for --demo; set gateway.registry_url",
            file=sys.stderr,
        )
        return 2
    elif args.config:
        try:
            redis_url = load_config(args.config).gateway.redis_url
        except ConfigError as exc:
            print(f"tenantware: {exc}", file=sys.stderr)
            return 2
        os.environ[_ENV_CONFIG] = os.path.abspath(args.config)
    else:
        print("tenantware serve: give --config FILE or --demo", file=sys.stderr)
        return 2
    if args.workers > 1:
        if redis_url is None or redis_url.startswith("memory://"):
            _warn_memory_stores(args.workers)
        metrics_dir = _shared_metrics_dir()
    else:
        metrics_dir = None
    try:
        _run_server(args, limits)
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def _warn_memory_stores(workers: int) -> None:
    """Said loudly at start: memory stores under several workers keep every limit per worker."""
    print(
        f"tenantware serve: WARNING: --workers {workers} with in-memory stores "
        "(gateway.redis_url is not set): each worker keeps its own rate limits, budgets, "
        f"concurrency slots, seats and circuits, so every limit is multiplied by {workers} "
        "(a tenant allowed 100 requests a minute gets up to "
        f"{100 * workers}). Set gateway.redis_url to share them, or run one worker.",
        file=sys.stderr,
        flush=True,
    )


def _shared_metrics_dir() -> str | None:
    """A fresh ``PROMETHEUS_MULTIPROC_DIR`` for the workers (so ``/metrics`` sums them all),
    unless the operator set one; the new one is returned to be removed after the server."""
    from tenantware.metrics import MULTIPROC_ENV

    if os.environ.get(MULTIPROC_ENV):
        return None
    directory = tempfile.mkdtemp(prefix="tenantware-metrics-")
    os.environ[MULTIPROC_ENV] = directory
    return directory


def _run_server(args: argparse.Namespace, limits: Any) -> None:
    import uvicorn

    from tenantware.server_limits import PROTOCOL_PATH

    uvicorn.run(
        "tenantware.cli:build_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        loop="auto",
        # uvicorn's httptools protocol with the connection limits (tenantware.server_limits).
        http=PROTOCOL_PATH,
        timeout_keep_alive=limits.keep_alive_timeout_s,
        # On SIGTERM: stop accepting, let requests and streams finish up to this deadline
        # (then they are cut), then the lifespan ends: the ledger writer flushes.
        timeout_graceful_shutdown=args.graceful_timeout,
        log_level=args.log_level,
        access_log=False,
    )


def _hash_key(args: argparse.Namespace) -> int:
    secret = os.environ.get(args.secret_env) if args.secret_env else None
    print(KeyHasher(secret.encode() if secret else None).hash(args.key))
    return 0


def _new_key(args: argparse.Namespace) -> int:
    key = generate_key(args.prefix)
    secret = os.environ.get(args.secret_env) if args.secret_env else None
    print(f"key:  {key}")
    print(f"hash: {KeyHasher(secret.encode() if secret else None).hash(key)}")
    return 0


def _usage(args: argparse.Namespace) -> int:
    import anyio
    import msgspec

    from tenantware.gateway import ledger_url
    from tenantware.metering.ledger import DEFAULT_LEDGER_URL, open_ledger
    from tenantware.metering.reports import parse_time, records_csv, report_csv, usage_report

    settings = None
    try:
        # Expanded like the configuration's URL: a quoted ``${NAME}`` keeps a password out of
        # the process list.
        url = expanded_url(args.ledger, "--ledger")
        if args.config:
            config = load_config(args.config)
            settings = config.metering
            url = url or ledger_url(config)
    except ConfigError as exc:
        print(f"tenantware: {exc}", file=sys.stderr)
        return 2
    url = url or DEFAULT_LEDGER_URL
    try:
        since = parse_time(args.since)
        until = parse_time(args.until) if args.until else None
        ledger = open_ledger(url)
    except ValueError as exc:
        print(f"tenantware usage: {exc}", file=sys.stderr)
        return 2
    # Which ledger was read goes to stderr, so the report on stdout stays machine-readable.
    print(f"tenantware usage: ledger {_shown_ledger(url)}", file=sys.stderr)

    async def fetch() -> list[Any]:
        try:
            if args.format == "records":
                return list(await ledger.query(tenant=args.tenant, since=since, until=until))
            return list(
                await usage_report(
                    ledger,
                    tenant=args.tenant,
                    since=since,
                    until=until,
                    period=args.period,
                    currency=settings.currency if settings else "USD",
                    currency_per_usd=settings.currency_per_usd if settings else Decimal(1),
                )
            )
        finally:
            await ledger.aclose()

    fetched: list[Any] = anyio.run(fetch)
    if not fetched:
        print(
            "tenantware usage: warning: no usage records in this ledger"
            + (f" for tenant {args.tenant}" if args.tenant else "")
            + f" since {args.since}; is it the ledger the gateway writes to? (--ledger URL, "
            "or --config with the gateway's file)",
            file=sys.stderr,
        )
    if args.format == "records":
        sys.stdout.write(records_csv(fetched))
        return 0
    rows = fetched
    if args.format == "json":
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(rows)).decode() + "\n")
    elif args.format == "csv":
        sys.stdout.write(report_csv(rows))
    else:
        header = f"{'tenant':<16} {'period':<21} {'requests':>8} {'errors':>6} {'tokens in':>10} "
        header += f"{'tokens out':>10} {'p50 s':>7} {'p99 s':>7} {'charged':>14}"
        print(header)
        for row in rows:
            p50 = f"{row.latency_p50_s:.3f}" if row.latency_p50_s is not None else "-"
            p99 = f"{row.latency_p99_s:.3f}" if row.latency_p99_s is not None else "-"
            print(
                f"{row.tenant:<16} {row.period:<21} {row.requests:>8} {row.errors:>6} "
                f"{row.input_tokens:>10} {row.output_tokens:>10} {p50:>7} {p99:>7} "
                f"{row.charged + ' ' + row.currency:>14}"
            )
    return 0


def _shown_ledger(url: str) -> str:
    """The ledger URL as an operator may see it: a SQLite file as an absolute path (a relative
    one depends on the directory), any password replaced by ``***``."""
    from urllib.parse import urlsplit

    if url.startswith("sqlite:///"):
        return "sqlite:///" + os.path.abspath(url.removeprefix("sqlite:///"))
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return parts._replace(netloc=netloc).geturl()
    return url


def _export_rules(args: argparse.Namespace) -> int:
    from tenantware.alerts.prometheus import export_rules

    path = args.config or os.environ.get(_ENV_CONFIG)
    if not path:
        print("tenantware alerts export-rules: --config is required", file=sys.stderr)
        return 2
    try:
        text = export_rules(load_config(path))
    except ConfigError as exc:
        print(f"tenantware: {exc}", file=sys.stderr)
        return 2
    if args.output in (None, "-"):
        sys.stdout.write(text)
    else:
        with open(args.output, "w", encoding="utf-8") as out:
            out.write(text)
    return 0


def _positive(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> int | float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tenantware", description="Multi-tenant AI API gateway.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help="configuration file (.toml, .yaml, .json)")
    serve.add_argument(
        "--demo", action="store_true", help="demo tenants and a built-in fake upstream"
    )
    serve.add_argument(
        "--ledger",
        metavar="URL",
        help="with --demo: where usage records go (default: a new temporary directory)",
    )
    serve.add_argument(
        "--registry",
        metavar="URL",
        help="with --demo: share tenants and keys through this Redis (several demo gateways)",
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--workers", type=int, default=1)
    serve.add_argument(
        "--graceful-timeout",
        type=_positive(float),
        default=30.0,
        metavar="S",
        help="on SIGTERM, seconds open requests and streams get to finish (default 30)",
    )
    serve.add_argument("--log-level", default="warning", help="uvicorn's own log level")
    serve.add_argument(
        "--log-format",
        choices=("json", "console"),
        default="json",
        help="request log lines: one JSON object each (default) or structlog's console view",
    )
    limits = serve.add_argument_group(
        "connection limits", "keep idle and slow clients from starving real requests"
    )
    limits.add_argument(
        "--header-timeout",
        type=_positive(float),
        default=10.0,
        metavar="S",
        help="seconds a client has to send a request's headers (default 10); then 408/close",
    )
    limits.add_argument(
        "--keep-alive-timeout",
        type=_positive(int),
        default=5,
        metavar="S",
        help="seconds an idle kept-alive connection stays open (default 5)",
    )
    limits.add_argument(
        "--max-header-bytes",
        type=_positive(int),
        default=64 * 1024,
        metavar="N",
        help="request line and headers at most (default 65536); past it 431",
    )
    limits.add_argument(
        "--max-headers",
        type=_positive(int),
        default=100,
        metavar="N",
        help="request headers at most (default 100); past it 431",
    )
    limits.add_argument(
        "--max-connections",
        type=_positive(int),
        default=None,
        metavar="N",
        help="open connections per worker (default: the open-file limit - 128, at most "
        "10000); past it the longest-idle one is closed, or a new request gets 503",
    )
    serve.set_defaults(func=_serve)

    hash_key = commands.add_parser("hash-key", help="print the stored hash of an API key")
    hash_key.add_argument("key")
    hash_key.add_argument("--secret-env", help="HMAC secret variable (gateway.key_secret_env)")
    hash_key.set_defaults(func=_hash_key)

    new_key = commands.add_parser("new-key", help="make a random API key and its hash")
    new_key.add_argument("--prefix", default="tw")
    new_key.add_argument("--secret-env", help="HMAC secret variable (gateway.key_secret_env)")
    new_key.set_defaults(func=_new_key)

    usage = commands.add_parser("usage", help="usage report from the ledger")
    usage.add_argument("--config", help="configuration file (its ledger and currency)")
    usage.add_argument(
        "--ledger", help="ledger URL (overrides the configuration; ${NAME} is expanded)"
    )
    usage.add_argument("--tenant", help="one tenant (default: every tenant)")
    usage.add_argument("--since", default="30d", help="2026-11-01, 2026-11-01T12:00Z, 24h, 7d")
    usage.add_argument("--until", help="end (exclusive), same forms as --since")
    usage.add_argument("--period", choices=["minute", "hour", "day", "month", "all"], default="day")
    usage.add_argument("--format", choices=["table", "json", "csv", "records"], default="table")
    usage.set_defaults(func=_usage)

    alerts = commands.add_parser("alerts", help="alert rules")
    alert_commands = alerts.add_subparsers(dest="alerts_command", required=True)
    export = alert_commands.add_parser(
        "export-rules", help="write the configured alert rules as a Prometheus rules file"
    )
    export.add_argument("--config", help="configuration file (default: $TENANTWARE_CONFIG)")
    export.add_argument("-o", "--output", help="file to write (default: standard output)")
    export.set_defaults(func=_export_rules)

    from tenantware.admin.cli import add_commands

    add_commands(commands)

    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
    except ConfigError as exc:  # e.g. a ``${NAME}`` in a URL whose variable is not set
        print(f"tenantware: {exc}", file=sys.stderr)
        return 2
    return result


if __name__ == "__main__":
    raise SystemExit(main())
