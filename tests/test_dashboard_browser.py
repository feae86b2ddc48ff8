"""The dashboard in headless Chromium (the Debian ``chromium`` package, driven by Playwright
with the system browser's path: no browser download), against a gateway on a loopback port
that served a known mix of requests from the fake upstream into a SQLite ledger.

Every view is screenshotted to ``dashboard-screens`` under pytest's temporary directory (the
path is printed); the committed copies are in ``docs/images/``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import io
import json
import math
import random
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any, TypeVar

import anyio
import httpx
import pytest

from tenantware import Gateway, HttpxUpstreamClient, KeyHasher
from tenantware.metering.billing import NOT_BILLED
from tenantware.metering.ledger import SqliteLedger, UsageRecord
from tenantware.testing.serve import serve_in_thread
from tenantware.testing.upstream import FakeUpstream, FakeUpstreamConfig
from tests.support import KEYS as SUPPORT_KEYS
from tests.support import make_config

T = TypeVar("T")
CHROMIUM = "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)", allow_module_level=True)
playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect

ADMIN = "sk-admin-dashboard"
READER = "sk-reader-dashboard"
KEYS = {"acme": "sk-dash-acme", "hobby": "sk-dash-hobby", "beta": "sk-dash-beta"}
#: Tenant-supplied strings the page must show as text, never run or parse as markup.
EVIL_NAME = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned=2">Acme'
EVIL_CENTER = "<b>research</b>"
OTHER_TENANTS = ("hobby", "beta", "Hobby Ltd", "Beta Labs", "idle", "Idle Inc")
#: Migration trials: acme's claude requests are copied to ``relay`` (shadow); hobby's gemini
#: requests are served by ``relay-canary`` (canary, every one); ``relay-old`` has shares 0.
CANDIDATES = ("relay", "relay-canary", "relay-old")
TRIALS = [
    {
        "name": "claude-shadow",
        "model": "claude-sonnet-4.5",
        "candidates": [
            {"upstream": "relay", "shadow_percent": 100},
            {"upstream": "relay-old"},
        ],
    },
    {
        "name": "gemini-canary",
        "model": "gemini-2.5-flash",
        "candidates": [{"upstream": "relay-canary", "canary_percent": 100}],
    },
]
SHADOWS = 3  # acme's claude requests
#: beta pays from a prepaid balance, topped up once before the traffic.
TOPUP_USD = Decimal(20)


def dashboard_config(upstream_url: str, ledger: Path) -> Any:
    hasher = KeyHasher()
    tenants = [
        {
            "id": "acme",
            "name": EVIL_NAME,
            "tier": "enterprise",
            "cost_center": EVIL_CENTER,
            "limits": {"monthly_budget_usd": "250"},
            "keys": [{"id": "acme-1", "hash": hasher.hash(KEYS["acme"]), "prefix": "sk-dash-ac"}],
        },
        {
            "id": "hobby",
            "name": "Hobby Ltd",
            "tier": "free",
            "keys": [{"id": "hobby-1", "hash": hasher.hash(KEYS["hobby"])}],
        },
        {
            "id": "beta",
            "name": "Beta Labs",
            "tier": "pro",
            "billing": "prepaid",
            "low_balance_usd": "50",
            "limits": {"requests_per_minute": 3, "burst_multiplier": 1},
            "keys": [{"id": "beta-1", "hash": hasher.hash(KEYS["beta"])}],
        },
        {"id": "idle", "name": "Idle Inc", "tier": "free", "keys": []},  # no traffic
    ]
    relay = upstream_url.replace("upstream.test", "relay.test")
    return make_config(
        upstream_url,
        tenants=tenants,
        upstreams=[
            {
                "name": "fake",
                "base_url": upstream_url,
                "models": ["gpt-4.1", "claude-sonnet-4.5", "gemini-2.5-flash", "deepseek-v3.2"],
                "timeout_s": 5,
            },
            # Candidates of the migration trials: only what the rules send them.
            *({"name": name, "base_url": relay, "timeout_s": 5} for name in CANDIDATES),
        ],
        migration={"rules": TRIALS},
        gateway={
            "admin_keys": [
                {"id": "ops", "hash": hasher.hash(ADMIN)},
                {"id": "auditor", "hash": hasher.hash(READER), "role": "read-only"},
            ]
        },
        metering={"ledger_url": f"sqlite:///{ledger}", "request_log": False},
    )


def chat(model: str, *, stream: bool = False) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Hello there, how are you today?"}],
        "stream": stream,
    }


def serve_traffic(base: str, fake: FakeUpstream) -> int:
    """The known mix: successes (streamed and not, two models), upstream errors, a refused
    model, rate-limited requests. Returns how many requests were sent."""
    sent = 0
    with httpx.Client(base_url=base, timeout=30) as client:

        def send(key: str, body: dict[str, Any]) -> None:
            nonlocal sent
            sent += 1
            headers = {"authorization": f"Bearer {key}"}
            with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
                r.read()

        for i in range(8):
            send(KEYS["acme"], chat("gpt-4.1", stream=i % 2 == 0))
        for _ in range(3):
            send(KEYS["acme"], chat("claude-sonnet-4.5"))
        # The shadow copies of those run after their answers: over before the upstream fails.
        wait_for_comparisons(base)
        fake.config.fail_next = [500] * 8  # more than the gateway's retries
        send(KEYS["acme"], chat("gpt-4.1"))
        fake.config.fail_next = []
        for _ in range(4):
            send(KEYS["hobby"], chat("gemini-2.5-flash"))
        send(KEYS["hobby"], chat("gpt-4.1"))  # not allowed for hobby: refused
        for _ in range(5):
            send(KEYS["beta"], chat("deepseek-v3.2"))  # 3 per minute: 2 rate-limited
    return sent


def history(now: float) -> list[UsageRecord]:
    """Yesterday's records, written to the ledger before the gateway starts, so the charts
    have a shape (the served mix all lands in the last minute)."""
    rng = random.Random(20)
    records = []
    for hour in range(2, 24):
        for tenant, model, per_hour in (
            ("acme", "gpt-4.1", 6),
            ("acme", "claude-sonnet-4.5", 2),
            ("hobby", "gemini-2.5-flash", 3),
            ("beta", "deepseek-v3.2", 4),
        ):
            for i in range(per_hour + rng.randrange(0, 4)):
                outcome = rng.choice(["ok"] * 12 + ["upstream_error", "rejected_quota"])
                billed = outcome != "rejected_quota"
                records.append(
                    UsageRecord(
                        record_id=f"history-{tenant}-{model}-{hour}-{i}",
                        request_id=f"history-{hour}-{i}",
                        ts=now - hour * 3600 + rng.uniform(0, 3500),
                        tenant=tenant,
                        cost_center=EVIL_CENTER if tenant == "acme" else tenant,
                        model_requested=model,
                        model_served=model,
                        outcome=outcome,
                        status=200 if outcome == "ok" else 429,
                        input_tokens=rng.randrange(50, 900) if billed else 0,
                        output_tokens=rng.randrange(10, 400) if billed else 0,
                        cost_nanousd=rng.randrange(10**5, 10**7) if billed else 0,
                        charged_nanousd=rng.randrange(10**5, 10**7) if billed else 0,
                        latency_s=rng.uniform(0.2, 1.5) * (1 + (hour % 7 == 0)),
                        ttft_s=rng.uniform(0.05, 0.3) if i % 2 else None,
                        stream=bool(i % 2),
                    )
                )
    return records


def write_history(path: Path, records: list[UsageRecord]) -> None:
    async def write() -> None:
        ledger = SqliteLedger(path)
        try:
            await ledger.write(records)
        finally:
            await ledger.aclose()

    in_a_thread(write)


def ledger_records(path: Path) -> list[UsageRecord]:
    async def read() -> list[UsageRecord]:
        ledger = SqliteLedger(path)
        try:
            return await ledger.query()
        finally:
            await ledger.aclose()

    return in_a_thread(read)


def wait_for_comparisons(url: str) -> None:
    """Until the gateway's comparison book holds every shadow call (they finish after the
    client's answer)."""
    headers = {"authorization": f"Bearer {ADMIN}"}
    rows: list[dict[str, Any]] = []
    for _ in range(1200):
        answer = httpx.get(f"{url}/admin/migration/report", headers=headers, timeout=30)
        rows = answer.json()["data"]
        if sum(row["shadow_requests"] for row in rows) >= SHADOWS:
            return
        time.sleep(0.05)
    raise AssertionError(rows)


def in_a_thread(work: Callable[[], Awaitable[T]]) -> T:
    """Playwright's sync API keeps an event loop running in this thread: run in another."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(anyio.run, work).result()


class Served:
    def __init__(self, url: str, ledger: list[UsageRecord], screens: Path) -> None:
        self.url = url
        #: Every record but the shadow calls (the operator's cost, left out of usage).
        self.records = [r for r in ledger if r.outcome != "shadow"]
        self.shadows = [r for r in ledger if r.outcome == "shadow"]
        self.screens = screens

    def of(self, tenant: str) -> list[UsageRecord]:
        return [r for r in self.records if r.tenant == tenant]

    def served_by_gateway(self, tenant: str) -> list[UsageRecord]:
        return [r for r in self.of(tenant) if not r.record_id.startswith("history-")]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    directory = tmp_path_factory.mktemp("dashboard")
    screens = tmp_path_factory.mktemp("dashboard-screens")
    print(f"\ndashboard screenshots: {screens}")
    ledger = directory / "ledger.db"
    fake = FakeUpstream(FakeUpstreamConfig(completion_tokens=12))
    client = HttpxUpstreamClient(transport=httpx.ASGITransport(app=fake))
    config = dashboard_config("http://upstream.test/v1", ledger)
    gateway = Gateway(config, upstream_client=client)
    past = history(time.time())
    write_history(ledger, past)
    with serve_in_thread(gateway.asgi_app(), lifespan="on", startup_timeout_s=30) as url:
        topup = httpx.post(
            f"{url}/admin/tenants/beta/balance/topups",
            json={"amount_usd": str(TOPUP_USD)},
            headers={"authorization": f"Bearer {ADMIN}", "idempotency-key": "dashboard-topup"},
            timeout=30,
        )
        assert topup.status_code in (200, 201), topup.text
        sent = serve_traffic(url, fake) + len(past) + SHADOWS
        records: list[UsageRecord] = []
        for _ in range(1200):  # the writer flushes every 0.1 s; generous on a busy host
            records = ledger_records(ledger)
            if len(records) >= sent:
                break
            time.sleep(0.05)
        assert len(records) == sent
        wait_for_comparisons(url)
        yield Served(url, records, screens)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM)
        yield launched
        launched.close()


class PageWatch:
    """A page with every JSON answer it received and every console error or CSP report."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.bodies: list[tuple[str, str]] = []
        self.requests: list[Any] = []
        self.problems: list[str] = []
        page.on("console", lambda m: m.type == "error" and self.problems.append(m.text))
        page.on("pageerror", lambda e: self.problems.append(str(e)))
        page.on("request", lambda r: self.requests.append(r))
        page.on("response", self._response)

    def _response(self, response: Any) -> None:
        if "/admin/" in response.url:
            # The page may close first (the test is over): its bodies no longer matter.
            with contextlib.suppress(playwright_api.Error):
                self.bodies.append((response.url, response.text()))


def open_dashboard(
    browser: Any, served: Served, key: str, *, clock: bool = False, **context: Any
) -> PageWatch:
    page = browser.new_page(**context)
    if clock:  # the page's timers and Date under the test's control (auto-refresh)
        page.clock.install()
    watch = PageWatch(page)
    page.goto(served.url + "/dashboard")
    page.get_by_label("API key", exact=True).fill(key)
    page.get_by_label("API key", exact=True).press("Enter")  # the keyboard is enough
    page.wait_for_selector("#kpi-requests")
    expect(page.locator(".charts canvas")).to_have_count(3)
    page.wait_for_load_state("networkidle")
    return watch


def kpi(page: Any, name: str) -> str:
    return str(page.locator(f"#kpi-{name}").text_content())


def number(text: str) -> int:
    return int(text.replace(",", ""))


def money(records: list[UsageRecord]) -> str:
    """The ledger's charged total as the page prints it (USD, 6 decimals)."""
    usd = (Decimal(sum(r.charged_nanousd for r in records)) / 10**9).quantize(Decimal("1e-6"))
    return f"{usd:,}"


def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def usd(nanousd: int) -> str:
    """Nano-USD as the page prints it (6 decimals, rounded half up)."""
    value = (Decimal(nanousd) / 10**9).quantize(Decimal("1e-6"), ROUND_HALF_UP)
    return f"{value:,}"


def painted(watch: PageWatch, selector: str) -> int:
    """Coloured pixels uPlot painted on the canvas under ``selector``."""
    return int(
        watch.page.evaluate(
            """(selector) => {
            const canvas = document.querySelector(selector + ' canvas');
            const pixels = canvas.getContext('2d')
                .getImageData(0, 0, canvas.width, canvas.height).data;
            let coloured = 0;
            for (let i = 0; i < pixels.length; i += 4) {
                const [r, g, b, a] = pixels.slice(i, i + 4);
                if (a > 0 && Math.max(r, g, b) - Math.min(r, g, b) > 60) coloured++;
            }
            return coloured;
        }""",
            selector,
        )
    )


def figure(table: Any, label: str) -> tuple[str, str]:
    """A trial table's row: (primary, candidate) as shown."""
    row = table.locator("tbody tr").filter(
        has=table.page.locator("th", has_text=re.compile(f"^{re.escape(label)}$"))
    )
    cells = row.locator("td")
    return str(cells.nth(0).text_content()), str(cells.nth(1).text_content())


def charts_drawn(watch: PageWatch) -> list[int]:
    """Per chart: its data points and the coloured pixels uPlot painted on its canvas."""
    points = [
        int(watch.page.locator(f"#chart-{name}").get_attribute("data-points"))
        for name in ("spend", "latency", "refusals")
    ]
    painted = watch.page.evaluate(
        """() => [...document.querySelectorAll('.plot canvas')].map((canvas) => {
            const pixels = canvas.getContext('2d')
                .getImageData(0, 0, canvas.width, canvas.height).data;
            let coloured = 0;
            for (let i = 0; i < pixels.length; i += 4) {
                const [r, g, b, a] = pixels.slice(i, i + 4);
                if (a > 0 && Math.max(r, g, b) - Math.min(r, g, b) > 60) coloured++;
            }
            return coloured;
        })"""
    )
    return [*points, *painted]


def screenshot(watch: PageWatch, served: Served, name: str) -> Path:
    path = served.screens / f"{name}.png"
    watch.page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    return path


def test_tenant_view_shows_the_ledgers_numbers_and_nothing_of_other_tenants(
    browser: Any, served: Served
) -> None:
    watch = open_dashboard(browser, served, KEYS["acme"])
    page = watch.page
    mine = served.of("acme")
    assert number(kpi(page, "requests")) == len(mine)
    assert len(served.served_by_gateway("acme")) == 12
    assert number(kpi(page, "input-tokens")) == sum(r.input_tokens for r in mine)
    assert number(kpi(page, "output-tokens")) == sum(r.output_tokens for r in mine)
    assert kpi(page, "spend") == money(mine)
    errors = sum(r.outcome == "upstream_error" for r in mine)
    assert sum(r.outcome == "upstream_error" for r in served.served_by_gateway("acme")) == 1
    assert kpi(page, "error-rate") == f"{100 * errors / len(mine):.1f}%"
    assert kpi(page, "budget") == "250"
    # Per model: the ledger's counts.
    by_model = {
        m: sum(r.model_requested == m for r in mine) for m in {r.model_requested for r in mine}
    }
    for model, count in by_model.items():
        cells = page.locator("#models-table tbody tr", has_text=model).first.locator("td")
        assert number(str(cells.nth(1).text_content())) == count
    # Keys: id and prefix only.
    keys = page.locator("#keys-table").text_content() or ""
    assert "acme-1" in keys
    assert "sk-dash-ac" in keys
    assert KEYS["acme"] not in page.content()
    assert all(n > 0 for n in charts_drawn(watch)), charts_drawn(watch)
    screenshot(watch, served, "tenant")
    # The tenant's own name and cost center are shown as text, never run as markup.
    assert EVIL_NAME in (page.locator("#who").text_content() or "")
    assert EVIL_CENTER in (page.locator("#centers-table").text_content() or "")
    assert page.evaluate("window.__pwned") is None
    assert page.locator("#board img, #board b, #who script").count() == 0
    # Latency and first token: the ledger's nearest-rank percentiles over the calls that were
    # not refused, to their latency bucket (within 5 %, docs/metering.md) and the display's
    # millisecond; the longest queue wait.
    timed = [r for r in mine if r.outcome not in NOT_BILLED]
    for name, values in (
        ("p50", [r.latency_s for r in timed]),
        ("p99", [r.latency_s for r in timed]),
        ("ttft-p50", [r.ttft_s for r in timed if r.ttft_s is not None]),
        ("ttft-p99", [r.ttft_s for r in timed if r.ttft_s is not None]),
    ):
        exact = nearest_rank(values, 0.99 if name.endswith("p99") else 0.50)
        shown = float(kpi(page, name))
        assert abs(shown - exact) <= 0.05 * exact + 0.0005, (name, shown, exact)
    assert float(kpi(page, "queue-wait")) == round(max(r.queue_wait_s for r in mine), 3)
    # Per cost center: the ledger's counts.
    centers = page.locator("#centers-table tbody tr", has_text=EVIL_CENTER).locator("td")
    assert number(str(centers.nth(1).text_content())) == len(mine)
    # The outcomes: the ledger's counts, by outcome.
    outcomes = page.locator("#outcomes-table tbody tr")
    failed = sum(r.outcome in ("upstream_error", "upstream_timeout", "error") for r in mine)
    limited = sum(r.outcome in ("rejected_quota", "rejected_budget") for r in mine)
    assert figure_of(outcomes, "Failed") == f"{failed:,}"
    assert figure_of(outcomes, "Refused: rate limit or budget") == f"{limited:,}"
    # Spend this month against the monthly budget: the ledger's charged since the 1st (UTC).
    now = datetime.now(UTC)
    month = datetime(now.year, now.month, 1, tzinfo=UTC).timestamp()
    assert kpi(page, "month-spend") == usd(sum(r.charged_nanousd for r in mine if r.ts >= month))
    assert page.locator(".kpi meter").count() == 1
    # No migration trial reaches a tenant key: not asked for, and refused when asked.
    assert not [r for r in watch.requests if "/admin/dashboard/migration" in r.url]
    logged = len(watch.problems)
    refused = page.evaluate(
        """async (key) => (await fetch('/admin/dashboard/migration',
            {headers: {Authorization: 'Bearer ' + key}})).status""",
        KEYS["acme"],
    )
    assert refused == 403
    assert [p for p in watch.problems[logged:] if "403" in p] == watch.problems[logged:]
    del watch.problems[logged:]  # the browser logs the refusal asked for above
    # No answer this key received names another tenant, or counts them.
    assert watch.bodies
    for url, body in watch.bodies:
        for other in (*OTHER_TENANTS, "claude-shadow", "gemini-canary", "relay"):
            assert other not in body, (url, other)
        data = json.loads(body)
        tenants = {row["tenant"] for part in ("totals", "series") for row in data.get(part, [])}
        assert tenants <= {"acme"}, url
    assert not watch.problems, watch.problems
    page.close()


def test_the_key_travels_only_in_a_header(browser: Any, served: Served) -> None:
    watch = open_dashboard(browser, served, KEYS["hobby"])
    page = watch.page
    assert page.evaluate("document.cookie") == ""
    assert page.evaluate("sessionStorage.getItem('tenantware.dashboard.key')") == KEYS["hobby"]
    assert page.evaluate("localStorage.length") == 0
    api = [r for r in watch.requests if "/admin/" in r.url]
    assert api
    for request in watch.requests:
        assert KEYS["hobby"] not in request.url
    for request in api:
        assert request.headers["authorization"] == f"Bearer {KEYS['hobby']}"
    # A reload keeps the session; signing out forgets the key.
    page.reload()
    page.wait_for_selector("#kpi-requests")
    assert number(kpi(page, "requests")) == len(served.of("hobby"))
    page.get_by_role("button", name="Sign out").click()
    assert page.evaluate("sessionStorage.length") == 0
    assert page.get_by_label("API key", exact=True).is_visible()
    page.close()


def test_operator_view_every_tenant_live_state_and_csv(browser: Any, served: Served) -> None:
    watch = open_dashboard(browser, served, READER)
    page = watch.page
    assert number(kpi(page, "requests")) == len(served.records)
    assert kpi(page, "spend") == money(served.records)
    rows = page.locator("#tenants-table tbody tr")
    assert rows.count() == 4  # every tenant, the one without traffic too
    idle = rows.filter(has=page.locator("td", has_text=re.compile("^idle$"))).locator("td")
    assert (idle.nth(0).text_content(), idle.nth(2).text_content()) == ("Idle Inc", "0")
    all_tokens = sum(r.input_tokens + r.output_tokens for r in served.records)
    tier_of = {"acme": "enterprise", "hobby": "free", "beta": "pro"}
    tiers = httpx.get(
        f"{served.url}/admin/tiers", headers={"authorization": f"Bearer {READER}"}, timeout=30
    ).json()["data"]
    tier_weights = {t["id"]: t["weight"] for t in tiers}
    for tenant in ("acme", "hobby", "beta"):
        cells = rows.filter(has=page.locator("td", has_text=re.compile(f"^{tenant}$"))).locator(
            "td"
        )
        mine = served.of(tenant)
        assert number(str(cells.nth(2).text_content())) == len(mine)
        refused = sum(
            r.outcome in ("rejected_quota", "rejected_budget", "rejected_queue", "breaker_open")
            for r in mine
        )
        assert number(str(cells.nth(8).text_content())) == refused
        # Share of the upstream's capacity used (tokens) against the share by weight.
        tokens = sum(r.input_tokens + r.output_tokens for r in mine)
        assert str(cells.nth(4).text_content()).strip() == f"{100 * tokens / all_tokens:.1f}%"
        weight = tier_weights[tier_of[tenant]]
        expected = 100 * weight / sum(tier_weights[t] for t in tier_of.values())
        assert str(cells.nth(5).text_content()).strip() == f"{expected:.1f}%"
    limited = sum(r.outcome == "rejected_quota" for r in served.records)
    # beta went over 3 requests a minute
    assert any(r.outcome == "rejected_quota" for r in served.served_by_gateway("beta"))
    assert number(kpi(page, "rate-limited")) == limited
    names = page.locator("#tenants-table").text_content() or ""
    assert EVIL_NAME in names
    assert "Hobby Ltd" in names
    assert page.evaluate("window.__pwned") is None
    circuits = page.locator("#circuits-table tbody tr")
    assert circuits.count() >= 4
    assert "closed" in (circuits.first.text_content() or "")
    health = page.locator("#health").text_content() or ""
    assert "sqlite" in health
    assert "writing" in health
    assert all(n > 0 for n in charts_drawn(watch)), charts_drawn(watch)
    screenshot(watch, served, "operator")
    # The CSV holds what is shown: one total row per tenant with the ledger's counts.
    with page.expect_download() as download:
        page.get_by_role("button", name="Download CSV").click()
    text = Path(download.value.path()).read_text()
    totals = [line for line in text.splitlines() if line.startswith("total,")]
    assert len(totals) == 3
    assert any(line.startswith(f"total,acme,all,,{len(served.of('acme'))},") for line in totals)
    assert EVIL_NAME not in text  # the CSV names tenants by id
    # Changing the range and refreshing keep the page whole.
    page.get_by_label("Time range", exact=True).select_option("1h")
    page.wait_for_load_state("networkidle")
    hour_ago = time.time() - 3600
    recent = [r for r in served.records if r.ts >= hour_ago]
    expect(page.locator("#kpi-requests")).to_have_text(f"{len(recent):,}")
    # One tenant only.
    page.get_by_label("Tenant", exact=True).select_option("hobby")
    expect(page.locator("#tenants-table tbody tr")).to_have_count(1)
    recent_hobby = [r for r in recent if r.tenant == "hobby"]
    expect(page.locator("#kpi-requests")).to_have_text(f"{len(recent_hobby):,}")
    page.get_by_label("Tenant", exact=True).select_option("")
    expect(page.locator("#kpi-requests")).to_have_text(f"{len(recent):,}")
    # A custom range (UTC, to the minute): the ledger's records in it.
    start = datetime.fromtimestamp(time.time() - 10 * 3600, UTC).replace(second=0, microsecond=0)
    end = start + timedelta(hours=5)
    page.get_by_label("Time range", exact=True).select_option("custom")
    page.get_by_label("From (UTC)").fill(start.strftime("%Y-%m-%dT%H:%M"))
    page.get_by_label("To (UTC)").fill(end.strftime("%Y-%m-%dT%H:%M"))
    page.get_by_role("button", name="Refresh").click()
    inside = [r for r in served.records if start.timestamp() <= r.ts < end.timestamp()]
    expect(page.locator("#kpi-requests")).to_have_text(f"{len(inside):,}")
    assert not watch.problems, watch.problems
    page.close()


def test_phone_width(browser: Any, served: Served) -> None:
    watch = open_dashboard(
        browser, served, KEYS["acme"], viewport={"width": 390, "height": 844}, device_scale_factor=2
    )
    page = watch.page
    overflow = page.evaluate(
        "document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow <= 1
    drawn = charts_drawn(watch)
    assert all(n > 0 for n in drawn), drawn
    screenshot(watch, served, "tenant-phone")
    assert not watch.problems, watch.problems
    page.close()


def figure_of(rows: Any, label: str) -> str:
    """The number in the row of a two-column label / number table that starts with label."""
    row = rows.filter(has=rows.page.locator("td", has_text=re.compile(f"^{re.escape(label)}")))
    return str(row.locator("td").nth(1).text_content())


def test_operator_sees_the_migration_trials(browser: Any, served: Served) -> None:
    watch = open_dashboard(browser, served, READER)
    page = watch.page
    trials = page.locator("#trials table.trial")
    expect(trials).to_have_count(3)
    # The shadow trial: its calls and cost are the ledger's shadow records.
    shadow = trials.filter(has_text="claude-shadow: relay / claude-sonnet-4.5")
    assert len(served.shadows) == SHADOWS
    assert {r.upstream for r in served.shadows} == {"relay"}
    assert figure(shadow, "Shadowed requests") == (f"{SHADOWS:,}", f"{SHADOWS:,}")
    cost = usd(sum(r.cost_nanousd for r in served.shadows))
    shadowed = {r.request_id for r in served.shadows}
    primaries = [r for r in served.records if r.request_id in shadowed]
    assert len(primaries) == SHADOWS
    assert figure(shadow, "Cost (USD)") == (usd(sum(r.cost_nanousd for r in primaries)), cost)
    assert figure(shadow, "Error rate (shadowed)") == ("0.0%", "0.0%")
    assert figure(shadow, "Exact same text")[1] == "100.0%"  # the same fake answered both
    assert "active" in (shadow.locator("caption").text_content() or "")
    # The canary trial: every gemini request of hobby was served by the candidate.
    canary = trials.filter(has_text="gemini-canary: relay-canary / gemini-2.5-flash")
    by_candidate = [r for r in served.records if r.upstream == "relay-canary"]
    assert len(by_candidate) == 4
    assert figure(canary, "Canary requests")[1] == "4"
    assert "canary 100%" in (canary.locator("caption").text_content() or "")
    off = trials.filter(has_text="claude-shadow: relay-old")
    assert "off (shares 0)" in (off.locator("caption").text_content() or "")
    # A chart of the candidates' p99 against their primaries'.
    assert int(page.locator("#chart-trials").get_attribute("data-points")) > 0
    assert painted(watch, "#chart-trials") > 0
    page.locator("#migration").screenshot(path=str(served.screens / "migration.png"))
    assert (served.screens / "migration.png").stat().st_size > 10_000
    # Its CSV: one line per trial, the report's figures.
    with page.expect_download() as download:
        page.get_by_role("button", name="Download migration trials as CSV").click()
    rows = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
    assert [row["trial"] for row in rows] == [
        "claude-shadow/relay/claude-sonnet-4.5",
        "claude-shadow/relay-old/claude-sonnet-4.5",
        "gemini-canary/relay-canary/gemini-2.5-flash",
    ]
    row = rows[0]
    assert (row["state"], row["shadow_requests"], row["shadow_percent"]) == ("active", "3", "100")
    assert row["shadow_cost_nanousd"] == str(sum(r.cost_nanousd for r in served.shadows))
    # The live panels download as CSV too.
    with page.expect_download() as download:
        page.get_by_role("button", name="Download upstream deployments as CSV").click()
    circuits = Path(download.value.path()).read_text().splitlines()
    assert circuits[0] == "key,upstream,model,state,wait_s,inflight"
    assert len(circuits) - 1 == page.locator("#circuits-table tbody tr").count()
    assert not watch.problems, watch.problems
    page.close()


def test_prepaid_balance(browser: Any, served: Served) -> None:
    watch = open_dashboard(browser, served, KEYS["beta"])
    page = watch.page
    charged = sum(r.charged_nanousd for r in served.served_by_gateway("beta"))
    left = TOPUP_USD - Decimal(charged) / 10**9
    assert kpi(page, "balance") == str(left.quantize(Decimal("1e-6")))
    # Under the tenant's warning threshold (50 USD).
    assert "Below the warning threshold" in (page.locator("#kpis").text_content() or "")
    assert not watch.problems, watch.problems
    page.close()


def test_auto_refresh(browser: Any, served: Served) -> None:
    watch = open_dashboard(browser, served, KEYS["acme"], clock=True)
    page = watch.page

    def usage_calls() -> int:
        return sum("/admin/dashboard/usage" in r.url for r in watch.requests)

    before = usage_calls()
    updated = str(page.locator("#updated").text_content())
    page.get_by_label("Auto-refresh (30 s)").focus()
    page.keyboard.press("Space")  # the keyboard is enough
    expect(page.get_by_label("Auto-refresh (30 s)")).to_be_checked()
    page.clock.fast_forward(31_000)
    # A load ends by writing the (page clock's) time: 31 s later than the first.
    expect(page.locator("#updated")).not_to_have_text(updated, timeout=60_000)
    assert usage_calls() > before
    expect(page.locator("#kpi-requests")).to_have_text(f"{len(served.of('acme')):,}")
    # Off again: no more loads, however long the page stays open.
    page.get_by_label("Auto-refresh (30 s)").press("Space")
    expect(page.get_by_label("Auto-refresh (30 s)")).not_to_be_checked()
    page.wait_for_load_state("networkidle")
    settled = usage_calls()
    updated = str(page.locator("#updated").text_content())
    page.clock.fast_forward(120_000)  # fires due timers now, in the page
    page.evaluate("new Promise((done) => setTimeout(done, 0))")
    assert usage_calls() == settled
    assert page.locator("#updated").text_content() == updated
    assert not watch.problems, watch.problems
    page.close()


@pytest.mark.parametrize("key", [KEYS["acme"], READER], ids=["tenant", "operator"])
def test_accessible(browser: Any, served: Served, key: str) -> None:
    """axe-core's WCAG 2.1 A/AA rules (labels, names, contrast, structure) on each view, and
    every control reachable with the keyboard."""
    axe = pytest.importorskip("axe_playwright_python.sync_playwright")
    watch = open_dashboard(browser, served, key)
    page = watch.page
    options = {"runOnly": {"type": "tag", "values": ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]}}
    results = axe.Axe().run(page, options=options)
    assert results.violations_count == 0, results.generate_report()
    reached = set()
    page.locator("#range").focus()
    for _ in range(40):
        page.keyboard.press("Tab")
        reached.add(page.evaluate("document.activeElement.id"))
    wanted = {"auto", "refresh", "csv"}
    if key == READER:
        wanted |= {"only", "circuits-csv", "pools-csv", "trials-csv"}
    assert wanted <= reached, reached
    assert not watch.problems, watch.problems
    page.close()


def test_operator_at_phone_width(browser: Any, served: Served) -> None:
    watch = open_dashboard(
        browser, served, READER, viewport={"width": 390, "height": 844}, device_scale_factor=2
    )
    page = watch.page
    expect(page.locator("#trials table.trial")).to_have_count(3)
    overflow = page.evaluate(
        "document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow <= 1
    assert painted(watch, "#chart-trials") > 0
    screenshot(watch, served, "operator-phone")
    assert not watch.problems, watch.problems
    page.close()


def test_operator_sees_open_circuits_queues_and_redis(
    browser: Any, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    """Live state on a gateway of its own: a circuit opened by failing calls (its cool-down
    left), an admission pool, the Redis store up."""
    fake = FakeUpstream(FakeUpstreamConfig(failure_rate=1.0))
    client = HttpxUpstreamClient(transport=httpx.ASGITransport(app=fake))
    hasher = KeyHasher()
    config = make_config(
        "http://upstream.test/v1",
        gateway={
            "admin_keys": [{"id": "auditor", "hash": hasher.hash(READER), "role": "read-only"}],
            "redis_url": redis_url,
            "redis_prefix": redis_prefix,
            "redis_timeout_s": 2.0,
        },
        admission={"enabled": True, "seats": 4},
        breaker={"deployment": {"open_wait_s": 600, "max_open_wait_s": 600}},
        metering={"ledger_url": f"sqlite:///{tmp_path / 'ledger.db'}", "request_log": False},
    )
    gateway = Gateway(config, upstream_client=client)
    with serve_in_thread(gateway.asgi_app(), lifespan="on", startup_timeout_s=30) as url:
        reader = {"authorization": f"Bearer {READER}"}
        acme = {"authorization": f"Bearer {SUPPORT_KEYS['acme']}"}
        state = ""
        for _ in range(40):  # five failures in a row open it; bounded
            httpx.post(f"{url}/v1/chat/completions", json=chat("gpt-4.1"), headers=acme, timeout=30)
            live = httpx.get(f"{url}/admin/dashboard/live", headers=reader, timeout=30).json()
            state = next(c["state"] for c in live["circuits"] if c["key"] == "fake/gpt-4.1")
            if state == "open":
                break
        assert state == "open"
        watch = open_dashboard(browser, Served(url, [], tmp_path), READER)
        page = watch.page
        row = page.locator("#circuits-table tbody tr", has_text="gpt-4.1").first
        cells = row.locator("td")
        expect(cells.nth(2)).to_have_text("open")
        assert 0 < float(str(cells.nth(3).text_content())) <= 600
        expect(page.locator("#health")).to_contain_text("redis — up")
        pools = page.locator("#pools-table tbody tr")
        assert pools.count() >= 1
        assert pools.first.locator("td").nth(1).text_content() == "4"
        assert number(kpi(page, "open-circuits")) >= 1
        assert not watch.problems, watch.problems
        page.close()


def test_committed_screenshots_exist() -> None:
    """The copies people look at without running anything (refreshed by hand from a run)."""
    images = Path(__file__).parent.parent / "docs" / "images"
    for name in (
        "dashboard-tenant.png",
        "dashboard-operator.png",
        "dashboard-phone.png",
        "dashboard-migration.png",
    ):
        assert (images / name).stat().st_size > 10_000
